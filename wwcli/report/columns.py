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
import numbers
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from wwcli.engine.results import Verdict
from wwcli.report.escape import printable
from wwcli.results import LayerResult, ListedLayer

Value = str | int | float | bool | None
Row = dict[str, Value]
Item = TypeVar("Item", LayerResult, ListedLayer)

VERDICT_WORDS: dict[Verdict, str] = {
    Verdict.OVER_TRAINED: "very heavy-tailed",
    Verdict.UNDER_TRAINED: "light tail",
    Verdict.TYPICAL: "typical",
    Verdict.FAILED: "fit failed",
}
"""How people read wwcli's label for a layer's alpha: a description of its spectrum's tail
(alpha < 2, alpha > 6 by default), never a finding of over- or under-training, which alpha alone
does not support (README, "What alpha does not tell you"). The `warning` column keeps
weightwatcher's own words for comparison."""

VERDICT_VALUES: dict[Verdict, str] = {
    Verdict.OVER_TRAINED: "very-heavy-tailed",
    Verdict.UNDER_TRAINED: "light-tail",
    Verdict.TYPICAL: "typical",
    Verdict.FAILED: "failed",
}
"""The `verdict` value of CSV and JSON rows (and of HTML row classes). Development builds before
the diagnostics wrote "over-trained" and "under-trained" here; weightwatcher's words are still in
the `warning` column, and the summary keeps its `over_trained` / `under_trained` keys."""


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
    groups: tuple[str, ...] = ()
    """The optional groups it belongs to (wwcli/diagnostics.py): it is in a run's rows and table
    only when the run computed all of them; () for the built-in columns, always there."""

    def shown_with(self, groups: Collection[str]) -> bool:
        """Whether a run that computed `groups` has this column."""
        return all(group in groups for group in self.groups)


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


def _metric_or_none(name: str) -> Callable[[str, LayerResult], Value]:
    # Optional engine fields (None when the option that computes them is off).
    return lambda _, result: getattr(result.metrics, name, None)


def _tail_test(name: str) -> Callable[[str, LayerResult], Value]:
    def value(_: str, result: LayerResult) -> Value:
        tests = getattr(result.metrics, "tail_tests", None)
        return None if tests is None else getattr(tests, name)

    return value


_COUNTS = frozenset({"num_spikes", "rand_num_spikes", "num_traps", "detX_num"})
"""Counts the engine modules report as -1 when they could not count: null in rows, as
num_pl_spikes of a failed fit."""


def _diagnostic(group: str, name: str) -> Callable[[str, LayerResult], Value]:
    """A field of one of the layer's diagnostic groups (None when the layer has not got it)."""

    def value(_: str, result: LayerResult) -> Value:
        found = getattr(result.diagnostics, group, None) if result.diagnostics else None
        if found is None:
            return None
        item = getattr(found, name)
        if name in _COUNTS and item is not None and item < 0:
            return None  # -1: the engine module could not count (its message says why)
        return item if item is None or isinstance(item, str | bool | float) else _plain(item)

    return value


def _plain(item: object) -> Value:
    # numpy scalars from the engine modules become Python numbers (JSON, CSV repr).
    if isinstance(item, numbers.Integral):
        return int(item)
    if isinstance(item, numbers.Real):
        return float(item)
    return str(item)


def _shown_count(group: str, name: str) -> Callable[[LayerResult], str]:
    get = _diagnostic(group, name)
    return lambda result: "-" if (value := get("", result)) is None else str(value)


def _shown_number(group: str, name: str) -> Callable[[LayerResult], str]:
    get = _diagnostic(group, name)

    def cell(result: LayerResult) -> str:
        value = get("", result)
        return "-" if value is None else number(float(value))

    return cell


