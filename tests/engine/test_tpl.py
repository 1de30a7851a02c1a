"""fit='tpl' and the tail tests through powerlaw 1.5: parity with weightwatcher 0.7.7's
``analyze(fit='TPL', pl_package='powerlaw')`` run for real, and with powerlaw called directly.

TPL fits are slow (a numerical fit and an mpmath incomplete gamma function per candidate xmin:
about 1 s for 16 eigenvalues, 14 s for 100); the default run fits one layer of 16, the slow
mark covers larger ones.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

from wwcli.engine import (
    EngineOptions,
    FitStatus,
    TailTests,
    analyze_layer,
    analyze_layer_spectrum,
    tpl,
)
from wwcli.engine.fingers import clip_xmax_fit
from wwcli.engine.tpl import POWERLAW_VERSION, import_powerlaw, tail_tests, tpl_fit

pytestmark = [
    pytest.mark.filterwarnings("ignore::Warning:weightwatcher.*"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:powerlaw"),
]

powerlaw = pytest.importorskip("powerlaw")


def _quietly(function: Any, *args: Any, **kwargs: Any) -> Any:
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function(*args, **kwargs)


def _weightwatcher_rows(weights: list[np.ndarray[Any, Any]], **options: Any) -> list[Any]:
    weightwatcher = pytest.importorskip("weightwatcher")
    torch = pytest.importorskip("torch")
    modules = []
    for weight in weights:
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight.data = torch.tensor(weight)
        modules.append(layer)
    watcher = weightwatcher.WeightWatcher(model=torch.nn.Sequential(*modules))
    rows: list[Any] = _quietly(watcher.analyze, pl_package="powerlaw", **options).to_dict("records")
    assert len(rows) == len(weights)
    return rows


def _student(seed: int, m: int) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng([seed, m])
    return (rng.standard_t(3.0, size=(4 * m, m)) / np.sqrt(m)).astype(np.float32)


def _check_tpl_row(theirs: dict[str, Any], ours: Any) -> None:
    assert ours.fit.status is FitStatus.SUCCESS
    assert ours.alpha == pytest.approx(theirs["alpha"], rel=1e-9)
    assert ours.Lambda == pytest.approx(theirs["Lambda"], rel=1e-6, abs=1e-12)
    assert ours.fit.xmin == pytest.approx(theirs["xmin"], rel=1e-10)
    assert pytest.approx(theirs["D"], rel=1e-8) == ours.fit.D
    assert ours.fit.num_pl_spikes == theirs["num_pl_spikes"]
    assert theirs["xmax"] is None  # weightwatcher reports powerlaw's given xmax; we the largest
    assert ours.fit.xmax == ours.lambda_max
    assert math.isnan(theirs["sigma"]) and math.isnan(ours.fit.sigma)
    assert ours.warning == theirs["warning"]
    assert ours.alpha_weighted == pytest.approx(theirs["alpha_weighted"], rel=1e-9)
    assert ours.log_alpha_norm == pytest.approx(theirs["log_alpha_norm"], rel=1e-9)


def test_powerlaw_is_the_pinned_release_with_the_api_weightwatcher_needs() -> None:
    assert powerlaw.__version__ == POWERLAW_VERSION == "1.5"
    assert import_powerlaw() is powerlaw
    data = np.sort(np.random.default_rng(0).pareto(2.0, size=60) + 1.0)
    fit = _quietly(powerlaw.Fit, data, xmin=None, xmax=None, verbose=False)
    assert {"truncated_power_law", "lognormal", "exponential"} <= set(fit.supported_distributions)
    R, p = _quietly(fit.distribution_compare, "power_law", "lognormal", normalized_ratio=True)
    assert math.isfinite(R) and 0 <= p <= 1


def test_tpl_matches_weightwatcher_on_a_small_layer() -> None:
    weight = _student(0, 16)
    (theirs,) = _weightwatcher_rows([weight], fit="TPL")
    ours = analyze_layer([weight], options=EngineOptions(fit="tpl"))
    _check_tpl_row(theirs, ours)


@pytest.mark.slow
def test_tpl_matches_weightwatcher_on_larger_layers() -> None:  # about a minute
    weights = [_student(1, 40), _student(2, 64), _student(3, 100)]
    rows = _weightwatcher_rows(weights, fit="TPL")
    for theirs, weight in zip(rows, weights, strict=True):
        _check_tpl_row(theirs, analyze_layer([weight], options=EngineOptions(fit="tpl")))


def test_tpl_with_clip_xmax_matches_weightwatcher() -> None:
    # weightwatcher clips with powerlaw's power-law fits, then reports the TPL fitted at the
    # kept fit's xmin on the clipped data: one TPL fit per layer, so this is fast.
    rng = np.random.default_rng(7)
    weights = [
        (rng.standard_normal((4 * m, m)) / np.sqrt(m)).astype(np.float32) for m in (200, 256, 300)
    ]
    rows = _weightwatcher_rows(weights, fit="TPL", fix_fingers="clip_xmax")
    options = EngineOptions(fit="tpl", fix_fingers="clip_xmax")
    fingers = 0
    for theirs, weight in zip(rows, weights, strict=True):
        ours = analyze_layer([weight], options=options)
        assert ours.num_fingers == theirs["num_fingers"]
        fingers += ours.num_fingers > 0
        assert ours.raw_alpha == pytest.approx(theirs["raw_alpha"], rel=1e-10)
        assert ours.alpha == pytest.approx(theirs["alpha"], rel=1e-9)
        assert ours.Lambda == pytest.approx(theirs["Lambda"], rel=1e-6)
        assert ours.fit.xmin == pytest.approx(theirs["xmin"], rel=1e-10)
        assert pytest.approx(theirs["D"], rel=1e-8) == ours.fit.D
        assert ours.fit.sigma == pytest.approx(theirs["sigma"], rel=1e-9)
        assert ours.fit.num_pl_spikes == theirs["num_pl_spikes"]
    assert fingers >= 1


def test_tpl_failures_are_results() -> None:
    assert tpl_fit(np.ones(10)).fit.status is FitStatus.FAILED
    assert tpl_fit(np.array([np.nan, 1.0, 2.0])).fit.message == "TPL: non-finite eigenvalues"
    metrics = analyze_layer([np.ones((30, 20))], options=EngineOptions(fit="tpl"))
    assert metrics.fit.status is FitStatus.FAILED
    assert metrics.Lambda is not None and math.isnan(metrics.Lambda)


# --- tail tests ---------------------------------------------------------------------------------


def _powerlaw_compare(tail_source: np.ndarray[Any, Any], xmin: float) -> tuple[float, ...]:
    fit = _quietly(powerlaw.Fit, tail_source, xmin=xmin, verbose=False)
    ln = _quietly(fit.distribution_compare, "power_law", "lognormal", normalized_ratio=True)
    ex = _quietly(fit.distribution_compare, "power_law", "exponential", normalized_ratio=True)
    return (*ln, *ex)


def _numbers(tests: TailTests) -> tuple[float, ...]:
    return (tests.R_lognormal, tests.p_lognormal, tests.R_exponential, tests.p_exponential)


@pytest.mark.parametrize(("df", "m"), [(2.5, 300), (4.0, 200), (None, 256)])
def test_tail_tests_are_powerlaws_numbers_on_the_engines_tail(df: float | None, m: int) -> None:
    rng = np.random.default_rng(m)
    weight = rng.standard_t(df, size=(3 * m, m)) if df else rng.standard_normal((3 * m, m))
    metrics, values = analyze_layer_spectrum([weight], options=EngineOptions(tail_tests=True))
    assert values is not None and metrics.tail_tests is not None
    assert metrics.tail_tests.message == ""
    expected = _powerlaw_compare(values[values > 1e-5], metrics.fit.xmin)
    assert _numbers(metrics.tail_tests) == expected
    # The fit itself is the plain one: the tests only add a field.
    assert metrics.fit == analyze_layer([weight]).fit
    assert all(0 <= p <= 1 for p in expected[1::2])


def test_tail_tests_use_the_clipped_tail() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        weight = rng.standard_normal((1024, 256))
        options = EngineOptions(fix_fingers="clip_xmax", tail_tests=True)
        metrics, values = analyze_layer_spectrum([weight], options=options)
        if metrics.num_fingers:
            break
    else:
        pytest.fail("no layer with fingers")
    assert values is not None and metrics.tail_tests is not None
    clipped = clip_xmax_fit(values).clipped
    data = np.sort(values[values > 1e-5])[: values.size - clipped]
    assert _numbers(metrics.tail_tests) == _powerlaw_compare(data, metrics.fit.xmin)
    assert _numbers(metrics.tail_tests) != _powerlaw_compare(values, metrics.fit.xmin)


def test_tail_tests_of_no_tail() -> None:
    metrics = analyze_layer([np.ones((30, 20))], options=EngineOptions(tail_tests=True))
    assert metrics.tail_tests is not None and metrics.tail_tests.message.startswith("no tail")
    assert all(math.isnan(x) for x in _numbers(metrics.tail_tests))
    assert math.isnan(tail_tests(np.arange(1.0, 10.0), xmin=100.0).R_lognormal)


def test_powerlaw_output_is_dropped_for_this_thread_only(capfd: pytest.CaptureFixture[str]) -> None:
    seen: list[bool] = []

    def other() -> None:
        # Print while the main thread's powerlaw call has the streams wrapped.
        for _ in range(10_000):
            if isinstance(sys.stderr, tpl._ThreadMute):
                break
            time.sleep(0.001)
        seen.append(isinstance(sys.stderr, tpl._ThreadMute))
        for _ in range(200):
            print("other thread", file=sys.stderr)

    thread = threading.Thread(target=other)
    thread.start()
    tpl_fit(np.sort(np.random.default_rng(1).pareto(2.0, size=15) + 1.0))
    thread.join()
    err = capfd.readouterr().err
    assert err.count("other thread") == 200
    assert "xmin progress" not in capfd.readouterr().out
    assert seen == [True]
    assert not isinstance(sys.stderr, tpl._ThreadMute)  # put back


def test_a_missing_powerlaw_is_a_clear_error() -> None:
    code = (
        "import sys; sys.modules['powerlaw'] = None\n"
        "import numpy as np\n"
        "from wwcli.engine import EngineOptions, analyze_layer\n"
        "for options in (EngineOptions(fit='tpl'), EngineOptions(tail_tests=True)):\n"
        "    try:\n"
        "        analyze_layer([np.eye(20)], options=options)\n"
        "    except ValueError as error:\n"
        "        print(error)\n"
        "print(analyze_layer([np.eye(20) + np.tri(20)]).verdict)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for line in lines[:2]:
        assert "powerlaw" in line and "pip install 'wwcli[tpl]'" in line
    assert lines[2] != ""  # the default options never need powerlaw


def test_a_wrong_powerlaw_version_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(powerlaw, "__version__", "2.0.0")
    with pytest.raises(ValueError, match=r"powerlaw 1\.5 .*found 2\.0\.0.*wwcli\[tpl\]"):
        import_powerlaw()
