"""Flat rows for CSV and JSON, derived from the column registry (wwcli/report/columns.py):
weightwatcher's column names, one row per layer."""

from __future__ import annotations

from collections.abc import Sequence

from wwcli.report.columns import (
    ANALYZE_REGISTRY,
    DESCRIBE_REGISTRY,
    Row,
    Value,
    make_row,
    row_columns,
    row_keys,
    row_of,
)
from wwcli.results import CheckpointListing, CheckpointReport

__all__ = [
    "ANALYZE_COLUMNS",
    "DESCRIBE_COLUMNS",
    "Row",
    "Value",
    "analyze_columns",
    "analyze_rows",
    "describe_columns",
    "listing_rows",
    "run_groups",
]

ANALYZE_COLUMNS: tuple[str, ...] = row_keys(ANALYZE_REGISTRY)
"""The built-in columns of an analyze row, in order. Keys are only ever added, never renamed."""

DESCRIBE_COLUMNS: tuple[str, ...] = row_keys(DESCRIBE_REGISTRY)
"""The built-in columns of a describe row, in order."""


def run_groups(reports: Sequence[CheckpointReport]) -> tuple[str, ...]:
    """The optional groups any of the reports computed (a run's reports share its settings)."""
    groups: dict[str, None] = {}
    for report in reports:
        groups.update(dict.fromkeys(report.groups))
    return tuple(groups)


def analyze_columns(reports: Sequence[CheckpointReport] = ()) -> tuple[str, ...]:
    """The columns of an analyze row now (the registry may have grown since import): the
    built-in ones, and those of the optional groups the reports computed, in registry order."""
    return row_keys(ANALYZE_REGISTRY, run_groups(reports))


def describe_columns() -> tuple[str, ...]:
    """The columns of a describe row now."""
    return row_keys(DESCRIBE_REGISTRY)


def analyze_rows(report: CheckpointReport) -> list[Row]:
    """Every analyzed layer of a report, as rows."""
    columns = row_columns(ANALYZE_REGISTRY, report.groups)
    return [row_of(columns, report.checkpoint, result) for result in report.layers]


def listing_rows(listing: CheckpointListing) -> list[Row]:
    """Every listed layer of a describe listing, as rows."""
    return [make_row(DESCRIBE_REGISTRY, listing.checkpoint, layer) for layer in listing.layers]
