"""The diagnostics through the run layer: each group's columns appear only when the run computed
it, the randomized spectra do not depend on --jobs or on the selection, --base matches layers by
name and shape (the unmatched ones are said), and the update W - W_base is analyzed as the
engine analyzes any layer. weightwatcher parity of the update is in tests/test_base_parity.py."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.hostile.make_corpus import tensors_to_safetensors
from wwcli.analysis import analyze_path
from wwcli.diagnostics import Diagnostics, layer_rng, run_groups
from wwcli.engine import EngineOptions, analyze_layer_spectrum
from wwcli.gate import GatePolicy, evaluate, parse_fail_on
from wwcli.report.columns import ANALYZE_REGISTRY, table_views
from wwcli.report.interface import formatter_for
from wwcli.report.rows import ANALYZE_COLUMNS, analyze_columns, analyze_rows
from wwcli.results import CheckpointReport, InputFailure, RunResult
from wwcli.settings import RunSettings

GROUP_KEYS = {
    "mp": {"num_spikes", "sigma_mp", "bulk_max", "bulk_min", "mp_softrank", "W_scale"},
    "random": {"rand_distance", "num_traps", "ww_softrank", "max_rand_eval", "rand_num_spikes"},
    "detx": {"detX_num", "detX_val", "ERG_gap"},
    "delta": {"delta_alpha", "delta_num_pl_spikes", "delta_norm", "delta_spectral_norm"},
    "fingers": {"num_fingers", "raw_alpha"},
    "tail_tests": {"R_lognormal", "p_lognormal", "R_exponential", "p_exponential"},
}


def _gaussian(rng: np.random.Generator, rows: int, columns: int) -> np.ndarray:
    return (rng.standard_normal((rows, columns)) / np.sqrt(columns)).astype(np.float32)


def _spiked(rng: np.random.Generator, rows: int, columns: int, k: int) -> np.ndarray:
    """A Gaussian matrix plus k strong rank-one spikes."""
    matrix = rng.standard_normal((rows, columns)) / np.sqrt(columns)
    for _ in range(k):
        u, v = rng.standard_normal(rows), rng.standard_normal(columns)
        matrix += 4.0 * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    return matrix.astype(np.float32)


def _write(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    path.write_bytes(tensors_to_safetensors(tensors))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(7)
    tensors = {
        "a.weight": _gaussian(rng, 160, 80),
        "b.weight": _spiked(rng, 200, 100, k=3),
        "c.weight": _gaussian(rng, 96, 96),
        "d.weight": _gaussian(rng, 120, 60),
        "e.weight": _gaussian(rng, 150, 75),
    }
    return _write(tmp_path_factory.mktemp("model") / "model.safetensors", tensors)


def _report(path: Path, settings: RunSettings, jobs: int = 1) -> CheckpointReport:
    report = analyze_path(path, settings, jobs=jobs)
    assert isinstance(report, CheckpointReport), report
    return report


def _json(settings: RunSettings, report: CheckpointReport) -> str:
    return formatter_for("json").render(RunResult(settings, (report,)))


def test_by_default_no_group_runs_and_rows_keep_their_keys(model: Path) -> None:
    settings = RunSettings()
    report = _report(model, settings)
    assert report.groups == ()
    assert all(result.diagnostics is None for result in report.layers)
    assert all(tuple(row) == ANALYZE_COLUMNS for row in analyze_rows(report))
    assert analyze_columns([report]) == ANALYZE_COLUMNS
    headers = {view.header for view in table_views(ANALYZE_REGISTRY, report.groups)}
    assert not headers & {"num_spikes", "traps", "delta_alpha"}


@pytest.mark.parametrize(
    ("settings", "groups"),
    [
        (RunSettings(diagnostics=Diagnostics(mp_fit=True)), {"mp"}),
        (RunSettings(diagnostics=Diagnostics(randomize=True)), {"random"}),
        (RunSettings(diagnostics=Diagnostics(detx=True)), {"detx"}),
        (RunSettings(engine=EngineOptions(fix_fingers="clip_xmax")), {"fingers"}),
        (RunSettings(engine=EngineOptions(tail_tests=True)), {"tail_tests"}),
    ],
)
def test_a_group_is_in_the_rows_only_when_its_option_is_on(
    model: Path, settings: RunSettings, groups: set[str]
) -> None:
    report = _report(model, settings)
    assert set(report.groups) == groups
    rows = analyze_rows(report)
    keys = set(rows[0])
    for group, group_keys in GROUP_KEYS.items():
        if group in groups:
            assert group_keys <= keys, group
        else:
            assert not group_keys & keys, group
    # Built-in keys first and in their order, the group's after them in registry order.
    assert tuple(rows[0])[: len(ANALYZE_COLUMNS)] == ANALYZE_COLUMNS
    registry_order = [c.key for c in ANALYZE_REGISTRY if c.key in keys]
    assert list(rows[0]) == registry_order
    assert tuple(rows[0]) == analyze_columns([report])


def test_mp_spikes_count_the_planted_spikes_and_gaussian_layers_have_none(model: Path) -> None:
    report = _report(model, RunSettings(diagnostics=Diagnostics(mp_fit=True, randomize=True)))
    rows = {row["name"]: row for row in analyze_rows(report)}
    assert rows["b"]["num_spikes"] == 3
    for name in ("a", "c", "d", "e"):
        assert rows[name]["num_spikes"] == 0, name
        assert rows[name]["num_traps"] == 0, name
    assert all(0 < float(row["sigma_mp"]) < 2 for row in rows.values())  # type: ignore[arg-type]


def test_randomized_spectra_do_not_depend_on_jobs_or_on_the_selection(model: Path) -> None:
    settings = RunSettings(diagnostics=Diagnostics(randomize=True, mp_fit=True, seed=3))
    one = _report(model, settings, jobs=1)
    three = _report(model, settings, jobs=3)
    assert _json(settings, one) == _json(settings, three)
    only_c = _report(model, dataclasses.replace(settings, layers="c,e"), jobs=2)
    rows = {row["name"]: row for row in analyze_rows(one)}
    for row in analyze_rows(only_c):
        assert row == rows[row["name"]]
    # Another seed, other permutations: the randomized numbers move, the layer's own do not.
    other = _report(model, dataclasses.replace(settings, diagnostics=Diagnostics(randomize=True)))
    before, after = analyze_rows(one)[0], analyze_rows(other)[0]
    assert before["alpha"] == after["alpha"]
    assert before["rand_distance"] != after["rand_distance"]


def test_each_layer_draws_from_its_own_generator() -> None:
    first = layer_rng(0, "encoder.layer.0.query").permutation(1000)
    assert np.array_equal(first, layer_rng(0, "encoder.layer.0.query").permutation(1000))
    assert not np.array_equal(first, layer_rng(0, "encoder.layer.0.key").permutation(1000))
    assert not np.array_equal(first, layer_rng(1, "encoder.layer.0.query").permutation(1000))


def test_the_options_object_names_the_diagnostics(model: Path) -> None:
    settings = RunSettings(diagnostics=Diagnostics(mp_fit=True, seed=5, base="base.pt"))
    options = settings.to_json()
    assert options["mp_fit"] is True and options["randomize"] is False
    assert options["seed"] == 5 and options["base"] == "base.pt" and options["detx"] is False
    assert list(options)[:8] == [
        "layers",
        "min_evals",
        "max_evals",
        "fail_below",
        "fail_above",
        "fail_on_failed_fit",
        "device",
        "precision",
    ]


@pytest.fixture(scope="module")
def base_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A fine-tuned model and its base: `a` matches, `b` changed shape, `c` is new, the base's
    `gone` is not in the model."""
    rng = np.random.default_rng(11)
    base = {
        "a.weight": _gaussian(rng, 160, 80),
        "b.weight": _gaussian(rng, 90, 60),
        "gone.weight": _gaussian(rng, 64, 64),
        "same.weight": _gaussian(rng, 100, 50),
    }
    update = _spiked(rng, 160, 80, k=2) * 0.5
    model = {
        "a.weight": base["a.weight"] + update,
        "b.weight": _gaussian(rng, 100, 60),
        "c.weight": _gaussian(rng, 128, 64),
        "same.weight": base["same.weight"].copy(),
    }
    folder = tmp_path_factory.mktemp("pair")
    return (
        _write(folder / "model.safetensors", model),
        _write(folder / "base.safetensors", base),
        # The difference of the stored float32 values, in float32 (as weightwatcher takes it).
        {"a": model["a.weight"] - base["a.weight"]},
    )


