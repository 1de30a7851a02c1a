"""Layer metrics from an eigenvalue spectrum and its power-law fit, and the verdict on alpha.

The formulas are weightwatcher 0.7.7's ``apply_norm_metrics`` (and RMT_Util's ``matrix_rank`` and
``matrix_entropy``), over all the layer's eigenvalues (pooled for a conv layer):

- lambda_max = max(lambda) (= spectral_norm); log_spectral_norm = log10(lambda_max)
- norm = sum(lambda); log_norm = log10(norm); stable_rank = norm / lambda_max
- alpha_weighted = alpha * log10(lambda_max); log_alpha_norm = log10(sum(lambda ** alpha))
- matrix_rank = #{sqrt(lambda) > sqrt(lambda_max) * N * eps}, eps of float64, N the larger side
- entropy = -sum(p ln p) / ln(rank + 1e-10), p = lambda / sum(lambda) + 1e-10, over *all* the
  eigenvalues (zeros included), with that rank

Differences from weightwatcher, on purpose (REFERENCE.md says failed fits are not over-trained):

- A failed fit gives NaN for alpha_weighted and log_alpha_norm (weightwatcher computes them with
  alpha = -1) and the verdict FAILED with warning "" (weightwatcher: "over-trained").
- log10 of a zero norm or lambda_max is NaN, as is stable_rank when lambda_max is 0
  (weightwatcher: -inf and nan with a RuntimeWarning).
- entropy is NaN when the rank is below 2: weightwatcher divides by ln(1 + 1e-10) ~ 1e-10 for a
  rank-1 matrix (giving about 23 (M - 1), which means nothing) and by a negative number for
  rank 0.
- The rank needs singular values down to sv_max * N * eps, far below what a Gram resolves
  (eigenvalues to about M * eps * lambda_max, ``esd.gram_noise_floor``). When every eigenvalue is
  above twice that floor, all of them count, as in weightwatcher; otherwise ``analyze_layer``
  takes the rank from a full SVD (``esd.svd_matrix_rank``) and passes it in. Without it,
  ``matrix_rank`` counts eigenvalues under ``noise_floor`` as zero.
- REFERENCE.md says entropy is taken "over the nonzero eigenvalues"; the 0.7.7 code sums over all
  of them with p + 1e-10 (a zero contributes 1e-10 * 23.03); we follow the code. (0.7.7 uses
  6e-5 instead of 1e-10 when torch sees a CUDA device; parity is defined on CPU.)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wwcli.engine.results import FitStatus, LayerMetrics, PowerLawFit, Verdict

__all__ = [
    "ENTROPY_EPSILON",
    "layer_metrics",
    "matrix_entropy",
    "matrix_rank",
    "verdict",
    "warning_label",
]

ENTROPY_EPSILON = 1e-10
"""weightwatcher's EPSILON, added to every p and to the rank in the entropy (CPU value)."""


def _log10(value: float) -> float:
    return math.log10(value) if value > 0 else math.nan


def matrix_rank(eigenvalues: NDArray[np.float64], *, N: int, noise_floor: float = 0.0) -> int:
    """Numerical rank as weightwatcher computes it from the singular values sqrt(lambda):
    those above max(sv) * N * eps(float64); eigenvalues <= `noise_floor` count as zero. O(n)."""
    if eigenvalues.size == 0:
        return 0
    singular_values = np.sqrt(eigenvalues)
    tolerance = singular_values.max() * N * np.finfo(np.float64).eps
    return int(np.count_nonzero((singular_values > tolerance) & (eigenvalues > noise_floor)))


def matrix_entropy(eigenvalues: NDArray[np.float64], *, rank: int) -> float:
    """weightwatcher's normalized matrix entropy: -sum(p ln p) / ln(rank + 1e-10) with
    p = lambda / sum(lambda) + 1e-10 over all eigenvalues; NaN when rank < 2 or sum is 0. O(n)."""
    total = float(eigenvalues.sum())
    if rank < 2 or not (total > 0 and math.isfinite(total)):
        return math.nan
    p = eigenvalues / total + ENTROPY_EPSILON
    return float(-np.sum(p * np.log(p)) / np.log(rank + ENTROPY_EPSILON))


def verdict(
    fit: PowerLawFit, *, over_trained_below: float = 2.0, under_trained_above: float = 6.0
) -> Verdict:
    """over-trained when alpha < over_trained_below, under-trained when alpha >
    under_trained_above, typical in between; FAILED for a failed fit (never over-trained)."""
    if over_trained_below > under_trained_above:
        raise ValueError(
            f"over_trained_below ({over_trained_below}) must be <= "
            f"under_trained_above ({under_trained_above})"
        )
    if fit.status is not FitStatus.SUCCESS or not math.isfinite(fit.alpha):
        return Verdict.FAILED
    if fit.alpha < over_trained_below:
        return Verdict.OVER_TRAINED
    if fit.alpha > under_trained_above:
        return Verdict.UNDER_TRAINED
    return Verdict.TYPICAL


def warning_label(layer_verdict: Verdict) -> str:
    """weightwatcher's `warning` column for a verdict: "over-trained", "under-trained" or ""."""
    if layer_verdict in (Verdict.OVER_TRAINED, Verdict.UNDER_TRAINED):
        return str(layer_verdict)
    return ""


def layer_metrics(
    eigenvalues: NDArray[Any],
    *,
    N: int,
    M: int,
    rf: int,
    fit: PowerLawFit,
    rank: int | None = None,
    noise_floor: float = 0.0,
    over_trained_below: float = 2.0,
    under_trained_above: float = 6.0,
) -> LayerMetrics:
    """All metrics of a layer from its (pooled) eigenvalues and their power-law fit. O(n).

    `eigenvalues` are the layer's num_evals values (non-negative, finite). `rank` is the
    matrix rank when the caller knows it better (from an SVD); otherwise it is computed from the
    eigenvalues, those under `noise_floor` counting as zero (0 for exact eigenvalues).
    """
    values = np.asarray(eigenvalues, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"eigenvalues must be a non-empty 1-D array, got shape {values.shape}")
    lambda_max = float(values.max())
    norm = float(values.sum())
    log_spectral_norm = _log10(lambda_max)
    layer_verdict = verdict(
        fit, over_trained_below=over_trained_below, under_trained_above=under_trained_above
    )
    if layer_verdict is Verdict.FAILED:
        alpha_weighted = log_alpha_norm = math.nan
    else:
        alpha_weighted = fit.alpha * log_spectral_norm
        with np.errstate(over="ignore"):
            log_alpha_norm = _log10(float(np.sum(values**fit.alpha)))
    if rank is None:
        rank = matrix_rank(values, N=N, noise_floor=noise_floor)
    return LayerMetrics(
        N=N,
        M=M,
        rf=rf,
        num_evals=int(values.size),
        fit=fit,
        lambda_max=lambda_max,
        norm=norm,
        log_norm=_log10(norm),
        log_spectral_norm=log_spectral_norm,
        alpha_weighted=alpha_weighted,
        log_alpha_norm=log_alpha_norm,
        stable_rank=norm / lambda_max if lambda_max > 0 else math.nan,
        entropy=matrix_entropy(values, rank=rank),
        matrix_rank=rank,
        verdict=layer_verdict,
        warning=warning_label(layer_verdict),
    )
