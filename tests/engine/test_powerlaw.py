"""The power-law fit: the estimator on known exponents, exactness against a plain loop, the
pruned search against the exhaustive one, the small-N branch, and failures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from tests.engine.spectra import spectrum
from wwcli.engine.powerlaw import fit_power_law, ks_distances, tail_alphas, tail_log_sums
from wwcli.engine.results import FitStatus


def loop_fit(values: NDArray[np.float64], threshold: float = 1e-5) -> tuple[int, float, float]:
    """REFERENCE.md's standard fit, transcribed as a plain loop: (index, alpha, D)."""
    x = np.sort(values[values > threshold])
    n = x.size
    best = (-1, math.nan, math.inf)
    for i in range(n - 1):
        m = n - i
        alpha = 1 + m / np.sum(np.log(x[i:] / x[i]))
        distance = 1.0
        if alpha > 1:
            fitted = 1 - (x[i:] / x[i]) ** (1 - alpha)
            distance = float(np.max(np.abs(fitted - np.arange(m) / m)))
        if distance < best[2]:
            best = (i, float(alpha), distance)
    return best


def loop_fit_small_n(values: NDArray[np.float64], threshold: float = 1e-5) -> tuple[int, float]:
    """weightwatcher 0.7.7's small-N fit as it behaves (see powerlaw.py): (index, alpha)."""
    x = np.sort(values[values > threshold])
    n = x.size
    best = (-1, math.nan, math.inf)
    for i in range(n - 1):
        m = n - i
        s = np.sum(np.log(x[i:] / x[i]))
        if m < 8 or s <= 1e-12:
            continue
        alpha = 1 + (m - 1) / s
        distance = float(np.max(np.abs(1 - (x[i:] / x[i]) ** (1 - alpha) - np.arange(m) / m)))
        if distance < best[2]:
            best = (i, alpha, distance)
    if best[0] < 0:
        return 0, 1 + (n - 1) / np.sum(np.log(x / x[0]))
    return best[0], best[1]


@pytest.mark.parametrize("exponent", [1.5, 2.0, 3.0, 4.0])
def test_pareto_exponent_within_three_standard_errors(exponent: float) -> None:
    """Seeds 0-9 for each exponent (n = 5000). Choosing xmin by KS widens the spread a little
    beyond the nominal standard error (over 200 seeds: z = (alpha - exponent) / sigma had mean
    ~0, standard deviation ~1.1, |z| > 3 in ~1 % of fits), so one fit in ten may miss 3 sigma;
    none may miss 5 sigma, and the misses must not all lean one way."""
    z_scores = []
    for seed in range(10):
        rng = np.random.default_rng([seed, int(exponent * 10)])
        samples = 1.0 + rng.pareto(exponent - 1.0, size=5000)  # density ~ x^-exponent on [1, inf)
        fit = fit_power_law(samples)
        assert fit.status is FitStatus.SUCCESS
        standard_error = (fit.alpha - 1.0) / math.sqrt(fit.num_pl_spikes)
        assert fit.sigma == pytest.approx(standard_error, rel=1e-12)
        z_scores.append((fit.alpha - exponent) / standard_error)
    z = np.array(z_scores)
    assert np.count_nonzero(np.abs(z) < 3) >= 9, z
    assert np.all(np.abs(z) < 5), z
    assert abs(z.mean()) < 3 / math.sqrt(z.size), z


@pytest.mark.parametrize(
    ("kind", "n", "seed"),
    [
        ("mp", 300, 0),
        ("mp", 1500, 1),
        ("mp+tail1.5", 1000, 2),
        ("mp+tail3", 2000, 3),
        ("t3", 400, 4),
        ("t1.5", 500, 5),
        ("pareto", 800, 6),
        ("pareto", 2000, 7),
    ],
)
def test_fit_equals_a_plain_loop_transcription(kind: str, n: int, seed: int) -> None:
    values = spectrum(kind, n, seed)
    index, alpha, distance = loop_fit(values)
    fit = fit_power_law(values)
    data = np.sort(values[values > 1e-5])
    assert fit.status is FitStatus.SUCCESS
    assert fit.xmin == data[index]
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert pytest.approx(distance, rel=1e-12, abs=1e-14) == fit.D
    assert fit.xmax == data[-1]
    assert fit.sigma == pytest.approx((alpha - 1) / math.sqrt(data.size - index), rel=1e-12)
    assert fit.num_pl_spikes == data.size - index


def test_alphas_and_log_sums_equal_their_definition() -> None:
    data = spectrum("t3", 500, 10)
    log_sums = tail_log_sums(data)
    expected = np.array([np.sum(np.log(data[i:] / data[i])) for i in range(data.size - 1)])
    np.testing.assert_allclose(log_sums, expected, rtol=1e-12, atol=0)
    m = data.size - np.arange(data.size - 1)
    np.testing.assert_allclose(tail_alphas(data), 1 + m / expected, rtol=1e-12)
    np.testing.assert_allclose(tail_alphas(data, bias_corrected=True), 1 + (m - 1) / expected)


def test_ks_distances_equal_their_definition() -> None:
    data = spectrum("t1.5", 300, 11)
    alphas = tail_alphas(data)
    expected = [
        np.max(
            np.abs(
                1
                - (data[i:] / data[i]) ** (1 - alphas[i])
                - np.arange(data.size - i) / (data.size - i)
            )
        )
        for i in range(data.size - 1)
    ]
    np.testing.assert_allclose(ks_distances(data), expected, rtol=1e-12, atol=1e-15)


def _check_pruned_equals_exhaustive(values: NDArray[np.float64]) -> None:
    data = np.sort(values[values > 1e-5])
    distances = ks_distances(data)
    index = int(np.argmin(distances))
    fit = fit_power_law(values)
    assert fit.xmin == data[index]
    assert distances[index] == fit.D
    assert fit.alpha == tail_alphas(data)[index]


