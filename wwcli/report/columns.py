"""The one column registry: every per-layer value a report shows, once. CSV and JSON rows and
the terminal table all derive from it, so a new metric is a field in the engine's result plus
one entry here.

An entry has a `key` (its CSV header and JSON key; None for a table-only column such as the
shape) and the value it takes from a layer; a `table` view, if the terminal shows it, says its
header, how its cell reads, where it sits (`order`) and how soon it is dropped on a narrow
terminal (`priority`, lower is kept longer). Row keys follow registry order, and keys are only
ever added (DESIGN.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from wwcli.engine.results import Verdict
from wwcli.report.escape import printable
from wwcli.results import LayerResult, ListedLayer

Value = str | int | float | bool | None
Row = dict[str, Value]
Item = TypeVar("Item", LayerResult, ListedLayer)

VERDICT_WORDS: dict[Verdict, str] = {
    Verdict.OVER_TRAINED: "possibly over-trained",
    Verdict.UNDER_TRAINED: "possibly under-trained",
    Verdict.TYPICAL: "typical",
    Verdict.FAILED: "fit failed",
}
"""How the table words a verdict: a heuristic, so the words stay modest."""


@dataclass(frozen=True)
class TableView(Generic[Item]):
    """How a column shows in the terminal table."""

    header: str
    """Its header."""
    cell: Callable[[Item], str]
    """The cell's text (escaped for the terminal where it comes from the file)."""
    order: float
    """Where it sits, left to right (sorted; ties keep registry order)."""
    priority: int
    """Lower is kept longer on a narrow terminal; 0 is never dropped."""
    numeric: bool = True
    """Right-aligned and never wrapped; False: left-aligned text that may fold."""


@dataclass(frozen=True)
class Column(Generic[Item]):
    """One value per layer, for rows (CSV, JSON) and, with a `table` view, the table."""

    key: str | None
    """CSV header and JSON key; None for a table-only column."""
    value: Callable[[str, Item], Value]
    """The value, from the checkpoint label and the layer (floats: NaN becomes null/empty)."""
    table: TableView[Item] | None = None
    """How the terminal table shows it; None: rows only."""


def number(value: float, digits: int = 3) -> str:
    """A metric as the table shows it: fixed digits, scientific when tiny or huge, "-" for NaN."""
    if not math.isfinite(value):
        return "-"
    magnitude = abs(value)
    if magnitude != 0 and (magnitude >= 1e5 or magnitude < 10 ** -(digits - 1)):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


def shape_text(shape: tuple[int, ...]) -> str:
    """A tensor shape as people write it: 784x300, or "-" for none."""
    return "x".join(str(size) for size in shape) if shape else "-"


def finite_or_none(value: float) -> float | None:
    """The float itself, or None for NaN and infinities (JSON null, empty CSV cell)."""
    return value if math.isfinite(value) else None


def _verdict_cell(result: LayerResult) -> str:
    words = VERDICT_WORDS[result.metrics.verdict]
    message = result.metrics.fit.message
    return printable(f"{words}: {message}") if message else words


def _spikes(result: LayerResult) -> int | None:
    spikes = result.metrics.fit.num_pl_spikes
    return spikes if spikes >= 0 else None


def _metric(name: str) -> Callable[[str, LayerResult], Value]:
    return lambda _, result: getattr(result.metrics, name)


def _fit(name: str) -> Callable[[str, LayerResult], Value]:
    return lambda _, result: getattr(result.metrics.fit, name)


def _shown(name: str) -> Callable[[LayerResult], str]:
    return lambda result: number(getattr(result.metrics, name))


def _shown_fit(name: str) -> Callable[[LayerResult], str]:
    return lambda result: number(getattr(result.metrics.fit, name))


View = TableView[LayerResult]

