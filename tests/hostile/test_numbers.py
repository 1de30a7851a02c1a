"""Weights that are valid bytes but awkward numbers, through the command line: NaN and infinite
weights fail that layer alone, with the reason "non-finite weights"; all-zero, rank-1, constant,
tiny and empty matrices are reported (analyzed, failed with a reason, or skipped with a reason),
never a crash."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.hostile.make_corpus import tensors_to_safetensors
from wwcli.cli import app

runner = CliRunner()
REPORT_KEYS_THAT_NAME_THE_FILE = ("checkpoint", "layer_id")


def _write(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    path.write_bytes(tensors_to_safetensors(tensors))
    return path


def _analyze(path: Path, *options: str) -> dict[str, Any]:
    result = runner.invoke(app, ["analyze", str(path), "--format", "json", "--exit-zero", *options])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def _bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """The bfloat16 nearest below each float32, as the uint16 bits safetensors stores."""
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _healthy(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _with(array: np.ndarray, position: tuple[int, int], value: float) -> np.ndarray:
    damaged = array.copy()
    damaged[position] = value
    return damaged


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in REPORT_KEYS_THAT_NAME_THE_FILE}


def test_non_finite_weights_fail_their_layer_and_no_other(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    first, last = _healthy(rng, (96, 48)), _healthy(rng, (80, 40))
    base = _healthy(rng, (64, 32))
    tensors = {
        "a_first.weight": first,
        "b_nan.weight": _with(base, (3, 5), np.nan),
        "c_inf.weight": _with(base, (0, 0), np.inf),
        "d_minus_inf.weight": _with(base, (63, 31), -np.inf),
        "e_float16_inf.weight": _with(base.astype(np.float16), (10, 10), np.inf),
        "f_bfloat16_nan.weight": _bfloat16_bits(_with(base, (1, 1), np.nan)),
        "g_float64_inf.weight": _with(base.astype(np.float64), (2, 2), np.inf),
        "h_last.weight": last,
    }
    document = _analyze(_write(tmp_path / "mixed.safetensors", tensors))
    rows = {row["name"]: row for row in document["layers"]}
    assert list(rows) == [key.removesuffix(".weight") for key in tensors]
    assert document["skipped"] == []
    for name, row in rows.items():
        if name in ("a_first", "h_last"):
            assert row["status"] == "success", row
            assert row["alpha"] is not None and np.isfinite(row["alpha"])
        else:
            assert (row["status"], row["verdict"], row["message"]) == (
                "failed",
                "failed",
                "non-finite weights",
            ), row
            assert row["alpha"] is None and row["lambda_max"] is None
            assert (row["N"], row["M"]) == (64, 32)

    # The healthy layers get exactly the numbers they get in a file of their own.
    alone = _analyze(
        _write(tmp_path / "healthy.safetensors", {"a_first.weight": first, "h_last.weight": last})
    )
    alone_rows = {row["name"]: row for row in alone["layers"]}
    for name in ("a_first", "h_last"):
        assert _metrics(rows[name]) == _metrics(alone_rows[name])
    assert document["summary"]["fits_failed"] == 6


def test_the_gate_can_fail_on_non_finite_weights_but_never_treats_them_as_a_crash(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(1)
    path = _write(
        tmp_path / "nan.safetensors",
        {"nan.weight": _with(_healthy(rng, (64, 32)), (0, 1), np.nan)},
    )
    # A 64x32 layer has 32 eigenvalues: gated only below the default --gate-min-evals (64).
    small = ["--gate-min-evals", "32"]
    assert runner.invoke(app, ["analyze", str(path), "--fail-below", "-1", *small]).exit_code == 0
    tripped = runner.invoke(app, ["analyze", str(path), "--fail-on-failed-fit", *small])
    assert tripped.exit_code == 1
    assert "layer 0 nan: power-law fit failed" in tripped.stderr


DEGENERATE: dict[str, np.ndarray] = {
    "all_zero": np.zeros((64, 32), np.float32),
    "rank_1": np.outer(np.arange(1, 65), np.arange(1, 33)).astype(np.float32),
    "constant": np.full((64, 32), 0.5, np.float32),
    "identity": np.eye(32, dtype=np.float32),
    "one_by_n": np.arange(64, dtype=np.float32).reshape(1, 64),
    "n_by_one": np.arange(64, dtype=np.float32).reshape(64, 1),
    "two_by_two": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
    "one_by_one": np.ones((1, 1), np.float32),
    "empty": np.zeros((0, 16), np.float32),
    "subnormal": np.full((64, 32), 1e-40, np.float32),
    "huge_float32": np.full((64, 32), 3e38, np.float32),
    "huge_float64": np.full((64, 32), 1e300, np.float64),
    "rank_1_conv": np.ones((16, 8, 3, 3), np.float32),
    "vector": np.ones(64, np.float32),
}


@pytest.mark.parametrize("min_evals", ["8", "1"])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_degenerate_matrices_are_reported_never_a_crash(
    min_evals: str, precision: str, tmp_path: Path
) -> None:
    tensors = {f"{name}.weight": array for name, array in DEGENERATE.items()}
    path = _write(tmp_path / "degenerate.safetensors", tensors)
    document = _analyze(path, "--min-evals", min_evals, "--precision", precision)
    analyzed = {row["name"]: row for row in document["layers"]}
    skipped = {row["name"]: row for row in document["skipped"]}
    assert sorted([*analyzed, *skipped]) == sorted(DEGENERATE)  # every layer, exactly once
    assert not set(analyzed) & set(skipped)
    for row in skipped.values():
        assert row["reason"]
    for name, row in analyzed.items():
        assert row["status"] in ("success", "failed"), row
        if row["status"] == "failed":
            assert row["message"], row
        for key, value in row.items():
            assert value is None or not isinstance(value, float) or np.isfinite(value), (name, key)
    for name in ("all_zero", "rank_1", "constant", "identity", "huge_float32", "huge_float64"):
        assert analyzed[name]["status"] == "failed", analyzed[name]
    assert "empty" in skipped and "vector" in skipped and "one_by_n" in skipped
    if min_evals == "1":
        assert "n_by_one" in analyzed and "two_by_two" in analyzed

    described = runner.invoke(app, ["describe", str(path), "--format", "json"])
    assert described.exit_code == 0, described.output
    assert len(json.loads(described.stdout)["layers"]) == len(DEGENERATE)
