"""benchmarks/make_synthetic.py: deterministic, HF-style sharded BF16 folders that wwcli reads."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from wwcli.loaders import open_checkpoint

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "make_synthetic.py"


@pytest.fixture(scope="module")
def make_synthetic() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_synthetic", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_synthetic"] = module
    spec.loader.exec_module(module)
    return module


SIZES = {"hidden": 48, "ffn": 96, "blocks": 2, "vocab": 128}


def test_same_bytes_whatever_the_workers(make_synthetic: ModuleType, tmp_path: Path) -> None:
    one = make_synthetic.write_model(tmp_path / "one", shard_bytes=40_000, workers=1, **SIZES)
    two = make_synthetic.write_model(tmp_path / "two", shard_bytes=40_000, workers=2, **SIZES)
    assert one["shards"] == two["shards"] > 1
    names = sorted(path.name for path in (tmp_path / "one").iterdir())
    assert names == sorted(path.name for path in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_wwcli_reads_it_in_model_order(make_synthetic: ModuleType, tmp_path: Path) -> None:
    summary = make_synthetic.write_model(tmp_path / "m", shard_bytes=40_000, **SIZES)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == summary["bytes"]
    with open_checkpoint(tmp_path / "m") as checkpoint:
        layers = checkpoint.layers()
        assert [layer.name + ".weight" for layer in layers] == list(index["weight_map"])
        dense = [layer for layer in layers if layer.analyzable]
        assert len(dense) == summary["matrices"] == 7 * SIZES["blocks"] + 2
        q_proj = next(layer for layer in dense if layer.name.endswith("0.self_attn.q_proj"))
        (matrix,) = checkpoint.matrices(q_proj)
    assert matrix.shape == (48, 48)
    expected = make_synthetic.draw(
        make_synthetic.TensorPlan(q_proj.name + ".weight", (48, 48), "powerlaw"), 0
    )
    np.testing.assert_allclose(matrix, expected, rtol=2**-8)  # BF16 keeps 8 bits


def test_bfloat16_rounding_is_round_to_nearest_even(make_synthetic: ModuleType) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    values[:4] = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 0.0]  # ties
    expected = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(make_synthetic.to_bfloat16_bits(values), expected)
