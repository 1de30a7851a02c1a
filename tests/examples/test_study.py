"""The validation study (examples/overtraining/study.py): the reduced grid end to end in a tmp
folder, the hand-written SGD against torch's autograd, and the rule scoring on known rows.

These check that the study runs and writes its table, not what it concludes.
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

FOLDER = Path(__file__).resolve().parents[2] / "examples" / "overtraining"
STUDY = FOLDER / "study.py"


def load(name: str) -> Any:
    """A study module by file name (registered first: dataclasses look their module up)."""
    if str(FOLDER) not in sys.path:
        sys.path.insert(0, str(FOLDER))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, FOLDER / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("study")
    command = [sys.executable, str(STUDY), "--reduced", "--out", str(folder)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=170, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return folder


def fc_weights(path: Path) -> dict[str, np.ndarray]:
    with open_checkpoint(path) as checkpoint:
        return {
            layer.name: checkpoint.matrices(layer)[0]
            for layer in checkpoint.layers()
            if layer.analyzable
        }


def test_reduced_study_writes_its_table_and_plots(out: Path) -> None:
    study = load("study")
    grid = study.REDUCED
    expected = len(grid.specs())
    with (out / "results_study.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == expected
    assert tuple(rows[0]) == study.CSV_COLUMNS
    for row in rows:
        assert math.isfinite(float(row["alpha"])) and float(row["alpha"]) > 1
        assert math.isfinite(float(row["delta_alpha"]))
        assert 0 <= float(row["test_accuracy"]) <= 1
        assert row["split"] == (
            "selection" if int(row["seed"]) in grid.selection_seeds else "held-out"
        )
        assert (row["judged"] == "True") == (int(row["batch_size"]) != 32)
    table = (out / "results_study.md").read_text()
    assert "| alpha < 2 | all |" in table and "Chosen rule holds on the held-out seeds" in table
    listed = table.split("## Every trained checkpoint")[1].strip().splitlines()
    assert len(listed) == 2 + expected
    document = json.loads((out / "results_study.json").read_text())
    assert len(document["rows"]) == expected and document["reduced"] is True
    assert isinstance(document["holds"], bool) and document["chosen_rule_text"]
    assert len(document["initial"]) == len(grid.seeds) * len(grid.hidden)
    for name in ("study_diagnostics.png", "study_alpha.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_checkpoints_are_state_dicts_with_only_fc2_trained(out: Path) -> None:
    checkpoints = out / "study_checkpoints"
    runs = json.loads((checkpoints / "runs.json").read_text())["runs"]
    assert runs and (checkpoints / ".gitignore").read_text() == "*\n"
    for run in runs:
        initial = fc_weights(Path(run["init_checkpoint"]))
        trained = fc_weights(Path(run["checkpoint"]))
        assert set(trained) == {"fc1", "fc2", "fc3"}
        assert sorted(trained["fc2"].shape) == [100, 300]
        np.testing.assert_array_equal(trained["fc1"], initial["fc1"])
        np.testing.assert_array_equal(trained["fc3"], initial["fc3"])
        assert not np.array_equal(trained["fc2"], initial["fc2"])


def test_skip_training_analyzes_the_same_checkpoints_again(out: Path) -> None:
    before = (out / "results_study.csv").read_text()
    command = [sys.executable, str(STUDY), "--reduced", "--out", str(out), "--skip-training"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert (out / "results_study.csv").read_text() == before


def test_sgd_step_is_the_gradient_torch_computes() -> None:
    torch = pytest.importorskip("torch")
    train = load("study_train")
    data = train.load_data(noise=0.2, train_size=100, seed=3)
    init = train.initial_weights(seed=3, hidden=100)
    h1 = train.fc1_features(data.x_train, init)[:8]
    y = data.y_train[:8]
    W2, b2 = init.W2.copy(), init.b2.copy()
    W3T = np.ascontiguousarray(init.W3.T)
    loss = train.sgd_step(h1, y, W2, b2, init.W3, W3T, init.b3, 0.01)

    tW2 = torch.tensor(init.W2, requires_grad=True)
    tb2 = torch.tensor(init.b2, requires_grad=True)
    logits = torch.relu(torch.tensor(h1) @ tW2 + tb2) @ torch.tensor(init.W3)
    mean = torch.nn.functional.cross_entropy(logits + torch.tensor(init.b3), torch.tensor(y))
    mean.backward()
    assert loss / 8 == pytest.approx(mean.item(), rel=1e-5)
    np.testing.assert_allclose(W2, init.W2 - 0.01 * tW2.grad.numpy(), atol=1e-7)
    np.testing.assert_allclose(b2, init.b2 - 0.01 * tb2.grad.numpy(), atol=1e-7)

    # Batch size 1 has its own loop (BLAS rank-1 updates): the same steps as sgd_step.
    W2a, b2a = np.asfortranarray(init.W2.copy()), init.b2.copy()
    mean_a = train.sgd_epoch_batch1(h1, y, np.arange(8), W2a, b2a, init.W3, init.b3, 0.01)
    W2b, b2b = init.W2.copy(), init.b2.copy()
    total = sum(
        train.sgd_step(h1[i : i + 1], y[i : i + 1], W2b, b2b, init.W3, W3T, init.b3, 0.01)
        for i in range(8)
    )
    assert mean_a == pytest.approx(total / 8, rel=1e-5)
    np.testing.assert_allclose(W2a, W2b, atol=1e-6)
    np.testing.assert_allclose(b2a, b2b, atol=1e-6)


def test_glorot_normal_is_truncated_with_the_target_variance() -> None:
    train = load("study_train")
    values = train.glorot_normal(300, 300, np.random.default_rng(0))
    stddev = math.sqrt(2 / 600) / 0.87962566103423978
    assert np.abs(values).max() <= 2 * stddev + 1e-7
    assert values.var() == pytest.approx(2 / 600, rel=0.03)


def test_label_noise_changes_that_share_of_training_labels_only() -> None:
    train = load("study_train")
    data = train.load_data(noise=0.4, train_size=250, seed=2)
    assert len(data.y_train) == 250 and len(data.y_test) == 540
    assert (data.y_train != data.y_train_clean).mean() == pytest.approx(0.4)
    clean = train.load_data(noise=0.0, train_size=250, seed=2)
    np.testing.assert_array_equal(clean.y_train, data.y_train_clean)
    np.testing.assert_array_equal(clean.y_test, data.y_test)


def row(
    group: str, batch: int, test: float, alpha: float, x: float, seed: int = 1
) -> dict[str, Any]:
    """A study row with just what labels and rules read."""
    return {
        "group": group,
        "batch_size": batch,
        "test_accuracy": test,
        "alpha": alpha,
        "mp_spike_frac": x,
        "seed": seed,
    }


def test_labels_rules_and_scores_on_known_rows() -> None:
    study = load("study")
    rows = [
        row("a", 32, 0.90, 2.5, 0.10),
        row("a", 8, 0.905, 2.1, 0.20),  # kept (better)
        row("a", 1, 0.88, 1.9, 0.50),  # lost by 0.02
        row("b", 32, 0.90, 2.2, 0.10),
        row("b", 8, 0.895, 1.95, 0.30),  # within the margin: kept
        row("b", 1, 0.85, 1.7, float("nan")),  # lost; NaN never flags
    ]
    study.label_rows(rows)
    assert [r["lost"] for r in rows] == [False, False, True, False, False, True]
    assert [r["judged"] for r in rows] == [False, True, True, False, True, True]
    assert rows[2]["lost_vs_less_training"] and not rows[4]["lost_vs_less_training"]
    assert rows[2]["delta_test_accuracy"] == pytest.approx(-0.02)

    alpha = study.score(study.ALPHA_RULE, rows)
    assert (alpha.flagged, alpha.true_positives, alpha.positives, alpha.rows) == (3, 2, 2, 4)
    assert alpha.precision == pytest.approx(2 / 3) and alpha.recall == 1.0
    spikes = study.Rule("mp_spike_frac", ">", 0.4, False)
    s = study.score(spikes, rows)
    assert (s.flagged, s.true_positives) == (1, 1) and s.f1 == pytest.approx(2 / 3)
    assert not study.holds(s)  # 2 positives < 10

    cuts = {r.threshold for r in study.candidate_rules(rows) if r.feature == "mp_spike_frac"}
    # Midpoints of the judged rows' values 0.2, 0.3, 0.5.
    assert sorted(cuts) == pytest.approx([0.15, 0.25, 0.4])
    chosen, best = study.choose_rule(rows)
    # alpha < 2 reaches F1 0.8 (3 flagged, 2 right); alpha < 1.925 flags just the two lost rows.
    assert best.f1 == 1.0 and chosen == study.Rule("alpha", "<", pytest.approx(1.925), False)
