"""The Marchenko-Pastur bulk fit (engine/mpfit.py): parity with weightwatcher 0.7.7's
``mp_fit=True``, its parts (the KDE against sklearn's, the Nelder-Mead port against scipy's
``fmin``), and known answers (Gaussian weights have no spikes, planted spikes are found)."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from tests.engine.spectra import heavy_tailed, with_singular_values
from wwcli.engine import analyze_layer_spectrum
from wwcli.engine.esd import eigenvalues
from wwcli.engine.mpfit import MPFit, _Residual, linear_kde, mp_fit, nelder_mead_1d

pytestmark = pytest.mark.filterwarnings("ignore::Warning")

FIELDS = ("sigma_mp", "bulk_max", "bulk_min", "mp_softrank", "W_scale")


def _quietly(function: Any, *args: Any, **kwargs: Any) -> Any:
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


def _weightwatcher_mp_fit(values: np.ndarray[Any, Any], N: int, M: int, rf: int) -> MPFit:
    """weightwatcher's own ``WeightWatcher.mp_fit`` (what ``apply_mp_fit`` calls), no plots."""
    weightwatcher = pytest.importorskip("weightwatcher")
    watcher = weightwatcher.WeightWatcher()
    result = _quietly(
        watcher.mp_fit,
        values, N, M, rf, "layer", 0, 0, False, False, "/tmp", "blue", 0.5, True, values,
    )  # fmt: skip
    num_spikes, sigma_mp, mp_softrank, bulk_min, bulk_max, w_scale = result
    return MPFit(int(num_spikes), sigma_mp, bulk_max, bulk_min, mp_softrank, w_scale)


def _assert_same(ours: MPFit, theirs: MPFit) -> None:
    assert ours.message == ""
    assert ours.num_spikes == theirs.num_spikes
    for name in FIELDS:
        expected = getattr(theirs, name)
        assert getattr(ours, name) == pytest.approx(expected, rel=1e-9, abs=1e-12), name


def _svd_eigenvalues(matrix: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.sort(np.linalg.svd(matrix, compute_uv=False) ** 2)


# (rows, columns, kind): aspect ratios 1, 1.5, 2, 4, 6.4; Gaussian and heavy-tailed weights.
_SPECTRA = [
    (384, 384, "gauss"),
    (600, 400, "t2.5"),
    (768, 384, "t3"),
    (1536, 384, "gauss"),
    (320, 50, "t2"),
]


@pytest.mark.parametrize(("rows", "columns", "kind"), _SPECTRA[:3])
def test_same_as_weightwatcher_mp_fit(rows: int, columns: int, kind: str) -> None:
    rng = np.random.default_rng([rows, columns])
    if kind == "gauss":
        matrix = rng.standard_normal((rows, columns)) / np.sqrt(rows)
    else:
        matrix = heavy_tailed(rng, rows, columns, df=float(kind[1:]))
    values = _svd_eigenvalues(matrix)
    theirs = _weightwatcher_mp_fit(values, rows, columns, 1)
    _assert_same(mp_fit(values, N=rows, M=columns, rf=1), theirs)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("rows", "columns", "kind"), _SPECTRA)
def test_same_as_weightwatcher_mp_fit_sweep(rows: int, columns: int, kind: str, seed: int) -> None:
    rng = np.random.default_rng([seed, rows, columns])
    if kind == "gauss":
        matrix = rng.standard_normal((rows, columns))
    else:
        matrix = heavy_tailed(rng, rows, columns, df=float(kind[1:]))
    values = _svd_eigenvalues(matrix)
    theirs = _weightwatcher_mp_fit(values, rows, columns, 1)
    _assert_same(mp_fit(values, N=rows, M=columns, rf=1), theirs)