def test_base_matches_by_name_and_shape_and_says_what_did_not_match(
    base_pair: tuple[Path, Path, dict[str, np.ndarray]],
) -> None:
    path, base, updates = base_pair
    settings = RunSettings(diagnostics=Diagnostics(base=str(base), mp_fit=True))
    report = _report(path, settings)
    assert "delta" in report.groups and "mp" in report.groups
    rows = {row["name"]: row for row in analyze_rows(report)}
    assert rows["a"]["delta_base"] == "a"
    assert rows["b"]["delta_base"] is None and rows["b"]["delta_alpha"] is None
    assert "60x90" in str(rows["b"]["delta_message"]) or "90x60" in str(rows["b"]["delta_message"])
    assert rows["c"]["delta_base"] is None
    assert rows["c"]["delta_message"] == "the base checkpoint has no layer of this name"
    assert report.base_unmatched == ("gone",)
    assert json.loads(_json(settings, report))["base_unmatched"] == ["gone"]
    assert "base_unmatched" not in json.loads(_json(RunSettings(), _report(path, RunSettings())))
    # Identical weights: an all-zero update, a failed fit said in the row, never a number.
    assert rows["same"]["delta_base"] == "same" and rows["same"]["delta_alpha"] is None
    assert rows["same"]["delta_norm"] == 0.0 and rows["same"]["delta_message"]

    # The update's numbers are the engine's on W - W_base.
    metrics, eigenvalues = analyze_layer_spectrum([updates["a"]])
    assert eigenvalues is not None
    assert rows["a"]["delta_alpha"] == pytest.approx(metrics.fit.alpha, rel=1e-12)
    assert rows["a"]["delta_num_pl_spikes"] == metrics.fit.num_pl_spikes
    assert rows["a"]["delta_norm"] == pytest.approx(metrics.norm, rel=1e-12)
    assert rows["a"]["delta_spectral_norm"] == pytest.approx(metrics.lambda_max, rel=1e-12)
    assert rows["a"]["delta_num_spikes"] == 2  # the two planted directions of the update
    # W itself is reported beside, unchanged by --base.
    plain = {row["name"]: row for row in analyze_rows(_report(path, RunSettings()))}
    assert all(rows[name]["alpha"] == plain[name]["alpha"] for name in rows)


