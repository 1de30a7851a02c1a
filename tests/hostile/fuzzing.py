"""What the hostile-input tests share: hypothesis settings sized for CI and `-m slow`, the check
that only a one-line LoaderError naming the file comes out of a loader, and pickle payloads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

from wwcli.loaders import LoaderError, open_checkpoint


def fuzz_settings(examples: int, *, slow: bool = False) -> Callable[[Any], Any]:
    """`examples` derandomized examples in CI; ten times as many, random, under `-m slow`."""
    return settings(
        max_examples=examples * 10 if slow else examples,
        deadline=None,
        derandomize=not slow,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def read_everything(path: Path) -> None:
    """What `wwcli analyze` asks of a loader; only LoaderError (one line, naming the file) may
    come out."""
    try:
        with open_checkpoint(path) as checkpoint:
            for spec in checkpoint.layers():
                if spec.analyzable:
                    for matrix in checkpoint.matrices(spec):
                        assert matrix.ndim == 2
                        assert sorted(matrix.shape) == sorted((spec.M, spec.N))
    except LoaderError as error:
        message = str(error)
        assert message and "\n" not in message, message
        assert str(path) in message, message


class Reduces:
    """Pickles as whatever `__reduce__` value it is given: unpickling calls that callable."""

    def __init__(self, reduced: tuple[Any, ...]) -> None:
        self.reduced = reduced

    def __reduce__(self) -> tuple[Any, ...]:
        return self.reduced
