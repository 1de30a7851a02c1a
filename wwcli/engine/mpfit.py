"""Marchenko-Pastur bulk fit of an eigenvalue spectrum: weightwatcher 0.7.7's ``mp_fit=True``.

What weightwatcher computes (``WeightWatcher.mp_fit``, ``RMT_Util.fit_density_with_range`` and
``resid_mp``), and what this module reproduces number for number:

- The eigenvalues are rescaled to mean 1: W_scale = sqrt(n) / sqrt(sum(lambda)), x = W_scale^2
  lambda (n = the number of eigenvalues, ``W_scale``).
- sigma is chosen by ``scipy.optimize.brute`` over the grid ``np.mgrid[0.05 s0 : 2.0 s0 : 0.01
  s0]`` (about 195 points), s0 = sqrt(max(x) / (1 + 1/sqrt(Q))^2), Q = N / M, followed by
  brute's default polish, ``scipy.optimize.fmin`` (Nelder-Mead) from the best grid point.
- The objective of a sigma: a linear-kernel KDE of the data (bandwidth 0.1; x itself, or
  sqrt(x) when Q == 1) on 1000 points of [0, max + 0.5]; points with density < 0.01 dropped; the
  sum of squares of MP density (or, when Q == 1, the quarter circle) minus the KDE, or 1000 per
  kept point when the MP edges miss the data (upper edge below the KDE's peak or above the last
  kept point, lower edge above the peak).
- bulk_max = (sigma (1 + 1/sqrt Q))^2, bulk_min = (sigma (1 - 1/sqrt Q))^2; a spike is an x above
  bulk_max + sqrt(Q^-1/2 bulk_max^(2/3) M^(-2/3)) (a Tracy-Widom margin); mp_softrank =
  bulk_max / max(x); bulk_max and bulk_min are reported on the scale of the input eigenvalues.

How it is fast: weightwatcher fits a sklearn ``KernelDensity`` and scores it on the 1000 points
for every sigma it tries (about 230 per layer). The KDE does not depend on sigma, so it is
computed once here, in numpy, in O(n * w) (each eigenvalue touches only the w grid points within
one bandwidth), and the whole grid of sigmas is scored in one vectorized pass. The polish is a
port of scipy's Nelder-Mead for one variable with fmin's defaults (xtol = ftol = 1e-4, at most
200 iterations and 200 evaluations, 5 % initial step), so that neither scipy.optimize (over a
second to import) nor sklearn is needed; the tests check the port against ``scipy.optimize.fmin``
and the whole fit against weightwatcher. The KDE's values differ from sklearn's (which sums in log
space) at round-off, about 1e-15 relative; everything else is the same arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "DENSITY_THRESHOLD",
    "KDE_BANDWIDTH",
    "KDE_POINTS",
    "MPFit",
    "linear_kde",
    "mp_fit",
    "nelder_mead_1d",
]

KDE_BANDWIDTH = 0.1
"""Bandwidth of weightwatcher's linear-kernel KDE of the rescaled eigenvalues."""
KDE_POINTS = 1000
"""The KDE is evaluated on this many evenly spaced points of [0, max + 0.5]."""
DENSITY_THRESHOLD = 0.01
"""Points where the KDE is below this are left out of the residual."""
_MISS_RESIDUAL = 1000.0
"""The residual of every kept point when the MP edges miss the data."""
_GRID_START, _GRID_STOP, _GRID_STEP = 0.05, 2.0, 0.01
"""The sigma grid, in units of sigma0 = sqrt(lambda_max) / (1 + 1/sqrt(Q))."""
_KDE_BLOCK = 1 << 20
"""The KDE is accumulated in blocks of about this many (eigenvalue, grid point) terms."""


