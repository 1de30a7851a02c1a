"""The over-training example end to end, reduced: two batch sizes, three epochs, in a tmp folder.

The script runs as a user runs it (a subprocess); these tests then read what it wrote, and read
the checkpoints back with wwcli's own loader to check that only the trainable layer was trained.
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
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=110, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return folder


@pytest.fixture(scope="module")
def results(out: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((out / "results.json").read_text())
    return loaded


def fc_weights(path: Path) -> dict[str, np.ndarray]:
    """The Dense kernels of a checkpoint by layer name, read back by wwcli's loader."""
    with open_checkpoint(path) as checkpoint:
        return {
            layer.name: checkpoint.matrices(layer)[0]
            for layer in checkpoint.layers()
            if layer.analyzable
        }


def test_a_checkpoint_per_batch_size_and_the_initial_one(out: Path) -> None:
    names = sorted(path.name for path in (out / "checkpoints").glob("*.keras"))
    assert names == sorted(["init.keras", *(f"bs{size}.keras" for size in BATCH_SIZES)])


def test_only_the_hidden_layer_was_trained(out: Path) -> None:
    initial = fc_weights(out / "checkpoints" / "init.keras")
    assert set(initial) == {"fc1", "fc2", "fc3"}
    assert initial["fc2"].shape in {(300, 100), (100, 300)}
    for size in BATCH_SIZES:
        trained = fc_weights(out / "checkpoints" / f"bs{size}.keras")
        np.testing.assert_array_equal(trained["fc1"], initial["fc1"])
        np.testing.assert_array_equal(trained["fc3"], initial["fc3"])
        change = np.linalg.norm(trained["fc2"] - initial["fc2"]) / np.linalg.norm(initial["fc2"])
        assert change > 1e-3, f"batch size {size}: fc2 barely moved ({change:.2e})"


def test_wwcli_json_has_every_checkpoint_and_finite_alphas(out: Path) -> None:
    document = json.loads((out / "wwcli.json").read_text())
    objects = document["checkpoints"]
    assert [Path(obj["checkpoint"]).name for obj in objects] == [
        "init.keras",
        *(f"bs{size}.keras" for size in BATCH_SIZES),
    ]
    for obj in objects:
        layers = {layer["name"]: layer for layer in obj["layers"]}
        assert set(layers) == {"fc1", "fc2", "fc3"}
        assert layers["fc2"]["layer_id"] == 2 and layers["fc2"]["num_evals"] == 100
        for layer in layers.values():
            assert layer["status"] == "success"
            assert math.isfinite(layer["alpha"]) and layer["alpha"] > 1


def test_results_agree_with_wwcli_and_training_learned(results: dict[str, Any], out: Path) -> None:
    wwcli = {
        Path(obj["checkpoint"]).name: obj
        for obj in json.loads((out / "wwcli.json").read_text())["checkpoints"]
    }
    assert results["frozen_layers_unchanged"] is True
    runs = results["runs"]
    assert [run["batch_size"] for run in runs] == list(BATCH_SIZES)
    initial_alpha = results["initial"]["fc2"]["alpha"]
    for run in runs:
        reported = next(
            layer
            for layer in wwcli[Path(run["checkpoint"]).name]["layers"]
            if layer["name"] == "fc2"
        )
        assert run["fc2"]["alpha"] == reported["alpha"]
        assert run["fc2"]["alpha"] != initial_alpha
        assert 1 <= run["epochs"] <= MAX_EPOCHS and 1 <= run["best_epoch"] <= run["epochs"]
        assert len(run["loss_history"]) == run["epochs"]
        # Chance is 0.1; even three epochs of SGD on one layer learn the digits well past it.
        assert run["test_accuracy"] > results["initial"]["test_accuracy"] + 0.2
        assert 0 <= run["train_accuracy"] <= 1


def test_gate_ran_on_the_smallest_batch(results: dict[str, Any]) -> None:
    gate = results["gate"]
    assert gate["command"][:2] == ["wwcli", "analyze"]
    assert Path(gate["command"][2]).name == f"bs{min(BATCH_SIZES)}.keras"
    smallest = next(run for run in results["runs"] if run["batch_size"] == min(BATCH_SIZES))
    expected = 1 if smallest["fc2"]["alpha"] < 2 else 0
    assert gate["exit_code"] == expected


def test_table_and_plot_were_written(out: Path, results: dict[str, Any]) -> None:
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| batch size |") and "alpha (fc2)" in table[0]
    assert len(table) == 2 + 1 + len(BATCH_SIZES)
    for line, run in zip(table[3:], results["runs"], strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == str(run["batch_size"])
        assert cells[5] == f"{run['fc2']['alpha']:.3f}"
    with (out / "results.csv").open(newline="") as handle:
        assert len(list(csv.reader(handle))) == 1 + 1 + len(BATCH_SIZES)
    plot = (out / "alpha_vs_accuracy.png").read_bytes()
    assert plot.startswith(b"\x89PNG\r\n\x1a\n") and len(plot) > 10_000


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
    completed = subprocess.run(command, capture_output=True, text=True, timeout=110, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    document = json.loads((tmp_path / "wwcli.json").read_text())
    fc1 = next(layer for layer in document["checkpoints"][1]["layers"] if layer["name"] == "fc1")
    assert (fc1["N"], fc1["M"]) == (784, 300)


def test_replot_remakes_the_same_table_from_results_json(out: Path) -> None:
    table = (out / "results.md").read_text()
    (out / "results.md").unlink()
    (out / "alpha_vs_accuracy.png").unlink()
    command = [sys.executable, str(EXPERIMENT), "--out", str(out), "--replot"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert completed.stdout == table == (out / "results.md").read_text()
    assert (out / "alpha_vs_accuracy.png").stat().st_size > 10_000
