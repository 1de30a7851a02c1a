"""The same inputs give byte-identical reports: across runs in one process, across fresh
processes with different hash seeds, and whatever `--jobs` is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.hostile.make_corpus import tensors_to_safetensors
from wwcli.cli import app

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """One checkpoint of every kind, and a safetensors file of many layers of mixed sizes (so
    that several are in flight at once with --jobs > 1), NaN and degenerate layers included."""
    rng = np.random.default_rng(7)
    tensors: dict[str, np.ndarray] = {}
    for index in range(12):
        rows, columns = int(rng.integers(20, 160)), int(rng.integers(10, 90))
        scale = rng.pareto(2.5, (rows, columns)) if index % 3 == 0 else np.ones((rows, columns))
        tensors[f"layer{index:02d}.weight"] = (rng.standard_normal((rows, columns)) * scale).astype(
            np.float32 if index % 2 else np.float64
        )
    tensors["layer05.weight"][0, 0] = np.nan
    tensors["zeros.weight"] = np.zeros((40, 20), np.float32)
    folder = tmp_path_factory.mktemp("determinism")
    generated = folder / "many.safetensors"
    generated.write_bytes(tensors_to_safetensors(tensors))
    return [
        str(generated),
        str(FIXTURES / "keras" / "functional_cnn.keras"),
        str(FIXTURES / "keras" / "seed_mlp.h5"),
        str(FIXTURES / "torch" / "cnn_state_dict.pt"),
        str(FIXTURES / "safetensors" / "hf_sharded_bf16"),
    ]


def _report(inputs: list[str], output_format: str, jobs: int) -> bytes:
    result = runner.invoke(
        app,
        ["analyze", *inputs, "--format", output_format, "--jobs", str(jobs), "--exit-zero", "-q"],
    )
    assert result.exit_code == 0, result.output
    return result.stdout_bytes


@pytest.mark.parametrize("output_format", ["json", "csv"])
def test_byte_identical_across_runs_and_jobs(inputs: list[str], output_format: str) -> None:
    first = _report(inputs, output_format, jobs=1)
    assert len(first) > 1000
    for jobs in (1, 2, 3, 2):
        assert _report(inputs, output_format, jobs=jobs) == first, f"--jobs {jobs}"


def test_byte_identical_in_fresh_processes(inputs: list[str]) -> None:
    expected = _report(inputs, "json", jobs=1)
    for seed, jobs in (("0", 3), ("4242", 2)):
        options = ["--format", "json", "--jobs", str(jobs), "--exit-zero", "-q"]
        completed = subprocess.run(
            [sys.executable, "-m", "wwcli", "analyze", *inputs, *options],
            capture_output=True,
            timeout=300,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout == expected, f"PYTHONHASHSEED={seed} --jobs {jobs}"


def test_describe_is_byte_identical(inputs: list[str]) -> None:
    outputs = {
        runner.invoke(app, ["describe", *inputs, "--format", "json"]).stdout_bytes for _ in range(3)
    }
    assert len(outputs) == 1
