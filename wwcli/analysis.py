"""The run layer: a path in, a report out. `analyze_path` (and `list_path` for describe) is the
one unit of work every command is built on; `analyze_paths` runs many through a Runner;
`analyze_checkpoint` runs the engine over the selected layers of one open checkpoint.

Nothing here prints: progress is reported through a listener, results come back as values, and
an unreadable input is an InputFailure value, not an exception.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from threadpoolctl import threadpool_limits

from wwcli.diagnostics import (
    DeltaResult,
    Diagnostics,
    LayerDiagnostics,
    delta_result,
    layer_diagnostics,
    run_groups,
    unmatched_delta,
)
from wwcli.engine import (
    EngineOptions,
    LayerMetrics,
    analyze_layer_spectrum,
    check_backend,
    check_size,
)
from wwcli.loaders.interface import (
    Checkpoint,
    LayerSpec,
    LayerType,
    LoaderError,
    weightwatcher_conv1d,
    weightwatcher_conv1d_matrices,
    weightwatcher_conv1d_spec,
)
from wwcli.results import (
    QUANTIZED_FORMATS,
    CheckpointListing,
    CheckpointReport,
    InputFailure,
    LayerResult,
    ListedLayer,
    SkippedLayer,
    Spectrum,
)
from wwcli.runners import LocalRunner, Runner
from wwcli.selection import select_layers
from wwcli.settings import RunSettings

ProgressCallback = Callable[[LayerSpec], None]


def skipped_from(spec: LayerSpec, reason: str) -> SkippedLayer:
    """A SkippedLayer for `spec` with the given reason."""
    return SkippedLayer(spec.layer_id, spec.name, spec.layer_type.value, reason)


LayerOutcome = tuple[LayerMetrics, Any]
"""What the engine returns for a layer: its metrics and its eigenvalues (or None)."""


def _layer_result(
    spec: LayerSpec,
    outcome: LayerOutcome,
    keep_spectrum: bool,
    diagnostics: LayerDiagnostics | None = None,
) -> LayerResult:
    metrics, eigenvalues = outcome
    spectrum = Spectrum(eigenvalues) if keep_spectrum and eigenvalues is not None else None
    return LayerResult(spec, metrics, spectrum, diagnostics)


BaseMatch = tuple[str, list[Any]] | DeltaResult | None
"""A layer's counterpart in the base checkpoint: its name and matrices (as the engine takes
them), the DeltaResult of a layer it has no match for, or None without --base."""


@dataclasses.dataclass(frozen=True)
class _LayerWork:
    """The engine's work on one layer with diagnostics: picklable, runs in a pool thread."""

    name: str
    options: EngineOptions
    diagnostics: Diagnostics
    flags: dict[str, bool]
    keep_spectrum: bool = False

    def __call__(
        self, matrices: list[Any], base: BaseMatch
    ) -> tuple[LayerOutcome, LayerDiagnostics | None]:
        outcome = analyze_layer_spectrum(matrices, options=self.options, **self.flags)
        delta = base if isinstance(base, DeltaResult) else None
        if isinstance(base, tuple):
            base_name, base_matrices = base
            delta = delta_result(
                base_name,
                matrices,
                base_matrices,
                options=self.options,
                conv2d_norm=self.flags["conv2d_norm"],
                weightwatcher_conv1d=self.flags["weightwatcher_conv1d"],
                mp_fit=self.diagnostics.mp_fit,
            )
        extra = layer_diagnostics(
            self.diagnostics,
            name=self.name,
            matrices=matrices,
            eigenvalues=outcome[1],
            metrics=outcome[0],
            conv2d_norm=self.flags["conv2d_norm"],
            options=self.options,
            weightwatcher_conv1d=self.flags["weightwatcher_conv1d"],
            delta=delta,
        )
        if extra is not None and extra.random is not None and not self.keep_spectrum:
            # The shuffled eigenvalues are for pictures: kept only when the spectra are.
            extra = dataclasses.replace(
                extra, random=dataclasses.replace(extra.random, rand_eigenvalues=None)
            )
        return outcome, extra