@pytest.mark.parametrize("kind", ["mp", "mp+tail1.5", "mp+tail3", "pareto", "geometric"])
@pytest.mark.parametrize("n", [25, 140, 600, 2500])
def test_pruned_search_selects_what_the_exhaustive_one_does(kind: str, n: int) -> None:
    _check_pruned_equals_exhaustive(spectrum(kind, n))


@pytest.mark.parametrize("kind", ["t3", "t1.5"])
@pytest.mark.parametrize("n", [60, 500])
def test_pruned_search_on_student_t_weights(kind: str, n: int) -> None:
    _check_pruned_equals_exhaustive(spectrum(kind, n))


def test_pruned_search_with_repeated_eigenvalues() -> None:
    # A pooled conv spectrum of identical slices repeats every value; tails of equal values at
    # the top have infinite alpha.
    values = np.repeat(spectrum("t3", 200, 12), 9)
    _check_pruned_equals_exhaustive(values)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=20, max_value=400),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    sigma=st.floats(min_value=0.05, max_value=3.0),
    duplicates=st.booleans(),
)
def test_pruned_search_property(n: int, seed: int, sigma: float, duplicates: bool) -> None:
    rng = np.random.default_rng(seed)
    values = rng.lognormal(0.0, sigma, size=n)
    if duplicates:
        values = np.round(values, 1) + 0.1
    _check_pruned_equals_exhaustive(values)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mp", "mp+tail2", "mp+tail5", "t2", "pareto", "geometric"])
def test_pruned_search_on_large_spectra(kind: str) -> None:
    _check_pruned_equals_exhaustive(spectrum(kind, 3000 if kind == "t2" else 15000, 13))


@pytest.mark.slow
def test_fit_equals_a_plain_loop_on_a_large_spectrum() -> None:
    values = spectrum("mp+tail2.5", 8192, 14)
    index, alpha, _ = loop_fit(values)
    fit = fit_power_law(values)
    assert fit.xmin == np.sort(values[values > 1e-5])[index]
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)


@pytest.mark.parametrize("n", [2, 5, 7, 8, 9, 12, 19])
@pytest.mark.parametrize("seed", range(4))
def test_small_n_branch(n: int, seed: int) -> None:
    values = np.sort(np.random.default_rng([n, seed]).lognormal(1.0, 1.0, size=n))
    index, alpha = loop_fit_small_n(values)
    fit = fit_power_law(values)
    assert fit.status is FitStatus.SUCCESS
    assert fit.xmin == values[index]
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.num_pl_spikes == n - index
    if n >= 8:
        assert fit.num_pl_spikes >= 8


def test_small_n_branch_starts_below_twenty_values_above_the_threshold() -> None:
    rng = np.random.default_rng(15)
    values = np.concatenate([np.zeros(30), np.sort(rng.lognormal(1.0, 1.0, size=19))])
    index, alpha = loop_fit_small_n(values)
    fit = fit_power_law(values)
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    # num_pl_spikes counts every eigenvalue >= xmin; the zeros are below it.
    assert fit.num_pl_spikes == 19 - index


def test_num_pl_spikes_counts_all_eigenvalues_at_or_above_xmin() -> None:
    values = spectrum("t3", 500, 16)
    fit = fit_power_law(values)
    assert fit.num_pl_spikes == np.count_nonzero(values >= fit.xmin)


def test_threshold_is_a_parameter() -> None:
    values = spectrum("t3", 500, 17)
    cut = float(np.quantile(values, 0.5))
    high = fit_power_law(values, threshold=cut)
    assert high.xmin > cut
    _, alpha, _ = loop_fit(values, threshold=cut)
    assert high.alpha == pytest.approx(alpha, rel=1e-12)


def test_order_of_the_input_does_not_matter() -> None:
    values = spectrum("t3", 300, 18)
    shuffled = np.random.default_rng(19).permutation(values)
    assert fit_power_law(shuffled) == fit_power_law(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.array([]), "too few positive eigenvalues: 0"),
        (np.array([0.0, 1e-7, 3.0]), "too few positive eigenvalues: 1"),
        (np.array([1.0, np.nan, 2.0]), "non-finite eigenvalues"),
        (np.array([1.0, np.inf, 2.0]), "non-finite eigenvalues"),
        (np.full(50, 2.5), "are equal"),
        (np.full(10, 2.5), "are equal"),
        (np.concatenate([np.ones(12), [1.0 + 1e-15]]), "degenerate spectrum"),
    ],
)
def test_failures_are_results_not_exceptions(values: NDArray[np.float64], message: str) -> None:
    fit = fit_power_law(values)
    assert fit.status is FitStatus.FAILED
    assert message in fit.message
    assert math.isnan(fit.alpha)
    assert fit.num_pl_spikes == -1


def test_top_tail_of_equal_values_is_not_an_infinite_alpha() -> None:
    # Equal largest values make alpha infinite for the last candidates; they are never chosen
    # over a real tail here, and an infinite alpha is never a success.
    values = np.concatenate([spectrum("t3", 300, 20), [50.0, 50.0, 50.0]])
    fit = fit_power_law(values)
    assert fit.status is FitStatus.SUCCESS
    assert math.isfinite(fit.alpha)


@pytest.mark.parametrize("threshold", [-1.0, math.nan, math.inf, "1e-5", True])
def test_bad_threshold_is_a_value_error(threshold: object) -> None:
    with pytest.raises(ValueError, match="threshold"):
        fit_power_law(np.ones(30), threshold=threshold)  # type: ignore[arg-type]


def test_two_dimensional_input_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="eigenvalues must be 1-D"):
        fit_power_law(np.ones((3, 3)))
