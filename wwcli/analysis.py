"""Runs the engine over the selected layers of one checkpoint; the core of `wwcli analyze`.

It never prints: progress is reported through a callback, results come back as values.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from threadpoolctl import threadpool_limits

from wwcli.engine import EngineOptions, analyze_layer, check_backend, check_size
from wwcli.engine.results import FitStatus, LayerMetrics, Verdict
from wwcli.loaders.interface import Checkpoint, LayerSpec, LayerType


@dataclass(frozen=True)
class LayerResult:
    """An analyzed layer: what it is, and what the engine found."""

    spec: LayerSpec
    """The layer as the loader listed it."""
    metrics: LayerMetrics
    """The engine's numbers for it (the fit may have failed; see metrics.fit.status)."""


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


@dataclass(frozen=True)
class Summary:
    """Model-level figures: counts, and means over the layers whose fit succeeded."""

    layers_analyzed: int
    """Number of layers the engine analyzed (failed fits included)."""
    layers_skipped: int
    """Number of selected layers not analyzed."""
    fits_failed: int
    """Number of analyzed layers whose power-law fit failed."""
    over_trained: tuple[int, ...]
    """Ids of the layers with the over-trained verdict."""
    under_trained: tuple[int, ...]
    """Ids of the layers with the under-trained verdict."""
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

ProgressCallback = Callable[[LayerSpec], None]


def skipped_from(spec: LayerSpec, reason: str) -> SkippedLayer:
    """A SkippedLayer for `spec` with the given reason."""
    return SkippedLayer(spec.layer_id, spec.name, spec.layer_type.value, reason)


def analyze_one(checkpoint: Checkpoint, spec: LayerSpec, options: EngineOptions) -> LayerResult:
    """Read one analyzable layer's matrices and run the engine on them."""
    matrices = checkpoint.matrices(spec)
    metrics = analyze_layer(matrices, conv2d_norm=_is_conv2d(spec), options=options)
    return LayerResult(spec, metrics)


def _is_conv2d(spec: LayerSpec) -> bool:
    # weightwatcher scales Conv2D kernels by sqrt(1/2) (its conv2d_norm), and only those.
    return spec.layer_type is LayerType.CONV2D


def skip_reason(spec: LayerSpec, options: EngineOptions) -> str | None:
    """Why `spec` will not be analyzed under `options`, or None; reads no weights."""
    if spec.skip_reason is not None:
        return spec.skip_reason
    return check_size(N=spec.N, M=spec.M, rf=spec.rf, options=options)


def default_jobs() -> int:
    """The number of cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not every platform has sched_getaffinity
        return max(1, os.cpu_count() or 1)


def analyze_checkpoint(
    checkpoint: Checkpoint,
    selected: Sequence[LayerSpec],
    *,
    label: str,
    options: EngineOptions,
    jobs: int = 1,
    on_layer: ProgressCallback | None = None,
) -> CheckpointReport:
    """Analyze the selected layers and report them in id order, whatever `jobs` is.

    Each layer's tensor is read (in this thread, in order) when its turn comes and dropped once
    the engine is done with it. BLAS is capped to one thread; with jobs > 1 the engine runs in a
    pool of `jobs` threads and at most jobs + 1 layers' matrices are held at once, so memory
    follows the largest matrices, not the model. numpy and torch release the GIL in the Gram
    product and the eigensolver, where the time goes. With jobs == 1 there is no pool: reading
    the next tensor while the current one is solved measured no faster on (b) (reading is ~4 %
    of the time) and held one more layer (+35 MiB), benchmarks/README.md.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    outcomes: dict[int, LayerResult | SkippedLayer] = {}
    work = []
    for position, spec in enumerate(selected):
        reason = skip_reason(spec, options)
        if reason is None:
            work.append((position, spec))
        else:
            outcomes[position] = skipped_from(spec, reason)
            if on_layer is not None:
                on_layer(spec)

    def finish(position: int, result: LayerResult) -> None:
        outcomes[position] = result
        if on_layer is not None:
            on_layer(result.spec)

    if work:
        # Fail before reading anything when the backend cannot run (no torch, no CUDA device);
        # for torch this also loads its thread pools before they are capped below.
        check_backend(backend=options.backend, device=options.device)
    # One BLAS thread per layer, always: parallelism comes from layers, and each layer's numbers
    # come from the same single-threaded arithmetic whatever `jobs` is (byte-identical output).
    with threadpool_limits(limits=1):
        if jobs == 1 or len(work) <= 1:
            for position, spec in work:
                finish(position, analyze_one(checkpoint, spec, options))
        else:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                in_flight: deque[tuple[int, LayerSpec, Future[LayerMetrics]]] = deque()
                for position, spec in work:
                    matrices = checkpoint.matrices(spec)
                    future = pool.submit(
                        analyze_layer, matrices, conv2d_norm=_is_conv2d(spec), options=options
                    )
                    del matrices
                    in_flight.append((position, spec, future))
                    while len(in_flight) > jobs:
                        done_position, done_spec, done = in_flight.popleft()
                        finish(done_position, LayerResult(done_spec, done.result()))
                while in_flight:
                    done_position, done_spec, done = in_flight.popleft()
                    finish(done_position, LayerResult(done_spec, done.result()))

    ordered = [outcomes[position] for position in range(len(selected))]
    return CheckpointReport(
        checkpoint=label,
        format=checkpoint.format,
        ids_note=checkpoint.ids_note,
        source_note=checkpoint.source_note,
        layers=tuple(item for item in ordered if isinstance(item, LayerResult)),
        skipped=tuple(item for item in ordered if isinstance(item, SkippedLayer)),
    )


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
        over_trained=tuple(
            r.spec.layer_id for r in report.layers if r.metrics.verdict is Verdict.OVER_TRAINED
        ),
        under_trained=tuple(
            r.spec.layer_id for r in report.layers if r.metrics.verdict is Verdict.UNDER_TRAINED
        ),
        means=means,
    )
