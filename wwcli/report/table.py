"""Tables for people (rich): analyze results with very heavy-tailed rows highlighted, and
describe listings. Columns come from the registry (wwcli/report/columns.py); every cell is
plain text, never markup. Formatters return text; the CLI decides where it goes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

from wwcli.engine.results import Verdict
from wwcli.report.columns import (
    ANALYZE_REGISTRY,
    DESCRIBE_REGISTRY,
    VERDICT_WORDS,
    Item,
    TableView,
    number,
    table_views,
)
from wwcli.report.escape import printable
from wwcli.results import (
    QUANTIZED_FORMATS,
    CheckpointListing,
    CheckpointReport,
    LayerResult,
    SkippedLayer,
    Summary,
    summarize,
)

if TYPE_CHECKING:
    from rich.console import Console

# rich's table, box and text modules are imported where a table is drawn: the summary lines
# (every analyze run's stderr) need none of them.

__all__ = [
    "PLAIN_TABLE_ROWS",
    "VERDICT_STYLES",
    "VERDICT_WORDS",
    "fold_name",
    "listing_summary",
    "render_analyze_table",
    "render_describe_table",
    "summary_lines",
]

VERDICT_STYLES: dict[Verdict, str] = {
    Verdict.OVER_TRAINED: "bold red",
    Verdict.UNDER_TRAINED: "yellow",
    Verdict.TYPICAL: "",
    Verdict.FAILED: "dim",
}
"""Row style per verdict."""

PLAIN_TABLE_ROWS = 2000
"""Past this many rows a table is laid out as plain text: rich's layout costs about 1.2 ms a row
(36 s for 30,000 tensors), plain columns a few microseconds."""

_CELL_PADDING = 3
"""Characters a column takes beyond its text in a SIMPLE_HEAD table (padding and separator)."""
_TABLE_EDGES = 2
"""Characters a SIMPLE_HEAD table takes at its two edges."""
_FOLDED_NAME_WIDTH = 16
"""Narrowest the name column gets before low-priority columns are dropped: names fold."""


def fold_name(name: str, width: int) -> str:
    """`name` broken into lines of at most `width` characters, after dots where it can be
    (encoder.layer.0. / attention.self.query), inside a token only when one is longer."""
    if len(name) <= width:
        return name
    lines: list[str] = []
    line = ""
    for token in name.replace(".", ".\0").split("\0"):
        while len(token) > width:  # one token longer than the column: fold it where it must
            if line:
                lines.append(line)
                line = ""
            lines.append(token[:width])
            token = token[width:]
        if len(line) + len(token) > width:
            lines.append(line)
            line = token
        else:
            line += token
    if line:
        lines.append(line)
    return "\n".join(lines)


def _fit_columns(
    views: Sequence[TableView[Item]], items: Sequence[Item], width: int
) -> tuple[list[TableView[Item]], int]:
    """The columns whose content fits in `width`, dropping the least important first, in order,
    and the width left for the name column (which folds; numbers never wrap)."""
    longest: dict[str, int] = {}
    for shown in views:
        widest = len(shown.header)
        for item in items:
            widest = max(widest, len(shown.cell(item)))
        longest[shown.header] = widest

    def needed(view: TableView[Item]) -> int:
        wanted = longest[view.header]
        if not view.numeric:
            wanted = min(wanted, _FOLDED_NAME_WIDTH)
        return wanted + _CELL_PADDING

    kept = list(views)
    for priority in sorted({view.priority for view in views}, reverse=True):
        if sum(needed(view) for view in kept) <= width or priority == 0:
            break
        kept = [view for view in kept if view.priority != priority]
    others = sum(needed(view) for view in kept if view.header != "name")
    name_width = max(_FOLDED_NAME_WIDTH, width - others - _CELL_PADDING - _TABLE_EDGES)
    return kept, min(name_width, longest.get("name", name_width))


def _console(width: int, color: bool) -> tuple[Console, io.StringIO]:
    from rich.console import Console

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


def _render_table(
    console: Console,
    buffer: io.StringIO,
    title: str,
    views: Sequence[TableView[Item]],
    items: Sequence[Item],
    styles: Sequence[str | None],
    width: int,
) -> None:
    """Lay the items out under `views`: rich for a screenful, plain text for huge listings."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    if len(items) > PLAIN_TABLE_ROWS:
        buffer.write(
            _plain_table(
                title,
                [view.header for view in views],
                [[view.cell(item) for view in views] for item in items],
                [view.numeric for view in views],
            )
        )
        return
    kept, name_width = _fit_columns(views, items, width)
    table = Table(box=box.SIMPLE_HEAD, title=Text(title), title_justify="left")
    for view in kept:
        table.add_column(
            view.header,
            justify="right" if view.numeric else "left",
            overflow="fold",
            # Numbers never wrap; names arrive folded at dots (fold_name) and must not be
            # re-folded by rich mid-token: only the other text columns wrap.
            no_wrap=view.numeric or view.header == "name",
        )
    for item, style in zip(items, styles, strict=True):
        cells = [
            Text(
                fold_name(view.cell(item), name_width) if view.header == "name" else view.cell(item)
            )
            for view in kept
        ]
        table.add_row(*cells, style=style)
    console.print(table)