def test_same_as_weightwatcher_analyze() -> None:
    """End to end: a torch model through ``analyze(mp_fit=True)``; our eigenvalues come from the
    engine (Gram + eigvalsh, Conv2D halved), not from weightwatcher's SVD."""
    weightwatcher = pytest.importorskip("weightwatcher")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    weights = [
        heavy_tailed(rng, 200, 120, df=2.5),  # Linear(120 -> 200): (out, in)
        rng.standard_normal((96, 300)) / 10,  # wide: Gaussian, no spikes
        heavy_tailed(rng, 32, 16 * 9, df=3).reshape(32, 16, 3, 3),  # Conv2d: rf 9, Q 2
    ]
    layers: list[Any] = []
    for weight in weights:
        if weight.ndim == 2:
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        else:
            layer = torch.nn.Conv2d(weight.shape[1], weight.shape[0], 3, bias=False)
        layer.weight.data = torch.tensor(weight, dtype=torch.float32)
        layers.append(layer)
    model = torch.nn.Sequential(*layers)
    details = _quietly(weightwatcher.WeightWatcher(model=model).analyze, mp_fit=True)
    rows = details.to_dict("records")
    assert len(rows) == len(weights)
    for theirs, weight in zip(rows, weights, strict=True):
        float32 = weight.astype(np.float32)
        conv = float32.ndim == 4
        matrices = [float32[:, :, i, j] for i in range(3) for j in range(3)] if conv else [float32]
        metrics, values = analyze_layer_spectrum(matrices, conv2d_norm=conv)
        assert values is not None
        ours = mp_fit(values, N=metrics.N, M=metrics.M, rf=metrics.rf)
        reference = MPFit(
            int(theirs["num_spikes"]),
            theirs["sigma_mp"],
            theirs["bulk_max"],
            theirs["bulk_min"],
            theirs["mp_softrank"],
            theirs["W_scale"],
        )
        _assert_same(ours, reference)
    assert [row["num_spikes"] for row in rows][1] == 0


def test_kde_is_sklearns() -> None:
    sklearn_neighbors = pytest.importorskip("sklearn.neighbors")
    rng = np.random.default_rng(5)
    for data in (rng.gamma(2.0, size=384), rng.pareto(2.0, size=2000), np.array([0.0, 0.05, 3.0])):
        data = data * data.size / data.sum()
        points = np.linspace(0, data.max() + 0.5, 1000)
        kde = sklearn_neighbors.KernelDensity(kernel="linear", bandwidth=0.1)
        expected = np.exp(kde.fit(data.reshape(-1, 1)).score_samples(points[:, None]))
        np.testing.assert_allclose(linear_kde(data, points), expected, rtol=1e-12, atol=1e-300)
        assert np.array_equal(linear_kde(data, points) == 0, expected == 0)


def test_nelder_mead_port_is_scipys_fmin() -> None:
    """Step for step: the same point, bit for bit, on smooth, flat, stepped and unbounded
    functions, from positive, negative and zero starts, also where the budget runs out."""
    optimize = pytest.importorskip("scipy.optimize")
    values = _svd_eigenvalues(heavy_tailed(np.random.default_rng(1), 500, 250, df=3))
    residual = _Residual(values * values.size / values.sum(), 2.0)
    functions = [
        lambda x: float(residual(np.array([x]))[0]),
        lambda x: (x - 0.7) ** 2,
        lambda x: abs(x + 3.0) + 1e-3 * x,
        lambda x: math.floor(8 * x) ** 2,  # steps: ties and shrinks
        lambda x: -x,  # unbounded: the evaluation budget ends it
        lambda x: math.cos(5 * x) + 0.1 * x * x,
    ]
    for function in functions:
        for start in (0.0, 0.3, 1.0, -2.5, 12.0):
            expected = optimize.fmin(lambda x: function(float(x[0])), start, disp=False)[0]  # noqa: B023
            assert nelder_mead_1d(function, start) == expected


def test_gaussian_weights_have_no_spikes() -> None:
    """False spikes: 0 of 1000 Gaussian layers measured (5 shapes x 200 seeds, notes). The
    Tracy-Widom margin sqrt(Q^-1/2 edge^(2/3) M^(-2/3)) is about M^(1/3) times the spread of the
    largest eigenvalue (which shrinks as M^(-2/3)): over 3 spreads for M >= 32, a tail of a few
    1e-3 at most. Here 40 layers: at most one may show a spike."""
    layers_with_spikes = 0
    for seed in range(20):
        for rows, columns in ((400, 100), (128, 128)):
            matrix = np.random.default_rng([seed, rows]).standard_normal((rows, columns))
            fit = mp_fit(eigenvalues(matrix), N=rows, M=columns, rf=1)
            assert fit.message == ""
            layers_with_spikes += fit.num_spikes > 0
    assert layers_with_spikes <= 1


