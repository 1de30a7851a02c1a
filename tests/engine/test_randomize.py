"""Randomized spectra and correlation traps (engine/randomize.py): parity with weightwatcher
0.7.7's ``randomize=True`` under the same draw (its global ``np.random`` state, reseeded and fed
to us in the same layer order), the draws it makes, and known answers (Gaussian weights have no
traps, one huge element makes one)."""

from __future__ import annotations

import contextlib
import io
import logging
import math
from typing import Any

import numpy as np
import pytest

from tests.engine.spectra import heavy_tailed
from wwcli.engine import EngineOptions, analyze_layer_spectrum
from wwcli.engine.esd import eigenvalues
from wwcli.engine.randomize import (
    RandomizedESD,
    jensen_shannon_distance,
    randomized_esd,
)

pytestmark = pytest.mark.filterwarnings("ignore::Warning")

COLUMNS = (
    "max_rand_eval", "rand_distance", "ww_softrank", "ww_maxdist", "rand_sigma_mp",
    "rand_mp_softrank", "rand_W_scale", "rand_bulk_max", "rand_bulk_min",
)  # fmt: skip


def _quietly(function: Any, *args: Any, **kwargs: Any) -> Any:
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


def _torch_model(weights: list[np.ndarray[Any, Any]]) -> Any:
    torch = pytest.importorskip("torch")
    layers: list[Any] = []
    for weight in weights:
        if weight.ndim == 2:
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        elif weight.ndim == 3:
            layer = torch.nn.Conv1d(weight.shape[1], weight.shape[0], weight.shape[2], bias=False)
        else:
            layer = torch.nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:], bias=False)
        layer.weight.data = torch.tensor(weight, dtype=torch.float32)
        layers.append(layer)
    return torch.nn.Sequential(*layers)


def _ours(weight: np.ndarray[Any, Any], rng: Any) -> RandomizedESD:
    """A PyTorch layer as weightwatcher sees it: Linear (out, in) as stored; Conv2d slices
    W[:, :, i, j] turned tall; Conv1d the kernel cut along its first axis."""
    weight = weight.astype(np.float32)
    conv1d = weight.ndim == 3
    if weight.ndim == 4:
        kh, kw = weight.shape[2:]
        matrices = [weight[:, :, i, j] for i in range(kh) for j in range(kw)]
    elif conv1d:
        matrices = [weight[i] for i in range(weight.shape[0])]
    else:
        matrices = [weight]
    options = EngineOptions(conv1d="weightwatcher") if conv1d else EngineOptions()
    metrics, values = analyze_layer_spectrum(
        matrices, conv2d_norm=weight.ndim == 4, options=options, weightwatcher_conv1d=conv1d
    )
    assert values is not None
    return randomized_esd(
        matrices, values, N=metrics.N, M=metrics.M, rf=metrics.rf,
        conv2d_norm=weight.ndim == 4, rng=rng, orient="tall" if weight.ndim == 4 else "as_given",
        weightwatcher_conv1d=conv1d,
    )  # fmt: skip


def _assert_parity(weights: list[np.ndarray[Any, Any]], seed: int) -> list[RandomizedESD]:
    weightwatcher = pytest.importorskip("weightwatcher")
    model = _torch_model(weights)
    np.random.seed(seed)
    details = _quietly(weightwatcher.WeightWatcher(model=model).analyze, randomize=True)
    rows = details.to_dict("records")
    assert len(rows) == len(weights)
    np.random.seed(seed)
    results = [_ours(weight, np.random) for weight in weights]  # the same draws, in order
    for theirs, ours in zip(rows, results, strict=True):
        assert ours.message == ""
        assert ours.num_traps == ours.rand_num_spikes == theirs["num_traps"]
        assert ours.rand_num_spikes == theirs["rand_num_spikes"]
        for name in COLUMNS:
            expected = theirs[name]
            assert getattr(ours, name) == pytest.approx(expected, rel=1e-9, abs=1e-12), name
    return results


