"""The detX / ERG constraint (engine/detx.py): parity with weightwatcher 0.7.7's
``analyze(detX=True)`` and with its ``detX_constraint`` on spectra of every kind, including the
degenerate ones."""

from __future__ import annotations

import contextlib
import io
import logging
import math
from typing import Any

import numpy as np
import pytest

from tests.engine.spectra import heavy_tailed, spectrum
from wwcli.engine import analyze_layer_spectrum
from wwcli.engine.detx import _walk, detx

pytestmark = pytest.mark.filterwarnings("ignore::Warning")


def _quietly(function: Any, *args: Any, **kwargs: Any) -> Any:
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


def test_same_as_weightwatcher_analyze() -> None:
    weightwatcher = pytest.importorskip("weightwatcher")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(17)
    weights = [
        heavy_tailed(rng, 300, 150, df=2.5),
        rng.standard_normal((64, 200)),
        heavy_tailed(rng, 120, 120, df=1.5),
        heavy_tailed(rng, 32, 16 * 9, df=3).reshape(32, 16, 3, 3),
    ]
    layers: list[Any] = []
    for weight in weights:
        if weight.ndim == 2:
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        else:
            layer = torch.nn.Conv2d(weight.shape[1], weight.shape[0], 3, bias=False)
        layer.weight.data = torch.tensor(weight, dtype=torch.float32)
        layers.append(layer)
    details = _quietly(
        weightwatcher.WeightWatcher(model=torch.nn.Sequential(*layers)).analyze, detX=True
    )
    rows = details.to_dict("records")
    assert len(rows) == len(weights)
    gaps = []
    for theirs, weight in zip(rows, weights, strict=True):
        float32 = weight.astype(np.float32)
        conv = float32.ndim == 4
        matrices = [float32[:, :, i, j] for i in range(3) for j in range(3)] if conv else [float32]
        metrics, values = analyze_layer_spectrum(matrices, conv2d_norm=conv)
        assert values is not None
        ours = detx(values, num_pl_spikes=metrics.fit.num_pl_spikes)
        assert ours.message == ""
        assert ours.detX_num == theirs["detX_num"] == theirs["num_ERG_spikes"]
        assert ours.ERG_gap == theirs["ERG_gap"]
        assert ours.detX_val == pytest.approx(theirs["detX_val"], rel=1e-9)
        assert ours.detX_val_unrescaled == pytest.approx(theirs["detX_val_unrescaled"], rel=1e-9)
        gaps.append(ours.ERG_gap)
    assert len(set(gaps)) > 1  # not one number for every layer


def _weightwatcher_detx(values: np.ndarray[Any, Any]) -> tuple[int, float, float]:
    """weightwatcher's apply_detX arithmetic on sorted values: (detX_num, detX_val,
    detX_val_unrescaled)."""
    rmt = pytest.importorskip("weightwatcher.RMT_Util")
    rescaled, w_scale = rmt.rescale_eigenvalues(values)
    count, index = _quietly(rmt.detX_constraint, rescaled, rescale=False)
    unscaled = rmt.un_rescale_eigenvalues(rescaled, w_scale)
    return count, unscaled[index], rescaled[index]


def _spectra() -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(8)
    kinds = [("mp", 400), ("mp+tail1.5", 1536), ("t3", 300), ("t1.5", 200), ("pareto", 1000)]
    spectra = [np.array(spectrum(kind, n, seed)) for kind, n in kinds for seed in range(3)]
    spectra += [
        np.sort(rng.lognormal(0.0, 2.0, size=50)),
        np.concatenate([np.zeros(30), np.sort(rng.gamma(2.0, size=70))]),  # rank deficient
        np.array([1.0, 2.0]),
        np.array([0.5, 0.5, 0.5, 4.0]),
        np.concatenate([np.full(3000, 1e-3), np.full(3000, 2.0)]),  # top product overflows
        np.geomspace(1e-6, 1e3, 500),
    ]
    return spectra


@pytest.mark.parametrize("index", range(len(_spectra())))
def test_same_as_weightwatcher_detx_constraint(index: int) -> None:
    values = _spectra()[index]
    count, value, rescaled_value = _weightwatcher_detx(values)
    ours = detx(values, num_pl_spikes=5)
    assert ours.detX_num == count
    assert ours.ERG_gap == count - 5
    assert ours.detX_val == value
    assert ours.detX_val_unrescaled == rescaled_value


def test_the_fast_crossing_is_the_walk() -> None:
    """The O(n) search and weightwatcher's O(n^2) walk agree on many random spectra."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 400))
        values = np.sort(rng.lognormal(0.0, float(rng.uniform(0.01, 3.0)), size=n))
        if trial % 3 == 0:
            values[: n // 4] = 0.0
        rescaled = values * n / values.sum()
        expected_index = _walk(rescaled)
        found = bool(np.prod(rescaled[expected_index:]) < 1.0)
        expected_count = n - expected_index if found else n
        assert detx(values, num_pl_spikes=0).detX_num == expected_count


def test_degenerate_and_bad_spectra() -> None:
    flat = detx(np.ones(10), num_pl_spikes=2)
    assert (flat.detX_num, flat.ERG_gap) == (0, -2)
    assert flat.detX_val == 1.0 and "distinct" in flat.message
    single = detx(np.array([3.0]), num_pl_spikes=1)
    assert single.detX_num == 0 and single.detX_val == 3.0
    for values, reason in (
        (np.array([]), "no eigenvalues"),
        (np.array([1.0, np.inf]), "non-finite"),
        (np.zeros(5), "sum to zero"),
    ):
        result = detx(values, num_pl_spikes=3)
        assert reason in result.message
        assert result.detX_num == -1 and math.isnan(result.detX_val) and result.ERG_gap is None
    failed_fit = detx(np.array(spectrum("mp", 100)), num_pl_spikes=-1)
    assert failed_fit.detX_num > 0 and failed_fit.ERG_gap is None
    assert "no ERG_gap" in failed_fit.message


def test_fixture_layers_same_as_weightwatcher() -> None:
    """weightwatcher's detX arithmetic on its own eigenvalues of the fixtures' layers (SVD,
    Conv2D kernels scaled by sqrt(1/2)) against ours on the engine's."""
    from tests.engine.test_mpfit import _fixture_layers

    for name, matrices, _, _, conv2d in _fixture_layers():
        scale = np.sqrt(1 / 2.0) if conv2d else 1.0
        svds = [np.linalg.svd(m.astype(np.float64) * scale, compute_uv=False) for m in matrices]
        theirs = np.sort(np.concatenate(svds) ** 2)
        count, value, rescaled_value = _weightwatcher_detx(theirs)
        _, values = analyze_layer_spectrum(matrices, conv2d_norm=conv2d)
        assert values is not None
        ours = detx(values, num_pl_spikes=0)
        assert ours.detX_num == count, name
        assert ours.detX_val == pytest.approx(value, rel=1e-9), name
        assert ours.detX_val_unrescaled == pytest.approx(rescaled_value, rel=1e-9), name