def test_the_table_notes_the_unmatched_layers(
    base_pair: tuple[Path, Path, dict[str, np.ndarray]],
) -> None:
    path, base, _ = base_pair
    report = _report(path, RunSettings(diagnostics=Diagnostics(base=str(base))))
    text = formatter_for("table", width=200).render_report(report)
    assert "delta_alpha" in text
    assert "2 layers with no layer of the same name and shape in the base" in text
    assert "1 layer of the base not in this checkpoint: gone" in text


def test_an_unreadable_base_is_an_input_failure_that_names_it(
    base_pair: tuple[Path, Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    path, _, _ = base_pair
    bogus = tmp_path / "base.safetensors"
    bogus.write_bytes(b"\x00" * 5)
    outcome = analyze_path(path, RunSettings(diagnostics=Diagnostics(base=str(bogus))))
    assert isinstance(outcome, InputFailure)
    assert outcome.message.startswith(f"--base {bogus}: ")


def test_reports_with_diagnostics_survive_pickling(model: Path) -> None:
    settings = RunSettings(diagnostics=Diagnostics(mp_fit=True, randomize=True, detx=True))
    report = _report(model, settings)
    again = pickle.loads(pickle.dumps(report))
    assert _json(settings, again) == _json(settings, report)


def test_fail_on_trips_on_diagnostic_metrics_and_says_the_values(model: Path) -> None:
    policy = GatePolicy(fail_below=None, fail_on=("num_spikes > 2",), gate_min_evals=0)
    settings = RunSettings(diagnostics=Diagnostics(mp_fit=True), gate=policy)
    run = RunResult(settings, (_report(model, settings),))
    outcome = evaluate(run)
    assert [trip.name for trip in outcome.trips] == ["b"]
    assert outcome.trips[0].reason == "fail-on num_spikes > 2: num_spikes 3"
    assert outcome.rules == ("(num_spikes > 2)",)
    assert int(outcome.code) == 1


def test_fail_on_needs_the_group_its_metrics_come_from() -> None:
    with pytest.raises(ValueError, match=r"num_traps is computed only with --randomize"):
        RunSettings(gate=GatePolicy(fail_on=("num_traps > 0",)))
    with pytest.raises(ValueError, match=r"delta_num_spikes is computed only with --base"):
        RunSettings(
            diagnostics=Diagnostics(mp_fit=True),
            gate=GatePolicy(fail_on=("delta_num_spikes > 0",)),
        )


def test_run_groups_follow_the_settings() -> None:
    assert run_groups(Diagnostics(), EngineOptions()) == ()
    groups = run_groups(Diagnostics(mp_fit=True, base="x"), EngineOptions(fit="tpl"))
    assert groups == ("mp", "delta", "tpl")


def test_a_missing_value_never_trips_a_rule() -> None:
    rule = parse_fail_on("not (delta_alpha > 1)")
    assert rule.holds({"delta_alpha": None}) is None
    assert parse_fail_on("alpha < 2 or delta_alpha > 1").holds({"alpha": 1.5}) is True
    assert parse_fail_on("alpha < 2 and delta_alpha > 1").holds({"alpha": 3.0}) is False
    assert parse_fail_on("alpha < 2").holds({"alpha": math.nan}) is None


def test_the_esd_figure_draws_the_mp_bulk_and_the_randomized_esd_when_they_ran(
    model: Path,
) -> None:
    pytest.importorskip("matplotlib")
    from wwcli.report import plots

    def gids(settings: RunSettings) -> set[str]:
        report = _report(model, dataclasses.replace(settings, keep_spectra=True))
        figure = plots.esd_figure(report.layers[1])
        return {str(line.get_gid()) for axes in figure.axes for line in axes.get_lines()}

    plain = gids(RunSettings())
    assert not plain & {"mp-bulk", "randomized-esd"}
    both = gids(RunSettings(diagnostics=Diagnostics(mp_fit=True, randomize=True)))
    assert {"mp-bulk", "randomized-esd"} <= both
    assert plain <= both
    # The shuffled eigenvalues are kept for pictures only: not without the spectra.
    report = _report(model, RunSettings(diagnostics=Diagnostics(randomize=True)))
    assert all(r.diagnostics.random.rand_eigenvalues is None for r in report.layers)  # type: ignore[union-attr]


def test_the_mp_density_integrates_to_one() -> None:
    from scipy.integrate import quad

    from wwcli.report.plots import marchenko_pastur_density

    for Q, sigma, scale in ((1.0, 1.0, 1.0), (4.0, 0.8, 2.0), (2.5, 1.3, 0.5)):
        low = (sigma * (1 - 1 / np.sqrt(Q))) ** 2 / scale**2
        high = (sigma * (1 + 1 / np.sqrt(Q))) ** 2 / scale**2

        def density(x: float, Q: float = Q, sigma: float = sigma, scale: float = scale) -> float:
            return float(
                marchenko_pastur_density(np.array([x]), sigma=sigma, Q=Q, W_scale=scale)[0]
            )

        total, _ = quad(density, low, high, limit=200)
        assert total == pytest.approx(1.0, abs=1e-6), (Q, sigma, scale)


def test_exit_code_applies_fail_on_rules_to_bare_results(model: Path) -> None:
    from wwcli.gate import exit_code

    report = _report(model, RunSettings(diagnostics=Diagnostics(mp_fit=True)))
    tripping = GatePolicy(fail_below=None, fail_on=("num_spikes >= 3",), gate_min_evals=0)
    passing = GatePolicy(fail_below=None, fail_on=("num_spikes > 3",), gate_min_evals=0)
    assert int(exit_code(report.layers, tripping)) == 1
    assert int(exit_code(report.layers, passing)) == 0
