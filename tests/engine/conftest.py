"""Engine tests run BLAS on one thread: the matrices here are small, and on a shared machine
several BLAS threads competing with other work for two cores run many times slower."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread() -> Iterator[None]:
    with threadpool_limits(limits=1, user_api="blas"):
        yield