def test_same_as_weightwatcher_with_the_same_draw() -> None:
    rng = np.random.default_rng(21)
    weights = [
        heavy_tailed(rng, 200, 120, df=3),  # Linear, 120 eigenvalues: one replica
        rng.standard_normal((40, 90)),  # wide, 40 eigenvalues: five replicas
        heavy_tailed(rng, 32, 16 * 9, df=2.5).reshape(32, 16, 3, 3),  # Conv2d: rf 9, tall
        rng.standard_normal((8, 16 * 9)).reshape(8, 16, 3, 3),  # Conv2d, 72: five replicas
        heavy_tailed(rng, 24, 20 * 9, df=3).reshape(24, 20, 9),  # Conv1d, M = 9, stacked
    ]
    results = _assert_parity(weights, seed=7)
    # Another draw gives other numbers: the test can fail.
    np.random.seed(8)
    other = _ours(weights[0], np.random)
    assert other.max_rand_eval != results[0].max_rand_eval


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_same_as_weightwatcher_sweep(seed: int) -> None:
    rng = np.random.default_rng([seed, 5])
    weights = [
        heavy_tailed(rng, 768, 384, df=2.5),
        heavy_tailed(rng, 384, 1536, df=3),  # wide
        heavy_tailed(rng, 1100, 1300, df=3),  # 1100: the two-stage eigensolver
        rng.standard_normal((50, 50)),  # square, replicas
        heavy_tailed(rng, 64, 32 * 25, df=2).reshape(64, 32, 5, 5),
        heavy_tailed(rng, 16, 48 * 9, df=2).reshape(16, 48, 3, 3),  # wide slices turned tall
    ]
    _assert_parity(weights, seed=seed)


class _Counting:
    """A Shuffler that records the size of every array it shuffles."""

    def __init__(self, seed: int) -> None:
        self.generator = np.random.default_rng(seed)
        self.sizes: list[int] = []

    def shuffle(self, x: Any, /) -> None:
        self.sizes.append(len(x))
        self.generator.shuffle(x)


@pytest.mark.parametrize(("rows", "columns", "rf", "draws"), [(300, 100, 1, 2), (60, 40, 2, 6 * 2)])
def test_draws_follow_weightwatcher(rows: int, columns: int, rf: int, draws: int) -> None:
    """5 + 1 shuffles of every matrix below 100 eigenvalues (M * rf), 1 + 1 from 100 up."""
    rng = np.random.default_rng(0)
    matrices = [rng.standard_normal((rows, columns)) for _ in range(rf)]
    values = np.sort(np.concatenate([eigenvalues(m) for m in matrices]))
    shuffler = _Counting(1)
    result = randomized_esd(
        matrices, values, N=rows, M=columns, rf=rf, conv2d_norm=False, rng=shuffler
    )
    assert shuffler.sizes == [rows * columns] * draws
    assert result.rand_eigenvalues is not None
    assert result.rand_eigenvalues.size == (draws - rf) * columns


def test_any_shuffler_and_reproducible() -> None:
    matrix = heavy_tailed(np.random.default_rng(2), 150, 100, df=3)
    values = eigenvalues(matrix)

    def run(rng: Any) -> RandomizedESD:
        return randomized_esd([matrix], values, N=150, M=100, rf=1, conv2d_norm=False, rng=rng)

    assert run(np.random.default_rng(4)) == run(np.random.default_rng(4))
    assert run(np.random.RandomState(4)) == run(np.random.RandomState(4))
    assert run(np.random.default_rng(4)) != run(np.random.default_rng(5))


