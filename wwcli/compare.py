"""Two checkpoints side by side (a base model and its fine-tune): their layers matched by name
and shape, per layer the change in alpha and log_spectral_norm and the distances
weightwatcher's `distances()` offers between two models' weights: the Frobenius norm of the
difference (its 'euclidean'), relative to the norm of A, the cosine of the two (its uncentered
'cka'), and the change in the top eigenvalues.

The metrics come from the run layer (`analysis.analyze_paths` over [A, B], spectra kept); the
distances from a second pass that reads each matched layer's raw matrices from both files, one
layer at a time (memory: two layers). Whether a layer got worse is the gate's call, with A as
the baseline: newly below the line, or alpha dropped by more than `max_drop`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wwcli import __version__

if TYPE_CHECKING:
    from wwcli.gate import GateOutcome
    from wwcli.results import CheckpointReport, InputFailure, LayerResult
    from wwcli.runners import Runner
    from wwcli.settings import RunSettings

TOP_EIGENVALUES = 5
"""How many of the largest eigenvalues `top_eigenvalues_change` compares."""

COMPARE_COLUMNS = (
    "name",
    "layer_type",
    "shape",
    "layer_id_a",
    "layer_id_b",
    "alpha_a",
    "alpha_b",
    "delta_alpha",
    "log_spectral_norm_a",
    "log_spectral_norm_b",
    "delta_log_spectral_norm",
    "frobenius_distance",
    "relative_distance",
    "cosine",
    "delta_lambda_max",
    "top_eigenvalues_change",
    "worse",
)
"""A compared layer's keys (CSV header, JSON keys), in order."""


@dataclass(frozen=True)
class LayerComparison:
    """One layer present in both checkpoints with the same shape."""

    name: str
    """Its name (the same in both)."""
    layer_type: str
    """Its type."""
    shape: tuple[int, ...]
    """Its weight tensor's shape (the same in both)."""
    layer_id_a: int
    """Its id in A."""
    layer_id_b: int
    """Its id in B."""
    alpha_a: float
    """alpha in A (NaN when the fit failed)."""
    alpha_b: float
    """alpha in B."""
    log_spectral_norm_a: float
    """log10 of the largest eigenvalue in A."""
    log_spectral_norm_b: float
    """... in B."""
    frobenius_distance: float
    """||W_B - W_A||_F over the whole tensor (every matrix of a conv), raw weights."""
    norm_a: float
    """||W_A||_F."""
    cosine: float
    """<W_A, W_B> / (||W_A|| ||W_B||) (NaN when a norm is 0)."""
    delta_lambda_max: float
    """lambda_max(B) - lambda_max(A)."""
    top_eigenvalues_change: float
    """The largest relative change among the TOP_EIGENVALUES largest eigenvalues:
    max_i |lambda_i(B) - lambda_i(A)| / lambda_i(A)."""

    @property
    def delta_alpha(self) -> float:
        """alpha(B) - alpha(A)."""
        return self.alpha_b - self.alpha_a

    @property
    def delta_log_spectral_norm(self) -> float:
        """log_spectral_norm(B) - log_spectral_norm(A)."""
        return self.log_spectral_norm_b - self.log_spectral_norm_a

    @property
    def relative_distance(self) -> float:
        """frobenius_distance / ||W_A||_F (NaN when A is all zeros)."""
        return self.frobenius_distance / self.norm_a if self.norm_a > 0 else math.nan


