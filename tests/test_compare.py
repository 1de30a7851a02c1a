"""`wwcli compare A B`: layers matched by name and shape; identical files move nothing; a
fine-tune with one layer perturbed moves only that layer, by numpy's Frobenius distance."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.run_factory import PLANTED, SHAPES, tensors, write_safetensors
from wwcli.cli import app

runner = CliRunner()


def compare(*args: str | Path) -> object:
    return runner.invoke(app, ["compare", *map(str, args)])


@pytest.fixture()
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.safetensors"
    write_safetensors(path, tensors(1))
    return path


def test_identical_files_move_nothing(base: Path, tmp_path: Path) -> None:
    twin = tmp_path / "twin.safetensors"
    shutil.copyfile(base, twin)
    result = compare(base, twin, "-f", "json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert sorted(layer["name"] for layer in document["layers"]) == sorted(SHAPES)
    for layer in document["layers"]:
        assert layer["delta_alpha"] == 0 and layer["delta_log_spectral_norm"] == 0
        assert layer["frobenius_distance"] == 0 and layer["relative_distance"] == 0
        assert layer["delta_lambda_max"] == 0 and layer["top_eigenvalues_change"] == 0
        assert layer["cosine"] == pytest.approx(1, abs=1e-12)
        assert layer["worse"] is False
    assert document["only_in_a"] == document["only_in_b"] == document["worse"] == []


def test_one_perturbed_layer_is_the_only_one_that_moves(base: Path, tmp_path: Path) -> None:
    weights = tensors(1)
    rng = np.random.default_rng(7)
    key = f"{PLANTED}.weight"
    tuned = dict(weights)
    tuned[key] = (weights[key] + 0.05 * rng.standard_t(1.0, weights[key].shape)).astype(np.float32)
    finetuned = tmp_path / "finetuned.safetensors"
    write_safetensors(finetuned, tuned)
    result = compare(base, finetuned, "-f", "json")
    document = json.loads(result.stdout)
    layers = {layer["name"]: layer for layer in document["layers"]}
    for name, layer in layers.items():
        if name == PLANTED:
            continue
        assert layer["frobenius_distance"] == 0 and layer["delta_alpha"] == 0, name
    moved = layers[PLANTED]
    a = weights[key].astype(np.float64)
    b = tuned[key].astype(np.float64)
    assert moved["frobenius_distance"] == pytest.approx(np.linalg.norm(b - a), rel=1e-12)
    assert moved["relative_distance"] == pytest.approx(
        np.linalg.norm(b - a) / np.linalg.norm(a), rel=1e-12
    )
    cosine = float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert moved["cosine"] == pytest.approx(cosine, rel=1e-12)
    assert moved["delta_alpha"] < -0.5 and moved["top_eigenvalues_change"] > 0
    # It got heavier-tailed past the line: exit 1, and it is the one named.
    assert result.exit_code == 1, result.output
    assert [item["name"] for item in document["worse"]] == [PLANTED]
    assert moved["worse"] is True
    table = compare(base, finetuned)
    assert table.exit_code == 1
    assert f"worse: layer {PLANTED}" in table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith(PLANTED))
    assert row.rstrip().endswith("worse")


def test_layers_on_one_side_and_changed_shapes_are_listed(base: Path, tmp_path: Path) -> None:
    weights = tensors(1)
    other = {key: value for key, value in weights.items() if not key.startswith("head.proj")}
    other["extra.layer.weight"] = (
        np.random.default_rng(3).standard_normal((160, 80)).astype(np.float32)
    )
    other["encoder.dense.weight"] = (
        np.random.default_rng(4).standard_normal((256, 96)).astype(np.float32)
    )
    changed = tmp_path / "changed.safetensors"
    write_safetensors(changed, other)
    result = compare(base, changed, "-f", "json", "--exit-zero")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["only_in_a"] == ["head.proj"]
    assert document["only_in_b"] == ["extra.layer"]
    assert document["shape_changed"] == ["encoder.dense"]
    assert [layer["name"] for layer in document["layers"]] == [PLANTED]
    csv_result = compare(base, changed, "-f", "csv", "--exit-zero")
    header, *rows = csv_result.stdout.splitlines()
    assert header.startswith("name,layer_type,shape") and len(rows) == 1
    assert not math.isnan(float(rows[0].split(",")[header.split(",").index("cosine")]))


def test_a_missing_side_is_exit_2(base: Path, tmp_path: Path) -> None:
    result = compare(base, tmp_path / "missing.safetensors")
    assert result.exit_code == 2
    assert "missing.safetensors" in result.stderr
