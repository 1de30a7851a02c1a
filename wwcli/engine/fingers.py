"""weightwatcher 0.7.7's `fix_fingers='clip_xmax'`: refit the tail with the top eigenvalues
removed, and keep such a fit when it lowers alpha a lot.

A few large eigenvalues set apart from the rest ("fingers", a finite-size effect) can make the
KS selection pick a short tail with a spuriously large alpha. weightwatcher's remedy
(``RMT_Util.fit_clipped_powerlaw``, called from ``WeightWatcher.fit_powerlaw``), which this
module reproduces:

- Data: the eigenvalues strictly above the threshold, sorted; the first fit is the ordinary one
  (``powerlaw.fit_power_law``), its alpha is `raw_alpha`.
- For k = 2, 3, ..., max_fingers - 1 (k = 1 is never tried): fit the data without its k largest
  values. Stop at the first k whose alpha + finger_thresh (1.0) is below the first fit's alpha:
  that fit is kept and weightwatcher reports ``num_fingers = k - 1`` (so "1 finger" is the fit
  without the top 2). Stop without a change when a clipped alpha is <= 2.0 (`min_alpha`, tested
  after the first rule). When no k qualifies, the first fit stays and num_fingers is 0.
- max_fingers: weightwatcher resets it to 10 unless it is >= half the layer's eigenvalues
  (``effective_max_fingers``); the default 10 is therefore always 10.
- What is then reported: alpha, xmin, xmax (the largest eigenvalue left), D and sigma of the
  kept fit; num_pl_spikes counts all the layer's eigenvalues >= that xmin, the clipped ones
  included (weightwatcher's count). alpha_weighted, log_alpha_norm and the verdict follow the
  kept alpha (weightwatcher's ``apply_norm_metrics`` reads the column it wrote).

Where wwcli differs, on purpose:

- After stopping, weightwatcher fits the data without 1, 2 and 3 more values "to check" and
  only logs the result; those fits never change what it reports, so wwcli skips them. When they
  run out of data (fewer than 2 values left; layers with about 14 or fewer eigenvalues above the
  threshold) weightwatcher's exception handler fails the whole layer (alpha -1); wwcli reports
  the fit it had found.
- A clipped fit with fewer than 2 values, or one that cannot give a finite exponent (all the
  values left are equal: weightwatcher's small-N branch then returns alpha 0, which it would
  keep), fails the layer with a message.

Cost: at most max_fingers - 1 extra fits of the layer's spectrum (each O(n log n) plus the pruned
KS search), typically 8 fits: about 8x the plain fit, still small next to the eigenvalues.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from wwcli.engine.powerlaw import fit_power_law
from wwcli.engine.results import FitStatus, PowerLawFit

__all__ = [
    "DEFAULT_FINGER_THRESH",
    "DEFAULT_MAX_FINGERS",
    "DEFAULT_MIN_ALPHA",
    "ClippedFit",
    "clip_xmax_fit",
    "effective_max_fingers",
]

DEFAULT_MAX_FINGERS = 10
"""weightwatcher's DEFAULT_MAX_FINGERS: clipped fits without the top k = 2 .. 9 values."""
DEFAULT_FINGER_THRESH = 1.0
"""weightwatcher's DEFAULT_FINGER_THRESH: a clipped fit is kept when its alpha is lower by more."""
DEFAULT_MIN_ALPHA = 2.0
"""``fit_clipped_powerlaw``'s min_alpha: clipping stops at a clipped alpha <= this."""


@dataclass(frozen=True)
class ClippedFit:
    """The outcome of clip_xmax: the fit weightwatcher reports, its first (unclipped) fit, and
    how many fingers it counts."""

    fit: PowerLawFit
    """The kept fit (the first one when nothing was clipped), num_pl_spikes over all values."""
    raw_fit: PowerLawFit
    """The ordinary fit of all the values above the threshold (its alpha is `raw_alpha`)."""
    num_fingers: int
    """k - 1 when the fit without the top k values was kept, 0 otherwise."""
    clipped: int
    """How many of the largest values the kept fit left out: k, or 0 (num_fingers is k - 1)."""


def effective_max_fingers(max_fingers: int | None, num_evals: int) -> int:
    """weightwatcher's reset rule (``fit_powerlaw``): `max_fingers` becomes 10 when it is None,
    negative or less than half of `num_evals` (all the layer's eigenvalues, zeros included)."""
    if max_fingers is None or max_fingers < 0 or max_fingers < 0.5 * num_evals:
        return DEFAULT_MAX_FINGERS
    return max_fingers


def clip_xmax_fit(
    eigenvalues: ArrayLike,
    *,
    threshold: float = 1e-5,
    max_fingers: int | None = DEFAULT_MAX_FINGERS,
    finger_thresh: float = DEFAULT_FINGER_THRESH,
    min_alpha: float = DEFAULT_MIN_ALPHA,
    raw_fit: PowerLawFit | None = None,
) -> ClippedFit:
    """weightwatcher 0.7.7's clip_xmax fit of the eigenvalues above `threshold` (module doc).

    `eigenvalues` are all the layer's eigenvalues (any order); `raw_fit` is their ordinary fit
    when the caller has it (``fit_power_law(eigenvalues, threshold=threshold)``), computed
    otherwise. A failed first fit is returned as it is, with 0 fingers. Never raises for bad
    numbers; ValueError for a `threshold` that ``fit_power_law`` refuses or eigenvalues that are
    not 1-D. Cost: up to max_fingers - 1 fits of the spectrum.
    """
    values: NDArray[Any] = np.asarray(eigenvalues, dtype=np.float64)
    first = raw_fit if raw_fit is not None else fit_power_law(values, threshold=threshold)
    if first.status is not FitStatus.SUCCESS:
        return ClippedFit(fit=first, raw_fit=first, num_fingers=0, clipped=0)
    data = np.sort(values[values > threshold])
    limit = effective_max_fingers(max_fingers, values.size)
    for k in range(2, limit):
        if data.size - k < 2:
            message = (
                f"clip_xmax: {data.size} eigenvalues above the threshold leave fewer than 2 "
                f"without the top {k} (weightwatcher fails such a layer too)"
            )
            return ClippedFit(PowerLawFit.failed(message), first, 0, 0)
        fit = fit_power_law(data[: data.size - k], threshold=threshold)
        if fit.status is not FitStatus.SUCCESS or not math.isfinite(fit.alpha):
            message = f"clip_xmax: the fit without the top {k} eigenvalues failed: {fit.message}"
            return ClippedFit(PowerLawFit.failed(message), first, 0, 0)
        if fit.alpha + finger_thresh < first.alpha:
            spikes = int(np.count_nonzero(values >= fit.xmin))
            kept = dataclasses.replace(fit, num_pl_spikes=spikes)
            return ClippedFit(fit=kept, raw_fit=first, num_fingers=k - 1, clipped=k)
        if fit.alpha <= min_alpha:
            break
    return ClippedFit(fit=first, raw_fit=first, num_fingers=0, clipped=0)