def _group_columns(
    groups: str | tuple[str, ...],
    columns: list[tuple[str, Callable[[str, LayerResult], Value]]],
    views: dict[str, TableView[LayerResult]] | None = None,
) -> list[Column[LayerResult]]:
    """The columns of an optional group (or of the groups all of which they need)."""
    needed = (groups,) if isinstance(groups, str) else groups
    views = views or {}
    return [Column(key, value, views.get(key), needed) for key, value in columns]


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
        lambda _, r: VERDICT_VALUES[r.metrics.verdict],
        View("verdict", _verdict_cell, 12, 1, numeric=False),
    ),
    Column("message", _fit("message")),
    # --- optional groups: in a run's rows only when it computed them (wwcli/diagnostics.py) ---
    *_group_columns(
        "fingers",
        [
            ("num_fingers", _metric_or_none("num_fingers")),
            ("raw_alpha", _metric_or_none("raw_alpha")),
        ],
    ),
    *_group_columns("tpl", [("Lambda", _metric_or_none("Lambda"))]),
    *_group_columns(
        "tail_tests",
        [
            (key, _tail_test(key))
            for key in ("R_lognormal", "p_lognormal", "R_exponential", "p_exponential")
        ]
        + [("tail_tests_message", _tail_test("message"))],
    ),
    *_group_columns(
        "mp",
        [
            (key, _diagnostic("mp", key))
            for key in ("num_spikes", "sigma_mp", "bulk_max", "bulk_min", "mp_softrank", "W_scale")
        ]
        + [("mp_message", _diagnostic("mp", "message"))],
        {"num_spikes": View("num_spikes", _shown_count("mp", "num_spikes"), 9.5, 2)},
    ),
    *_group_columns(
        "random",
        [
            (key, _diagnostic("random", key))
            for key in (
                "max_rand_eval",
                "rand_distance",
                "ww_softrank",
                "ww_maxdist",
                "rand_num_spikes",
                "num_traps",
                "rand_sigma_mp",
                "rand_mp_softrank",
                "rand_W_scale",
                "rand_bulk_max",
                "rand_bulk_min",
            )
        ]
        + [("rand_message", _diagnostic("random", "message"))],
        {"num_traps": View("traps", _shown_count("random", "num_traps"), 9.6, 2)},
    ),
    *_group_columns(
        "detx",
        [
            (key, _diagnostic("detx", key))
            for key in ("detX_num", "detX_val", "detX_val_unrescaled", "ERG_gap")
        ]
        + [("detx_message", _diagnostic("detx", "message"))],
    ),
    *_group_columns(
        "delta",
        [
            ("delta_base", _diagnostic("delta", "base_name")),
            ("delta_alpha", _diagnostic("delta", "alpha")),
            ("delta_D", _diagnostic("delta", "D")),
            ("delta_num_pl_spikes", _diagnostic("delta", "num_pl_spikes")),
        ],
        {"delta_alpha": View("delta_alpha", _shown_number("delta", "alpha"), 11.5, 2)},
    ),
    *_group_columns(("delta", "mp"), [("delta_num_spikes", _diagnostic("delta", "num_spikes"))]),
    *_group_columns(
        "delta",
        [
            ("delta_norm", _diagnostic("delta", "norm")),
            ("delta_spectral_norm", _diagnostic("delta", "spectral_norm")),
            ("delta_message", _diagnostic("delta", "message")),
        ],
    ),
    Column(
        "quantization",
        lambda _, r: r.spec.dtype,
        View("quant", lambda r: printable(r.spec.dtype), 4.5, 5, numeric=False),
        groups=("quantized",),
    ),
]
"""Every column of `analyze`, in row order: the built-in ones, then the optional groups."""


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
    Column(  # the table shows the stored type where it may be a quantization (GGUF)
        None,
        lambda _, item: None,
        Listed("dtype", lambda item: printable(item.spec.dtype), 3.5, 5, numeric=False),
        groups=("quantized",),
    ),
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


def row_keys(registry: list[Column[Item]], groups: Collection[str] = ()) -> tuple[str, ...]:
    """The row keys of a registry for a run that computed `groups`, in order (the CSV header)."""
    return tuple(
        column.key for column in registry if column.key is not None and column.shown_with(groups)
    )


def row_columns(registry: list[Column[Item]], groups: Collection[str] = ()) -> list[Column[Item]]:
    """The columns with a key that a run which computed `groups` has in its rows, in order."""
    return [
        column
        for column in registry
        if column.key is not None and (not column.groups or column.shown_with(groups))
    ]


def make_row(
    registry: list[Column[Item]], checkpoint: str, item: Item, groups: Collection[str] = ()
) -> Row:
    """One layer as a row of the registry's keys (the built-in ones, and those of the optional
    `groups` the run computed); non-finite floats become None."""
    return row_of(row_columns(registry, groups), checkpoint, item)


def row_of(columns: list[Column[Item]], checkpoint: str, item: Item) -> Row:
    """One layer as a row of these columns (`row_columns`); non-finite floats become None."""
    row: Row = {}
    for column in columns:
        value = column.value(checkpoint, item)
        row[column.key] = finite_or_none(float(value)) if isinstance(value, float) else value  # type: ignore[index]
    return row


def table_views(
    registry: list[Column[Item]], groups: Collection[str] = ()
) -> list[TableView[Item]]:
    """The table's columns, left to right (optional groups' only when the run computed them)."""
    views = [
        column.table
        for column in registry
        if column.table is not None and column.shown_with(groups)
    ]
    return sorted(views, key=lambda view: view.order)


@contextlib.contextmanager
def registered(registry: list[Column[Item]], column: Column[Item]) -> Iterator[None]:
    """`column` appended to `registry` while the block runs (for tests and plug-ins)."""
    registry.append(column)
    try:
        yield
    finally:
        registry.remove(column)
