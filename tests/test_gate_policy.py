"""The gate's policy on models shaped like real ones: it passes healthy models, fails a planted
very heavy-tailed layer, ignores what it cannot judge, and cannot pass by accident; baselines and
project configuration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.hostile.make_corpus import tensors_to_safetensors
from wwcli.cli import app
from wwcli.engine import analyze_layer
from wwcli.gate import GATE_MIN_EVALS

runner = CliRunner()
HIDDEN = 128


def _gaussian(rng: np.random.Generator, rows: int, columns: int) -> np.ndarray:
    return (rng.standard_normal((rows, columns)) / np.sqrt(columns)).astype(np.float32)


def _heavy(rng: np.random.Generator, rows: int, columns: int) -> np.ndarray:
    """Entries with a very heavy tail (Pareto 0.8): the ESD of such a table has alpha < 2."""
    signs = rng.choice([-1.0, 1.0], size=(rows, columns))
    return (signs * rng.pareto(0.8, size=(rows, columns))).astype(np.float32)


def _over_trained(rng: np.random.Generator, size: int) -> np.ndarray:
    """A square matrix whose squared singular values follow a power law of exponent ~1.5."""
    u, _ = np.linalg.qr(rng.standard_normal((size, size)))
    v, _ = np.linalg.qr(rng.standard_normal((size, size)))
    singular = np.sqrt(rng.pareto(0.5, size) + 1.0)
    return (u * singular @ v.T).astype(np.float32)


def bert_folder(folder: Path, *, planted: bool, seed: int = 0) -> Path:
    """A BERT-shaped safetensors folder: heavy-tailed embeddings, Gaussian blocks, a small
    classifier; with `planted`, one attention output is very heavy-tailed (alpha < 2)."""
    rng = np.random.default_rng(seed)
    tensors = {
        "embeddings.word_embeddings.weight": _heavy(rng, 1000, HIDDEN),
        "embeddings.position_embeddings.weight": _heavy(rng, 512, HIDDEN),
        "embeddings.token_type_embeddings.weight": _heavy(rng, 2, HIDDEN),
    }
    for block in range(2):
        prefix = f"encoder.layer.{block}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value"):
            tensors[prefix + part + ".weight"] = _gaussian(rng, HIDDEN, HIDDEN)
        tensors[prefix + "attention.output.dense.weight"] = (
            _over_trained(rng, HIDDEN) if planted and block == 1 else _gaussian(rng, HIDDEN, HIDDEN)
        )
        tensors[prefix + "intermediate.dense.weight"] = _gaussian(rng, 4 * HIDDEN, HIDDEN)
        tensors[prefix + "output.dense.weight"] = _gaussian(rng, HIDDEN, 4 * HIDDEN)
    tensors["classifier.weight"] = _gaussian(rng, 16, HIDDEN)  # 16 eigenvalues: not gated
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(tensors_to_safetensors(tensors))
    return folder


def llama_folder(folder: Path, *, planted: bool, seed: int = 1) -> Path:
    """A Llama-shaped safetensors folder (embed_tokens, q/k/v/o, gate/up/down, lm_head)."""
    rng = np.random.default_rng(seed)
    tensors = {"model.embed_tokens.weight": _heavy(rng, 800, HIDDEN)}
    for block in range(2):
        prefix = f"model.layers.{block}."
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            over = planted and block == 0 and part == "v_proj"
            tensors[f"{prefix}self_attn.{part}.weight"] = (
                _over_trained(rng, HIDDEN) if over else _gaussian(rng, HIDDEN, HIDDEN)
            )
        tensors[f"{prefix}mlp.gate_proj.weight"] = _gaussian(rng, 3 * HIDDEN, HIDDEN)
        tensors[f"{prefix}mlp.up_proj.weight"] = _gaussian(rng, 3 * HIDDEN, HIDDEN)
        tensors[f"{prefix}mlp.down_proj.weight"] = _gaussian(rng, HIDDEN, 3 * HIDDEN)
    tensors["lm_head.weight"] = _gaussian(rng, 800, HIDDEN)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(tensors_to_safetensors(tensors))
    return folder


def test_the_planted_layers_really_are_very_heavy_tailed() -> None:
    rng = np.random.default_rng(5)
    assert analyze_layer([_over_trained(rng, HIDDEN)]).alpha < 2
    assert analyze_layer([_heavy(rng, 512, HIDDEN)]).alpha < 2
    assert analyze_layer([_gaussian(rng, HIDDEN, HIDDEN)]).alpha > 2


@pytest.mark.parametrize("make", [bert_folder, llama_folder], ids=["bert", "llama"])
def test_the_default_gate_passes_healthy_models_and_fails_a_planted_layer(
    make: object, tmp_path: Path
) -> None:
    healthy = make(tmp_path / "healthy", planted=False)  # type: ignore[operator]
    result = runner.invoke(app, ["analyze", str(healthy), "-f", "json"])
    assert result.exit_code == 0, result.stderr
    layers = json.loads(result.stdout)["layers"]
    embeddings = [layer for layer in layers if "embed" in layer["name"]]
    assert embeddings and all(layer["layer_type"] == "embedding" for layer in embeddings)
    assert any(layer["alpha"] < 2 for layer in embeddings)  # heavy, but not gated
    assert "not gated" in result.stderr

    planted = make(tmp_path / "planted", planted=True)  # type: ignore[operator]
    result = runner.invoke(app, ["analyze", str(planted), "-f", "json"])
    assert result.exit_code == 1, result.stderr
    trips = [line for line in result.stderr.splitlines() if line.startswith("gate:")]
    assert len(trips) == 1, result.stderr
    assert ("attention.output.dense" in trips[0]) or ("v_proj" in trips[0])


def test_layers_minus_embedding_works_on_a_bert_folder(tmp_path: Path) -> None:
    folder = bert_folder(tmp_path / "bert", planted=False)
    result = runner.invoke(app, ["describe", str(folder), "-f", "json", "--layers", "-embedding"])
    assert result.exit_code == 0, result.output
    names = [layer["name"] for layer in json.loads(result.stdout)["layers"]]
    assert names and not any("embeddings" in name for name in names)


def test_the_default_min_evals_keeps_noise_out_of_the_gate() -> None:
    # The measurement behind GATE_MIN_EVALS, repeated: pure square Gaussian noise of that size
    # gets alpha < 2 in under 2 % of draws; at 32 eigenvalues it does several times as often.
    rng = np.random.default_rng(2024)

    def trip_rate(size: int, draws: int = 200) -> float:
        return (
            sum(analyze_layer([rng.standard_normal((size, size))]).alpha < 2 for _ in range(draws))
            / draws
        )

    at_default = trip_rate(GATE_MIN_EVALS)
    assert at_default < 0.02
    assert trip_rate(32) > 2 * max(at_default, 0.01)


def _two_layers(path: Path, *, second_over: bool, seed: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    tensors = {
        "first.weight": _over_trained(rng, HIDDEN),  # over the line in both
        "second.weight": _over_trained(rng, HIDDEN)
        if second_over
        else _gaussian(rng, HIDDEN, HIDDEN),
    }
    path.write_bytes(tensors_to_safetensors(tensors))
    return path


def test_a_baseline_fails_only_on_what_got_worse(tmp_path: Path) -> None:
    before = _two_layers(tmp_path / "before.safetensors", second_over=False)
    after = _two_layers(tmp_path / "after.safetensors", second_over=True)
    baseline = tmp_path / "baseline.json"
    first = runner.invoke(app, ["analyze", str(before), "--write-baseline", str(baseline), "-q"])
    assert first.exit_code == 1  # "first" is over the line: that is what a baseline accepts
    same = runner.invoke(app, ["analyze", str(before), "--baseline", str(baseline)])
    assert same.exit_code == 0, same.stderr
    worse = runner.invoke(app, ["analyze", str(after), "--baseline", str(baseline)])
    assert worse.exit_code == 1
    trips = [line for line in worse.stderr.splitlines() if line.startswith("gate:")]
    assert len(trips) == 1 and "second" in trips[0] and "new since the baseline" in trips[0]


def test_a_layer_that_appeared_or_vanished_is_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    old = tmp_path / "old.safetensors"
    old.write_bytes(
        tensors_to_safetensors(
            {
                "kept.weight": _gaussian(rng, HIDDEN, HIDDEN),
                "gone.weight": _gaussian(rng, HIDDEN, HIDDEN),
            }
        )
    )
    new = tmp_path / "new.safetensors"
    new.write_bytes(
        tensors_to_safetensors(
            {
                "kept.weight": _gaussian(rng, HIDDEN, HIDDEN),
                "fresh.weight": _gaussian(rng, HIDDEN, HIDDEN),
            }
        )
    )
    baseline = tmp_path / "b.json"
    runner.invoke(app, ["analyze", str(old), "--write-baseline", str(baseline), "-q"])
    result = runner.invoke(app, ["analyze", str(new), "--baseline", str(baseline)])
    assert result.exit_code == 0
    assert "gone" in result.stderr and "are gone" in result.stderr
    assert "fresh" in result.stderr and "new since the baseline" in result.stderr


def test_project_configuration_sets_defaults_and_flags_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _two_layers(tmp_path / "m.safetensors", second_over=False)
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[tool.wwcli]\nfail-below = 1.0\n")
    monkeypatch.chdir(project / "sub")  # the nearest pyproject.toml is found from below
    configured = runner.invoke(app, ["analyze", str(model), "-f", "json"])
    assert configured.exit_code == 0, configured.stderr  # alpha ~1.5 is above the configured 1.0
    assert json.loads(configured.stdout)["options"]["fail_below"] == 1.0
    assert runner.invoke(app, ["analyze", str(model), "--fail-below", "2"]).exit_code == 1
    assert runner.invoke(app, ["analyze", str(model), "--isolated"]).exit_code == 1
    other = tmp_path / "wwcli.toml"
    other.write_text("fail-below = 0.5\nexit-zero = false\n")
    chosen = runner.invoke(app, ["analyze", str(model), "--config", str(other), "-f", "json"])
    assert json.loads(chosen.stdout)["options"]["fail_below"] == 0.5
    (project / "pyproject.toml").write_text("[tool.wwcli]\nfail-belo = 1.0\n")
    typo = runner.invoke(app, ["analyze", str(model)])
    assert typo.exit_code == 2 and "unknown setting 'fail-belo'" in typo.output


def test_the_gate_cannot_pass_by_accident(tmp_path: Path) -> None:
    model = _two_layers(tmp_path / "m.safetensors", second_over=False)
    ignored = runner.invoke(app, ["analyze", str(model), "--gate-ignore", "*"])
    assert ignored.exit_code == 2
    assert "the gate judged no layer" in ignored.stderr
    allowed = runner.invoke(app, ["analyze", str(model), "--gate-ignore", "*", "--allow-empty"])
    assert allowed.exit_code == 0
    for bad in ("nan", "inf", "dense=nan", "attention=2"):
        result = runner.invoke(app, ["analyze", str(model), "--fail-below", bad])
        assert result.exit_code == 2, bad
        assert "--fail-below" in result.stderr and "fail_below" not in result.stderr


def test_per_type_lines_tolerated_trips_ignores_and_the_explanation(tmp_path: Path) -> None:
    model = _two_layers(tmp_path / "m.safetensors", second_over=True)
    assert runner.invoke(app, ["analyze", str(model)]).exit_code == 1
    assert runner.invoke(app, ["analyze", str(model), "--fail-below", "2,dense=1"]).exit_code == 0
    assert runner.invoke(app, ["analyze", str(model), "--max-over-trained", "2"]).exit_code == 0
    assert runner.invoke(app, ["analyze", str(model), "--max-over-trained", "1"]).exit_code == 1
    one = runner.invoke(app, ["analyze", str(model), "--gate-ignore", "first"])
    assert one.exit_code == 1 and "first" not in "".join(
        line for line in one.stderr.splitlines() if line.startswith("gate:")
    )
    explained = runner.invoke(
        app, ["analyze", str(model), "--explain-gate", "--gate-ignore", "first"]
    )
    lines = explained.stderr.splitlines()
    assert any("first: not gated: ignored by gate_ignore first" in line for line in lines)
    assert any("second: gated by alpha < 2 (dense): tripped" in line for line in lines)


def test_github_annotations_name_the_planted_layer_and_come_by_themselves_in_actions(
    tmp_path: Path,
) -> None:
    planted = bert_folder(tmp_path / "planted", planted=True)
    summary = tmp_path / "summary.md"
    result = runner.invoke(
        app, ["analyze", str(planted), "--format", "github", "--summary", str(summary)]
    )
    assert result.exit_code == 1
    annotations = [line for line in result.stdout.splitlines() if line.startswith("::error")]
    assert len(annotations) == 1, result.stdout
    assert annotations[0].startswith(f"::error file={planted},title=")
    assert "attention.output.dense" in annotations[0]
    assert "| id | name |" in summary.read_text(encoding="utf-8")
    automatic = runner.invoke(app, ["analyze", str(planted)], env={"GITHUB_ACTIONS": "true"})
    assert automatic.stdout.splitlines() == result.stdout.splitlines()
    chosen = runner.invoke(
        app, ["analyze", str(planted), "-f", "csv"], env={"GITHUB_ACTIONS": "true"}
    )
    assert chosen.stdout.startswith("checkpoint,")
