"""Tables for people (rich): analyze results with over-trained rows highlighted, and describe
listings. Formatters return text; the CLI decides where it goes."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from wwcli.analysis import CheckpointReport, LayerResult, SkippedLayer, Summary, summarize
from wwcli.engine.results import Verdict
from wwcli.report.escape import printable
from wwcli.report.rows import Row, shape_text

VERDICT_STYLES: dict[Verdict, str] = {
    Verdict.OVER_TRAINED: "bold red",
    Verdict.UNDER_TRAINED: "yellow",
    Verdict.TYPICAL: "",
    Verdict.FAILED: "dim",
}
"""Row style per verdict."""

VERDICT_WORDS: dict[Verdict, str] = {
    Verdict.OVER_TRAINED: "possibly over-trained",
    Verdict.UNDER_TRAINED: "possibly under-trained",
    Verdict.TYPICAL: "typical",
    Verdict.FAILED: "fit failed",
}
"""How the table words a verdict: a heuristic, so the words stay modest."""


def _number(value: float, digits: int = 3) -> str:
    if not math.isfinite(value):
        return "-"
    magnitude = abs(value)
    if magnitude != 0 and (magnitude >= 1e5 or magnitude < 10 ** -(digits - 1)):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


@dataclass(frozen=True)
class _Column:
    header: str
    cell: Callable[[LayerResult], str]
    priority: int
    """Lower numbers are kept first on a narrow terminal."""
    numeric: bool = True


def _verdict_cell(result: LayerResult) -> str:
    words = VERDICT_WORDS[result.metrics.verdict]
    message = result.metrics.fit.message
    return printable(f"{words}: {message}") if message else words


_ANALYZE_COLUMNS: tuple[_Column, ...] = (
    _Column("id", lambda r: str(r.spec.layer_id), 0),
    _Column("name", lambda r: printable(r.spec.name), 0, numeric=False),
    _Column("type", lambda r: r.spec.layer_type.value, 3, numeric=False),
    _Column("shape", lambda r: shape_text(r.spec.shape), 5, numeric=False),
    _Column("evals", lambda r: str(r.metrics.num_evals), 4),
    _Column("alpha", lambda r: _number(r.metrics.alpha), 0),
    _Column("D", lambda r: _number(r.metrics.fit.D), 2),
    _Column("xmin", lambda r: _number(r.metrics.fit.xmin), 6),
    _Column("lambda_max", lambda r: _number(r.metrics.lambda_max), 2),
    _Column(
        "spikes",
        lambda r: str(r.metrics.fit.num_pl_spikes) if r.metrics.fit.num_pl_spikes >= 0 else "-",
        6,
    ),
    _Column("log_norm", lambda r: _number(r.metrics.log_norm), 7),
    _Column("stable_rank", lambda r: _number(r.metrics.stable_rank), 7),
    _Column("verdict", _verdict_cell, 1, numeric=False),
)


_CELL_PADDING = 3
"""Characters a column takes beyond its text in a SIMPLE_HEAD table (padding and separator)."""
_FOLDED_NAME_WIDTH = 16
"""Narrowest the name column gets before low-priority columns are dropped: names fold."""


def _fitting_columns(
    columns: Sequence[_Column], results: Sequence[LayerResult], width: int
) -> list[_Column]:
    """The columns whose content fits in `width`, dropping the least important first, in order.
    The name column may fold to a narrower width; numbers never wrap."""

    def needed(column: _Column) -> int:
        longest = max([len(column.header), *(len(column.cell(result)) for result in results)])
        if not column.numeric:
            longest = min(longest, _FOLDED_NAME_WIDTH)
        return longest + _CELL_PADDING

    widths = {column.header: needed(column) for column in columns}
    kept = list(columns)
    for priority in sorted({column.priority for column in columns}, reverse=True):
        if sum(widths[column.header] for column in kept) <= width or priority == 0:
            break
        kept = [column for column in kept if column.priority != priority]
    return kept


def _console(width: int, color: bool) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=width,
        force_terminal=color,
        no_color=not color,
        color_system="standard" if color else None,
        highlight=False,
        emoji=False,
        soft_wrap=False,
    )
    return console, buffer


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _skipped_lines(skipped: Sequence[SkippedLayer], limit: int = 8) -> list[str]:
    by_reason: dict[str, list[SkippedLayer]] = {}
    for layer in skipped:
        by_reason.setdefault(layer.reason, []).append(layer)
    lines = []
    for reason, layers in by_reason.items():
        shown = ", ".join(f"{layer.layer_id} {layer.name}" for layer in layers[:limit])
        more = f", ... (+{len(layers) - limit})" if len(layers) > limit else ""
        lines.append(f"skipped ({reason}): {shown}{more}")
    return lines


def summary_lines(report: CheckpointReport, summary: Summary | None = None) -> list[str]:
    """The summary under a table, also printed to stderr for csv/json runs."""
    summary = summary or summarize(report)
    by_id = {result.spec.layer_id: result for result in report.layers}
    lines = [
        f"{report.checkpoint} ({report.format}): {_count(summary.layers_analyzed, 'layer')} "
        f"analyzed, {summary.layers_skipped} skipped, "
        f"{_count(summary.fits_failed, 'failed fit')}; "
        f"mean alpha {_number(summary.means['alpha'])}"
    ]
    for note in (report.source_note, report.ids_note):
        if note:
            lines.append(f"note: {note}")

    def named(ids: Sequence[int], limit: int = 10) -> str:
        shown = ", ".join(
            f"{i} {by_id[i].spec.name} (alpha {_number(by_id[i].metrics.alpha)})"
            for i in ids[:limit]
        )
        return shown + (f", ... (+{len(ids) - limit})" if len(ids) > limit else "")

    if summary.over_trained:
        lines.append(
            f"{_count(len(summary.over_trained), 'layer')} very heavy-tailed (alpha < 2), "
            f"possibly over-trained: {named(summary.over_trained)}"
        )
    if summary.under_trained:
        lines.append(
            f"{_count(len(summary.under_trained), 'layer')} light-tailed (alpha > 6), "
            f"possibly under-trained: {named(summary.under_trained)}"
        )
    lines.extend(_skipped_lines(report.skipped))
    return lines


PLAIN_TABLE_ROWS = 2000
"""Past this many rows a table is laid out as plain text: rich's layout costs about 1.2 ms a row
(36 s for 30,000 tensors), plain columns a few microseconds."""


def _plain_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool]
) -> str:
    """A table as aligned plain-text columns (no folding, no styles): for very long listings."""
    widths = [len(header) for header in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))

    def line(cells: Sequence[str]) -> str:
        laid = [
            cell.rjust(width) if is_numeric else cell.ljust(width)
            for cell, width, is_numeric in zip(cells, widths, numeric, strict=True)
        ]
        return "  ".join(laid).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([title, line(headers), rule, *(line(row) for row in rows)]) + "\n"


def _rich_table(
    title: str,
    columns: Sequence[tuple[str, bool]],
    rows: Sequence[tuple[Sequence[str], str | None]],
    console: Console,
    *,
    wrap_numbers: bool,
) -> None:
    """Print a SIMPLE_HEAD table: every cell is plain text, never markup."""
    table = Table(box=box.SIMPLE_HEAD, title=Text(title), title_justify="left")
    for header, numeric in columns:
        table.add_column(
            header,
            justify="right" if numeric else "left",
            overflow="fold",
            no_wrap=numeric and not wrap_numbers,
        )
    for cells, style in rows:
        table.add_row(*(Text(cell) for cell in cells), style=style)
    console.print(table)


def render_analyze_table(report: CheckpointReport, *, width: int, color: bool) -> str:
    """The analyzed layers of one checkpoint as a table, then its summary."""
    console, buffer = _console(width, color)
    columns = _fitting_columns(_ANALYZE_COLUMNS, report.layers, width)
    title = printable(report.checkpoint)
    if len(report.layers) > PLAIN_TABLE_ROWS:
        buffer.write(
            _plain_table(
                title,
                [column.header for column in columns],
                [[column.cell(result) for column in columns] for result in report.layers],
                [column.numeric for column in columns],
            )
        )
    elif report.layers:
        _rich_table(
            title,
            [(column.header, column.numeric) for column in columns],
            [
                (
                    [column.cell(result) for column in columns],
                    VERDICT_STYLES[result.metrics.verdict] or None,
                )
                for result in report.layers
            ],
            console,
            wrap_numbers=False,
        )
    else:
        console.print(Text(f"{title}: no layer was analyzed"))
    for line in summary_lines(report):
        console.print(Text(printable(line)))
    return buffer.getvalue()


_DESCRIBE_HEADERS = ("id", "name", "type", "shape", "N", "M", "rf", "evals", "analyzed")
_DESCRIBE_KEYS = ("layer_id", "name", "layer_type", "shape", "N", "M", "rf", "num_evals", "reason")
_DESCRIBE_NUMERIC = tuple(header in ("id", "N", "M", "rf", "evals") for header in _DESCRIBE_HEADERS)


def render_describe_table(
    checkpoint: str,
    notes: Sequence[str | None],
    rows: Sequence[Row],
    *,
    width: int,
    color: bool,
) -> str:
    """describe's listing of one checkpoint as a table."""
    console, buffer = _console(width, color)
    cells: list[tuple[list[str], str | None]] = []
    for row in rows:
        line = [printable(str(row[key])) for key in _DESCRIBE_KEYS]
        line[-1] = "yes" if row["analyzable"] else printable(f"no: {row['reason']}")
        cells.append((line, None if row["analyzable"] else "dim"))
    title = printable(checkpoint)
    if len(rows) > PLAIN_TABLE_ROWS:
        buffer.write(
            _plain_table(title, _DESCRIBE_HEADERS, [line for line, _ in cells], _DESCRIBE_NUMERIC)
        )
    else:
        _rich_table(
            title,
            list(zip(_DESCRIBE_HEADERS, _DESCRIBE_NUMERIC, strict=True)),
            cells,
            console,
            wrap_numbers=True,
        )
    for note in notes:
        if note:
            console.print(Text(printable(f"note: {note}")))
    return buffer.getvalue()