ANALYZE_REGISTRY: list[Column[LayerResult]] = [
    Column("checkpoint", lambda checkpoint, _: checkpoint),
    Column(
        "layer_id", lambda _, r: r.spec.layer_id, View("id", lambda r: str(r.spec.layer_id), 0, 0)
    ),
    Column(
        "name",
        lambda _, r: r.spec.name,
        View("name", lambda r: printable(r.spec.name), 1, 0, numeric=False),
    ),
    Column(
        "layer_type",
        lambda _, r: r.spec.layer_type.value,
        View("type", lambda r: r.spec.layer_type.value, 2, 3, numeric=False),
    ),
    Column(None, lambda _, r: None, View("shape", lambda r: shape_text(r.spec.shape), 3, 5, False)),
    Column("N", _metric("N")),
    Column("M", _metric("M")),
    Column("rf", _metric("rf")),
    Column(
        "num_evals", _metric("num_evals"), View("evals", lambda r: str(r.metrics.num_evals), 4, 4)
    ),
    Column("alpha", _fit("alpha"), View("alpha", _shown_fit("alpha"), 5, 0)),
    Column("D", _fit("D"), View("D", _shown_fit("D"), 6, 2)),
    Column("sigma", _fit("sigma")),
    Column("xmin", _fit("xmin"), View("xmin", _shown_fit("xmin"), 7, 6)),
    Column("xmax", _fit("xmax")),
    Column(
        "num_pl_spikes",
        lambda _, r: _spikes(r),
        View("spikes", lambda r: str(_spikes(r)) if _spikes(r) is not None else "-", 9, 6),
    ),
    Column("lambda_max", _metric("lambda_max"), View("lambda_max", _shown("lambda_max"), 8, 2)),
    Column("spectral_norm", _metric("spectral_norm")),
    Column("norm", _metric("norm")),
    Column("log_norm", _metric("log_norm"), View("log_norm", _shown("log_norm"), 10, 7)),
    Column("log_spectral_norm", _metric("log_spectral_norm")),
    Column("alpha_weighted", _metric("alpha_weighted")),
    Column("log_alpha_norm", _metric("log_alpha_norm")),
    Column(
        "stable_rank", _metric("stable_rank"), View("stable_rank", _shown("stable_rank"), 11, 7)
    ),
    Column("entropy", _metric("entropy")),
    Column("matrix_rank", _metric("matrix_rank")),
    Column("status", lambda _, r: r.metrics.fit.status.value),
    Column("warning", _metric("warning")),
    Column(
        "verdict",
        lambda _, r: r.metrics.verdict.value,
        View("verdict", _verdict_cell, 12, 1, numeric=False),
    ),
    Column("message", _fit("message")),
]
"""Every column of `analyze`, in row order."""


def _reason(listed: ListedLayer) -> str:
    return listed.skip_reason or ""


Listed = TableView[ListedLayer]

DESCRIBE_REGISTRY: list[Column[ListedLayer]] = [
    Column("checkpoint", lambda checkpoint, _: checkpoint),
    Column(
        "layer_id",
        lambda _, item: item.spec.layer_id,
        Listed("id", lambda item: str(item.spec.layer_id), 0, 0),
    ),
    Column(
        "name",
        lambda _, item: item.spec.name,
        Listed("name", lambda item: printable(item.spec.name), 1, 0, numeric=False),
    ),
    Column(
        "layer_type",
        lambda _, item: item.spec.layer_type.value,
        Listed("type", lambda item: item.spec.layer_type.value, 2, 3, numeric=False),
    ),
    Column(
        "shape",
        lambda _, item: shape_text(item.spec.shape),
        Listed("shape", lambda item: shape_text(item.spec.shape), 3, 5, numeric=False),
    ),
    Column("dtype", lambda _, item: item.spec.dtype),
    Column("N", lambda _, item: item.spec.N, Listed("N", lambda item: str(item.spec.N), 4, 6)),
    Column("M", lambda _, item: item.spec.M, Listed("M", lambda item: str(item.spec.M), 5, 6)),
    Column("rf", lambda _, item: item.spec.rf, Listed("rf", lambda item: str(item.spec.rf), 6, 6)),
    Column(
        "num_evals",
        lambda _, item: item.spec.num_evals,
        Listed("evals", lambda item: str(item.spec.num_evals), 7, 4),
    ),
    Column("analyzable", lambda _, item: item.skip_reason is None),
    Column(
        "reason",
        lambda _, item: _reason(item),
        Listed(
            "analyzed",
            lambda item: (
                "yes" if item.skip_reason is None else printable(f"no: {item.skip_reason}")
            ),
            8,
            1,
            numeric=False,
        ),
    ),
]
"""Every column of `describe`, in row order."""


def row_keys(registry: list[Column[Item]]) -> tuple[str, ...]:
    """The row keys of a registry, in order (the CSV header)."""
    return tuple(column.key for column in registry if column.key is not None)


def make_row(registry: list[Column[Item]], checkpoint: str, item: Item) -> Row:
    """One layer as a row of the registry's keys; non-finite floats become None."""
    row: Row = {}
    for column in registry:
        if column.key is None:
            continue
        value = column.value(checkpoint, item)
        row[column.key] = finite_or_none(float(value)) if isinstance(value, float) else value
    return row


def table_views(registry: list[Column[Item]]) -> list[TableView[Item]]:
    """The table's columns, left to right."""
    views = [column.table for column in registry if column.table is not None]
    return sorted(views, key=lambda view: view.order)


@contextlib.contextmanager
def registered(registry: list[Column[Item]], column: Column[Item]) -> Iterator[None]:
    """`column` appended to `registry` while the block runs (for tests and plug-ins)."""
    registry.append(column)
    try:
        yield
    finally:
        registry.remove(column)
