"""How the work units of a run are executed. A unit is a path (plus the run's settings, bound
into the function), never an open checkpoint, so a runner may send it to another process or
machine; results come back in input order, one at a time, as they are done."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

Unit = TypeVar("Unit")
Outcome = TypeVar("Outcome")


class Runner(Protocol):
    """Maps a picklable function over work units, yielding outcomes in input order."""

    @property
    def layer_jobs(self) -> int:
        """Threads each checkpoint's layers are analyzed with."""
        ...

    @property
    def in_process(self) -> bool:
        """True when units run in this process, so callbacks (progress) can reach the caller."""
        ...

    def map(self, function: Callable[[Unit], Outcome], units: Sequence[Unit]) -> Iterator[Outcome]:
        """function(unit) for every unit, in input order, each yielded as soon as it is done."""
        ...


def default_jobs() -> int:
    """The number of cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not every platform has sched_getaffinity
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class LocalRunner:
    """Checkpoints one after another in this process; each one's layers in `jobs` threads
    (BLAS capped to one thread each, see analysis.analyze_checkpoint)."""

    jobs: int = 1
    """Layers analyzed in parallel (1 = one at a time)."""

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")

    @property
    def layer_jobs(self) -> int:
        """Threads each checkpoint's layers are analyzed with."""
        return self.jobs

    @property
    def in_process(self) -> bool:
        """Always: units run here."""
        return True

    def map(self, function: Callable[[Unit], Outcome], units: Sequence[Unit]) -> Iterator[Outcome]:
        """function(unit) for each unit in turn."""
        for unit in units:
            yield function(unit)


# --- Processes on this machine ----------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """How a run is spread over this machine: `workers` processes, each analyzing one
    checkpoint's layers in `jobs` threads (BLAS capped per thread), workers * jobs <= cores."""

    workers: int
    """Checkpoints analyzed at once, each in its own process (1: in this process)."""
    jobs: int
    """Threads each checkpoint's layers are analyzed with."""
    note: str = ""
    """Set when the numbers asked for were lowered to fit the cores (for people)."""


