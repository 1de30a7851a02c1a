"""Frozen values the engine returns: a power-law fit, the metrics of a layer, and its verdict."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class FitStatus(enum.StrEnum):
    """Whether the power-law fit produced an exponent."""

    SUCCESS = "success"
    FAILED = "failed"


class Verdict(enum.StrEnum):
    """What alpha says about a layer (REFERENCE.md "The verdict on a layer")."""

    OVER_TRAINED = "over-trained"
    """alpha below the over-trained threshold (2 by default): very heavy-tailed."""
    UNDER_TRAINED = "under-trained"
    """alpha above the under-trained threshold (6 by default)."""
    TYPICAL = "typical"
    """alpha between the two thresholds."""
    FAILED = "failed"
    """No exponent could be fitted; never counted as over-trained."""


@dataclass(frozen=True)
class PowerLawFit:
    """A continuous power-law fit of the tail of an eigenvalue spectrum."""

    status: FitStatus
    """SUCCESS when alpha is a real exponent; FAILED otherwise (then the numbers are NaN / -1)."""
    alpha: float
    """Power-law exponent of the tail (NaN when failed)."""
    xmin: float
    """Start of the tail: the chosen candidate eigenvalue (NaN when failed)."""
    xmax: float
    """Largest eigenvalue used by the fit (NaN when failed)."""
    D: float
    """Kolmogorov-Smirnov distance between the tail and the fitted law (NaN when failed)."""
    sigma: float
    """Standard error of alpha: (alpha - 1) / sqrt(tail size) (NaN when failed)."""
    num_pl_spikes: int
    """Number of eigenvalues >= xmin (-1 when failed)."""
    message: str = ""
    """Why the fit failed; "" on success."""

    @classmethod
    def failed(cls, message: str) -> PowerLawFit:
        """A failed fit: NaN numbers, -1 spikes, and why."""
        nan = math.nan
        return cls(FitStatus.FAILED, nan, nan, nan, nan, nan, -1, message)


@dataclass(frozen=True)
class TailTests:
    """Likelihood-ratio tests of the fitted tail (``powerlaw`` 1.5's
    ``Fit.distribution_compare(..., normalized_ratio=True)``): is a power law a better description
    of the eigenvalues >= xmin than a lognormal, or an exponential?

    R > 0 favours the power law, R < 0 the alternative; p is the significance of R's sign (small:
    the sign is meaningful; large: the data cannot tell the two apart). R is normalized
    (R / sqrt(n variance)). NaN numbers with a `message` when the test could not run."""

    R_lognormal: float
    """Normalized log-likelihood ratio, power law vs lognormal."""
    p_lognormal: float
    """Its p-value."""
    R_exponential: float
    """Normalized log-likelihood ratio, power law vs exponential."""
    p_exponential: float
    """Its p-value."""
    message: str = ""
    """Why the tests did not run; "" when they did."""

    @classmethod
    def failed(cls, message: str) -> TailTests:
        """Tests that could not run: NaN numbers, and why."""
        nan = math.nan
        return cls(nan, nan, nan, nan, message)


@dataclass(frozen=True)
class LayerMetrics:
    """Everything the engine computes for one layer's (pooled) spectrum."""

    N: int
    """Larger side of the layer's matrices."""
    M: int
    """Smaller side of the layer's matrices."""
    rf: int
    """Number of matrices pooled into the spectrum."""
    num_evals: int
    """Number of eigenvalues in the spectrum (M * rf)."""
    fit: PowerLawFit
    """The power-law fit of the tail."""
    lambda_max: float
    """Largest eigenvalue (= spectral_norm: squared largest singular value)."""
    norm: float
    """Sum of the eigenvalues (squared Frobenius norm)."""
    log_norm: float
    """log10(norm)."""
    log_spectral_norm: float
    """log10(lambda_max)."""
    alpha_weighted: float
    """alpha * log10(lambda_max) (NaN when the fit failed)."""
    log_alpha_norm: float
    """log10(sum(lambda ** alpha)) (NaN when the fit failed)."""
    stable_rank: float
    """norm / lambda_max."""
    entropy: float
    """Normalized matrix entropy of the spectrum, as weightwatcher computes it."""
    matrix_rank: int
    """Numerical rank, as weightwatcher computes it."""
    verdict: Verdict
    """over-trained / under-trained / typical / failed."""
    warning: str
    """weightwatcher's label for comparison: "over-trained", "under-trained" or "" (also "" when
    the fit failed: weightwatcher would call such a layer over-trained, which is a defect)."""
    num_fingers: int | None = None
    """fix_fingers='clip_xmax' only: weightwatcher's count of clipped top eigenvalues (k - 1
    when the fit without the top k was kept; 0 when the unclipped fit was kept)."""
    raw_alpha: float | None = None
    """fix_fingers='clip_xmax' only: alpha of the unclipped fit (NaN when it failed)."""
    Lambda: float | None = None
    """fit='tpl' only: the truncated power law's exponential cutoff rate (NaN when failed)."""
    tail_tests: TailTests | None = None
    """tail_tests only: the likelihood-ratio tests of the fitted tail."""

    @property
    def alpha(self) -> float:
        """Shortcut for fit.alpha."""
        return self.fit.alpha

    @property
    def spectral_norm(self) -> float:
        """Alias of lambda_max, weightwatcher's name for it."""
        return self.lambda_max
