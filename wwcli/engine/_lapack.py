"""LAPACK's two-stage symmetric eigensolver (``dsyevd_2stage``), eigenvalues only, from the
OpenBLAS that numpy already loaded.

numpy's ``eigvalsh`` calls ``dsyevd``, whose one-stage reduction to tridiagonal form is half
memory-bound. The two-stage reduction (dense -> band -> tridiagonal) does most of its work in
BLAS-3 blocks: measured here on one thread (benchmarks/bench_solvers.py) it is 1.15-1.4x as fast
as syevd from 1024 to 2048 and 1.55-1.6x at 3072 and 4096, and 7 % slower at 768, so ``esd``
uses it from ``TWO_STAGE_MIN_ORDER`` up. numpy and scipy do not expose these drivers, so they
are called here through ctypes from numpy's own OpenBLAS (the pip wheels bundle
``libscipy_openblas64_``, whose LAPACKE symbols carry a ``scipy_`` prefix and a ``64_`` suffix
and take 64-bit integers).

Where no such library or symbol is found (numpy built against MKL or Accelerate, say), or where
a self-check on a small matrix of known spectrum disagrees with ``numpy.linalg.eigvalsh``,
``two_stage_eigvalsh`` returns None and the caller uses ``numpy.linalg.eigvalsh``: the results
are the same to round-off either way. ctypes releases the GIL during the call, so layers still
run in parallel threads.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["TWO_STAGE_MIN_ORDER", "two_stage_eigvalsh"]

TWO_STAGE_MIN_ORDER = 1024
"""Smallest Gram order for which the two-stage solver is used (the measured crossover lies
between 768 and 1024)."""

_LAPACK_COL_MAJOR = 102

# (symbol, C type of lapack_int): only names whose integer width is certain.
_CANDIDATES: tuple[tuple[str, Any], ...] = (
    ("scipy_LAPACKE_dsyevd_2stage64_", ctypes.c_int64),  # numpy's scipy-openblas64 (ILP64)
    ("LAPACKE_dsyevd_2stage64_", ctypes.c_int64),  # OpenBLAS built with a 64_ symbol suffix
    ("scipy_LAPACKE_dsyevd_2stage", ctypes.c_int32),  # scipy's scipy-openblas32 (LP64)
)

_Solver = Callable[[NDArray[np.float64]], "NDArray[np.float64] | None"]

_lock = threading.Lock()
_solver: _Solver | None = None
_resolved = False
enabled = True
"""Set to False to always use numpy.linalg.eigvalsh (tests and benchmarks compare the two)."""


def _bind(function: Any, int_type: Any) -> _Solver:
    function.restype = int_type
    function.argtypes = [
        ctypes.c_int,  # matrix_layout
        ctypes.c_char,  # jobz
        ctypes.c_char,  # uplo
        int_type,  # n
        ctypes.c_void_p,  # a
        int_type,  # lda
        ctypes.c_void_p,  # w
    ]

    def solve(gram: NDArray[np.float64]) -> NDArray[np.float64] | None:
        """Eigenvalues (ascending) of the symmetric C-ordered float64 `gram`, which is destroyed;
        None if LAPACK reports an error or no convergence."""
        order = gram.shape[0]
        values = np.empty(order, dtype=np.float64)
        # A C-ordered symmetric matrix read column-major is itself. 'L' there is the upper
        # triangle of the C layout; it measured 5-30 % faster than 'U' at 1024 to 2048 (the
        # Grams wwcli forms are exactly symmetric: numpy mirrors the syrk triangle).
        info = function(
            _LAPACK_COL_MAJOR, b"N", b"L", order, gram.ctypes.data, order, values.ctypes.data
        )
        return values if info == 0 else None

    return solve


def _self_check(solve: _Solver) -> bool:
    """True when `solve` gives numpy's eigenvalues for a matrix of known spectrum (guards against
    a library whose calling convention is not the one its symbol name suggests)."""
    rng = np.random.default_rng(0)
    order = 48
    q, _ = np.linalg.qr(rng.standard_normal((order, order)))
    expected = np.geomspace(1e-3, 1e3, order)
    matrix = np.ascontiguousarray((q * expected) @ q.T)
    matrix = (matrix + matrix.T) / 2
    reference = np.linalg.eigvalsh(matrix)
    got = solve(matrix.copy())
    if got is None or got.shape != reference.shape:
        return False
    return bool(np.max(np.abs(got - reference)) <= 1e-10 * reference[-1])


def _find_solver() -> _Solver | None:
    try:
        from threadpoolctl import threadpool_info

        libraries = [
            info["filepath"] for info in threadpool_info() if info.get("internal_api") == "openblas"
        ]
    except Exception:  # any failure to inspect the libraries means: no two-stage solver
        return None
    for path in libraries:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol, int_type in _CANDIDATES:
            function = getattr(library, symbol, None)
            if function is None:
                continue
            solve = _bind(function, int_type)
            if _self_check(solve):
                return solve
    return None


def two_stage_eigvalsh(gram: NDArray[np.float64]) -> NDArray[np.float64] | None:
    """The eigenvalues (ascending) of the square symmetric float64 matrix `gram`, computed by
    LAPACK's two-stage ``dsyevd_2stage`` in place (`gram` is destroyed when it is C-ordered and
    writeable, copied otherwise); None where that solver is unavailable, disabled, or fails."""
    global _solver, _resolved
    if not enabled:
        return None
    if not _resolved:
        with _lock:
            if not _resolved:
                _solver = _find_solver()
                _resolved = True
    if _solver is None:
        return None
    if gram.dtype != np.float64 or not (gram.flags.c_contiguous and gram.flags.writeable):
        gram = np.array(gram, dtype=np.float64, order="C")
    return _solver(gram)
