"""Flat rows for CSV and JSON, derived from the column registry (wwcli/report/columns.py):
weightwatcher's column names, one row per layer."""

from __future__ import annotations

from wwcli.report.columns import (
    ANALYZE_REGISTRY,
    DESCRIBE_REGISTRY,
    Row,
    Value,
    make_row,
    row_keys,
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
]

ANALYZE_COLUMNS: tuple[str, ...] = row_keys(ANALYZE_REGISTRY)
"""The built-in columns of an analyze row, in order. Keys are only ever added, never renamed."""

DESCRIBE_COLUMNS: tuple[str, ...] = row_keys(DESCRIBE_REGISTRY)
"""The built-in columns of a describe row, in order."""


def analyze_columns() -> tuple[str, ...]:
    """The columns of an analyze row now (the registry may have grown since import)."""
    return row_keys(ANALYZE_REGISTRY)


def describe_columns() -> tuple[str, ...]:
    """The columns of a describe row now."""
    return row_keys(DESCRIBE_REGISTRY)


def analyze_rows(report: CheckpointReport) -> list[Row]:
    """Every analyzed layer of a report, as rows."""
    return [make_row(ANALYZE_REGISTRY, report.checkpoint, result) for result in report.layers]


def listing_rows(listing: CheckpointListing) -> list[Row]:
    """Every listed layer of a describe listing, as rows."""
    return [make_row(DESCRIBE_REGISTRY, listing.checkpoint, layer) for layer in listing.layers]
