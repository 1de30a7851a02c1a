"""The over-training example end to end, reduced: two batch sizes, three epochs, in a tmp folder.

The script runs as a user runs it (a subprocess): it trains, saves the checkpoints and runs one
`wwcli sweep` over them. These tests then read what it wrote, check the sweep's outputs against
one another and against an independent reading of its rows, and read the checkpoints back with
wwcli's own loader to check that only the trainable layer was trained. The learning rate is 0.5
(the experiment's is 0.01) so that three epochs take fc2 below alpha 2: the crossing table and
the tripped gate are exercised, not only the empty case.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wwcli.loaders import open_checkpoint

EXPERIMENT = Path(__file__).resolve().parents[2] / "examples" / "overtraining" / "experiment.py"
BATCH_SIZES = (8, 4)
MAX_EPOCHS = 3
LEARNING_RATE = 0.5
STEPS = ["init/step-0.keras", "bs8/step-1.keras", "bs4/step-2.keras"]
"""The checkpoints under checkpoints/, in the experiment's (and the sweep's) order."""
GATED = {"fc1", "fc2"}
"""The layers wwcli's gate judges: fc3 has 10 eigenvalues, under gate_min_evals (64)."""


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("overtraining")
    command = [
        sys.executable,
        str(EXPERIMENT),
        "--out",
        str(folder),
        "--batch-sizes",
        *(str(size) for size in BATCH_SIZES),
        "--max-epochs",
        str(MAX_EPOCHS),
        "--learning-rate",
        str(LEARNING_RATE),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=150, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return folder


@pytest.fixture(scope="module")
def results(out: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((out / "results.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def sweep(out: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((out / "sweep.json").read_text())
    return loaded


def relative(out: Path, checkpoint: str) -> str:
    """A checkpoint path as the sweep wrote it, relative to OUT/checkpoints."""
    return Path(checkpoint).relative_to(out / "checkpoints").as_posix()


def fc_weights(path: Path) -> dict[str, np.ndarray]:
    """The Dense kernels of a checkpoint by layer name, read back by wwcli's loader."""
    with open_checkpoint(path) as checkpoint:
        return {
            layer.name: checkpoint.matrices(layer)[0]
            for layer in checkpoint.layers()
            if layer.analyzable
        }


def test_a_checkpoint_per_batch_size_and_the_initial_one(out: Path) -> None:
    found = sorted(relative(out, str(path)) for path in (out / "checkpoints").rglob("*.keras"))
    assert found == sorted(STEPS)


def test_only_the_hidden_layer_was_trained(out: Path) -> None:
    initial = fc_weights(out / "checkpoints" / STEPS[0])
    assert set(initial) == {"fc1", "fc2", "fc3"}
    assert initial["fc2"].shape in {(300, 100), (100, 300)}
    for name in STEPS[1:]:
        trained = fc_weights(out / "checkpoints" / name)
        np.testing.assert_array_equal(trained["fc1"], initial["fc1"])
        np.testing.assert_array_equal(trained["fc3"], initial["fc3"])
        change = np.linalg.norm(trained["fc2"] - initial["fc2"]) / np.linalg.norm(initial["fc2"])
        assert change > 1e-3, f"{name}: fc2 barely moved ({change:.2e})"


def test_one_sweep_over_every_checkpoint_in_training_order(
    out: Path, results: dict[str, Any], sweep: dict[str, Any]
) -> None:
    command = results["sweep"]["command"]
    assert command[:2] == ["wwcli", "sweep"] and command[2].endswith("*/step-*.keras")
    assert sweep["order"] == "natural"
    assert [relative(out, item["checkpoint"]) for item in sweep["checkpoints"]] == STEPS
    assert [item["order_key"] for item in sweep["checkpoints"]] == [0, 1, 2]
    assert [item["format"] for item in sweep["checkpoints"]] == ["keras"] * 3
    assert sweep["failures"] == []
    rows = sweep["trajectory"]
    assert [(relative(out, row["checkpoint"]), row["name"]) for row in rows] == [
        (step, name) for step in STEPS for name in ("fc1", "fc2", "fc3")
    ]
    for row in rows:
        assert row["status"] == "success"
        assert math.isfinite(row["alpha"]) and row["alpha"] > 1
        assert row["layer_id"] == {"fc1": 1, "fc2": 2, "fc3": 3}[row["name"]]
        assert row["num_evals"] == {"fc1": 64, "fc2": 100, "fc3": 10}[row["name"]]


def test_the_csv_holds_the_json_rows(out: Path, sweep: dict[str, Any]) -> None:
    with (out / "sweep.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(sweep["trajectory"])
    for line, row in zip(table, sweep["trajectory"], strict=True):
        assert line["checkpoint"] == row["checkpoint"] and line["name"] == row["name"]
        for key in ("alpha", "log_spectral_norm", "D"):
            assert float(line[key]) == row[key]
        assert int(line["num_pl_spikes"]) == row["num_pl_spikes"]


def test_the_crossings_are_what_the_rows_say(
    out: Path, results: dict[str, Any], sweep: dict[str, Any]
) -> None:
    expected = []
    for name in sorted(GATED):
        points = [row for row in sweep["trajectory"] if row["name"] == name]
        below = [i for i, row in enumerate(points) if row["alpha"] < 2]
        if below:
            first = below[0]
            before = points[first - 1]["alpha"] if first else None
            expected.append((name, points[first]["checkpoint"], points[first]["alpha"], before))
    crossings = sweep["crossings"]
    found = sorted((c["name"], c["checkpoint"], c["alpha"], c["before"]) for c in crossings)
    assert found == expected
    assert results["sweep"]["crossings"] == sweep["crossings"]
    # At learning rate 0.5 three epochs take fc2 below 2 from the initial weights' 5.8 on.
    assert [c["name"] for c in sweep["crossings"]] == ["fc2"]
    table = (out / "sweep.txt").read_text()
    assert table == results["sweep"]["table"]
    assert "Layers whose alpha crossed below the line, and where first:" in table
    crossing = sweep["crossings"][0]
    line = next(line for line in table.splitlines() if line.startswith("fc2 "))
    assert crossing["checkpoint"] in line and f"{crossing['alpha']:.3f}" in line


def test_results_agree_with_the_sweep_and_training_learned(
    out: Path, results: dict[str, Any], sweep: dict[str, Any]
) -> None:
    fc2 = {relative(out, r["checkpoint"]): r for r in sweep["trajectory"] if r["name"] == "fc2"}
    assert results["frozen_layers_unchanged"] is True
    runs = results["runs"]
    assert [run["batch_size"] for run in runs] == list(BATCH_SIZES)
    assert [run["step"] for run in runs] == [1, 2]
    initial = results["initial"]
    assert initial["fc2"]["alpha"] == fc2[STEPS[0]]["alpha"]
    for run, step in zip(runs, STEPS[1:], strict=True):
        assert relative(out, run["checkpoint"]) == step
        row = fc2[step]
        assert run["fc2"]["alpha"] == row["alpha"] and run["fc2"]["D"] == row["D"]
        assert run["fc2"]["lambda_max"] == pytest.approx(10 ** row["log_spectral_norm"])
        expected = "very heavy-tailed" if row["alpha"] < 2 else "typical"
        assert run["fc2"]["label"] == expected
        assert run["fc2"]["alpha"] != initial["fc2"]["alpha"]
        assert 1 <= run["epochs"] <= MAX_EPOCHS and 1 <= run["best_epoch"] <= run["epochs"]
        assert len(run["loss_history"]) == run["epochs"]
        # Chance is 0.1; even three epochs of SGD on one layer learn the digits well past it.
        assert run["test_accuracy"] > initial["test_accuracy"] + 0.2
        assert 0 <= run["train_accuracy"] <= 1


def test_the_sweeps_gate_judged_the_smallest_batch(
    out: Path, results: dict[str, Any], sweep: dict[str, Any]
) -> None:
    gate = results["gate"]
    assert relative(out, gate["checkpoint"]) == STEPS[-1]
    assert gate["batch_size"] == min(BATCH_SIZES)
    last = [r for r in sweep["trajectory"] if relative(out, r["checkpoint"]) == STEPS[-1]]
    expected = 1 if any(r["alpha"] < 2 for r in last if r["name"] in GATED) else 0
    assert gate["exit_code"] == results["sweep"]["exit_code"] == expected
    if expected:
        assert f"gate: {gate['checkpoint']}: layer 2 fc2" in results["sweep"]["stderr"]


def test_table_and_plots_were_written(out: Path, results: dict[str, Any]) -> None:
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| step | batch size |") and "alpha (fc2)" in table[0]
    assert len(table) == 2 + 1 + len(BATCH_SIZES)
    for line, run in zip(table[3:], results["runs"], strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[:2] == [str(run["step"]), str(run["batch_size"])]
        assert cells[6] == f"{run['fc2']['alpha']:.3f}"
        assert cells[10] == run["fc2"]["label"]
    with (out / "results.csv").open(newline="") as handle:
        assert len(list(csv.reader(handle))) == 1 + 1 + len(BATCH_SIZES)
    for name in ("alpha_vs_accuracy.png", "trajectory-alpha.png"):
        plot = (out / name).read_bytes()
        assert plot.startswith(b"\x89PNG\r\n\x1a\n") and len(plot) > 10_000, name


def load_experiment_module() -> Any:
    """The script as a module (it imports only numpy at the top; keras only when training)."""
    spec = importlib.util.spec_from_file_location("overtraining_experiment", EXPERIMENT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered first: dataclasses look their module up while the class is being made.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fake_mnist(path: Path, *, n_train: int = 120, n_test: int = 60) -> Path:
    """A stand-in for keras' mnist.npz: random 28x28 uint8 images, every digit present."""
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        y_train=np.arange(n_train) % 10,
        x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        y_test=np.arange(n_test) % 10,
    )
    return path


def test_mnist_npz_is_scaled_and_malformed_files_are_refused(tmp_path: Path) -> None:
    experiment = load_experiment_module()
    data = experiment.load_mnist_npz(fake_mnist(tmp_path / "mnist.npz"))
    assert data.input_shape == (28, 28) and data.x_train.dtype == np.float32
    assert data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
    assert len(data.y_train) == 120 and len(data.y_test) == 60
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match=r"missing arrays \['x_test', 'y_test', 'y_train'\]"):
        experiment.load_mnist_npz(tmp_path / "bad.npz")


def test_the_mnist_flag_runs_the_784_input_model(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(EXPERIMENT),
        "--out",
        str(tmp_path),
        "--mnist",
        str(fake_mnist(tmp_path / "mnist.npz")),
        "--batch-sizes",
        "32",
        "--max-epochs",
        "1",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=150, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    document = json.loads((tmp_path / "sweep.json").read_text())
    fc1 = [row for row in document["trajectory"] if row["name"] == "fc1"]
    assert [row["num_evals"] for row in fc1] == [300, 300]
    kernel = fc_weights(tmp_path / "checkpoints" / "bs32" / "step-1.keras")["fc1"]
    assert kernel.shape in {(784, 300), (300, 784)}


def test_batch_sizes_must_decrease_they_are_the_steps(capsys: pytest.CaptureFixture[str]) -> None:
    experiment = load_experiment_module()
    assert experiment.parse_args(["--batch-sizes", "8", "4"]).batch_sizes == [8, 4]
    for sizes in (["4", "8"], ["4", "4"]):
        with pytest.raises(SystemExit):
            experiment.parse_args(["--batch-sizes", *sizes])
    assert "strictly decreasing" in capsys.readouterr().err


def test_replot_remakes_the_same_table_from_results_json(out: Path) -> None:
    table = (out / "results.md").read_text()
    swept = (out / "sweep.json").read_bytes()
    (out / "results.md").unlink()
    (out / "alpha_vs_accuracy.png").unlink()
    command = [sys.executable, str(EXPERIMENT), "--out", str(out), "--replot"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert completed.stdout == table == (out / "results.md").read_text()
    assert (out / "alpha_vs_accuracy.png").stat().st_size > 10_000
    assert (out / "sweep.json").read_bytes() == swept
