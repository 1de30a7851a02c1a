"""The one Formatter protocol every output format implements, and the formats by name.

A formatter turns run-layer values into text and never prints: the CLI decides where the text
goes (stdout, a file). A streaming formatter (the table) can show each checkpoint's report as
soon as it is done; the others render the whole run at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from wwcli.results import CheckpointListing, CheckpointReport, RunResult


class Formatter(Protocol):
    """Renders an analyze run, one checkpoint's report, or describe's listings as text."""

    @property
    def streams(self) -> bool:
        """True when render_report's texts, one per report as it arrives, make up the output."""
        ...

    def render_report(self, report: CheckpointReport) -> str:
        """One checkpoint's part of the output (streaming formatters)."""
        ...

    def render(self, run: RunResult) -> str:
        """The whole output of an analyze run."""
        ...

    def render_listings(self, listings: Sequence[CheckpointListing]) -> str:
        """describe's whole output."""
        ...


@dataclass(frozen=True)
class TableFormatter:
    """Tables for people (wwcli/report/table.py), one per checkpoint, streamed."""

    width: int
    """Line width to lay the table out in."""
    color: bool
    """Whether to style rows (ANSI)."""

    @property
    def streams(self) -> bool:
        """Always: each checkpoint's table is shown as soon as it is done."""
        return True

    def render_report(self, report: CheckpointReport) -> str:
        """The table and summary of one checkpoint."""
        from wwcli.report.table import render_analyze_table

        return render_analyze_table(report, width=self.width, color=self.color)

    def render(self, run: RunResult) -> str:
        """Every checkpoint's table, in input order."""
        return "".join(self.render_report(report) for report in run.reports)

    def render_listings(self, listings: Sequence[CheckpointListing]) -> str:
        """describe's tables."""
        from wwcli.report.table import render_describe_table

        return "".join(
            render_describe_table(listing, width=self.width, color=self.color)
            for listing in listings
        )


@dataclass(frozen=True)
class CsvFormatter:
    """CSV: a header, then one row per layer of every checkpoint."""

    @property
    def streams(self) -> bool:
        """Never: one header for the whole run."""
        return False

    def render_report(self, report: CheckpointReport) -> str:
        """One checkpoint as a CSV document of its own."""
        from wwcli.report.csv import render_csv
        from wwcli.report.rows import analyze_columns, analyze_rows

        return render_csv(analyze_rows(report), analyze_columns([report]))

    def render(self, run: RunResult) -> str:
        """Every analyzed layer of the run."""
        from wwcli.report.csv import render_csv
        from wwcli.report.rows import analyze_columns, analyze_rows

        rows = [row for report in run.reports for row in analyze_rows(report)]
        return render_csv(rows, analyze_columns(run.reports))

    def render_listings(self, listings: Sequence[CheckpointListing]) -> str:
        """Every listed layer."""
        from wwcli.report.csv import render_csv
        from wwcli.report.rows import describe_columns, listing_rows

        rows = [row for listing in listings for row in listing_rows(listing)]
        return render_csv(rows, describe_columns())


@dataclass(frozen=True)
class JsonFormatter:
    """JSON (DESIGN.md's document), with the run's settings as `options`."""

    @property
    def streams(self) -> bool:
        """Never: one document for the whole run."""
        return False

    def render_report(self, report: CheckpointReport) -> str:
        """One checkpoint's object, with no options."""
        from wwcli.report.json import checkpoint_object, render_json

        return render_json(checkpoint_object(report, {}))

    def render(self, run: RunResult) -> str:
        """The run's document."""
        from wwcli.report.json import render_json, run_document

        return render_json(run_document(run))

    def render_listings(self, listings: Sequence[CheckpointListing]) -> str:
        """describe's document."""
        from wwcli.report.json import describe_document, render_json

        return render_json(describe_document(listings))


def formatter_for(name: str, *, width: int = 100_000, color: bool = False) -> Formatter:
    """The formatter of an output format ("table", "csv", "json", and for CI "github",
    "junit", "markdown", "sarif")."""
    if name == "table":
        return TableFormatter(width, color)
    if name == "csv":
        return CsvFormatter()
    if name == "json":
        return JsonFormatter()
    # Only the CI formats need wwcli/report/ci.py (XML, SARIF, hashing): not imported otherwise.
    from wwcli.report.ci import GithubFormatter, JunitFormatter, MarkdownFormatter, SarifFormatter

    formatters: dict[str, Formatter] = {
        "table": TableFormatter(width, color),
        "csv": CsvFormatter(),
        "json": JsonFormatter(),
        "github": GithubFormatter(),
        "junit": JunitFormatter(),
        "markdown": MarkdownFormatter(),
        "sarif": SarifFormatter(),
    }
    try:
        return formatters[name]
    except KeyError:
        raise ValueError(f"name must be one of {sorted(formatters)}, got {name!r}") from None