def test_jensen_shannon_distance_is_weightwatchers() -> None:
    rmt = pytest.importorskip("weightwatcher.RMT_Util")
    rng = np.random.default_rng(3)
    for p, q in (
        (rng.gamma(2.0, size=500), rng.gamma(2.0, size=500)),
        (np.sort(rng.pareto(2.0, size=64)), np.sort(rng.pareto(2.0, size=64))),
        (np.array([0.0, 0.0, 1.0, 2.0]), np.array([0.0, 0.5, 1.0, 3.0])),
    ):
        expected = rmt.jensen_shannon_distance(p, q)
        assert jensen_shannon_distance(p, q) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert jensen_shannon_distance(p, p) == 0.0


def test_gaussian_weights_have_no_traps() -> None:
    """False traps: 0 of 1000 Gaussian layers measured (notes). A shuffled Gaussian matrix is a
    Gaussian matrix, so this is the MP fit's false-spike rate (test_mpfit.py: the Tracy-Widom
    margin is over 3 spreads of the largest eigenvalue): at most one of 30 layers."""
    layers_with_traps = 0
    for seed in range(15):
        for rows, columns in ((400, 100), (150, 150)):
            matrix = np.random.default_rng([seed, rows]).standard_normal((rows, columns))
            result = randomized_esd(
                [matrix], eigenvalues(matrix), N=rows, M=columns, rf=1, conv2d_norm=False,
                rng=np.random.default_rng(seed),
            )  # fmt: skip
            assert result.message == ""
            layers_with_traps += result.num_traps > 0
    assert layers_with_traps <= 1


def test_one_huge_element_makes_a_trap() -> None:
    """One element 30x the others' spread: wherever a shuffle puts it, the shuffled matrix has
    an eigenvalue of about 900 / 400 of the bulk's scale above its bulk (a rank-one spike)."""
    rows, columns = 400, 200
    for seed in range(3):
        matrix = np.random.default_rng(seed).standard_normal((rows, columns))
        clean = randomized_esd(
            [matrix], eigenvalues(matrix), N=rows, M=columns, rf=1, conv2d_norm=False,
            rng=np.random.default_rng(seed),
        )  # fmt: skip
        matrix[17, 3] = 30.0 * math.sqrt(rows)
        trapped = randomized_esd(
            [matrix], eigenvalues(matrix), N=rows, M=columns, rf=1, conv2d_norm=False,
            rng=np.random.default_rng(seed),
        )  # fmt: skip
        assert clean.num_traps == 0
        assert trapped.num_traps == 1
        assert trapped.rand_mp_softrank < 0.1


def test_conv2d_norm_halves_the_shuffled_eigenvalues() -> None:
    rng = np.random.default_rng(6)
    matrices = [rng.standard_normal((64, 32)) for _ in range(4)]
    values = np.sort(np.concatenate([eigenvalues(m) for m in matrices]))

    def run(conv2d_norm: bool) -> RandomizedESD:
        return randomized_esd(
            matrices, values * (0.5 if conv2d_norm else 1.0), N=64, M=32, rf=4,
            conv2d_norm=conv2d_norm, rng=np.random.default_rng(1),
        )  # fmt: skip

    plain, halved = run(False), run(True)
    assert halved.max_rand_eval == pytest.approx(plain.max_rand_eval / 2, rel=1e-12)
    assert halved.rand_distance == pytest.approx(plain.rand_distance, rel=1e-9)
    assert halved.num_traps == plain.num_traps


def test_bad_numbers_give_a_message_and_the_same_draws() -> None:
    matrix = np.random.default_rng(0).standard_normal((120, 110))
    matrix[3, 4] = np.nan
    shuffler = _Counting(0)
    result = randomized_esd(
        [matrix], np.full(110, np.nan), N=120, M=110, rf=1, conv2d_norm=False, rng=shuffler
    )
    assert "non-finite" in result.message
    assert math.isnan(result.max_rand_eval) and result.num_traps == -1
    assert len(shuffler.sizes) == 2
    with pytest.raises(ValueError, match="orient"):
        randomized_esd(
            [matrix], np.ones(110), N=120, M=110, rf=1, conv2d_norm=False,
            rng=np.random.default_rng(0), orient="sideways",  # type: ignore[arg-type]
        )  # fmt: skip