@pytest.mark.parametrize("k", [1, 3, 10])
def test_planted_spikes_are_found(k: int) -> None:
    """A Gaussian bulk plus k orthogonal rank-1 spikes of singular value 3x the bulk edge's."""
    rows, columns = 800, 400
    rng = np.random.default_rng(k)
    bulk = rng.standard_normal((rows, columns)) / np.sqrt(rows)
    edge = 1 + math.sqrt(columns / rows)  # the bulk's largest singular value
    spikes = with_singular_values(rng, rows, columns, np.linspace(3.0, 4.0, k) * edge)
    fit = mp_fit(eigenvalues(bulk + spikes), N=rows, M=columns, rf=1)
    assert fit.num_spikes == k
    assert 0 < fit.mp_softrank < 1


def test_bad_numbers_fail_with_a_message() -> None:
    for values, reason in (
        (np.array([]), "no eigenvalues"),
        (np.array([1.0, np.nan, 2.0]), "non-finite"),
        (np.zeros(10), "sum to zero"),
    ):
        fit = mp_fit(values, N=20, M=10, rf=1)
        assert reason in fit.message
        assert fit.num_spikes == -1 and math.isnan(fit.sigma_mp)
    with pytest.raises(ValueError, match="N must be >= M"):
        mp_fit(np.ones(10), N=5, M=10, rf=1)
    with pytest.raises(ValueError, match="M must be a positive int"):
        mp_fit(np.ones(10), N=5, M=0, rf=1)


def test_lambda_max_is_the_largest_eigenvalue() -> None:
    values = eigenvalues(heavy_tailed(np.random.default_rng(3), 300, 100, df=3))
    assert mp_fit(values, N=300, M=100, rf=1) == mp_fit(
        values, N=300, M=100, rf=1, lambda_max=float(values.max())
    )


def test_neither_sklearn_nor_scipy_optimize_is_imported() -> None:
    code = (
        "import sys, numpy as np\n"
        "from wwcli.engine.mpfit import mp_fit\n"
        "mp_fit(np.random.default_rng(0).gamma(2.0, size=200), N=400, M=200, rf=1)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('sklearn', 'scipy'))))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def _fixture_layers() -> list[tuple[str, list[np.ndarray[Any, Any]], int, int, bool]]:
    """(name, matrices, N, M, conv2d) of every analyzed layer of two fixtures: a PyTorch CNN
    state dict (two Conv2D layers and two Linear) and the Keras seed MLP (three Dense)."""
    from pathlib import Path

    from wwcli.loaders import LayerType, open_checkpoint

    root = Path(__file__).resolve().parents[2] / "fixtures"
    layers = []
    for path in (root / "torch" / "cnn_state_dict.pt", root / "keras" / "seed_mlp.h5"):
        checkpoint = open_checkpoint(path)
        for spec in checkpoint.layers():
            if spec.skip_reason is None and spec.M * spec.rf >= 8:
                conv2d = spec.layer_type is LayerType.CONV2D
                layers.append((spec.name, checkpoint.matrices(spec), spec.N, spec.M, conv2d))
    return layers


def test_fixture_layers_same_as_weightwatcher() -> None:
    """weightwatcher's mp_fit on its own eigenvalues (SVD of each matrix, Conv2D kernels scaled
    by sqrt(1/2) first, as its conv2d_norm does) against ours on the engine's."""
    layers = _fixture_layers()
    assert len(layers) == 7
    for name, matrices, N, M, conv2d in layers:
        scale = np.sqrt(1 / 2.0) if conv2d else 1.0
        float64 = [m.astype(np.float64) * scale for m in matrices]  # weightwatcher: W.astype(float)
        theirs = np.sort(np.concatenate([_svd_eigenvalues(m) for m in float64]))
        _, values = analyze_layer_spectrum(matrices, conv2d_norm=conv2d)
        assert values is not None, name
        ours = mp_fit(values, N=N, M=M, rf=len(matrices))
        _assert_same(ours, _weightwatcher_mp_fit(theirs, N, M, len(matrices)))
