"""The values a run produces: per layer, per checkpoint, per run. Formatters and the gate read
these and nothing else; every one of them is picklable, so it can come back from another
process."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wwcli.engine.results import FitStatus, LayerMetrics, Verdict
from wwcli.loaders.interface import LayerSpec

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from wwcli.diagnostics import LayerDiagnostics
    from wwcli.settings import RunSettings


QUANTIZED_FORMATS = frozenset({"gguf"})
"""Formats whose tensors may be stored quantized: their reports have the "quantized" group (the
stored type of each layer, `quantization`, beside its metrics)."""


@dataclass(frozen=True)
class Spectrum:
    """The eigenvalues a layer's metrics were computed from, kept when the run asks for them."""

    eigenvalues: NDArray[Any] = field(compare=False)
    """The pooled eigenvalues (M * rf of them, float64, ascending), Conv2D scaling applied."""


@dataclass(frozen=True)
class LayerResult:
    """An analyzed layer: what it is, and what the engine found."""

    spec: LayerSpec
    """The layer as the loader listed it."""
    metrics: LayerMetrics
    """The engine's numbers for it (the fit may have failed; see metrics.fit.status)."""
    spectrum: Spectrum | None = field(default=None, compare=False)
    """Its eigenvalues, when the run keeps them (RunSettings.keep_spectra) and they exist."""
    diagnostics: LayerDiagnostics | None = None
    """The optional diagnostics the run computed for it (MP fit, randomized ESD, detX, the
    update W - W_base); None when the run asked for none."""


@dataclass(frozen=True)
class SkippedLayer:
    """A selected layer that was not analyzed, and why."""

    layer_id: int
    """weightwatcher's id for the layer."""
    name: str
    """Full name of the layer in the file."""
    layer_type: str
    """Kind of layer ("dense", "norm", "other", ...)."""
    reason: str
    """Why it was not analyzed, for people."""


@dataclass(frozen=True)
class CheckpointReport:
    """Everything `analyze` learned about one checkpoint."""

    checkpoint: str
    """The path as the user gave it."""
    format: str
    """The format the loader read it as."""
    ids_note: str | None
    """Set when the ids are not weightwatcher's ids for the model."""
    source_note: str | None
    """Set when the weights came from part of the file (which part, for people)."""
    layers: tuple[LayerResult, ...]
    """Analyzed layers, in id order."""
    skipped: tuple[SkippedLayer, ...]
    """Selected layers that were not analyzed, in id order."""
    source_files: tuple[str, ...] = field(default=(), compare=False)
    """Every file the checkpoint was read from (resolved): reports are never written over one."""
    groups: tuple[str, ...] = ()
    """The groups of optional columns the run computed (wwcli.diagnostics.run_groups): its rows
    have those columns, and only those, beyond the built-in ones."""
    base_unmatched: tuple[str, ...] = ()
    """With --base: the names of the base checkpoint's layers that matched no analyzed layer."""


@dataclass(frozen=True)
class ListedLayer:
    """A layer as `describe` lists it: the loader's spec and whether analyze would analyze it."""

    spec: LayerSpec
    """The layer as the loader listed it."""
    skip_reason: str | None
    """Why analyze would skip it under the run's settings; None when it would analyze it."""


@dataclass(frozen=True)
class CheckpointListing:
    """What `describe` found in one checkpoint: its layers, no weights read."""

    checkpoint: str
    """The path as the user gave it."""
    format: str
    """The format the loader read it as."""
    ids_note: str | None
    """Set when the ids are not weightwatcher's ids for the model."""
    source_note: str | None
    """Set when the weights came from part of the file."""
    layers: tuple[ListedLayer, ...]
    """The selected layers, in id order."""


@dataclass(frozen=True)
class InputFailure:
    """An input that could not be read: missing, malformed, unsupported or unsafe."""

    path: str
    """The path as the user gave it."""
    message: str
    """One line for people, naming the file and the problem."""
    traceback: str = field(default="", compare=False)
    """Where the reader gave up, as a formatted traceback (shown with --debug)."""

    @classmethod
    def from_error(cls, path: str, error: BaseException) -> InputFailure:
        """The failure a reader's exception describes."""
        import traceback

        return cls(path, str(error), "".join(traceback.format_exception(error)))


@dataclass(frozen=True)
class RunResult:
    """A whole `analyze` run: the settings it ran under, one report per readable input (in input
    order), and the inputs that could not be read."""

    settings: RunSettings
    """What the run computed and how it judges it."""
    reports: tuple[CheckpointReport, ...]
    """One per readable input, in input order."""
    failures: tuple[InputFailure, ...] = ()
    """The inputs that could not be read, in input order."""


@dataclass(frozen=True)
class Summary:
    """Model-level figures: counts, and means over the layers whose fit succeeded."""

    layers_analyzed: int
    """Number of layers the engine analyzed (failed fits included)."""
    layers_skipped: int
    """Number of selected layers not analyzed."""
    fits_failed: int
    """Number of analyzed layers whose power-law fit failed."""
    very_heavy_tailed: tuple[int, ...]
    """Ids of the very heavy-tailed layers (alpha below the line, 2 by default): a description
    of the spectrum, not a finding of over-training. JSON: `very_heavy_tailed`, and under its
    old key `over_trained` (keys are never removed)."""
    light_tail: tuple[int, ...]
    """Ids of the light-tailed layers (alpha above 6 by default). JSON: `light_tail`, and under
    its old key `under_trained`."""
    means: dict[str, float]
    """Mean of each summary metric (weightwatcher's get_summary list) over successful fits."""


SUMMARY_METRICS: tuple[str, ...] = (
    "log_norm",
    "alpha",
    "alpha_weighted",
    "log_alpha_norm",
    "log_spectral_norm",
    "stable_rank",
)
"""The metrics weightwatcher averages in get_summary(), in its order."""


def summarize(report: CheckpointReport) -> Summary:
    """Counts and means of one report."""
    fitted = [r.metrics for r in report.layers if r.metrics.fit.status is FitStatus.SUCCESS]
    means: dict[str, float] = {}
    for metric in SUMMARY_METRICS:
        values = [float(getattr(m, metric)) for m in fitted]
        values = [v for v in values if math.isfinite(v)]
        means[metric] = sum(values) / len(values) if values else math.nan
    return Summary(
        layers_analyzed=len(report.layers),
        layers_skipped=len(report.skipped),
        fits_failed=len(report.layers) - len(fitted),
        very_heavy_tailed=tuple(
            r.spec.layer_id for r in report.layers if r.metrics.verdict is Verdict.OVER_TRAINED
        ),
        light_tail=tuple(
            r.spec.layer_id for r in report.layers if r.metrics.verdict is Verdict.UNDER_TRAINED
        ),
        means=means,
    )
