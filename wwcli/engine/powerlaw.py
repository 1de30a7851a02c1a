"""Continuous power-law fit of the tail of an eigenvalue spectrum, with KS selection of xmin.

The estimator and the selection are weightwatcher 0.7.7's (``WWFit``, its default
``pl_package='ww'``, ``fit='PL'``), computed without a Python loop over candidates:

- Data: the eigenvalues strictly above ``threshold`` (1e-5), sorted: x_0 <= ... <= x_{n-1}.
- Candidates for xmin: x_i for i = 0 .. n-2, tail size m = n - i, and
  s_i = sum_{j >= i} ln(x_j / x_i).
- Standard branch (n >= 20): alpha_i = 1 + m / s_i;
  D_i = max_{k=0..m-1} |1 - (x_{i+k} / x_i)^(1 - alpha_i) - k/m| where alpha_i > 1, else D_i = 1;
  the fit is the first i with the smallest D_i; sigma = (alpha - 1) / sqrt(m).
- Small-N branch (n < 20, ``WWFit.fit_powerlaw_smallN``): alpha_i = 1 + (m - 1) / s_i; only
  tails with m >= 8 and s_i > 1e-12 get a D (the others keep D = 1); the fit is again the first i
  with the smallest D. When no tail qualifies (in practice: n < 8), the whole data is the tail
  (i = 0).

How it is fast: s_i for every i comes from one suffix sum, O(n) (we sum the non-negative terms
(n - k) ln(x_k / x_{k-1}) rather than subtract n ln x_i from a sum of logs, so there is no
cancellation). D_i needs the whole tail, so the exhaustive search is O(n^2); we prune it exactly:
the largest KS term at 17 evenly spread ranks of a tail is a lower bound of D_i (a maximum over a
subset of the same terms, computed by the same arithmetic); candidates whose bound exceeds the
best D found so far are dropped, the others get tighter bounds (65, 257, ... ranks), and D_i
is computed in full only for the few still in reach, in order of their bound. The selection is
identical to the exhaustive one (``ks_distances``), which the tests check.

Where wwcli differs from weightwatcher 0.7.7, on purpose:

- The small-N selection: ``fit_powerlaw_smallN`` computes J_i = D_i - 0.868 / sqrt(m) and keeps
  the smallest J, but ``WWFit.__init__`` then overwrites that choice with ``argmin(self.Ds)``, so
  what 0.7.7 reports is the smallest D among the qualifying tails (REFERENCE.md's "smallest D" is
  right in effect; its "m >= 8" omits s_i > 1e-12 and the n < 8 fallback). We do the same.
- A fit that cannot produce a finite exponent is ``FitStatus.FAILED`` with a message, never a
  number. weightwatcher gives alpha = -1 after an exception (fewer than two values above the
  threshold), alpha = 0.0 in the small-N "pathological" case (s_0 <= 1e-12: the values are
  equal), an infinite alpha in the standard branch when all values are equal, and labels the
  first two over-trained.
- In the small-N fallback (no qualifying tail) weightwatcher reports sigma computed before alpha
  is set, i.e. -1 / sqrt(n); we report (alpha - 1) / sqrt(n).
- D uses exp((1 - alpha) ln(x_j / x_i)) instead of a power, and s_i is summed without
  cancellation; both differ from weightwatcher's arithmetic only at round-off (about 1e-15
  relative), so a different xmin can only come from two D values tied to that level.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from wwcli.engine.results import FitStatus, PowerLawFit

__all__ = [
    "SMALL_N_CUTOFF",
    "SMALL_N_MIN_TAIL",
    "fit_power_law",
    "ks_distances",
    "tail_alphas",
    "tail_log_sums",
]

SMALL_N_CUTOFF = 20
"""Below this many eigenvalues above the threshold, weightwatcher uses its small-N estimator."""
SMALL_N_MIN_TAIL = 8
"""Smallest tail the small-N branch considers (``k_min``)."""
_SMALL_N_MIN_LOG_SUM = 1e-12
"""The small-N branch skips tails with sum ln(x_j / x_i) <= 1e-12."""

_SAMPLE_INTERVALS = (16, 64, 256, 1024, 4096, 16384)
"""Lower bounds of D sample 17, then 65, 257, ... ranks of each tail still in reach (a tail that
short is evaluated exactly by its sample). Each must be a power of two."""
_SEEDS = 8
"""At each level, this many candidates with the lowest bounds are evaluated in full."""
_PRUNE_MARGIN = 1e-12
"""A candidate is pruned only when its lower bound exceeds the best D by more than this, so a
last-bit difference between two evaluations of the same term can never prune the minimum."""
_BLOCK_ELEMENTS = 1 << 18
"""KS terms are evaluated in blocks of about this many (2 MiB of float64 per temporary)."""


def tail_log_sums(data: NDArray[np.float64]) -> NDArray[np.float64]:
    """s_i = sum_{j >= i} ln(x_j / x_i) for i = 0 .. n-2 of sorted positive `data`, in O(n).

    Computed as the suffix sum of (n - k) ln(x_k / x_{k-1}), k = i+1 .. n-1: non-negative terms,
    so no cancellation, and s_i == 0 exactly when the tail's values are all equal.
    """
    n = data.size
    gaps = np.log1p(np.diff(data) / data[:-1])
    weighted = gaps * np.arange(n - 1, 0, -1, dtype=np.float64)
    sums: NDArray[np.float64] = np.cumsum(weighted[::-1])[::-1]
    return sums


def tail_alphas(data: NDArray[np.float64], *, bias_corrected: bool = False) -> NDArray[np.float64]:
    """alpha_i = 1 + m / s_i (or 1 + (m - 1) / s_i when `bias_corrected`) for every candidate
    i = 0 .. n-2 of sorted positive `data`; +inf where the tail's values are all equal. O(n)."""
    n = data.size
    tail_sizes = np.arange(n, 1, -1, dtype=np.float64)
    numerators = tail_sizes - 1.0 if bias_corrected else tail_sizes
    with np.errstate(divide="ignore"):
        alphas: NDArray[np.float64] = 1.0 + numerators / tail_log_sums(data)
    return alphas