class _Base:
    """The base checkpoint of --base, open for a run: its layers by name."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.by_name = {spec.name: spec for spec in checkpoint.layers()}

    def match(self, spec: LayerSpec, options: EngineOptions) -> BaseMatch:
        """The layer's counterpart: same name and same stored shape."""
        found = self.by_name.get(spec.name)
        if found is None:
            return unmatched_delta("the base checkpoint has no layer of this name")
        if found.shape != spec.shape:
            return unmatched_delta(
                f"the base's layer of this name is {'x'.join(map(str, found.shape))}, "
                f"not {'x'.join(map(str, spec.shape))}"
            )
        matrices, _ = _engine_input(self.checkpoint, found, options)
        return found.name, matrices

    def unmatched(self, names: set[str]) -> tuple[str, ...]:
        """The base's analyzable layers that the checkpoint does not have (by name)."""
        return tuple(
            spec.name
            for spec in self.by_name.values()
            if spec.skip_reason is None and spec.name not in names
        )


def sized(spec: LayerSpec, options: EngineOptions) -> LayerSpec:
    """The layer as the engine will measure it: as listed, or, under --conv1d weightwatcher, a
    Conv1D kernel sized as weightwatcher 0.7.7 sizes it (N, M = its largest and smallest side,
    rf 1)."""
    return weightwatcher_conv1d_spec(spec) if options.conv1d == "weightwatcher" else spec


def _engine_input(
    checkpoint: Checkpoint, spec: LayerSpec, options: EngineOptions
) -> tuple[list[Any], dict[str, bool]]:
    """The layer's matrices as the engine takes them, and the engine's per-layer flags. The
    matrices are read for the spec as listed (readers check shapes against it)."""
    matrices = checkpoint.matrices(spec)
    weightwatcher = options.conv1d == "weightwatcher" and weightwatcher_conv1d(spec)
    if weightwatcher:
        matrices = weightwatcher_conv1d_matrices(spec, matrices)
    return matrices, {"conv2d_norm": _is_conv2d(spec), "weightwatcher_conv1d": weightwatcher}


def analyze_one(
    checkpoint: Checkpoint, spec: LayerSpec, options: EngineOptions, *, keep_spectrum: bool = False
) -> LayerResult:
    """Read one analyzable layer's matrices and run the engine on them."""
    matrices, flags = _engine_input(checkpoint, spec, options)
    outcome = analyze_layer_spectrum(matrices, options=options, **flags)
    return _layer_result(sized(spec, options), outcome, keep_spectrum)


def _is_conv2d(spec: LayerSpec) -> bool:
    # weightwatcher scales Conv2D kernels by sqrt(1/2) (its conv2d_norm), and only those.
    return spec.layer_type is LayerType.CONV2D


def skip_reason(spec: LayerSpec, options: EngineOptions) -> str | None:
    """Why `spec` will not be analyzed under `options`, or None; reads no weights."""
    if spec.skip_reason is not None:
        return spec.skip_reason
    measured = sized(spec, options)
    return check_size(N=measured.N, M=measured.M, rf=measured.rf, options=options)


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


