"""fix_fingers='clip_xmax': parity with weightwatcher 0.7.7, run for real.

The fit alone against ``RMT_Util.fit_clipped_powerlaw`` on spectra with fingers (a Marchenko-Pastur
bulk with a few eigenvalues just above its edge: the plain fit then picks a short tail with a
large alpha, which clipping the top two or more lowers by more than 1), and whole layers against
``WeightWatcher(model).analyze(fix_fingers='clip_xmax')``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.engine.spectra import marchenko_pastur, with_singular_values
from wwcli.engine import (
    EngineOptions,
    FitStatus,
    Verdict,
    analyze_layer,
    analyze_layer_spectrum,
    clip_xmax_fit,
    fit_power_law,
)
from wwcli.engine.fingers import DEFAULT_MAX_FINGERS, effective_max_fingers

pytestmark = pytest.mark.filterwarnings("ignore::Warning:weightwatcher.*")

CLIP = EngineOptions(fix_fingers="clip_xmax")


def _quietly(function: Any, *args: Any, **kwargs: Any) -> Any:
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


def _clipped_by_weightwatcher(values: np.ndarray[Any, Any]) -> Any:
    """``fit_clipped_powerlaw`` with a silent logger (it sets its default one to INFO, and
    pytest's log capture of thousands of records costs seconds)."""
    rmt = pytest.importorskip("weightwatcher.RMT_Util")
    silent = logging.getLogger("tests.engine.fingers.silent")
    silent.setLevel(logging.CRITICAL)
    silent.propagate = False
    return _quietly(rmt.fit_clipped_powerlaw, values, logger=silent)


def _fingered(seed: int, n: int = 384) -> np.ndarray[Any, Any]:
    """An MP bulk of n eigenvalues whose top 1-3 are moved 5-50 % above the edge."""
    rng = np.random.default_rng([seed, n])
    bulk = marchenko_pastur(rng, n, 4 * n)
    spikes = int(rng.integers(1, 4))
    top = bulk[-1] * (1.0 + rng.uniform(0.05, 0.5, size=spikes))
    return np.sort(np.concatenate([bulk[: n - spikes], top]))


def test_max_fingers_reset_rule() -> None:
    # weightwatcher: reset to 10 unless max_fingers >= half of all the layer's eigenvalues.
    assert effective_max_fingers(None, 100) == DEFAULT_MAX_FINGERS == 10
    assert effective_max_fingers(-3, 4) == 10
    assert effective_max_fingers(20, 100) == 10
    assert effective_max_fingers(50, 100) == 50
    assert effective_max_fingers(10, 19) == 10
    assert effective_max_fingers(3, 6) == 3


def test_fit_matches_fit_clipped_powerlaw() -> None:
    changed = 0
    for seed in range(8):
        values = _fingered(seed, 256)
        best, num_fingers, first = _clipped_by_weightwatcher(values[values > 1e-5])
        ours = clip_xmax_fit(values)
        assert ours.num_fingers == num_fingers, seed
        assert ours.raw_fit.alpha == pytest.approx(first.alpha, rel=1e-10)
        assert ours.fit.alpha == pytest.approx(best.alpha, rel=1e-10)
        assert ours.fit.xmin == best.xmin
        assert ours.fit.xmax == best.xmax
        assert pytest.approx(best.D, rel=1e-10, abs=1e-14) == ours.fit.D
        assert ours.fit.sigma == pytest.approx(best.sigma, rel=1e-10)
        # weightwatcher counts every eigenvalue >= xmin, the clipped ones too.
        assert ours.fit.num_pl_spikes == np.count_nonzero(values >= best.xmin)
        if num_fingers:
            changed += 1
            assert ours.clipped == num_fingers + 1
            assert ours.fit.alpha + 1.0 < ours.raw_fit.alpha
            assert ours.fit.xmax == values[-(num_fingers + 2)]
        else:
            assert ours.fit == ours.raw_fit
    assert 3 <= changed < 8  # both outcomes are exercised


def test_raw_fit_is_the_plain_fit_and_is_reused() -> None:
    values = _fingered(1)
    plain = fit_power_law(values)
    assert clip_xmax_fit(values).raw_fit == plain
    assert clip_xmax_fit(values, raw_fit=plain).raw_fit is plain


def test_failed_first_fit_passes_through() -> None:
    result = clip_xmax_fit(np.ones(30))
    assert result.fit.status is FitStatus.FAILED
    assert (result.num_fingers, result.clipped) == (0, 0)


def test_too_few_values_to_clip_fail_as_in_weightwatcher() -> None:
    # 5 values: the plain fit works (small-N fallback); without the top 4, 1 value is left.
    values = np.array([1.0, 1.1, 1.3, 1.35, 40.0])
    result = clip_xmax_fit(values)
    assert result.raw_fit.status is FitStatus.SUCCESS
    assert result.fit.status is FitStatus.FAILED
    assert "fewer than 2 without the top 4" in result.fit.message
    with pytest.raises(ValueError):  # weightwatcher's analyze() turns this into alpha -1
        _clipped_by_weightwatcher(values)


def test_weightwatchers_check_fits_do_not_fail_the_layer() -> None:
    # 11 values of an x^-4 law: no clipped alpha is 1 lower, the loop ends at k = 9 with 2
    # values left; weightwatcher's "check" fit without the top 10 then has 1 value and raises.
    values = (1.0 - (np.arange(11) + 0.5) / 11) ** (-1.0 / 3.0)
    result = clip_xmax_fit(values)
    assert result.fit == result.raw_fit == fit_power_law(values)
    assert result.num_fingers == 0
    with pytest.raises(ValueError):
        _clipped_by_weightwatcher(values)
    # One more value and weightwatcher's check stops early: its answer is ours.
    values = (1.0 - (np.arange(12) + 0.5) / 12) ** (-1.0 / 3.0)
    best, num_fingers, _ = _clipped_by_weightwatcher(values)
    assert (clip_xmax_fit(values).fit.alpha, num_fingers) == (pytest.approx(best.alpha), 0)


# --- whole layers through weightwatcher's analyze() ---------------------------------------------


def _gaussian_layers() -> list[np.ndarray[Any, Any]]:
    """Linear weights (out, in) of MP-like layers, some with fingers, one heavy-tailed."""
    rng = np.random.default_rng(7)
    layers = [rng.standard_normal((4 * m, m)) / np.sqrt(m) for m in (200, 256, 300, 320, 384)]
    layers += [rng.standard_normal((m, 3 * m)) / np.sqrt(m) for m in (150, 240)]
    layers.append(rng.standard_t(2.5, size=(600, 300)) / np.sqrt(300))
    return layers


@pytest.fixture(scope="module")
def both() -> list[tuple[dict[str, Any], Any, Any]]:
    """(weightwatcher's clip_xmax row, our clip_xmax metrics, our plain metrics) per layer."""
    weightwatcher = pytest.importorskip("weightwatcher")
    torch = pytest.importorskip("torch")
    weights = [w.astype(np.float32) for w in _gaussian_layers()]
    modules = []
    for weight in weights:
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight.data = torch.tensor(weight)
        modules.append(layer)
    watcher = weightwatcher.WeightWatcher(model=torch.nn.Sequential(*modules))
    details = _quietly(watcher.analyze, fix_fingers="clip_xmax")
    rows = details.to_dict("records")
    assert len(rows) == len(weights)
    return [
        (row, analyze_layer([w], options=CLIP), analyze_layer([w]))
        for row, w in zip(rows, weights, strict=True)
    ]


def test_layers_match_weightwatcher(both: list[tuple[dict[str, Any], Any, Any]]) -> None:
    changed = 0
    for theirs, ours, plain in both:
        assert ours.num_fingers == theirs["num_fingers"]
        assert ours.raw_alpha == pytest.approx(theirs["raw_alpha"], rel=1e-10)
        assert ours.alpha == pytest.approx(theirs["alpha"], rel=1e-10)
        assert ours.fit.xmin == pytest.approx(theirs["xmin"], rel=1e-10)
        assert ours.fit.xmax == pytest.approx(theirs["xmax"], rel=1e-10)
        assert pytest.approx(theirs["D"], rel=1e-8, abs=1e-12) == ours.fit.D
        assert ours.fit.sigma == pytest.approx(theirs["sigma"], rel=1e-10)
        assert ours.fit.num_pl_spikes == theirs["num_pl_spikes"]
        # alpha-derived metrics and the label follow the clipped alpha.
        assert ours.alpha_weighted == pytest.approx(theirs["alpha_weighted"], rel=1e-9)
        assert ours.log_alpha_norm == pytest.approx(theirs["log_alpha_norm"], rel=1e-9)
        assert ours.warning == theirs["warning"]
        # raw_alpha is the plain fit's alpha, and nothing else of the layer moves.
        assert ours.raw_alpha == plain.alpha
        assert (ours.lambda_max, ours.norm, ours.entropy) == (
            plain.lambda_max,
            plain.norm,
            plain.entropy,
        )
        if ours.num_fingers:
            changed += 1
            assert ours.alpha + 1.0 < plain.alpha
            assert ours.alpha_weighted < plain.alpha_weighted
    assert changed >= 2


def test_the_verdict_follows_the_clipped_alpha() -> None:
    # An MP layer that reads under-trained (alpha > 6) with its fingers, typical without.
    for seed in range(40):
        values = _fingered(seed)
        result = clip_xmax_fit(values)
        if result.raw_fit.alpha > 6.5 and result.fit.alpha < 5.5:
            break
    else:
        pytest.fail("no seed gave alpha > 6.5 clipped to < 5.5")
    layer = with_singular_values(np.random.default_rng(seed), 1536, 384, np.sqrt(values))
    plain = analyze_layer([layer])
    clipped = analyze_layer([layer], options=CLIP)
    assert plain.alpha == pytest.approx(result.raw_fit.alpha, rel=1e-8)
    assert clipped.alpha == pytest.approx(result.fit.alpha, rel=1e-8)
    assert (plain.verdict, plain.warning) == (Verdict.UNDER_TRAINED, "under-trained")
    assert (clipped.verdict, clipped.warning) == (Verdict.TYPICAL, "")
    assert clipped.num_fingers == result.num_fingers > 0


def test_options_off_changes_nothing() -> None:
    layer = np.random.default_rng(3).standard_normal((900, 300))
    metrics, values = analyze_layer_spectrum([layer])
    assert (metrics.num_fingers, metrics.raw_alpha, metrics.Lambda, metrics.tail_tests) == (
        None,
        None,
        None,
        None,
    )
    assert metrics.fit == fit_power_law(values)


def test_failed_layer_with_clip_xmax() -> None:
    metrics = analyze_layer([np.ones((40, 20))], options=CLIP)
    assert metrics.verdict is Verdict.FAILED
    assert metrics.num_fingers == 0
    assert metrics.raw_alpha is not None and math.isnan(metrics.raw_alpha)


@pytest.mark.parametrize(
    ("field", "value"),
    [("fix_fingers", "xmin_peak"), ("fix_fingers", None), ("fit", "TPL"), ("tail_tests", 1)],
)
def test_options_are_checked(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        EngineOptions(**{field: value})


@pytest.mark.slow
def test_synthetic_encoder_matches_weightwatcher() -> None:  # about a minute
    # The BERT-sized encoder of benchmarks/bench_fits.py (39 layers of 384 eigenvalues).
    weightwatcher = pytest.importorskip("weightwatcher")
    torch = pytest.importorskip("torch")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fits.py"
    spec = importlib.util.spec_from_file_location("bench_fits", script)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    plans = bench.encoder_plans()
    weights = [bench.draw(plan, seed=0) for plan in plans]
    modules = []
    for weight in weights:
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight.data = torch.from_numpy(weight)
        modules.append(layer)
    watcher = weightwatcher.WeightWatcher(model=torch.nn.Sequential(*modules))
    rows = _quietly(watcher.analyze, fix_fingers="clip_xmax").to_dict("records")
    assert len(rows) == len(weights) == 39
    changed = 0
    for theirs, weight in zip(rows, weights, strict=True):
        ours = analyze_layer([weight], options=CLIP)
        assert ours.num_fingers == theirs["num_fingers"]
        assert ours.alpha == pytest.approx(theirs["alpha"], rel=1e-10)
        assert ours.raw_alpha == pytest.approx(theirs["raw_alpha"], rel=1e-10)
        assert ours.fit.num_pl_spikes == theirs["num_pl_spikes"]
        changed += theirs["num_fingers"] > 0
    assert 0 < changed < 39
