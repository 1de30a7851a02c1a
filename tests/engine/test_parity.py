"""Parity with weightwatcher 0.7.7: the same weights give the same numbers.

A torch model with set weights goes through ``WeightWatcher(model).analyze()`` with its defaults;
the same matrices go through ``analyze_layer``. Also the fit alone against ``WWFit`` on many
spectra. Skipped only where weightwatcher (or torch, for the model) is not installed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from typing import Any

import numpy as np
import pytest

from tests.engine.spectra import heavy_tailed, spectrum, with_singular_values
from wwcli.engine import EngineOptions, LayerMetrics, analyze_layer, check_size, fit_power_law
from wwcli.engine.results import FitStatus

pytestmark = pytest.mark.filterwarnings("ignore::Warning:weightwatcher.*")

weightwatcher = pytest.importorskip("weightwatcher")
torch = pytest.importorskip("torch")


def _quietly(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a weightwatcher call without its prints ("SMALL N PL FIT") and log lines."""
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


def _weights() -> list[tuple[str, np.ndarray[Any, Any]]]:
    """(kind, weight) with torch's layouts: Linear (out, in), Conv2d (out, in, kh, kw),
    Embedding (num, dim)."""
    rng = np.random.default_rng(2024)
    planted = np.sqrt(np.sort(1.0 + rng.pareto(2.0, size=768)))  # eigenvalues ~ x^-3
    low_rank = heavy_tailed(rng, 200, 60, df=3) @ heavy_tailed(rng, 60, 100, df=3)
    return [
        ("linear", rng.standard_normal((600, 300)) / np.sqrt(300)),  # MP bulk: alpha > 6
        ("linear", heavy_tailed(rng, 500, 200, df=2.5)),
        ("linear", heavy_tailed(rng, 120, 400, df=1.3)),  # very heavy: alpha < 2
        ("linear", rng.standard_normal((10, 64))),  # 10 eigenvalues: small-N branch
        ("linear", rng.standard_normal((100, 5))),  # 5 eigenvalues: skipped (min_evals)
        ("conv2d", heavy_tailed(rng, 64, 32 * 9, df=3).reshape(64, 32, 3, 3)),
        ("conv2d", heavy_tailed(rng, 48, 16 * 25, df=2).reshape(48, 16, 5, 5)),
        ("linear", with_singular_values(rng, 1024, 768, planted)),
        ("embedding", heavy_tailed(rng, 1000, 64, df=2.2)),
        ("linear", low_rank),  # rank 60 of 100
        # 1100 eigenvalues: above TWO_STAGE_MIN_ORDER, so LAPACK's two-stage solver
        ("linear", heavy_tailed(rng, 1100, 1300, df=2.5)),
    ]


def _model(weights: list[tuple[str, np.ndarray[Any, Any]]]) -> Any:
    layers = []
    for kind, weight in weights:
        if kind == "linear":
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        elif kind == "conv2d":
            out_channels, in_channels, kh, kw = weight.shape
            layer = torch.nn.Conv2d(in_channels, out_channels, (kh, kw), bias=False)
        else:
            layer = torch.nn.Embedding(*weight.shape)
        layer.weight.data = torch.tensor(weight, dtype=torch.float32)
        layers.append(layer)
    return torch.nn.Sequential(*layers)