@dataclass(frozen=True)
class MPFit:
    """A Marchenko-Pastur fit of a layer's spectrum (weightwatcher's ``mp_fit`` columns)."""

    num_spikes: int
    """Eigenvalues above the fitted bulk edge plus its Tracy-Widom margin (-1 when failed)."""
    sigma_mp: float
    """The fitted MP scale sigma, on the rescaled spectrum (mean eigenvalue 1)."""
    bulk_max: float
    """Upper MP edge (sigma (1 + 1/sqrt Q))^2, on the scale of the input eigenvalues."""
    bulk_min: float
    """Lower MP edge (sigma (1 - 1/sqrt Q))^2, on the scale of the input eigenvalues."""
    mp_softrank: float
    """bulk_max / lambda_max (either scale: the ratio is the same)."""
    W_scale: float
    """sqrt(n) / sqrt(sum of eigenvalues): the rescaling of W that makes the mean eigenvalue 1."""
    message: str = ""
    """Why the fit failed (then the numbers are NaN and num_spikes -1); "" on success."""

    @classmethod
    def failed(cls, message: str) -> MPFit:
        """A failed fit: NaN numbers, -1 spikes, and why."""
        nan = math.nan
        return cls(-1, nan, nan, nan, nan, nan, message)


def linear_kde(
    data: NDArray[np.float64], points: NDArray[np.float64], bandwidth: float = KDE_BANDWIDTH
) -> NDArray[np.float64]:
    """The linear-kernel density estimate of 1-D `data` at `points`, as sklearn's
    ``KernelDensity(kernel='linear', bandwidth=h).fit(data).score_samples`` exponentiated:
    sum_i max(0, 1 - |p - d_i| / h) / (n h) (the kernel is normalized to integrate to 1).

    `points` must be evenly spaced and ascending (a ``np.linspace``). Each datum only reaches the
    points within one bandwidth, so the cost is O(n w), w = min(len(points), 2 h / spacing + 3),
    in blocks of bounded memory; the result differs from sklearn's at round-off only.
    """
    data = np.asarray(data, dtype=np.float64).ravel()
    points = np.asarray(points, dtype=np.float64)
    count = points.size
    sums = np.zeros(count, dtype=np.float64)
    if data.size == 0 or count == 0:
        return sums
    spacing = (points[-1] - points[0]) / (count - 1) if count > 1 else math.inf
    width = count if not spacing > 0 else min(count, int(2.0 * bandwidth / spacing) + 3)
    offsets = np.arange(width, dtype=np.intp)
    rows = max(1, _KDE_BLOCK // width)
    for start in range(0, data.size, rows):
        block = data[start : start + rows, None]
        if width == count:
            first = np.zeros((block.shape[0], 1), dtype=np.intp)
        else:
            first = np.floor((block - bandwidth - points[0]) / spacing).astype(np.intp)
            np.clip(first, 0, count - width, out=first)
        indices = first + offsets
        distances = np.abs(points[indices] - block)
        weights = np.where(distances < bandwidth, 1.0 - distances / bandwidth, 0.0)
        sums += np.bincount(indices.ravel(), weights=weights.ravel(), minlength=count)
    density: NDArray[np.float64] = sums / (data.size * bandwidth)
    return density


class _Residual:
    """weightwatcher's ``resid_mp(sigma, data, Q, 0.1, allresid=False)`` for many sigmas at once.

    The KDE is computed once; ``__call__`` takes an array of sigmas and returns their residuals
    with the same elementwise arithmetic weightwatcher uses for one (each residual row also ends
    in the zeros weightwatcher appends for the dropped points, so numpy sums it in the same
    pairwise order).
    """

    def __init__(self, data: NDArray[np.float64], Q: float) -> None:
        points = np.linspace(0, np.max(data) + 0.5, KDE_POINTS)
        density = linear_kde(data, points)
        good = np.where(density > DENSITY_THRESHOLD)[0]
        self.dropped = int(np.count_nonzero(density < DENSITY_THRESHOLD))
        self.x = points[good]
        self.y = density[good]
        self.Q = Q
        if self.x.size:
            self.peak = float(self.x[np.argmax(self.y)])
            self.last = float(np.max(self.x))

    def __call__(self, sigmas: NDArray[np.float64]) -> NDArray[np.float64]:
        sigma = np.asarray(sigmas, dtype=np.float64).reshape(-1, 1)
        x, Q = self.x, self.Q
        with np.errstate(all="ignore"):
            if Q == 1:
                model = np.nan_to_num((1 / (np.pi * sigma * sigma)) * np.sqrt(4 - x**2))
                missed = np.zeros(sigma.shape[0], dtype=bool)
            else:
                y = 1 / Q
                b = np.power(sigma * (1 + np.sqrt(1 / Q)), 2)
                a = np.power(sigma * (1 - np.sqrt(1 / Q)), 2)
                model = np.nan_to_num(
                    (1 / (2 * np.pi * sigma * sigma * x * y)) * np.sqrt((b - x) * (x - a))
                )
                missed = ((b < self.peak) | (b > self.last) | (a > self.peak)).ravel()
            residual = np.zeros((sigma.shape[0], x.size + self.dropped), dtype=np.float64)
            residual[:, : x.size] = model - self.y
            residual[missed, : x.size] = _MISS_RESIDUAL
            sums: NDArray[np.float64] = np.sum(residual**2, axis=1)
        return sums


def nelder_mead_1d(
    function: Callable[[float], float],
    x0: float,
    *,
    xtol: float = 1e-4,
    ftol: float = 1e-4,
    maxiter: int = 200,
    maxfun: int = 200,
) -> float:
    """``scipy.optimize.fmin(function, x0, disp=False)[0]`` for one variable, step for step.

    scipy's ``_minimize_neldermead`` with its defaults (reflection 1, expansion 2, contraction
    and shrink 1/2, a first vertex 5 % away, or 0.00025 away from 0), the same order of
    operations, the same stopping rules and the same handling of the evaluation budget, written
    for one variable in plain floats. Returns the best vertex. O(maxfun) evaluations.
    """
    calls = 0

    class _BudgetSpentError(Exception):
        pass

    def evaluate(x: float) -> float:
        nonlocal calls
        if calls >= maxfun:
            raise _BudgetSpentError
        calls += 1
        return float(function(x))

    x0 = float(x0)
    sim = [x0, (1 + 0.05) * x0 if x0 != 0 else 0.00025]
    fsim = [math.inf, math.inf]
    try:
        for k in range(2):
            fsim[k] = evaluate(sim[k])
    except _BudgetSpentError:
        pass

    def order() -> None:
        # np.argsort of two values: the second first only when strictly smaller (NaN last).
        if fsim[1] < fsim[0] or (math.isnan(fsim[0]) and not math.isnan(fsim[1])):
            sim.reverse()
            fsim.reverse()

    order()
    iterations = 1
    while calls < maxfun and iterations < maxiter:
        try:
            if abs(sim[1] - sim[0]) <= xtol and abs(fsim[0] - fsim[1]) <= ftol:
                break
            xbar = sim[0] / 1
            xr = (1 + 1) * xbar - 1 * sim[-1]
            fxr = evaluate(xr)
            if fxr < fsim[0]:
                xe = (1 + 1 * 2) * xbar - 1 * 2 * sim[-1]
                fxe = evaluate(xe)
                if fxe < fxr:
                    sim[-1], fsim[-1] = xe, fxe
                else:
                    sim[-1], fsim[-1] = xr, fxr
            elif fxr < fsim[-2]:
                sim[-1], fsim[-1] = xr, fxr
            else:
                shrink = False
                if fxr < fsim[-1]:
                    xc = (1 + 0.5 * 1) * xbar - 0.5 * 1 * sim[-1]
                    fxc = evaluate(xc)
                    if fxc <= fxr:
                        sim[-1], fsim[-1] = xc, fxc
                    else:
                        shrink = True
                else:
                    xcc = (1 - 0.5) * xbar + 0.5 * sim[-1]
                    fxcc = evaluate(xcc)
                    if fxcc < fsim[-1]:
                        sim[-1], fsim[-1] = xcc, fxcc
                    else:
                        shrink = True
                if shrink:
                    sim[1] = sim[0] + 0.5 * (sim[1] - sim[0])
                    fsim[1] = evaluate(sim[1])
            iterations += 1
        except _BudgetSpentError:
            pass
        order()
    return sim[0]


def _brute_sigma(data: NDArray[np.float64], Q: float, scale_data: NDArray[np.float64]) -> float:
    """weightwatcher's ``fit_density_with_range``: brute force over the sigma grid, then the
    fmin polish; `data` is what the KDE sees, `scale_data` what sets sigma0."""
    inv_sqrt_q = 1.0 / np.sqrt(Q)
    sigma0 = np.sqrt(np.max(scale_data) / np.square(1 + inv_sqrt_q))
    grid = np.mgrid[slice(_GRID_START * sigma0, _GRID_STOP * sigma0, _GRID_STEP * sigma0)]
    residual = _Residual(data, Q)
    if residual.x.size == 0:
        raise ValueError("the density of the eigenvalues is below the threshold everywhere")
    scores = residual(grid)
    start = float(grid[int(np.argmin(scores))])
    return nelder_mead_1d(lambda sigma: float(residual(np.array([sigma]))[0]), start)


def mp_fit(
    eigenvalues: NDArray[np.float64],
    *,
    N: int,
    M: int,
    rf: int,
    lambda_max: float | None = None,
) -> MPFit:
    """The Marchenko-Pastur fit of a layer's pooled eigenvalues, as weightwatcher 0.7.7's
    ``analyze(mp_fit=True)`` reports it (module docstring).

    `eigenvalues`: the layer's eigenvalues (any order; Conv2D scaling already applied); N >= M
    the sides of one of its matrices; rf the number of matrices (not used by weightwatcher's
    formulas, which take n = len(eigenvalues) and M; kept for the interface). `lambda_max`: the
    largest eigenvalue when the caller has it; it must be max(eigenvalues) (weightwatcher's
    mp_softrank divides by the largest of the values fitted, so the random fit of a shuffled
    layer uses its own maximum). Non-finite or all-zero eigenvalues give ``MPFit.failed`` (where
    weightwatcher catches an exception and reports -1 everywhere); ValueError only for bad N, M.
    Cost: O(n w) for the KDE (w <= 1000), O(200 * 1000) for the grid and the polish.
    """
    for name, value in (("N", N), ("M", M), ("rf", rf)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if N < M:
        raise ValueError(f"N must be >= M, got N={N}, M={M}")
    values = np.asarray(eigenvalues, dtype=np.float64).ravel()
    if values.size == 0:
        return MPFit.failed("no eigenvalues")
    if not np.isfinite(values).all():
        return MPFit.failed("non-finite eigenvalues")
    total = float(np.sum(values))
    if not total > 0:
        return MPFit.failed("the eigenvalues sum to zero: nothing to rescale")
    Q = N / M
    w_scale = np.sqrt(values.shape[0]) / np.sqrt(np.sum(values))
    rescaled = (w_scale * w_scale) * values
    # Scaling is monotone, so the scaled maximum is the maximum of the scaled values, bit for bit.
    top = np.max(rescaled) if lambda_max is None else (w_scale * w_scale) * lambda_max
    try:
        sigma = _brute_sigma(np.sqrt(rescaled) if Q == 1 else rescaled, Q, rescaled)
    except ValueError as error:
        return MPFit.failed(str(error))
    bulk_max = (sigma * (1 + 1 / np.sqrt(Q))) ** 2
    bulk_min = (sigma * (1 - 1 / np.sqrt(Q))) ** 2
    tracy_widom = 1 / np.sqrt(Q) * np.power(bulk_max, 2 / 3) * np.power(M, -2 / 3)
    edge = bulk_max + np.sqrt(tracy_widom)
    num_spikes = int(np.count_nonzero(rescaled > edge))
    return MPFit(
        num_spikes=num_spikes,
        sigma_mp=float(sigma),
        bulk_max=float(bulk_max / (w_scale * w_scale)),
        bulk_min=float(bulk_min / (w_scale * w_scale)),
        mp_softrank=float(bulk_max / top),
        W_scale=float(w_scale),
    )