def plan_execution(
    workers: int | None,
    jobs: int | None,
    units: int,
    *,
    cores: int | None = None,
    spread: bool = True,
) -> Execution:
    """Workers and layer threads for a run of `units` checkpoints, never more threads than
    `cores` (default: the cores this process may use) in all.

    Neither given: with `spread` (sweep) one worker per checkpoint up to the cores, the cores
    left over as layer threads; without (analyze, which streams in this process) one worker and
    every core as layer threads. One given: the other fills the machine. Too many threads in
    all: the workers are lowered to the cores, then the layer threads to what is left, and the
    note says so (not for analyze's --jobs alone, which has always been the user's call)."""
    cores = cores or default_jobs()
    units = max(1, units)
    for name, value in (("workers", workers), ("jobs", jobs)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if workers is None:
        if jobs is None:
            chosen = min(cores, units) if spread else 1
        else:
            chosen = max(1, min(units, cores // jobs)) if spread else 1
    else:
        chosen = workers
    layer_jobs = jobs if jobs is not None else max(1, cores // max(1, min(chosen, units)))
    note = ""
    if chosen * layer_jobs > cores and (spread or workers is not None):
        asked = f"--workers {chosen} --jobs {layer_jobs}"
        threads = chosen * layer_jobs
        chosen = min(chosen, cores)
        layer_jobs = max(1, cores // chosen)
        note = (
            f"{asked} would run {threads} threads on {cores} cores: "
            f"using --workers {chosen} --jobs {layer_jobs}"
        )
    return Execution(chosen, layer_jobs, note)


def _worker_init(jobs: int) -> None:
    """A worker process's thread budget: BLAS and OpenMP at most `jobs` threads (the run layer
    caps each layer's BLAS to one thread inside that), Ctrl-C left to the parent, which stops
    the pool."""
    import signal

    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(jobs)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=jobs)


def failure_for(unit: object, reason: str) -> Any:
    """The outcome of a unit (a path) that no worker could finish: an InputFailure naming it."""
    from wwcli.results import InputFailure

    return InputFailure(str(unit), f"{unit}: {reason}")


@dataclass(frozen=True)
class ProcessRunner:
    """Checkpoints in a pool of `workers` processes (spawned: nothing of this process's state,
    threads or locks is inherited), each one's layers in `jobs` threads. The numbers are the
    same bytes as a LocalRunner's: every layer's arithmetic is single-threaded wherever it
    runs. A worker that dies (a crash in a reader's C code) takes the pool down: the units it
    broke are run again one at a time in fresh processes, and one that kills its process
    again comes back as an InputFailure."""

    workers: int = 2
    """Processes, at most one per checkpoint."""
    jobs: int = 1
    """Threads each checkpoint's layers are analyzed with, in its process."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")

    @property
    def layer_jobs(self) -> int:
        """Threads each checkpoint's layers are analyzed with."""
        return self.jobs

    @property
    def in_process(self) -> bool:
        """Never: units run in the worker processes."""
        return False

    def _pool(self, size: int) -> Any:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(
            max_workers=size,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(self.jobs,),
        )

    def map(self, function: Callable[[Unit], Outcome], units: Sequence[Unit]) -> Iterator[Outcome]:
        """function(unit) for every unit in the pool, yielded in input order."""
        from concurrent.futures.process import BrokenProcessPool

        units = list(units)
        if not units:
            return
        pool = self._pool(min(self.workers, len(units)))
        try:
            futures = [pool.submit(function, unit) for unit in units]
            for unit, future in zip(units, futures, strict=True):
                try:
                    yield future.result()
                except BrokenProcessPool:
                    yield self._alone(function, unit)
        except BaseException:
            _stop_pool(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _alone(self, function: Callable[[Unit], Outcome], unit: Unit) -> Outcome:
        """A unit whose pool broke, run again in a process of its own."""
        from concurrent.futures.process import BrokenProcessPool

        pool = self._pool(1)
        try:
            return cast(Outcome, pool.submit(function, unit).result())
        except BrokenProcessPool:
            return cast(Outcome, failure_for(unit, "the worker process analyzing it died"))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _stop_pool(pool: Any) -> None:
    """Stop a process pool now (Ctrl-C, an error): cancel what has not started and end the
    worker processes this runner started, by pid."""
    # Taken before shutdown(), which forgets them.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(timeout=5)


# --- A Dask cluster ---------------------------------------------------------------------------

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
"""Where the Dask scheduler is when --scheduler is not given (Dask's own variable)."""


class RunnerError(Exception):
    """A runner cannot start (Dask missing, no scheduler at the address): a usage error."""


def _distributed() -> Any:
    """dask.distributed, or RunnerError saying how to install it."""
    try:
        import distributed
    except ImportError as error:
        raise RunnerError(
            "--scheduler needs Dask's distributed scheduler: pip install 'wwcli[dask]'"
        ) from error
    return distributed


@dataclass(frozen=True)
class DaskRunner:
    """Units as tasks on a Dask cluster (dask.distributed, an existing engine): one task per
    checkpoint, or with `layers_per_task` per (path, layer ids) chunk, merged back into one
    report. Workers read the files at the path as given (shared storage) and send back wwcli's
    result values; nothing else crosses the network.

    A worker that dies mid-task: Dask runs the task again on another worker (its
    `allowed-failures`), and a task that raised is retried `retries` times. A unit that fails
    everywhere, or waits `no_worker_timeout` seconds with no worker connected, comes back as an
    InputFailure with the reason: never a hang. Ctrl-C cancels the run's futures."""

    address: str
    """The scheduler: tcp://HOST:PORT."""
    jobs: int = 1
    """Threads each task analyzes its checkpoint's layers with (give workers that many cores
    per task: `dask worker --nthreads 1` and jobs 1, or a worker of K cores and jobs K)."""
    retries: int = 2
    """Times a task that raised is run again (Dask's retries=)."""
    layers_per_task: int | None = None
    """Split each checkpoint into tasks of this many selected layers (a model too big for
    one worker's time or memory); None: one task per checkpoint."""
    no_worker_timeout: float = 60.0
    """Seconds a unit may wait with no worker connected before it fails."""
    connect_timeout: float = 10.0
    """Seconds to reach the scheduler (Dask retries a refused connection until then)."""
    client: Any = dataclasses.field(default=None, compare=False, repr=False)
    """A client of the scheduler to use (its owner closes it); None: one per map()."""

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.layers_per_task is not None and self.layers_per_task < 1:
            raise ValueError(f"layers_per_task must be >= 1, got {self.layers_per_task}")

    @property
    def layer_jobs(self) -> int:
        """Threads each task analyzes layers with."""
        return self.jobs

    @property
    def in_process(self) -> bool:
        """Never: units run on the cluster's workers."""
        return False

    def connect(self) -> Any:
        """A client of the scheduler; RunnerError when it cannot be reached."""
        distributed = _distributed()
        try:
            return distributed.Client(
                self.address, timeout=self.connect_timeout, set_as_default=False
            )
        except (OSError, TimeoutError, ValueError) as error:
            raise RunnerError(
                f"--scheduler {self.address}: cannot reach a Dask scheduler there: {error}"
            ) from error

    def map(self, function: Callable[[Unit], Outcome], units: Sequence[Unit]) -> Iterator[Outcome]:
        """function(unit) for every unit on the cluster, yielded in input order."""
        units = list(units)
        if not units:
            return
        client = self.client or self.connect()
        submitted: list[Any] = []
        try:
            chunked = self._chunked(function)
            tasks: list[list[Any]] = []
            for index, unit in enumerate(units):
                if chunked is None:
                    tasks.append([self._submit(client, function, unit, index)])
                else:
                    tasks.append(chunked(client, unit, index))
                submitted.extend(tasks[-1])
            for unit, futures in zip(units, tasks, strict=True):
                outcomes = [self._outcome(client, unit, future) for future in futures]
                yield outcomes[0] if len(outcomes) == 1 else _merged(unit, outcomes)
        except BaseException:
            with contextlib.suppress(Exception):
                client.cancel(submitted, force=True)
            raise
        finally:
            if self.client is None:
                with contextlib.suppress(Exception):
                    client.close(timeout=5)

    def _submit(self, client: Any, function: Callable[..., Any], unit: Any, index: int) -> Any:
        return client.submit(
            function, unit, key=f"wwcli-{index}-{_token()}", pure=False, retries=self.retries
        )

    def _chunked(self, function: Callable[..., Any]) -> Callable[[Any, Any, int], list[Any]] | None:
        """With layers_per_task and analyze_path's unit of work: a function submitting one
        checkpoint as tasks of that many selected layers (listed first, on a worker)."""
        import functools

        from wwcli.analysis import analyze_path, list_path

        if (
            self.layers_per_task is None
            or not isinstance(function, functools.partial)
            or function.func is not analyze_path
        ):
            return None
        settings = function.keywords["settings"]
        jobs = function.keywords.get("jobs", 1)
        size = self.layers_per_task

        def submit(client: Any, unit: Any, index: int) -> list[Any]:
            listing = client.submit(list_path, unit, settings, pure=False, retries=self.retries)
            listed = self._outcome(client, unit, listing)
            if not hasattr(listed, "layers"):  # an InputFailure
                return [client.submit(lambda failure: failure, listed, pure=False)]
            ids = [layer.spec.layer_id for layer in listed.layers]
            if len(ids) <= size:
                return [self._submit(client, function, unit, index)]
            futures = []
            for start in range(0, len(ids), size):
                chunk = ",".join(f"id:{layer_id}" for layer_id in ids[start : start + size])
                part = functools.partial(
                    analyze_path,
                    settings=dataclasses.replace(settings, layers=chunk),
                    jobs=jobs,
                    progress=None,
                )
                futures.append(self._submit(client, part, unit, index))
            return futures

        return submit

    def _outcome(self, client: Any, unit: Any, future: Any) -> Any:
        """The future's value; an InputFailure when it failed on the cluster or no worker was
        left to run it for no_worker_timeout seconds."""
        from wwcli.selection import SelectionError

        alone_since: float | None = None
        while True:
            try:
                return future.result(timeout=0.5)
            except TimeoutError:
                if client.nthreads():
                    alone_since = None
                    continue
                alone_since = alone_since or time.monotonic()
                if time.monotonic() - alone_since > self.no_worker_timeout:
                    with contextlib.suppress(Exception):
                        client.cancel([future], force=True)
                    return failure_for(
                        unit,
                        f"no Dask worker connected to {self.address} for "
                        f"{self.no_worker_timeout:g} s",
                    )
            except SelectionError:
                raise
            except Exception as error:
                reason = f"{type(error).__name__}: {error}".rstrip(": ")
                return failure_for(unit, f"failed on the Dask cluster ({reason})")


def _token() -> str:
    import uuid

    return uuid.uuid4().hex[:12]


def _merged(unit: object, outcomes: Sequence[Any]) -> Any:
    """One checkpoint's report from the reports of its layer chunks (layers and skipped
    layers in id order), or the first failure among them."""
    from wwcli.results import CheckpointReport

    reports = [outcome for outcome in outcomes if isinstance(outcome, CheckpointReport)]
    if len(reports) != len(outcomes):
        return next(outcome for outcome in outcomes if not isinstance(outcome, CheckpointReport))
    first = reports[0]
    layers = sorted(
        (layer for report in reports for layer in report.layers),
        key=lambda result: result.spec.layer_id,
    )
    skipped = sorted(
        (layer for report in reports for layer in report.skipped),
        key=lambda item: item.layer_id,
    )
    return dataclasses.replace(first, layers=tuple(layers), skipped=tuple(skipped))
