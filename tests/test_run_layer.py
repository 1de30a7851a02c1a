"""The run layer's contracts: a path in, a report out, in this process or another; one column
registry behind every output; the JSON options are the settings; the gate decides once."""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from wwcli.analysis import analyze_path, analyze_paths, list_path
from wwcli.cli import app, settings_from_cli
from wwcli.exit_codes import ExitCode
from wwcli.gate import GatePolicy, evaluate
from wwcli.report.columns import ANALYZE_REGISTRY, Column, TableView, registered
from wwcli.report.interface import formatter_for
from wwcli.results import CheckpointReport, InputFailure, RunResult
from wwcli.runners import LocalRunner
from wwcli.settings import RunSettings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
INPUTS = [
    FIXTURES / "keras" / "seed_mlp.keras",
    FIXTURES / "keras" / "seed_mlp.h5",
    FIXTURES / "torch" / "cnn_state_dict.pt",
    FIXTURES / "safetensors" / "cnn.safetensors",
    FIXTURES / "safetensors" / "hf_sharded_bf16",
]

runner = CliRunner()


def _json(settings: RunSettings, reports: list[CheckpointReport]) -> str:
    return formatter_for("json").render(RunResult(settings, tuple(reports)))


def test_analyze_path_in_a_spawned_process_gives_the_same_bytes_of_json() -> None:
    settings = settings_from_cli(layers=None, min_evals=8, max_evals=15000, trust_pickle=False)
    here = [analyze_path(path, settings) for path in INPUTS]
    assert all(isinstance(report, CheckpointReport) for report in here)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        there = list(pool.map(analyze_path, INPUTS, [settings] * len(INPUTS)))
    assert _json(settings, there) == _json(settings, here)  # type: ignore[arg-type]


def test_an_unreadable_input_is_a_value_not_an_exception(tmp_path: Path) -> None:
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"\x00" * 3)
    settings = RunSettings()
    outcome = analyze_path(bogus, settings)
    assert isinstance(outcome, InputFailure)
    assert outcome.path == str(bogus) and "too small" in outcome.message
    assert "Traceback" in outcome.traceback
    listing = list_path(bogus, settings)
    assert isinstance(listing, InputFailure)


def test_analyze_paths_streams_in_input_order_and_hears_progress(tmp_path: Path) -> None:
    events: list[str] = []

    class Listener:
        def checkpoint_started(self, label: str, total: int) -> None:
            events.append(f"start {Path(label).name} {total}")

        def layer_done(self, spec: object) -> None:
            events.append("layer")

        def checkpoint_done(self, label: str) -> None:
            events.append(f"done {Path(label).name}")

    missing = tmp_path / "missing.keras"
    paths = [INPUTS[0], missing, INPUTS[3]]
    outcomes = list(
        analyze_paths(paths, RunSettings(), runner=LocalRunner(jobs=2), progress=Listener())
    )
    assert [type(outcome).__name__ for outcome in outcomes] == [
        "CheckpointReport",
        "InputFailure",
        "CheckpointReport",
    ]
    assert events[0] == "start seed_mlp.keras 4" and events[5] == "done seed_mlp.keras"
    assert events.count("layer") == 4 + len(outcomes[2].layers) + len(outcomes[2].skipped)  # type: ignore[union-attr]


def test_spectra_are_kept_only_when_asked_and_change_no_number() -> None:
    plain = analyze_path(INPUTS[3], RunSettings())
    kept = analyze_path(INPUTS[3], RunSettings(keep_spectra=True))
    assert isinstance(plain, CheckpointReport) and isinstance(kept, CheckpointReport)
    assert all(result.spectrum is None for result in plain.layers)
    for without, with_spectrum in zip(plain.layers, kept.layers, strict=True):
        assert without.metrics == with_spectrum.metrics
        assert with_spectrum.spectrum is not None
        eigenvalues = with_spectrum.spectrum.eigenvalues
        assert eigenvalues.shape == (with_spectrum.metrics.num_evals,)
        assert np.all(np.diff(eigenvalues) >= 0)
        assert eigenvalues[-1] == pytest.approx(with_spectrum.metrics.lambda_max, rel=1e-12)