def test_fixture_layers_same_draws_as_weightwatcher() -> None:
    """weightwatcher's ``random_eigenvalues`` (its SVD) on the fixtures' layers as it holds them
    (Conv2D slices tall and scaled by sqrt(1/2), Dense kernels as stored: Keras (in, out),
    PyTorch (out, in)) against ``shuffled_eigenvalues`` under the same global draw."""
    weightwatcher = pytest.importorskip("weightwatcher")
    from tests.engine.test_mpfit import _fixture_layers
    from wwcli.engine.randomize import shuffled_eigenvalues

    watcher = weightwatcher.WeightWatcher()
    params = weightwatcher.weightwatcher.DEFAULT_PARAMS.copy()
    for name, matrices, _, M, conv2d in _fixture_layers():
        n_comp = M * len(matrices)
        replicas = 5 if n_comp < 100 else 1
        tall = [m.T if m.shape[0] < m.shape[1] else m for m in matrices] if conv2d else matrices
        held = [m * np.sqrt(1 / 2.0) for m in tall] if conv2d else tall
        np.random.seed(11)
        theirs = _quietly(watcher.random_eigenvalues, held, n_comp, replicas, params)
        np.random.seed(11)
        ours = shuffled_eigenvalues(
            tall, rng=np.random, n_comp=n_comp, replicas=replicas, conv2d_norm=conv2d
        )
        assert ours.shape == theirs.shape, name
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12 * theirs.max(), err_msg=name)


@pytest.mark.slow
def test_same_as_weightwatcher_on_a_keras_model() -> None:
    """Keras layouts: a Dense kernel (in, out) shuffled as stored, Conv2D kernel (kh, kw, in,
    out) sliced kernel[i, j] and turned wide (weightwatcher's channels-first branch)."""
    weightwatcher = pytest.importorskip("weightwatcher")
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(31)
    conv = (heavy_tailed(rng, 9 * 12, 40, df=2.5) / 3).reshape(3, 3, 12, 40).astype(np.float32)
    narrow = rng.standard_normal((3, 3, 40, 8)).astype(np.float32) / 10  # 72: five replicas
    dense = heavy_tailed(rng, 8 * 6 * 6, 150, df=3).astype(np.float32)
    model = keras.Sequential(
        [
            keras.Input((10, 10, 12)),
            keras.layers.Conv2D(40, 3, use_bias=False),
            keras.layers.Conv2D(8, 3, use_bias=False),
            keras.layers.Flatten(),
            keras.layers.Dense(150, use_bias=False),
        ]
    )
    model.layers[0].set_weights([conv])
    model.layers[1].set_weights([narrow])
    model.layers[3].set_weights([dense])
    np.random.seed(5)
    details = _quietly(weightwatcher.WeightWatcher(model=model).analyze, randomize=True)
    rows = details.to_dict("records")
    assert len(rows) == 3
    np.random.seed(5)
    for theirs, kernel in zip(rows, (conv, narrow, dense), strict=True):
        is_conv = kernel.ndim == 4
        matrices = [kernel[i, j] for i in range(3) for j in range(3)] if is_conv else [kernel]
        metrics, values = analyze_layer_spectrum(matrices, conv2d_norm=is_conv)
        assert values is not None
        ours = randomized_esd(
            matrices, values, N=metrics.N, M=metrics.M, rf=metrics.rf, conv2d_norm=is_conv,
            rng=np.random, orient="wide" if is_conv else "as_given",
        )  # fmt: skip
        assert ours.num_traps == theirs["num_traps"]
        for name in COLUMNS:
            expected = theirs[name]
            assert getattr(ours, name) == pytest.approx(expected, rel=1e-9, abs=1e-12), name