def _ks_maxima(
    log_data: NDArray[np.float64],
    starts: NDArray[np.intp],
    alphas: NDArray[np.float64],
    ranks: NDArray[np.intp],
) -> NDArray[np.float64]:
    """max over the given ranks k of |1 - (x_{i+k} / x_i)^(1 - alpha_i) - k/m|, for each candidate
    i in `starts` (one row of ranks per candidate, each rank <= m - 1). Every caller computes a
    given (i, k) term with this same arithmetic, so a maximum over fewer ranks is never larger."""
    tail_sizes = (log_data.size - starts).astype(np.float64)[:, None]
    terms = log_data[starts[:, None] + ranks]
    terms -= log_data[starts][:, None]
    terms *= (1.0 - alphas[starts])[:, None]
    np.exp(terms, out=terms)
    np.subtract(1.0, terms, out=terms)
    terms -= ranks / tail_sizes
    np.abs(terms, out=terms)
    maxima: NDArray[np.float64] = terms.max(axis=1)
    return maxima


def _known_distances(
    alphas: NDArray[np.float64], n: int
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """D for the candidates that need no KS evaluation, and the mask of those that do.

    alpha <= 1 (or NaN): D = 1, as weightwatcher leaves it. alpha = +inf (a tail of equal values):
    every (x_j / x_i)^(1 - alpha) is 1, so D = max k/m = (m - 1) / m.
    """
    tail_sizes = np.arange(n, 1, -1, dtype=np.float64)
    distances = np.ones(alphas.size, dtype=np.float64)
    infinite = np.isposinf(alphas)
    distances[infinite] = (tail_sizes[infinite] - 1.0) / tail_sizes[infinite]
    to_evaluate = (alphas > 1.0) & ~infinite
    return distances, to_evaluate


def _exact_distances(
    log_data: NDArray[np.float64], alphas: NDArray[np.float64], starts: NDArray[np.intp]
) -> NDArray[np.float64]:
    """D_i over the whole tail for each candidate in `starts`, in blocks of bounded size."""
    n = log_data.size
    distances = np.empty(starts.size, dtype=np.float64)
    position = 0
    while position < starts.size:
        # At most 64 candidates, and fewer when their tails are long.
        width = n - int(starts[position : position + 64].min())
        block = starts[position : position + max(1, min(64, _BLOCK_ELEMENTS // width))]
        width = n - int(block.min())
        # Shorter tails repeat their last rank, a term that belongs to them.
        ranks = np.minimum(np.arange(width, dtype=np.intp)[None, :], (n - 1 - block)[:, None])
        distances[position : position + block.size] = _ks_maxima(log_data, block, alphas, ranks)
        position += block.size
    return distances


def ks_distances(
    data: NDArray[np.float64], alphas: NDArray[np.float64] | None = None
) -> NDArray[np.float64]:
    """The KS distance D_i of every candidate xmin = x_i, i = 0 .. n-2, exhaustively.

    `data` must be sorted ascending and positive (not checked); `alphas` defaults to
    ``tail_alphas(data)``. O(n^2) time, memory bounded by blocks of candidates. The fit itself
    prunes this search and selects the same candidate.
    """
    data = np.asarray(data, dtype=np.float64)
    if alphas is None:
        alphas = tail_alphas(data)
    distances, to_evaluate = _known_distances(alphas, data.size)
    starts = np.flatnonzero(to_evaluate)
    distances[starts] = _exact_distances(np.log(data), alphas, starts)
    return distances


def _sampled_distances(
    log_data: NDArray[np.float64],
    alphas: NDArray[np.float64],
    starts: NDArray[np.intp],
    intervals: int,
) -> NDArray[np.float64]:
    """The KS maximum over intervals + 1 evenly spread ranks of each tail, k = floor(q (m-1) /
    intervals) for q = 0 .. intervals (`intervals` a power of two). A lower bound of D_i, and
    equal to D_i when m - 1 <= intervals (then no rank is skipped). O(len(starts) * intervals)."""
    shift = intervals.bit_length() - 1
    steps = np.arange(intervals + 1, dtype=np.intp)[None, :]
    bounds = np.empty(starts.size, dtype=np.float64)
    rows = max(1, _BLOCK_ELEMENTS // (intervals + 1))
    for first in range(0, starts.size, rows):
        block = starts[first : first + rows]
        ranks = (steps * (log_data.size - 1 - block)[:, None]) >> shift
        bounds[first : first + block.size] = _ks_maxima(log_data, block, alphas, ranks)
    return bounds


def _select_standard(data: NDArray[np.float64], alphas: NDArray[np.float64]) -> tuple[int, float]:
    """(index, D) of the first candidate with the smallest D: the same answer as
    ``argmin(ks_distances(data, alphas))``, found without evaluating most tails in full.

    Lower bounds from 17 sampled ranks of every tail; then, for the candidates still in reach,
    from more ranks (while the tails are much longer than that), the few with the lowest bounds
    evaluated in full at each level to tighten the best D; then exact D in order of bound until
    the bound exceeds the best. Tails no longer than a sample are exact at that level. O(17 n) plus
    O(ranks) per candidate still in reach at each level plus O(n) per candidate evaluated in
    full (O(n^2) only when nearly every candidate is within reach, as for an exact x^-1 law).
    """
    n = data.size
    log_data = np.log(data)
    distances, to_evaluate = _known_distances(alphas, n)
    starts = np.flatnonzero(to_evaluate)
    distances[starts] = np.inf  # not evaluated (yet)
    bounds = np.zeros(starts.size)
    best = float(distances.min())
    for level, intervals in enumerate(_SAMPLE_INTERVALS):
        if level > 0:
            in_reach = bounds <= best + _PRUNE_MARGIN
            starts, bounds = starts[in_reach], bounds[in_reach]
            if starts.size == 0 or np.mean(n - starts) < 4 * (intervals + 1):
                break  # sampling this finely costs about what the exact D does
        sampled = _sampled_distances(log_data, alphas, starts, intervals)
        exact = (n - 1 - starts) <= intervals
        distances[starts[exact]] = sampled[exact]
        best = min(best, float(sampled[exact].min(initial=np.inf)))
        starts, bounds = starts[~exact], np.maximum(bounds, sampled)[~exact]
        # The lowest bounds point at the likely winners: their exact D tightens the best early.
        seeds = np.argsort(bounds, kind="stable")[:_SEEDS]
        seed_distances = _exact_distances(log_data, alphas, starts[seeds])
        distances[starts[seeds]] = seed_distances
        best = min(best, float(seed_distances.min(initial=np.inf)))
        others = np.ones(starts.size, dtype=np.bool_)
        others[seeds] = False
        starts, bounds = starts[others], bounds[others]
    order = np.argsort(bounds, kind="stable")
    pending, pending_bounds = starts[order], bounds[order]
    position = 0
    while position < pending.size and pending_bounds[position] <= best + _PRUNE_MARGIN:
        reachable = int(np.searchsorted(pending_bounds, best + _PRUNE_MARGIN, side="right"))
        block = pending[position : min(reachable, position + 64)]
        block_distances = _exact_distances(log_data, alphas, block)
        distances[block] = block_distances
        best = min(best, float(block_distances.min()))
        position += block.size
    index = int(np.argmin(distances))
    return index, float(distances[index])


def _fit_small_n(data: NDArray[np.float64]) -> tuple[int, float, float] | str:
    """(index, alpha, D) of weightwatcher's small-N fit, or why there is none.

    Candidates qualify with a tail of m >= 8 and s_i > 1e-12; the fit is the first qualifying
    candidate with the smallest D (weightwatcher leaves D = 1 for the others, and no computed D
    reaches 1). With none qualifying (n < 8) the whole data is the tail (i = 0).
    """
    n = data.size
    log_sums = tail_log_sums(data)
    alphas = tail_alphas(data, bias_corrected=True)
    tail_sizes = np.arange(n, 1, -1, dtype=np.float64)
    # log_sums > 0 and m >= 2 make alpha > 1, so every qualifying candidate has a real D.
    starts = np.flatnonzero((tail_sizes >= SMALL_N_MIN_TAIL) & (log_sums > _SMALL_N_MIN_LOG_SUM))
    if starts.size == 0:
        if log_sums[0] <= _SMALL_N_MIN_LOG_SUM:
            return (
                f"degenerate spectrum: the {n} eigenvalues above the threshold have "
                f"sum ln(x / xmin) = {log_sums[0]:.3g} <= 1e-12 (weightwatcher reports alpha 0)"
            )
        starts = np.zeros(1, dtype=np.intp)
    distances = _exact_distances(np.log(data), alphas, starts)
    best = int(np.argmin(distances))
    return int(starts[best]), float(alphas[starts[best]]), float(distances[best])


def fit_power_law(eigenvalues: ArrayLike, *, threshold: float = 1e-5) -> PowerLawFit:
    """Fit a continuous power law to the eigenvalues above `threshold`, choosing xmin by KS.

    Returns alpha, xmin, xmax (the largest eigenvalue), D, sigma = (alpha - 1) / sqrt(tail size)
    and num_pl_spikes = the number of all given eigenvalues >= xmin (weightwatcher's count).
    Never raises for bad numbers: non-finite eigenvalues, fewer than two values above the
    threshold or a degenerate tail give ``FitStatus.FAILED`` with a message. Raises ValueError
    only for a `threshold` that is not a finite number >= 0 or `eigenvalues` that are not 1-D.
    Cost: O(n log n) to sort, O(n) for every candidate's alpha, and the pruned KS search:
    O(17 n) plus a few hundred sampled ranks per candidate near the best plus O(n) per candidate
    evaluated in full; O(n^2) only in the worst case (an exact x^-1 law). Measured: ~2 ms for
    4096 values, ~130 ms for 50000 i.i.d. Pareto values (benchmarks/README.md).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise ValueError(f"threshold must be a real number, got {threshold!r}")
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be finite and >= 0, got {threshold}")
    values: NDArray[Any] = np.asarray(eigenvalues, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"eigenvalues must be 1-D, got shape {values.shape}")
    if not np.isfinite(values).all():
        return PowerLawFit.failed("non-finite eigenvalues")
    data = np.sort(values[values > threshold])
    n = data.size
    if n < 2:
        return PowerLawFit.failed(
            f"too few positive eigenvalues: {n} above the threshold {threshold:g} "
            "(a fit needs at least 2)"
        )
    if data[0] == data[-1]:
        return PowerLawFit.failed(
            f"all {n} eigenvalues above the threshold are equal ({data[0]:.6g}): no tail to fit"
        )
    if n < SMALL_N_CUTOFF:
        selection = _fit_small_n(data)
        if isinstance(selection, str):
            return PowerLawFit.failed(selection)
        index, alpha, distance = selection
    else:
        alphas = tail_alphas(data)
        index, distance = _select_standard(data, alphas)
        alpha = float(alphas[index])
    if not math.isfinite(alpha):
        return PowerLawFit.failed(
            f"alpha is not finite ({alpha}): the tail's eigenvalues are all equal"
        )
    xmin = float(data[index])
    return PowerLawFit(
        status=FitStatus.SUCCESS,
        alpha=alpha,
        xmin=xmin,
        xmax=float(data[-1]),
        D=distance,
        sigma=(alpha - 1.0) / math.sqrt(n - index),
        num_pl_spikes=int(np.count_nonzero(values >= xmin)),
    )
