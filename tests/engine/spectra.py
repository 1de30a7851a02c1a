"""Seeded matrices and spectra with known properties, shared by the engine tests."""

from __future__ import annotations

import functools

import numpy as np
import scipy.linalg
from numpy.typing import NDArray


def orthogonal(rng: np.random.Generator, size: int) -> NDArray[np.float64]:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((size, size)))
    return q * np.sign(np.diag(r))


def with_singular_values(
    rng: np.random.Generator, rows: int, columns: int, singular_values: NDArray[np.float64]
) -> NDArray[np.float64]:
    """U diag(s) V^T with random orthogonal U (rows x k) and V (columns x k), k = len(s)."""
    k = singular_values.size
    u = orthogonal(rng, rows)[:, :k]
    v = orthogonal(rng, columns)[:, :k]
    return (u * singular_values) @ v.T


def heavy_tailed(
    rng: np.random.Generator, rows: int, columns: int, df: float
) -> NDArray[np.float64]:
    """Student-t entries: heavy-tailed ESDs like those of trained layers (smaller df, heavier)."""
    return rng.standard_t(df, size=(rows, columns)) / np.sqrt(columns)


def marchenko_pastur(rng: np.random.Generator, n: int, rows: int) -> NDArray[np.float64]:
    """The n eigenvalues of W^T W / rows for a Gaussian rows x n matrix W, in O(n^2): the
    Dumitriu-Edelman bidiagonal model B (diagonal chi_{rows - i}, superdiagonal chi_{n - 1 - i})
    has the same eigenvalue distribution, and B^T B is tridiagonal."""
    diagonal = np.sqrt(rng.chisquare(rows - np.arange(n)))
    upper = np.sqrt(rng.chisquare(n - 1 - np.arange(n - 1)))
    main = diagonal**2 + np.concatenate([[0.0], upper**2])
    off = diagonal[:-1] * upper
    values = scipy.linalg.eigvalsh_tridiagonal(main, off)
    return np.sort(np.maximum(values, 0.0)) / rows


@functools.cache
def _spectrum(kind: str, n: int, seed: int) -> NDArray[np.float64]:
    rng = np.random.default_rng([seed, n])
    if kind == "pareto":
        values = 1.0 + rng.pareto(1.5, size=n)
    elif kind == "geometric":
        values = np.geomspace(1.0, 1e3, n)
    elif kind == "mp":
        values = marchenko_pastur(rng, n, 2 * n)
    elif kind.startswith("mp+tail"):
        # An MP bulk whose top 10 % is replaced by a power-law tail from the bulk edge.
        bulk = marchenko_pastur(rng, n, 2 * n)
        tail_size = n // 10
        exponent = float(kind.removeprefix("mp+tail"))
        tail = bulk[-1] * (1.0 + rng.pareto(exponent - 1.0, size=tail_size))
        values = np.concatenate([bulk[: n - tail_size], tail])
    elif kind.startswith("t"):
        w = rng.standard_t(float(kind[1:]), size=(2 * n, n))
        values = np.linalg.eigvalsh(w.T @ w) / (2 * n)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    values = np.sort(values)
    values.setflags(write=False)
    return values


def spectrum(kind: str, n: int, seed: int = 0) -> NDArray[np.float64]:
    """n sorted eigenvalues (read-only, cached) of a kind: "mp" (Gaussian weights, the
    Marchenko-Pastur bulk), "mp+tail<exponent>" (that bulk with a power-law top 10 %),
    "t<df>" (Student-t weights: a real matrix, O(n^3), keep n small), "pareto" (i.i.d. Pareto
    samples of exponent 2.5), "geometric" (an exact x^-1 law: every candidate's D is alike, the
    hardest case for a pruned search)."""
    return _spectrum(kind, n, seed)