def _matrices(kind: str, weight: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
    if kind == "conv2d":
        return [weight[:, :, i, j] for i in range(weight.shape[2]) for j in range(weight.shape[3])]
    return [weight]


@pytest.fixture(scope="module")
def both() -> list[tuple[dict[str, Any], LayerMetrics]]:
    """(weightwatcher's row, our metrics) for every layer weightwatcher analyzes, in order."""
    weights = _weights()
    model = _model(weights)
    details = _quietly(weightwatcher.WeightWatcher(model=model).analyze)
    ours = []
    options = EngineOptions()
    for kind, weight in weights:
        float32 = weight.astype(np.float32)  # what the model holds
        matrices = _matrices(kind, float32)
        N, M = max(matrices[0].shape), min(matrices[0].shape)
        if check_size(N=N, M=M, rf=len(matrices), options=options) is None:
            ours.append(analyze_layer(matrices, conv2d_norm=kind == "conv2d", options=options))
    rows = details.to_dict("records")
    assert len(rows) == len(ours) == len(weights) - 1  # the same layers analyzed (one skipped)
    return list(zip(rows, ours, strict=True))


def test_same_shapes_and_spectra(both: list[tuple[dict[str, Any], LayerMetrics]]) -> None:
    for theirs, ours in both:
        assert (theirs["N"], theirs["M"], theirs["rf"]) == (ours.N, ours.M, ours.rf)
        assert theirs["num_evals"] == ours.num_evals
        assert ours.lambda_max == pytest.approx(theirs["lambda_max"], rel=1e-10)


def test_same_fit(both: list[tuple[dict[str, Any], LayerMetrics]]) -> None:
    alphas = []
    for theirs, ours in both:
        assert ours.fit.status is FitStatus.SUCCESS
        assert ours.alpha == pytest.approx(theirs["alpha"], rel=1e-6)
        assert ours.fit.xmin == pytest.approx(theirs["xmin"], rel=1e-10)
        assert ours.fit.num_pl_spikes == theirs["num_pl_spikes"]
        assert pytest.approx(theirs["D"], rel=1e-8, abs=1e-12) == ours.fit.D
        assert ours.fit.sigma == pytest.approx(theirs["sigma"], rel=1e-6)
        assert ours.fit.xmax == pytest.approx(theirs["xmax"], rel=1e-10)
        alphas.append(ours.alpha)
    # The model covers both sides of the lines: over-trained, typical and under-trained.
    assert min(alphas) < 2 < 6 < max(alphas)
    assert any(2 < a < 6 for a in alphas)


def test_same_metrics_and_verdict(both: list[tuple[dict[str, Any], LayerMetrics]]) -> None:
    for theirs, ours in both:
        assert ours.warning == theirs["warning"]
        for name in ("log_norm", "log_spectral_norm", "alpha_weighted", "log_alpha_norm"):
            assert getattr(ours, name) == pytest.approx(theirs[name], rel=1e-9), name
        assert ours.stable_rank == pytest.approx(theirs["stable_rank"], rel=1e-9)
        assert ours.norm == pytest.approx(theirs["norm"], rel=1e-10)
        assert ours.entropy == pytest.approx(theirs["entropy"], rel=1e-9)
        assert ours.matrix_rank == theirs["matrix_rank"]


@pytest.mark.parametrize(
    ("kind", "n"),
    [
        ("mp", 20),
        ("mp", 500),
        ("mp+tail1.5", 1536),
        ("mp+tail3", 3000),
        ("t3", 400),
        ("t1.5", 300),
        ("pareto", 1000),
        ("pareto", 40),
    ],
)
def test_fit_matches_wwfit(kind: str, n: int) -> None:
    values = np.array(spectrum(kind, n, 7))
    reference = _quietly(weightwatcher.WW_powerlaw.WWFit, values[values > 1e-5])
    fit = fit_power_law(values)
    assert fit.xmin == reference.xmin
    assert fit.alpha == pytest.approx(reference.alpha, rel=1e-10)
    assert pytest.approx(reference.D, rel=1e-10, abs=1e-14) == fit.D
    assert fit.sigma == pytest.approx(reference.sigma, rel=1e-10)
    assert fit.num_pl_spikes == reference.data.size


@pytest.mark.parametrize("n", range(2, 20))
def test_small_n_fit_matches_wwfit(n: int) -> None:
    values = np.random.default_rng(n).lognormal(0.0, 1.5, size=n)
    reference = _quietly(weightwatcher.WW_powerlaw.WWFit, values)
    fit = fit_power_law(values)
    assert fit.xmin == reference.xmin
    assert fit.alpha == pytest.approx(reference.alpha, rel=1e-10)
    assert pytest.approx(reference.D, rel=1e-10) == fit.D
    if n >= 8:  # below 8 weightwatcher's sigma is -1/sqrt(n), a defect (powerlaw.py)
        assert fit.sigma == pytest.approx(reference.sigma, rel=1e-10)
    else:
        assert reference.sigma == pytest.approx(-1 / math.sqrt(n))