def _count(number_: int, noun: str) -> str:
    return f"{number_} {noun}" if number_ == 1 else f"{number_} {noun}s"


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
    """The summary under a table, also printed to stderr for csv/json runs (not yet escaped:
    the printer escapes what comes from the file)."""
    summary = summary or summarize(report)
    by_id: dict[int, LayerResult] = {result.spec.layer_id: result for result in report.layers}
    lines = [
        f"{report.checkpoint} ({report.format}): {_count(summary.layers_analyzed, 'layer')} "
        f"analyzed, {summary.layers_skipped} skipped, "
        f"{_count(summary.fits_failed, 'failed fit')}; "
        f"mean alpha {number(summary.means['alpha'])}"
    ]
    for note in (report.source_note, report.ids_note):
        if note:
            lines.append(f"note: {note}")

    def named(ids: Sequence[int], limit: int = 10) -> str:
        shown = ", ".join(
            f"{i} {by_id[i].spec.name} (alpha {number(by_id[i].metrics.alpha)})"
            for i in ids[:limit]
        )
        return shown + (f", ... (+{len(ids) - limit})" if len(ids) > limit else "")

    if summary.very_heavy_tailed:
        lines.append(
            f"{_count(len(summary.very_heavy_tailed), 'layer')} very heavy-tailed "
            f"(alpha < 2): {named(summary.very_heavy_tailed)}"
        )
    if summary.light_tail:
        lines.append(
            f"{_count(len(summary.light_tail), 'layer')} with a light tail (alpha > 6): "
            f"{named(summary.light_tail)}"
        )
    lines.extend(_skipped_lines(report.skipped))
    lines.extend(_base_lines(report))
    return lines


def _base_lines(report: CheckpointReport, limit: int = 8) -> list[str]:
    """With --base: the layers it had no match for, and the base's layers this one lacks."""
    if "delta" not in report.groups:
        return []
    lines = []
    unmatched = [
        result
        for result in report.layers
        if result.diagnostics is not None
        and result.diagnostics.delta is not None
        and result.diagnostics.delta.base_name is None
    ]
    if unmatched:
        shown = ", ".join(f"{r.spec.layer_id} {r.spec.name}" for r in unmatched[:limit])
        more = f", ... (+{len(unmatched) - limit})" if len(unmatched) > limit else ""
        lines.append(
            f"note: {_count(len(unmatched), 'layer')} with no layer of the same name and shape "
            f"in the base (no delta_* numbers): {shown}{more}"
        )
    if report.base_unmatched:
        names = report.base_unmatched
        more = f", ... (+{len(names) - limit})" if len(names) > limit else ""
        lines.append(
            f"note: {_count(len(names), 'layer')} of the base not in this checkpoint: "
            f"{', '.join(names[:limit])}{more}"
        )
    return lines


def listing_summary(listing: CheckpointListing) -> str:
    """describe's closing line: "53 layers, 39 would be analyzed"."""
    analyzable = sum(layer.skip_reason is None for layer in listing.layers)
    return f"{_count(len(listing.layers), 'layer')}, {analyzable} would be analyzed"


def render_analyze_table(report: CheckpointReport, *, width: int, color: bool) -> str:
    """The analyzed layers of one checkpoint as a table, then its summary."""
    from rich.text import Text

    console, buffer = _console(width, color)
    title = printable(report.checkpoint)
    if report.layers:
        _render_table(
            console,
            buffer,
            title,
            table_views(ANALYZE_REGISTRY, report.groups),
            report.layers,
            [VERDICT_STYLES[result.metrics.verdict] or None for result in report.layers],
            width,
        )
    else:
        console.print(Text(f"{title}: no layer was analyzed"))
    for line in summary_lines(report):
        console.print(Text(printable(line)))
    return buffer.getvalue()


def render_describe_table(listing: CheckpointListing, *, width: int, color: bool) -> str:
    """describe's listing of one checkpoint as a table, its notes and its summary line."""
    from rich.text import Text

    console, buffer = _console(width, color)
    _render_table(
        console,
        buffer,
        printable(listing.checkpoint),
        table_views(
            DESCRIBE_REGISTRY, ("quantized",) if listing.format in QUANTIZED_FORMATS else ()
        ),
        listing.layers,
        [None if layer.skip_reason is None else "dim" for layer in listing.layers],
        width,
    )
    for note in (listing.source_note, listing.ids_note):
        if note:
            console.print(Text(printable(f"note: {note}")))
    console.print(Text(listing_summary(listing)))
    return buffer.getvalue()
