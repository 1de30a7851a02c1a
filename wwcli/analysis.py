"""Runs the engine over the selected layers of one checkpoint; the core of `wwcli analyze`.

It never prints: progress is reported through a callback, results come back as values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
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


TORCH_EIGH_MIN_ORDER = 1280
"""From this Gram order up, torch's eigensolver (MKL) beats LAPACK's two-stage one on one CPU
thread: 1.3x at 1280, 1.5x at 2048, 1.6x at 4096; at 1024 it is slower (benchmarks/README.md)."""

TORCH_EIGH_ENV = "WWCLI_TORCH_EIGH"
"""Set to 0 to keep torch's eigensolver out of a run (LAPACK only; the same values to round-off)."""

TORCH_WORTH_CUBES = 1.2e11
"""torch's eigensolver saves about 2.5e-11 * n**3 s per Gram of order n >= TORCH_EIGH_MIN_ORDER
against LAPACK's (measured here, one thread) and its import costs ~1.8 s. It is imported for a
run only when the sum of n**3 over those Grams reaches this (~3 s saved: two layers of 4096,
fourteen of 2048), and used whenever it is already loaded (the PyTorch reader loads it)."""


def eigensolver_options(specs: Sequence[LayerSpec], options: EngineOptions) -> EngineOptions:
    """`options`, with torch's CPU eigensolver turned on for the large Grams of `specs` where
    torch is installed and worth its import (TORCH_WORTH_CUBES), unless TORCH_EIGH_ENV is 0;
    unchanged otherwise. The eigenvalues are the same to round-off either way
    (tests/engine/test_two_stage.py)."""
    if (
        options.backend != "numpy"
        or options.precision != "float64"
        or options.torch_eigh_min_order is not None
        or os.environ.get(TORCH_EIGH_ENV, "").strip() == "0"
    ):
        return options
    cubes = sum(spec.rf * spec.M**3 for spec in specs if spec.M >= TORCH_EIGH_MIN_ORDER)
    if cubes == 0:
        return options
    if sys.modules.get("torch") is None:  # not loaded (or blocked, as None)
        if cubes < TORCH_WORTH_CUBES or importlib.util.find_spec("torch") is None:
            return options
        try:
            import torch  # noqa: F401 - loaded here, before BLAS and OpenMP are capped
        except Exception:  # a broken torch install: LAPACK does the work
            return options
    return dataclasses.replace(options, torch_eigh_min_order=TORCH_EIGH_MIN_ORDER)


def _one_torch_thread() -> None:
    """Each thread that calls torch's CPU eigensolver runs it on one thread (torch's setting also
    sets the calling thread's OpenMP count, which threads do not inherit)."""
    import torch

    torch.set_num_threads(1)


@contextlib.contextmanager
def _torch_cpu_threads(options: EngineOptions) -> Iterator[Callable[[], None] | None]:
    """While open, torch runs on one thread when `options` send Grams to its CPU eigensolver;
    yields the initializer for pool threads (None when torch is not used)."""
    if options.backend != "numpy" or options.torch_eigh_min_order is None:
        yield None
        return
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _one_torch_thread
    finally:
        torch.set_num_threads(saved)


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
    product and the eigensolver, where the time goes. Large Grams may go to torch's CPU
    eigensolver (``eigensolver_options``), then also capped to one thread. With jobs == 1 there
    is no pool: reading
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
        options = eigensolver_options([spec for _, spec in work], options)
    # One BLAS thread per layer, always: parallelism comes from layers, and each layer's numbers
    # come from the same single-threaded arithmetic whatever `jobs` is (byte-identical output).
    with threadpool_limits(limits=1), _torch_cpu_threads(options) as initializer:
        if jobs == 1 or len(work) <= 1:
            for position, spec in work:
                finish(position, analyze_one(checkpoint, spec, options))
        else:
            with ThreadPoolExecutor(max_workers=jobs, initializer=initializer) as pool:
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
