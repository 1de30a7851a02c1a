"""The engine's entry points: check_size, analyze_layer (degenerate inputs included), options."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.engine.spectra import heavy_tailed, orthogonal
from wwcli.engine import (
    EngineOptions,
    FitStatus,
    LayerMetrics,
    Verdict,
    analyze_layer,
    check_size,
    pooled_eigenvalues,
)


def _assert_failed(metrics: LayerMetrics, reason: str) -> None:
    assert metrics.fit.status is FitStatus.FAILED
    assert reason in metrics.fit.message
    assert metrics.verdict is Verdict.FAILED
    assert metrics.warning == ""
    assert math.isnan(metrics.alpha)
    assert math.isnan(metrics.alpha_weighted)


# check_size


@pytest.mark.parametrize(
    ("N", "M", "rf", "options", "reason"),
    [
        (100, 7, 1, EngineOptions(), "7 eigenvalues < min_evals 8"),
        (100, 8, 1, EngineOptions(), None),
        (64, 3, 4, EngineOptions(), None),  # pooled: 12 eigenvalues
        (64, 1, 4, EngineOptions(), "4 eigenvalues < min_evals 8"),
        (20000, 15000, 1, EngineOptions(), None),
        (20000, 15001, 1, EngineOptions(), "15001 eigenvalues > max_evals 15000"),
        (512, 2048, 9, EngineOptions(), "18432 eigenvalues > max_evals 15000"),
        (20000, 15001, 1, EngineOptions(max_evals=None), None),
        (50001, 100, 1, EngineOptions(), "N = 50001 > max_N 50000"),
        (50001, 100, 1, EngineOptions(max_N=None), None),
        (100, 2, 1, EngineOptions(min_evals=0), None),
        (100, 2, 1, EngineOptions(min_evals=2), None),
    ],
)
def test_check_size(N: int, M: int, rf: int, options: EngineOptions, reason: str | None) -> None:
    assert check_size(N=N, M=M, rf=rf, options=options) == reason


def test_check_size_rejects_bad_dimensions() -> None:
    with pytest.raises(ValueError, match="rf"):
        check_size(N=10, M=10, rf=-1, options=EngineOptions())
    with pytest.raises(ValueError, match="M"):
        check_size(N=10, M=2.5, rf=1, options=EngineOptions())  # type: ignore[arg-type]


# analyze_layer on good input


def test_analyze_layer_on_a_dense_matrix() -> None:
    w = heavy_tailed(np.random.default_rng(0), 300, 120, df=2.5)
    metrics = analyze_layer([w])
    assert (metrics.N, metrics.M, metrics.rf, metrics.num_evals) == (300, 120, 1, 120)
    assert metrics.fit.status is FitStatus.SUCCESS
    assert metrics.fit.message == ""
    assert metrics.lambda_max == pytest.approx(np.linalg.norm(w, 2) ** 2, rel=1e-12)
    assert metrics.norm == pytest.approx(np.sum(w.astype(np.float64) ** 2), rel=1e-12)
    assert metrics.matrix_rank == 120
    assert metrics.verdict is not Verdict.FAILED


def test_orientation_does_not_matter() -> None:
    w = heavy_tailed(np.random.default_rng(1), 200, 90, df=3)
    a, b = analyze_layer([w]), analyze_layer([w.T])
    assert (a.N, a.M) == (b.N, b.M) == (200, 90)
    assert a.alpha == pytest.approx(b.alpha, rel=1e-10)
    assert a.fit.num_pl_spikes == b.fit.num_pl_spikes


def test_conv2d_norm_halves_the_spectrum_and_keeps_alpha() -> None:
    rng = np.random.default_rng(2)
    slices = [heavy_tailed(rng, 64, 32, df=3) for _ in range(9)]
    plain = analyze_layer(slices)
    halved = analyze_layer(slices, conv2d_norm=True)
    assert (halved.N, halved.M, halved.rf, halved.num_evals) == (64, 32, 9, 288)
    assert halved.lambda_max == pytest.approx(plain.lambda_max / 2, rel=1e-15)
    assert halved.fit.xmin == pytest.approx(plain.fit.xmin / 2, rel=1e-15)
    assert halved.alpha == pytest.approx(plain.alpha, rel=1e-12)  # a power law is scale-free


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_dtypes(dtype: type[np.floating[Any]]) -> None:
    w = heavy_tailed(np.random.default_rng(3), 100, 50, df=3).astype(dtype)
    reference = analyze_layer([w.astype(np.float64)])
    assert analyze_layer([w]).alpha == pytest.approx(reference.alpha, rel=1e-10)


def test_bfloat16_from_ml_dtypes() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    w = heavy_tailed(np.random.default_rng(12), 100, 50, df=3).astype(ml_dtypes.bfloat16)
    reference = analyze_layer([w.astype(np.float64)])
    assert analyze_layer([w]).alpha == pytest.approx(reference.alpha, rel=1e-10)


@pytest.mark.usefixtures("torch")
def test_torch_backend_equals_numpy_to_round_off() -> None:
    w = heavy_tailed(np.random.default_rng(4), 400, 150, df=2.5)
    ours = analyze_layer([w])
    theirs = analyze_layer([w], options=EngineOptions(backend="torch"))
    assert theirs.fit.num_pl_spikes == ours.fit.num_pl_spikes
    assert theirs.alpha == pytest.approx(ours.alpha, rel=1e-9)
    assert theirs.fit.xmin == pytest.approx(ours.fit.xmin, rel=1e-10)
    assert theirs.lambda_max == pytest.approx(ours.lambda_max, rel=1e-12)


@pytest.fixture
def torch() -> Any:
    return pytest.importorskip("torch")


def test_rank_deficient_matrix_has_the_true_rank() -> None:
    rng = np.random.default_rng(5)
    w = heavy_tailed(rng, 200, 60, df=3) @ heavy_tailed(rng, 60, 100, df=3)  # rank 60
    metrics = analyze_layer([w])
    assert metrics.matrix_rank == 60 == np.linalg.matrix_rank(w)
    # The 40 zero eigenvalues are not in the fit: at most 60 values above xmin.
    assert metrics.fit.status is FitStatus.SUCCESS
    assert metrics.fit.num_pl_spikes <= 60


# analyze_layer on degenerate input: a failed result with a reason, never an exception


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights(bad: float) -> None:
    w = np.random.default_rng(6).standard_normal((30, 20))
    w[3, 4] = bad
    metrics = analyze_layer([w])
    _assert_failed(metrics, "non-finite weights")
    assert (metrics.N, metrics.M, metrics.num_evals) == (30, 20, 20)
    assert math.isnan(metrics.lambda_max)
    assert metrics.matrix_rank == -1


def test_non_finite_weights_in_one_conv_slice() -> None:
    rng = np.random.default_rng(7)
    slices = [rng.standard_normal((16, 8)).astype(np.float16) for _ in range(4)]
    slices[2][0, 0] = np.float16("nan")
    _assert_failed(analyze_layer(slices, conv2d_norm=True), "non-finite weights")


def test_all_zero_matrix() -> None:
    metrics = analyze_layer([np.zeros((40, 20))])
    _assert_failed(metrics, "too few positive eigenvalues: 0")
    assert metrics.lambda_max == 0.0
    assert metrics.matrix_rank == 0
    assert math.isnan(metrics.log_norm)


def test_rank_one_matrix() -> None:
    rng = np.random.default_rng(8)
    metrics = analyze_layer([np.outer(rng.standard_normal(50), rng.standard_normal(30))])
    _assert_failed(metrics, "too few positive eigenvalues: 1")
    assert metrics.matrix_rank == 1
    assert metrics.stable_rank == pytest.approx(1.0)


@pytest.mark.parametrize("value", [0.01, 3.0, 1e4])
def test_constant_matrix(value: float) -> None:
    # lambda_max = value^2 * 60 * 25; with value 1e4 that is 1.5e11 and the Gram's round-off
    # (~1e-5) reaches the fit threshold: the noise floor keeps it out of the fit.
    metrics = analyze_layer([np.full((60, 25), value)])
    _assert_failed(metrics, "too few positive eigenvalues: 1")
    assert metrics.matrix_rank == 1
    assert metrics.lambda_max == pytest.approx(value**2 * 60 * 25, rel=1e-12)


def test_scaled_orthogonal_matrix_has_no_tail() -> None:
    w = 0.5 * orthogonal(np.random.default_rng(9), 64)
    metrics = analyze_layer([w])
    _assert_failed(metrics, "equal to within round-off")
    assert metrics.matrix_rank == 64
    assert metrics.lambda_max == pytest.approx(0.25, rel=1e-12)


def test_eigenvalues_below_the_threshold() -> None:
    w = 1e-4 * np.random.default_rng(10).standard_normal((40, 20))  # eigenvalues ~ 1e-7
    _assert_failed(analyze_layer([w]), "too few positive eigenvalues: 0")


def test_gram_overflow() -> None:
    w = np.full((10, 10), 1e200)
    w[0, 1] = -3e200
    _assert_failed(analyze_layer([w]), "non-finite eigenvalues")


def test_empty_matrix() -> None:
    metrics = analyze_layer([np.zeros((0, 5))])
    _assert_failed(metrics, "empty matrix")
    assert metrics.num_evals == 0


def test_two_distinct_positive_eigenvalues_is_a_fit() -> None:
    # weightwatcher fits any two distinct values (small-N fallback); so do we.
    w = np.diag([1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    metrics = analyze_layer([w])
    assert metrics.fit.status is FitStatus.SUCCESS
    assert metrics.fit.num_pl_spikes == 2
    assert metrics.alpha == pytest.approx(1 + 1 / math.log(4.0), rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    w=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 12), st.integers(1, 12)),
        elements=st.one_of(
            st.sampled_from([0.0, 1.0, -1.0, 1e-3, np.nan, np.inf, 1e150]),
            st.floats(-10, 10),
        ),
    )
)
def test_nothing_raises_and_nothing_failed_is_over_trained(w: np.ndarray[Any, Any]) -> None:
    metrics = analyze_layer([w])
    if metrics.verdict is Verdict.OVER_TRAINED:
        assert metrics.fit.status is FitStatus.SUCCESS
        assert metrics.alpha < 2
    if metrics.fit.status is FitStatus.FAILED:
        assert metrics.verdict is Verdict.FAILED
        assert metrics.warning == ""
        assert metrics.fit.message
    else:
        assert math.isfinite(metrics.alpha) and metrics.alpha > 1


# arguments that are not matrices: ValueError naming the problem


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="at least one matrix"):
        analyze_layer([])
    with pytest.raises(ValueError, match="wrap one matrix in a list"):
        analyze_layer(np.ones((4, 4)))
    with pytest.raises(ValueError, match=r"matrices\[1\] must be 2-D"):
        analyze_layer([np.ones((4, 4)), np.ones(4)])
    with pytest.raises(ValueError, match="one shape"):
        analyze_layer([np.ones((4, 4)), np.ones((4, 5))])
    with pytest.raises(ValueError, match="real"):
        analyze_layer([np.ones((4, 4), dtype=complex)])
    with pytest.raises(ValueError, match="real numbers"):
        analyze_layer([np.array([["a", "b"], ["c", "d"]], dtype=object)])


def test_pooled_eigenvalues_is_what_analyze_layer_uses() -> None:
    rng = np.random.default_rng(11)
    slices = [heavy_tailed(rng, 30, 20, df=3) for _ in range(3)]
    metrics = analyze_layer(slices, conv2d_norm=True)
    assert metrics.lambda_max == pooled_eigenvalues(slices, conv2d_norm=True)[-1]


# options


def test_options_defaults_are_weightwatchers() -> None:
    options = EngineOptions()
    assert (options.min_evals, options.max_evals, options.max_N) == (8, 15000, 50000)
    assert options.eigenvalue_threshold == 1e-5
    assert (options.over_trained_below, options.under_trained_above) == (2.0, 6.0)
    assert (options.backend, options.device, options.precision) == ("numpy", "cpu", "float64")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"min_evals": -1}, "min_evals"),
        ({"min_evals": 2.5}, "min_evals"),
        ({"min_evals": True}, "min_evals"),
        ({"max_evals": 0}, "max_evals"),
        ({"min_evals": 10, "max_evals": 9}, "max_evals"),
        ({"max_N": 0}, "max_N"),
        ({"eigenvalue_threshold": -1e-5}, "eigenvalue_threshold"),
        ({"eigenvalue_threshold": math.nan}, "eigenvalue_threshold"),
        ({"over_trained_below": math.inf}, "over_trained_below"),
        ({"over_trained_below": 7.0}, "over_trained_below"),
        ({"under_trained_above": "6"}, "under_trained_above"),
        ({"backend": "jax"}, "backend"),
        ({"device": "tpu"}, "device"),
        ({"device": "cuda"}, "device"),  # numpy backend runs on the CPU only
        ({"precision": "float16"}, "precision"),
    ],
)
def test_options_are_validated(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        EngineOptions(**kwargs)


def test_options_accept_torch_devices() -> None:
    assert EngineOptions(backend="torch", device="cuda:1").device == "cuda:1"
    assert EngineOptions(backend="torch", precision="float32").precision == "float32"