@dataclass(frozen=True)
class Comparison:
    """What `compare` found: matched layers, layers on one side only, and the gate's verdict."""

    a: CheckpointReport
    """A's report."""
    b: CheckpointReport
    """B's report."""
    layers: tuple[LayerComparison, ...]
    """Layers in both (same name and shape), in B's id order."""
    only_in_a: tuple[str, ...]
    """Analyzed layers of A that B does not have."""
    only_in_b: tuple[str, ...]
    """Analyzed layers of B that A does not have."""
    shape_changed: tuple[str, ...]
    """Layers in both whose shapes differ (not compared)."""
    outcome: GateOutcome
    """The gate's decision on B with A as the baseline: trips are the layers that got worse."""

    def worse(self) -> dict[str, str]:
        """Layer name -> why it got worse."""
        return {trip.name: trip.reason for trip in self.outcome.trips}

    def to_document(self, settings: RunSettings) -> dict[str, Any]:
        """The comparison as one JSON object."""
        return {
            "wwcli_version": __version__,
            "a": self.a.checkpoint,
            "b": self.b.checkpoint,
            "options": settings.to_json(),
            "layers": self.rows(),
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
            "shape_changed": list(self.shape_changed),
            "worse": [{"name": name, "reason": why} for name, why in self.worse().items()],
        }

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per compared layer (COMPARE_COLUMNS; null for NaN)."""
        worse = self.worse()
        rows = []
        for layer in self.layers:
            row: dict[str, Any] = {}
            for key in COMPARE_COLUMNS:
                if key == "worse":
                    row[key] = layer.name in worse
                elif key == "shape":
                    row[key] = "x".join(str(size) for size in layer.shape)
                else:
                    value = getattr(layer, key)
                    row[key] = (
                        None if isinstance(value, float) and not math.isfinite(value) else value
                    )
            rows.append(row)
        return rows


def _top(result: LayerResult) -> Any:
    import numpy as np

    if result.spectrum is None:
        return np.array([result.metrics.lambda_max])
    return np.sort(result.spectrum.eigenvalues)[::-1][:TOP_EIGENVALUES]


def top_change(a: LayerResult, b: LayerResult) -> float:
    """The largest relative change among the top eigenvalues of two analyzed layers."""
    import numpy as np

    top_a, top_b = _top(a), _top(b)
    count = min(len(top_a), len(top_b))
    if count == 0:
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        change = np.abs(top_b[:count] - top_a[:count]) / top_a[:count]
    return float(np.max(change)) if np.all(np.isfinite(change)) else math.nan


def distances(matrices_a: Sequence[Any], matrices_b: Sequence[Any]) -> tuple[float, float, float]:
    """(||B - A||_F, ||A||_F, cosine) over all matrices of a layer, in float64."""
    import numpy as np

    difference = norm_a = norm_b = dot = 0.0
    for left, right in zip(matrices_a, matrices_b, strict=True):
        x = np.asarray(left, dtype=np.float64)
        y = np.asarray(right, dtype=np.float64)
        difference += float(np.sum((y - x) ** 2))
        norm_a += float(np.sum(x * x))
        norm_b += float(np.sum(y * y))
        dot += float(np.sum(x * y))
    denominator = math.sqrt(norm_a) * math.sqrt(norm_b)
    cosine = dot / denominator if denominator > 0 else math.nan
    return math.sqrt(difference), math.sqrt(norm_a), cosine


def compare_reports(
    a: CheckpointReport, b: CheckpointReport, settings: RunSettings, *, max_drop: float | None
) -> Comparison:
    """Match two analyzed checkpoints' layers, read their matrices for the distances, and let
    the gate (A as the baseline) say which got worse."""
    import dataclasses

    from wwcli.gate import Baseline, evaluate
    from wwcli.loaders import open_checkpoint
    from wwcli.results import RunResult

    in_a = {result.spec.name: result for result in a.layers}
    in_b = {result.spec.name: result for result in b.layers}
    matched = [
        name for name in in_b if name in in_a and in_a[name].spec.shape == in_b[name].spec.shape
    ]
    shape_changed = tuple(
        name for name in in_b if name in in_a and in_a[name].spec.shape != in_b[name].spec.shape
    )
    layers = []
    trust = settings.trust_pickle
    with (
        open_checkpoint(Path(a.checkpoint), trust_pickle=trust) as file_a,
        open_checkpoint(Path(b.checkpoint), trust_pickle=trust) as file_b,
    ):
        listed_a = {spec.name: spec for spec in file_a.layers()}
        listed_b = {spec.name: spec for spec in file_b.layers()}
        for name in matched:
            left, right = in_a[name], in_b[name]
            frobenius, norm_a, cosine = distances(
                file_a.matrices(listed_a[name]), file_b.matrices(listed_b[name])
            )
            layers.append(
                LayerComparison(
                    name=name,
                    layer_type=right.spec.layer_type.value,
                    shape=right.spec.shape,
                    layer_id_a=left.spec.layer_id,
                    layer_id_b=right.spec.layer_id,
                    alpha_a=left.metrics.fit.alpha,
                    alpha_b=right.metrics.fit.alpha,
                    log_spectral_norm_a=left.metrics.log_spectral_norm,
                    log_spectral_norm_b=right.metrics.log_spectral_norm,
                    frobenius_distance=frobenius,
                    norm_a=norm_a,
                    cosine=cosine,
                    delta_lambda_max=right.metrics.lambda_max - left.metrics.lambda_max,
                    top_eigenvalues_change=top_change(left, right),
                )
            )
    alphas = {name: _alpha_or_none(in_a[name]) for name in matched}
    policy = dataclasses.replace(
        settings.gate, baseline=Baseline(a.checkpoint, {a.checkpoint: alphas}), max_drop=max_drop
    )
    outcome = evaluate(RunResult(settings, (b,)), policy)
    return Comparison(
        a=a,
        b=b,
        layers=tuple(layers),
        only_in_a=tuple(name for name in in_a if name not in in_b),
        only_in_b=tuple(name for name in in_b if name not in in_a),
        shape_changed=shape_changed,
        outcome=outcome,
    )


class CompareInputError(Exception):
    """A or B could not be read."""

    def __init__(self, failures: Sequence[InputFailure]) -> None:
        super().__init__("; ".join(failure.message for failure in failures))
        self.failures = tuple(failures)
        """The inputs that could not be read."""


def compare(
    a: Path,
    b: Path,
    settings: RunSettings,
    *,
    runner: Runner | None = None,
    max_drop: float | None = None,
) -> Comparison:
    """Analyze A and B through the run layer (spectra kept, for the top eigenvalues) and
    compare them; CompareInputError when either cannot be read."""
    import dataclasses

    from wwcli.analysis import analyze_paths
    from wwcli.results import CheckpointReport, InputFailure

    kept = dataclasses.replace(settings, keep_spectra=True)
    outcomes = list(analyze_paths([a, b], kept, runner=runner))
    failures = [outcome for outcome in outcomes if isinstance(outcome, InputFailure)]
    if failures:
        raise CompareInputError(failures)
    first, second = (outcome for outcome in outcomes if isinstance(outcome, CheckpointReport))
    return compare_reports(first, second, settings, max_drop=max_drop)


def _alpha_or_none(result: LayerResult) -> float | None:
    alpha = result.metrics.fit.alpha
    return alpha if math.isfinite(alpha) else None


def render_csv(comparison: Comparison) -> str:
    """The compared layers as CSV (COMPARE_COLUMNS; empty for null)."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COMPARE_COLUMNS)
    for row in comparison.rows():
        writer.writerow(["" if row[key] is None else row[key] for key in COMPARE_COLUMNS])
    return buffer.getvalue()


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value != 0 and abs(value) < 10 ** -(digits - 1):
        return f"{value:+.{digits - 1}e}" if digits == 3 else f"{value:.{digits - 1}e}"
    return f"{value:+.{digits}f}" if digits == 3 else f"{value:.{digits}f}"