def analyze_checkpoint(
    checkpoint: Checkpoint,
    selected: Sequence[LayerSpec],
    *,
    label: str,
    options: EngineOptions,
    jobs: int = 1,
    on_layer: ProgressCallback | None = None,
    keep_spectra: bool = False,
    diagnostics: Diagnostics | None = None,
    base: Checkpoint | None = None,
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

    `diagnostics` adds the optional groups (wwcli/diagnostics.py) to every analyzed layer;
    `base` is the open base checkpoint of `diagnostics.base` (its matched layer is read beside
    each layer, so a layer then holds twice the memory).
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
    opened_base = _Base(base) if base is not None else None
    if diagnostics is not None and (diagnostics.any or opened_base is not None):
        return _analyze_with_diagnostics(
            checkpoint,
            selected,
            work,
            outcomes,
            label=label,
            options=options,
            jobs=jobs,
            finish=finish,
            keep_spectra=keep_spectra,
            diagnostics=diagnostics,
            base=opened_base,
        )
    # One BLAS thread per layer, always: parallelism comes from layers, and each layer's numbers
    # come from the same single-threaded arithmetic whatever `jobs` is (byte-identical output).
    with threadpool_limits(limits=1), _torch_cpu_threads(options) as initializer:
        if jobs == 1 or len(work) <= 1:
            for position, spec in work:
                finish(position, analyze_one(checkpoint, spec, options, keep_spectrum=keep_spectra))
        else:
            with ThreadPoolExecutor(max_workers=jobs, initializer=initializer) as pool:
                in_flight: deque[tuple[int, LayerSpec, Future[LayerOutcome]]] = deque()
                for position, spec in work:
                    matrices, flags = _engine_input(checkpoint, spec, options)
                    future = pool.submit(analyze_layer_spectrum, matrices, options=options, **flags)
                    del matrices
                    in_flight.append((position, sized(spec, options), future))
                    while len(in_flight) > jobs:
                        done_position, done_spec, done = in_flight.popleft()
                        finish(done_position, _layer_result(done_spec, done.result(), keep_spectra))
                while in_flight:
                    done_position, done_spec, done = in_flight.popleft()
                    finish(done_position, _layer_result(done_spec, done.result(), keep_spectra))

    return _report(checkpoint, selected, outcomes, label, run_groups(Diagnostics(), options))


def _report(
    checkpoint: Checkpoint,
    selected: Sequence[LayerSpec],
    outcomes: dict[int, LayerResult | SkippedLayer],
    label: str,
    groups: tuple[str, ...],
) -> CheckpointReport:
    ordered = [outcomes[position] for position in range(len(selected))]
    if checkpoint.format in QUANTIZED_FORMATS:
        groups = (*groups, "quantized")
    return CheckpointReport(
        checkpoint=label,
        format=checkpoint.format,
        ids_note=checkpoint.ids_note,
        source_note=checkpoint.source_note,
        layers=tuple(item for item in ordered if isinstance(item, LayerResult)),
        skipped=tuple(item for item in ordered if isinstance(item, SkippedLayer)),
        groups=groups,
    )


def _analyze_with_diagnostics(
    checkpoint: Checkpoint,
    selected: Sequence[LayerSpec],
    work: Sequence[tuple[int, LayerSpec]],
    outcomes: dict[int, LayerResult | SkippedLayer],
    *,
    label: str,
    options: EngineOptions,
    jobs: int,
    finish: Callable[[int, LayerResult], None],
    keep_spectra: bool,
    diagnostics: Diagnostics,
    base: _Base | None,
) -> CheckpointReport:
    """analyze_checkpoint's loop when diagnostics run: the same reading order and pool, each
    layer's work a _LayerWork (the engine, then the diagnostics on its eigenvalues). Each
    layer's randomization draws from its own generator (diagnostics.layer_rng), so the numbers
    do not depend on `jobs` or on the order the layers finish in."""

    def prepared(spec: LayerSpec) -> tuple[_LayerWork, list[Any], BaseMatch]:
        matrices, flags = _engine_input(checkpoint, spec, options)
        match = base.match(spec, options) if base is not None else None
        work = _LayerWork(spec.name, options, diagnostics, flags, keep_spectra)
        return work, matrices, match

    def done(spec: LayerSpec, result: tuple[LayerOutcome, LayerDiagnostics | None]) -> LayerResult:
        outcome, extra = result
        return _layer_result(sized(spec, options), outcome, keep_spectra, extra)

    with threadpool_limits(limits=1), _torch_cpu_threads(options) as initializer:
        if jobs == 1 or len(work) <= 1:
            for position, spec in work:
                layer_work, matrices, match = prepared(spec)
                finish(position, done(spec, layer_work(matrices, match)))
                del matrices, match
        else:
            with ThreadPoolExecutor(max_workers=jobs, initializer=initializer) as pool:
                in_flight: deque[tuple[int, LayerSpec, Future[Any]]] = deque()
                for position, spec in work:
                    layer_work, matrices, match = prepared(spec)
                    in_flight.append((position, spec, pool.submit(layer_work, matrices, match)))
                    del matrices, match
                    while len(in_flight) > jobs:
                        done_position, done_spec, future = in_flight.popleft()
                        finish(done_position, done(done_spec, future.result()))
                while in_flight:
                    done_position, done_spec, future = in_flight.popleft()
                    finish(done_position, done(done_spec, future.result()))
    report = _report(checkpoint, selected, outcomes, label, run_groups(diagnostics, options))
    unmatched = base.unmatched({spec.name for spec in checkpoint.layers()}) if base else ()
    return dataclasses.replace(report, base_unmatched=unmatched)


def _resolved_sources(checkpoint: Checkpoint) -> tuple[str, ...]:
    return tuple(os.path.realpath(path) for path in checkpoint.source_files())


class ProgressListener(Protocol):
    """Hears how a run advances (a progress bar); called in the process that runs the unit."""

    def checkpoint_started(self, label: str, total: int) -> None:
        """A checkpoint was opened and `total` layers were selected."""

    def layer_done(self, spec: LayerSpec) -> None:
        """One selected layer was analyzed or skipped."""

    def checkpoint_done(self, label: str) -> None:
        """The checkpoint is done (or failed)."""


def _open(path: Path, settings: RunSettings) -> Checkpoint:
    from wwcli.loaders import open_checkpoint

    return open_checkpoint(path, trust_pickle=settings.trust_pickle)


def _selected(checkpoint: Checkpoint, settings: RunSettings) -> list[LayerSpec]:
    specs = checkpoint.layers()
    terms = settings.terms()
    return select_layers(specs, terms) if terms else specs


def analyze_path(
    path: str | Path,
    settings: RunSettings,
    *,
    jobs: int = 1,
    progress: ProgressListener | None = None,
) -> CheckpointReport | InputFailure:
    """Open the checkpoint at `path`, analyze the layers `settings` select, and close it.

    An input that cannot be read gives an InputFailure; a --layers term that matches nothing
    raises SelectionError (a usage error). Callable in another process: the arguments and the
    result are picklable (progress must then be None)."""
    label = str(path)
    try:
        with contextlib.ExitStack() as stack:
            checkpoint = stack.enter_context(_open(Path(path), settings))
            base = _open_base(settings, label, stack)
            if isinstance(base, InputFailure):
                return base
            chosen = _selected(checkpoint, settings)
            if progress is not None:
                progress.checkpoint_started(label, len(chosen))
            try:
                report = analyze_checkpoint(
                    checkpoint,
                    chosen,
                    label=label,
                    options=settings.engine,
                    jobs=jobs,
                    on_layer=progress.layer_done if progress is not None else None,
                    keep_spectra=settings.keep_spectra,
                    diagnostics=settings.diagnostics,
                    base=base,
                )
                # The base's files too: no report may be written over any file the run read.
                sources = _resolved_sources(checkpoint)
                if isinstance(base, Checkpoint):
                    sources += _resolved_sources(base)
                return dataclasses.replace(report, source_files=sources)
            finally:
                if progress is not None:
                    progress.checkpoint_done(label)
    except LoaderError as error:
        return InputFailure.from_error(label, error)


def _open_base(
    settings: RunSettings, label: str, stack: contextlib.ExitStack
) -> Checkpoint | InputFailure | None:
    """The base checkpoint of --base, opened with the same loader and trust as the checkpoint
    (an unreadable base is this checkpoint's input failure); None without --base."""
    if settings.diagnostics.base is None:
        return None
    try:
        return stack.enter_context(_open(Path(settings.diagnostics.base), settings))
    except LoaderError as error:
        failure = InputFailure.from_error(label, error)
        return dataclasses.replace(failure, message=f"--base {settings.diagnostics.base}: {error}")


def list_path(path: str | Path, settings: RunSettings) -> CheckpointListing | InputFailure:
    """describe's unit of work: the selected layers of the checkpoint at `path`, with the
    reason analyze would skip each one under `settings`; no weights are read."""
    label = str(path)
    try:
        with _open(Path(path), settings) as checkpoint:
            layers = tuple(
                ListedLayer(sized(spec, settings.engine), skip_reason(spec, settings.engine))
                for spec in _selected(checkpoint, settings)
            )
            return CheckpointListing(
                label, checkpoint.format, checkpoint.ids_note, checkpoint.source_note, layers
            )
    except LoaderError as error:
        return InputFailure.from_error(label, error)


def analyze_paths(
    paths: Sequence[str | Path],
    settings: RunSettings,
    *,
    runner: Runner | None = None,
    progress: ProgressListener | None = None,
) -> Iterator[CheckpointReport | InputFailure]:
    """analyze_path over every path through `runner` (a LocalRunner by default), yielding each
    outcome in input order as soon as it is done. `progress` is heard only when the runner runs
    the units in this process."""
    runner = runner or LocalRunner()
    function = functools.partial(
        analyze_path,
        settings=settings,
        jobs=runner.layer_jobs,
        progress=progress if runner.in_process else None,
    )
    return runner.map(function, list(paths))


def list_paths(
    paths: Sequence[str | Path], settings: RunSettings, *, runner: Runner | None = None
) -> Iterator[CheckpointListing | InputFailure]:
    """list_path over every path through `runner`, in input order."""
    runner = runner or LocalRunner()
    return runner.map(functools.partial(list_path, settings=settings), list(paths))
