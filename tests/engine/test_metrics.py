"""Layer metrics and the verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.engine.spectra import spectrum
from wwcli.engine.metrics import (
    layer_metrics,
    matrix_entropy,
    matrix_rank,
    verdict,
    warning_label,
)
from wwcli.engine.powerlaw import fit_power_law
from wwcli.engine.results import FitStatus, PowerLawFit, Verdict


def _fit(alpha: float, status: FitStatus = FitStatus.SUCCESS) -> PowerLawFit:
    return PowerLawFit(status, alpha, 1.0, 10.0, 0.05, 0.1, 20)


def test_metrics_follow_their_formulas() -> None:
    values = np.array(spectrum("mp+tail2.5", 400, 1))
    fit = fit_power_law(values)
    metrics = layer_metrics(values, N=800, M=400, rf=1, fit=fit)
    lambda_max = values.max()
    assert metrics.lambda_max == lambda_max == metrics.spectral_norm
    assert metrics.norm == pytest.approx(values.sum(), rel=1e-14)
    assert metrics.log_norm == pytest.approx(math.log10(values.sum()), rel=1e-14)
    assert metrics.log_spectral_norm == pytest.approx(math.log10(lambda_max), rel=1e-14)
    assert metrics.alpha == fit.alpha
    assert metrics.alpha_weighted == pytest.approx(fit.alpha * math.log10(lambda_max), rel=1e-14)
    expected_log_alpha_norm = math.log10(sum(v**fit.alpha for v in values))
    assert metrics.log_alpha_norm == pytest.approx(expected_log_alpha_norm, rel=1e-12)
    assert metrics.stable_rank == pytest.approx(values.sum() / lambda_max, rel=1e-14)
    assert metrics.num_evals == 400
    assert (metrics.N, metrics.M, metrics.rf) == (800, 400, 1)
    assert metrics.matrix_rank == 400
    p = values / values.sum() + 1e-10
    expected_entropy = -np.sum(p * np.log(p)) / np.log(400 + 1e-10)
    assert metrics.entropy == pytest.approx(expected_entropy, rel=1e-12)
    assert metrics.verdict is verdict(fit)
    assert metrics.warning == warning_label(metrics.verdict)


def test_matrix_rank_uses_n_times_eps_on_singular_values() -> None:
    # weightwatcher: sv > max(sv) * N * eps; with N = 1000 the cut is sv_max * 2.2e-13.
    values = np.array([0.0, 1e-30, 1e-24, 1e-20, 1.0])  # sv: 0, 1e-15, 1e-12, 1e-10, 1
    assert matrix_rank(values, N=1000) == 3
    assert matrix_rank(values, N=10) == 3
    assert matrix_rank(values, N=10**5) == 2
    # ... and eigenvalues under the Gram's noise floor count as zero.
    assert matrix_rank(values, N=1000, noise_floor=1e-16) == 1
    assert matrix_rank(np.zeros(5), N=10) == 0


def test_entropy_is_undefined_below_rank_two() -> None:
    assert math.isnan(matrix_entropy(np.array([0.0, 0.0, 4.0]), rank=1))
    assert math.isnan(matrix_entropy(np.zeros(3), rank=0))
    uniform = matrix_entropy(np.ones(50), rank=50)
    assert uniform == pytest.approx(1.0, rel=1e-8)


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        (1.2, Verdict.OVER_TRAINED),
        (1.999, Verdict.OVER_TRAINED),
        (2.0, Verdict.TYPICAL),
        (4.0, Verdict.TYPICAL),
        (6.0, Verdict.TYPICAL),
        (6.001, Verdict.UNDER_TRAINED),
    ],
)
def test_verdict_thresholds(alpha: float, expected: Verdict) -> None:
    assert verdict(_fit(alpha)) is expected


def test_verdict_thresholds_are_parameters() -> None:
    assert verdict(_fit(2.4), over_trained_below=2.5) is Verdict.OVER_TRAINED
    assert verdict(_fit(5.0), under_trained_above=4.5) is Verdict.UNDER_TRAINED
    with pytest.raises(ValueError, match="over_trained_below"):
        verdict(_fit(3.0), over_trained_below=5.0, under_trained_above=4.0)


def test_warning_is_weightwatchers_label() -> None:
    assert warning_label(Verdict.OVER_TRAINED) == "over-trained"
    assert warning_label(Verdict.UNDER_TRAINED) == "under-trained"
    assert warning_label(Verdict.TYPICAL) == ""
    assert warning_label(Verdict.FAILED) == ""


@pytest.mark.parametrize("alpha", [-1.0, 0.5, 1.5, math.nan])
def test_a_failed_fit_is_never_over_trained(alpha: float) -> None:
    failed = _fit(alpha, FitStatus.FAILED)
    assert verdict(failed) is Verdict.FAILED
    metrics = layer_metrics(np.array([1.0, 2.0, 5.0]), N=3, M=3, rf=1, fit=failed)
    assert metrics.verdict is Verdict.FAILED
    assert metrics.warning == ""
    assert math.isnan(metrics.alpha_weighted)
    assert math.isnan(metrics.log_alpha_norm)
    assert metrics.lambda_max == 5.0  # metrics that do not need alpha are still there


def test_zero_spectrum_has_undefined_logs_not_infinities() -> None:
    failed = fit_power_law(np.zeros(10))
    metrics = layer_metrics(np.zeros(10), N=20, M=10, rf=1, fit=failed)
    assert metrics.norm == 0.0
    assert metrics.matrix_rank == 0
    for value in (metrics.log_norm, metrics.log_spectral_norm, metrics.stable_rank):
        assert math.isnan(value)


def test_empty_eigenvalues_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="eigenvalues"):
        layer_metrics(np.array([]), N=1, M=1, rf=1, fit=_fit(3.0))