def render_table(comparison: Comparison) -> str:
    """For people: one line per compared layer, then the layers on one side only and the ones
    that got worse. Names from files are escaped."""
    from wwcli.report.escape import printable
    from wwcli.sweep import _columns

    worse = comparison.worse()
    lines = [
        f"compare: {printable(comparison.a.checkpoint)} -> {printable(comparison.b.checkpoint)}: "
        f"{len(comparison.layers)} layers matched by name and shape",
        "",
    ]
    rows = [
        (
            printable(layer.name),
            "x".join(str(size) for size in layer.shape),
            _number(layer.alpha_a, 4).lstrip("+"),
            _number(layer.alpha_b, 4).lstrip("+"),
            _number(layer.delta_alpha),
            _number(layer.delta_log_spectral_norm),
            _number(layer.relative_distance, 4),
            _number(layer.cosine, 4),
            _number(layer.top_eigenvalues_change, 4),
            "worse" if layer.name in worse else "",
        )
        for layer in comparison.layers
    ]
    header = (
        "layer",
        "shape",
        "alpha A",
        "alpha B",
        "d alpha",
        "d log_sn",
        "rel dist",
        "cosine",
        "top ev chg",
        "",
    )
    lines += _columns(header, rows, {2, 3, 4, 5, 6, 7, 8})
    for title, names in (
        ("only in A", comparison.only_in_a),
        ("only in B", comparison.only_in_b),
        ("shape changed (not compared)", comparison.shape_changed),
    ):
        if names:
            lines += ["", f"{title}: " + ", ".join(printable(name) for name in names)]
    return "\n".join(lines) + "\n"