def test_a_column_added_to_the_registry_shows_in_csv_json_and_the_table() -> None:
    column = Column(
        "twice_alpha",
        lambda _, result: 2 * result.metrics.alpha,
        TableView("2alpha", lambda result: f"{2 * result.metrics.alpha:.2f}", 5.5, 0),
    )
    with registered(ANALYZE_REGISTRY, column):
        csv_text = runner.invoke(app, ["analyze", str(INPUTS[3]), "-f", "csv", "--exit-zero"])
        json_text = runner.invoke(app, ["analyze", str(INPUTS[3]), "-f", "json", "--exit-zero"])
        table = runner.invoke(app, ["analyze", str(INPUTS[3]), "--exit-zero"])
    rows = list(csv.DictReader(io.StringIO(csv_text.stdout)))
    assert rows and all(float(row["twice_alpha"]) == 2 * float(row["alpha"]) for row in rows)
    layers = json.loads(json_text.stdout)["layers"]
    assert all(layer["twice_alpha"] == 2 * layer["alpha"] for layer in layers)
    header = next(line for line in table.stdout.splitlines() if " id " in line).split()
    assert header.index("2alpha") == header.index("alpha") + 1
    # Gone again once the block ends.
    after = runner.invoke(app, ["analyze", str(INPUTS[3]), "-f", "csv", "--exit-zero"])
    assert "twice_alpha" not in after.stdout


def _leaves(value: object, prefix: str = "") -> list[str]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = []
        for field in dataclasses.fields(value):
            names += _leaves(getattr(value, field.name), field.name)
        return names
    return [prefix]


def test_the_json_options_are_every_setting() -> None:
    settings = settings_from_cli(
        layers="dense", min_evals=10, max_evals=0, trust_pickle=True, fail_above=6.5
    )
    options = settings.to_json()
    assert sorted(options) == sorted(_leaves(settings))
    assert options["layers"] == "dense" and options["min_evals"] == 10
    assert options["max_evals"] is None and options["trust_pickle"] is True
    assert options["fail_above"] == 6.5
    # The keys reports always had come first, in their order.
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
    result = runner.invoke(app, ["analyze", str(INPUTS[3]), "-f", "json", "--layers", "dense"])
    assert json.loads(result.stdout)["options"] == RunSettings(layers="dense").to_json() | {
        "max_evals": 15000
    }


def test_the_gate_decides_once_and_names_the_trips() -> None:
    report = analyze_path(INPUTS[3], RunSettings())
    assert isinstance(report, CheckpointReport)
    alphas = [result.metrics.alpha for result in report.layers]
    line = sorted(alphas)[1] + 1e-9  # two layers below it
    run = RunResult(RunSettings(gate=GatePolicy(fail_below=line, gate_min_evals=1)), (report,))
    outcome = evaluate(run)
    assert outcome.code is ExitCode.GATE
    assert len(outcome.trips) == 2
    assert all(trip.checkpoint == str(INPUTS[3]) for trip in outcome.trips)
    assert evaluate(run, GatePolicy(fail_below=line, exit_zero=True)).code is ExitCode.OK
    small = evaluate(run, GatePolicy(fail_below=line))  # the default gate skips small layers
    assert all(not j.gated for j in small.judged if j.layer_id != 3)
    failed = dataclasses.replace(run, failures=(InputFailure("x", "x: bad"),))
    assert evaluate(failed).code is ExitCode.ERROR


def test_help_imports_neither_numpy_nor_a_framework() -> None:
    code = (
        "import sys, io, contextlib\n"
        "from wwcli.cli import app\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        app(['analyze', '--help'], prog_name='wwcli')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('numpy', 'torch', 'h5py', 'tensorflow', 'matplotlib', 'rich')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_help_groups_options_and_names_no_python_type() -> None:
    result = runner.invoke(app, ["analyze", "-h"])
    assert result.exit_code == 0
    for panel in ("Input:", "Selection:", "Engine:", "Gate:", "Output:"):
        assert panel in result.stdout
    for leak in ("<bool>", "list[", "Path]", "<int>", "<float>", "NoneType"):
        assert leak not in result.stdout


def test_describe_ends_with_a_count_of_what_would_be_analyzed() -> None:
    result = runner.invoke(app, ["describe", str(INPUTS[0])])
    assert result.exit_code == 0
    assert result.stdout.rstrip().splitlines()[-1] == "4 layers, 3 would be analyzed"
