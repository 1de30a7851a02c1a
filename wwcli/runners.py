"""How the work units of a run are executed. A unit is a path (plus the run's settings, bound
into the function), never an open checkpoint, so a runner may send it to another process or
machine; results come back in input order, one at a time, as they are done."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

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
