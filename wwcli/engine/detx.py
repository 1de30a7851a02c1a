"""The detX (ERG) constraint of an eigenvalue spectrum: weightwatcher 0.7.7's ``detX=True``.

What weightwatcher computes (``apply_detX``, ``RMT_Util.detX_constraint``): the eigenvalues
are rescaled to mean 1 (x = W_scale^2 lambda, W_scale = sqrt(n) / sqrt(sum lambda)); walking down
from the top, detX_num is the size of the smallest top set whose product drops below 1 (the
"det X = 1" condition of the ERG theory), and idx the index of its smallest member. ERG_gap =
detX_num - num_pl_spikes (the power-law tail's size). Its value columns are named the other way
round from what they hold, and kept so for parity: ``detX_val`` is the eigenvalue at idx on the
input scale, ``detX_val_unrescaled`` the rescaled one.

weightwatcher takes np.prod of every top set in turn (O(n^2)); the product of the top k values
first grows (values >= 1), then falls, so the crossing is found here from the running sum of
logarithms (O(n), no overflow) and then confirmed with weightwatcher's own product test at the
crossing and its neighbours (the two can disagree only within round-off of 1, or where
weightwatcher's product under- or overflows; then the walk follows its test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["DetX", "detx"]

_MAX_STEPS = 64
"""Beyond this many steps from the logarithmic estimate, weightwatcher's whole walk is run."""


@dataclass(frozen=True)
class DetX:
    """The detX / ERG columns of a layer (weightwatcher's ``detX=True``)."""

    detX_num: int
    """Size of the smallest top set of rescaled eigenvalues whose product is below 1 (weightwatcher
    also reports it as num_ERG_spikes); -1 when it could not be computed."""
    detX_val: float
    """The smallest eigenvalue of that set, on the scale of the input eigenvalues."""
    detX_val_unrescaled: float
    """The same eigenvalue rescaled to mean eigenvalue 1 (weightwatcher's name, kept)."""
    ERG_gap: int | None
    """detX_num - num_pl_spikes; None when the power-law fit failed (no tail to compare)."""
    message: str = ""
    """Why numbers are NaN / -1 / None, or a note on a degenerate spectrum; "" otherwise."""


def _below_one(rescaled: NDArray[np.float64], index: int) -> bool:
    """weightwatcher's test: np.prod(evals[idx:]) < 1."""
    return bool(np.prod(rescaled[index:]) < 1.0)


def _walk(rescaled: NDArray[np.float64]) -> int:
    """weightwatcher's loop: the first idx from n - 1 down to 1 whose top product is below 1;
    1 when none is (its loop variable after the last pass). O(n^2)."""
    for index in range(rescaled.size - 1, 0, -1):
        if _below_one(rescaled, index):
            return index
    return 1


def _crossing(rescaled: NDArray[np.float64]) -> tuple[int, bool]:
    """(idx, found) as weightwatcher's loop ends, in O(n) but for a few products."""
    n = rescaled.size
    with np.errstate(divide="ignore"):
        # log_sums[k - 1] = sum of the logs of the top k values, k = 1 .. n - 1 (idx = n - k).
        log_sums = np.cumsum(np.log(rescaled[:0:-1]))
    below = np.flatnonzero(log_sums < 0.0)
    index = n - 1 - int(below[0]) if below.size else 1
    for _ in range(_MAX_STEPS):
        if not _below_one(rescaled, index):
            if index == 1:
                return 1, False  # like the estimate, the test never holds
            index -= 1  # the product is still >= 1 here: the crossing is further down
        elif index < n - 1 and _below_one(rescaled, index + 1):
            index += 1  # it already holds higher up
        else:
            return index, True
    index = _walk(rescaled)
    return index, _below_one(rescaled, index)


def detx(eigenvalues: NDArray[np.float64], *, num_pl_spikes: int) -> DetX:
    """The detX constraint of a layer's eigenvalues, as weightwatcher 0.7.7's
    ``analyze(detX=True)`` reports it (module docstring); `num_pl_spikes` is the power-law fit's
    tail size (negative when the fit failed: then ERG_gap is None).

    Degenerate spectra follow weightwatcher: fewer than 2 eigenvalues, or all equal, give
    detX_num 0 at index 0 (with a message); when no top set's product falls below 1, detX_num is
    n at index 1. Empty, non-finite or all-zero eigenvalues give -1 / NaN and a message. O(n).
    """
    values = np.sort(np.asarray(eigenvalues, dtype=np.float64).ravel())
    nan = math.nan
    if values.size == 0:
        return DetX(-1, nan, nan, None, "no eigenvalues")
    if not np.isfinite(values).all():
        return DetX(-1, nan, nan, None, "non-finite eigenvalues")
    if not np.sum(values) > 0:
        return DetX(-1, nan, nan, None, "the eigenvalues sum to zero: nothing to rescale")
    w_scale = np.sqrt(len(values)) / np.sqrt(np.sum(values))
    rescaled = (w_scale * w_scale) * values
    message = ""
    if values.size < 2 or not values[0] < values[-1]:
        count, index = 0, 0
        message = "fewer than 2 distinct eigenvalues: no detX tail"
    else:
        index, found = _crossing(rescaled)
        count = values.size - index if found else values.size
        if not found:
            message = "no top set of eigenvalues has a product below 1"
    gap = count - int(num_pl_spikes) if num_pl_spikes >= 0 else None
    if gap is None:
        message = "; ".join(filter(None, [message, "no power-law tail: no ERG_gap"]))
    return DetX(
        detX_num=int(count),
        detX_val=float(rescaled[index] / (w_scale * w_scale)),
        detX_val_unrescaled=float(rescaled[index]),
        ERG_gap=gap,
        message=message,
    )
