"""The diagnostics on the command line: the flags, the columns they add (only then), --fail-on
(its parse errors, its trips, the rule printed), the verdict's words, and the default output
left as it was."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.hostile.make_corpus import tensors_to_safetensors
from wwcli.cli import app
from wwcli.report.rows import ANALYZE_COLUMNS

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SEED_MLP = FIXTURES / "keras" / "seed_mlp.keras"
HEAVY = FIXTURES / "keras" / "heavy_tailed_mlp.keras"

runner = CliRunner()


def invoke(*args: str | Path) -> object:
    return runner.invoke(app, ["analyze", "--isolated", "-j", "1", *[str(a) for a in args]])


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_the_default_output_has_no_diagnostic_column() -> None:
    result = invoke(SEED_MLP, "-f", "csv")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert result.stdout.splitlines()[0] == ",".join(ANALYZE_COLUMNS)  # type: ignore[attr-defined]
    table = invoke(SEED_MLP).stdout  # type: ignore[attr-defined]
    header = next(line for line in table.splitlines() if " id " in line).split()
    assert not {"num_spikes", "traps", "delta_alpha"} & set(header)
    document = json.loads(invoke(SEED_MLP, "-f", "json").stdout)  # type: ignore[attr-defined]
    assert list(document["layers"][0]) == list(ANALYZE_COLUMNS)
    options = document["options"]
    assert (options["mp_fit"], options["randomize"], options["detx"]) == (False, False, False)
    assert options["base"] is None and options["seed"] == 0 and options["fail_on"] == []


def test_mp_fit_and_randomize_add_their_columns_and_the_table_shows_the_key_ones() -> None:
    result = invoke(SEED_MLP, "--mp-fit", "--randomize", "-f", "csv")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    rows = _csv(result.stdout)  # type: ignore[attr-defined]
    assert {"num_spikes", "sigma_mp", "num_traps", "rand_distance"} <= set(rows[0])
    assert "detX_num" not in rows[0] and "delta_alpha" not in rows[0]
    assert list(rows[0])[: len(ANALYZE_COLUMNS)] == list(ANALYZE_COLUMNS)
    table = invoke(SEED_MLP, "--mp-fit", "--randomize").stdout  # type: ignore[attr-defined]
    header = next(line for line in table.splitlines() if " id " in line).split()
    assert {"num_spikes", "traps"} <= set(header) and "delta_alpha" not in header


def test_all_diagnostics_turns_on_the_ones_that_leave_alpha_alone() -> None:
    every = invoke(SEED_MLP, "--all-diagnostics", "-f", "json")
    assert every.exit_code == 0, every.output  # type: ignore[attr-defined]
    document = json.loads(every.stdout)  # type: ignore[attr-defined]
    layer = document["layers"][0]
    assert {"num_spikes", "num_traps", "detX_num", "R_lognormal", "p_exponential"} <= set(layer)
    assert "num_fingers" not in layer and "Lambda" not in layer and "delta_alpha" not in layer
    options = document["options"]
    assert options["fix_fingers"] == "none" and options["fit"] == "power_law"
    plain = json.loads(invoke(SEED_MLP, "-f", "json").stdout)  # type: ignore[attr-defined]
    assert [row["alpha"] for row in plain["layers"]] == [row["alpha"] for row in document["layers"]]


def test_the_seed_picks_the_permutations() -> None:
    first = invoke(SEED_MLP, "--randomize", "--seed", "4", "-f", "csv").stdout  # type: ignore[attr-defined]
    again = invoke(SEED_MLP, "--randomize", "--seed", "4", "-f", "csv", "-j", "3").stdout  # type: ignore[attr-defined]
    other = invoke(SEED_MLP, "--randomize", "--seed", "5", "-f", "csv").stdout  # type: ignore[attr-defined]
    assert first == again
    assert [r["rand_distance"] for r in _csv(first)] != [r["rand_distance"] for r in _csv(other)]


def test_fix_fingers_reports_the_raw_alpha_beside() -> None:
    result = invoke(SEED_MLP, "--fix-fingers", "clip_xmax", "-f", "json")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    layer = json.loads(result.stdout)["layers"][0]  # type: ignore[attr-defined]
    assert isinstance(layer["num_fingers"], int) and isinstance(layer["raw_alpha"], float)


def test_base_adds_the_update_columns_and_names_the_unmatched(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    base = {"a.weight": rng.standard_normal((120, 80)).astype(np.float32)}
    model = {
        "a.weight": base["a.weight"] + 0.1 * rng.standard_normal((120, 80)).astype(np.float32),
        "b.weight": rng.standard_normal((100, 70)).astype(np.float32),
    }
    (tmp_path / "base.safetensors").write_bytes(tensors_to_safetensors(base))
    (tmp_path / "model.safetensors").write_bytes(tensors_to_safetensors(model))
    model_path, base_path = tmp_path / "model.safetensors", tmp_path / "base.safetensors"
    result = invoke(model_path, "--base", base_path, "-f", "csv", "--exit-zero")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    rows = {row["name"]: row for row in _csv(result.stdout)}  # type: ignore[attr-defined]
    assert rows["a"]["delta_base"] == "a" and float(rows["a"]["delta_alpha"]) > 0
    assert rows["b"]["delta_base"] == "" and rows["b"]["delta_alpha"] == ""
    assert "delta_num_spikes" not in rows["a"]  # only with --mp-fit
    assert "1 layer with no layer of the same name and shape in the base" in result.stderr  # type: ignore[attr-defined]
    table = invoke(model_path, "--base", base_path, "--exit-zero").stdout  # type: ignore[attr-defined]
    assert "delta_alpha" in table
    missing = invoke(model_path, "--base", tmp_path / "nope.safetensors")
    assert missing.exit_code == 2  # type: ignore[attr-defined]
    assert "--base" in missing.stderr  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("rule", "words"),
    [
        ("alpah < 2", "unknown metric 'alpah' (did you mean alpha?)"),
        ("alpha <", "expected a metric name, a number or a quoted word at the end"),
        ("alpha < 2 and (D > 0.1", "expected ')' at the end"),
        ("__import__('os') < 1", "unknown metric '__import__'"),
        ("alpha < 2; rm", "unexpected ';' at column 10"),
        ("verdict < 2", "words compare with == and != only"),
        ("num_traps > 0", "num_traps is computed only with --randomize"),
        ("delta_alpha > 1", "delta_alpha is computed only with --base CKPT"),
    ],
)
def test_fail_on_errors_are_usage_errors_that_say_what_is_wrong(rule: str, words: str) -> None:
    result = invoke(SEED_MLP, "--fail-on", rule)
    assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
    assert words in result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in result.output  # type: ignore[attr-defined]


def test_fail_on_trips_prints_the_rule_and_replaces_the_default_line() -> None:
    tripped = invoke(HEAVY, "--mp-fit", "--fail-on", "alpha < 2 and num_spikes >= 0")
    assert tripped.exit_code == 1, tripped.output  # type: ignore[attr-defined]
    stderr = tripped.stderr  # type: ignore[attr-defined]
    assert "gate: rule: (alpha < 2 and num_spikes >= 0)" in stderr
    assert "layer 1 dense_1: fail-on alpha < 2 and num_spikes >= 0: alpha 1.5" in stderr
    # The rule replaces the default alpha < 2: a rule nothing satisfies passes the same model.
    passed = invoke(HEAVY, "--mp-fit", "--fail-on", "alpha < 2 and num_spikes > 1000")
    assert passed.exit_code == 0, passed.output  # type: ignore[attr-defined]
    # ... unless --fail-below is given too.
    both = invoke(HEAVY, "--fail-below", "2", "--fail-on", "alpha > 1000")
    assert both.exit_code == 1  # type: ignore[attr-defined]
    assert "gate: rule: alpha < 2 or (alpha > 1000)" in both.stderr  # type: ignore[attr-defined]


def test_fail_on_rules_are_repeatable_and_any_trips() -> None:
    result = invoke(SEED_MLP, "--fail-on", "alpha > 1000", "--fail-on", "stable_rank > 1")
    assert result.exit_code == 1, result.output  # type: ignore[attr-defined]
    assert "fail-on stable_rank > 1: stable_rank" in result.stderr  # type: ignore[attr-defined]


def test_the_verdict_describes_the_tail_and_warning_keeps_weightwatchers_word() -> None:
    result = invoke(HEAVY, "-f", "json", "--exit-zero")
    document = json.loads(result.stdout)  # type: ignore[attr-defined]
    heavy = next(row for row in document["layers"] if row["name"] == "dense_1")
    assert heavy["verdict"] == "very-heavy-tailed" and heavy["warning"] == "over-trained"
    summary = document["summary"]
    assert summary["over_trained"] == summary["very_heavy_tailed"] == [1]
    assert summary["under_trained"] == summary["light_tail"]
    table = invoke(HEAVY, "--exit-zero")
    assert "very heavy-tailed" in table.stdout  # type: ignore[attr-defined]
    assert "over-trained" not in table.stdout + table.stderr  # type: ignore[attr-defined]
    help_text = runner.invoke(app, ["analyze", "--help"]).stdout
    assert "possibly over-trained" not in help_text
    assert "--fit <power_law|tpl>" in help_text and "Slow" in help_text


def test_max_trips_is_the_tolerance_under_its_new_name() -> None:
    assert invoke(HEAVY, "--max-trips", "1").exit_code == 0  # type: ignore[attr-defined]
    assert invoke(HEAVY, "--max-trips", "0").exit_code == 1  # type: ignore[attr-defined]
    assert invoke(HEAVY, "--max-over-trained", "1").exit_code == 0  # type: ignore[attr-defined]


def test_without_powerlaw_the_tail_tests_are_a_usage_error_or_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "powerlaw", None)  # as if it were not installed
    asked = invoke(SEED_MLP, "--tail-tests")
    assert asked.exit_code == 2  # type: ignore[attr-defined]
    assert "--tail-tests: " in asked.stderr and "wwcli[tpl]" in asked.stderr  # type: ignore[attr-defined]
    every = invoke(SEED_MLP, "--all-diagnostics", "-f", "csv")
    assert every.exit_code == 0, every.output  # type: ignore[attr-defined]
    assert "no tail tests" in every.stderr  # type: ignore[attr-defined]
    header = every.stdout.splitlines()[0].split(",")  # type: ignore[attr-defined]
    assert "num_spikes" in header and "R_lognormal" not in header


def test_no_report_is_written_over_a_file_of_the_base(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    tensors = {"a.weight": rng.standard_normal((90, 70)).astype(np.float32)}
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(tensors_to_safetensors(tensors))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a.weight": "model.safetensors"}}))
    before = index.read_bytes()
    model = tmp_path / "model.safetensors"
    model.write_bytes(tensors_to_safetensors(tensors))
    result = invoke(model, "--base", folder, "--json", index, "--exit-zero")
    assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
    assert "refusing to overwrite a file" in result.stderr  # type: ignore[attr-defined]
    assert index.read_bytes() == before
