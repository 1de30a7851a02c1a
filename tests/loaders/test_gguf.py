"""Tests of the GGUF reader (`wwcli.loaders.gguf`): names typed as llama.cpp names them, shapes
reversed to numpy's, every quantization type dequantized exactly as the gguf package does it,
and headers that declare more than the file holds refused before the package's reader runs."""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from wwcli.loaders.detect import open_checkpoint
from wwcli.loaders.gguf import open_gguf
from wwcli.loaders.interface import LayerType, LoaderError

gguf = pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[2]
FORMATS = REPO / "fixtures" / "formats"
FIXTURES = {
    "F32": FORMATS / "tiny_llama_f32.gguf",
    "F16": FORMATS / "tiny_llama_f16.gguf",
    "Q8_0": FORMATS / "tiny_llama_q8_0.gguf",
    "Q4_K": FORMATS / "tiny_llama_q4_k.gguf",
}


def _fixture_maker() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_format_fixtures", REPO / "fixtures" / "make_format_fixtures.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package_dequantized(path: Path) -> dict[str, np.ndarray]:
    """The gguf package's own reading: GGUFReader, then gguf.quants.dequantize."""
    reader = gguf.GGUFReader(path)
    return {
        tensor.name: gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        for tensor in reader.tensors
    }


@pytest.mark.parametrize("quantization", list(FIXTURES))
def test_layers_types_and_dtypes(quantization: str) -> None:
    hidden = 256 if quantization == "Q4_K" else 64
    with open_gguf(FIXTURES[quantization]) as checkpoint:
        layers = {layer.name: layer for layer in checkpoint.layers()}
        assert checkpoint.format == "gguf"
    assert [layer.layer_id for layer in layers.values()] == list(range(21))
    assert layers["token_embd"].layer_type is LayerType.EMBEDDING
    assert layers["token_embd"].shape == (64, hidden)  # (vocab, hidden): GGUF's dims reversed
    assert layers["output"].layer_type is LayerType.DENSE
    for block in (0, 1):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down", "ffn_gate"):
            layer = layers[f"blk.{block}.{part}"]
            assert layer.layer_type is LayerType.DENSE and layer.analyzable
            assert layer.dtype == quantization
        for part in ("attn_norm", "ffn_norm"):
            layer = layers[f"blk.{block}.{part}"]
            assert layer.layer_type is LayerType.NORM and not layer.analyzable
            assert layer.dtype == "F32"
    assert layers["blk.0.ffn_down"].shape == (hidden, 2 * hidden)
    assert layers["blk.0.attn_k"].shape == (hidden // 4, hidden)


@pytest.mark.parametrize("quantization", list(FIXTURES))
def test_dequantized_tensors_equal_the_package_ones(quantization: str) -> None:
    theirs = _package_dequantized(FIXTURES[quantization])
    with open_gguf(FIXTURES[quantization]) as checkpoint:
        for layer in checkpoint.layers():
            if not layer.analyzable:
                continue
            (ours,) = checkpoint.matrices(layer)
            assert ours.dtype == np.float32
            np.testing.assert_array_equal(ours, theirs[f"{layer.name}.weight"])


def test_f32_and_f16_are_the_written_weights() -> None:
    written = _fixture_maker().llama_tensors(hidden=64, blocks=2, vocab=64, seed=7)
    for quantization, cast in (("F32", np.float32), ("F16", np.float16)):
        with open_gguf(FIXTURES[quantization]) as checkpoint:
            for layer in checkpoint.layers():
                if layer.analyzable:
                    expected = written[f"{layer.name}.weight"].astype(cast).astype(np.float32)
                    np.testing.assert_array_equal(checkpoint.matrices(layer)[0], expected)


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, Any]]) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _random_blocks(rng: np.random.Generator, qtype: Any, rows: int, columns: int) -> np.ndarray:
    """Valid blocks of a K-quant: random bytes, with the f16 super-block scales set to small
    finite numbers (gguf can dequantize Q5_K and Q6_K but not quantize them)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * columns // block_size, type_size), dtype=np.uint8)
    scale = np.full((blocks.shape[0], 1), 0.01, dtype=np.float16).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q6_K:
        blocks[:, -2:] = scale  # Q6_K: ql, qh, scales, then d
    else:
        blocks[:, 0:2] = scale  # Q5_K: d, dmin first
        blocks[:, 2:4] = scale
    return blocks.reshape(rows, columns // block_size * type_size)


def test_every_quantization_type_is_dequantized_as_the_package_does(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    weights = (rng.standard_normal((32, 256)) / 16).astype(np.float32)
    types = gguf.GGMLQuantizationType
    tensors: dict[str, tuple[np.ndarray, Any]] = {
        "q4_0.weight": (gguf.quants.quantize(weights, types.Q4_0), types.Q4_0),
        "q8_0.weight": (gguf.quants.quantize(weights, types.Q8_0), types.Q8_0),
        "bf16.weight": (gguf.quants.quantize(weights, types.BF16), types.BF16),
        "q4_k.weight": (_fixture_maker().quantize_q4_k(weights), types.Q4_K),
        "q5_k.weight": (_random_blocks(rng, types.Q5_K, 32, 256), types.Q5_K),
        "q6_k.weight": (_random_blocks(rng, types.Q6_K, 32, 256), types.Q6_K),
        "f16.weight": (weights.astype(np.float16), None),
        "f32.weight": (weights, None),
    }
    path = _write(tmp_path / "types.gguf", tensors)
    theirs = _package_dequantized(path)
    with open_gguf(path) as checkpoint:
        layers = checkpoint.layers()
        assert {layer.dtype for layer in layers} == {
            "Q4_0",
            "Q8_0",
            "BF16",
            "Q4_K",
            "Q5_K",
            "Q6_K",
            "F16",
            "F32",
        }
        for layer in layers:
            (ours,) = checkpoint.matrices(layer)
            assert ours.shape == (32, 256)
            assert np.isfinite(ours).all()
            np.testing.assert_array_equal(ours, theirs[f"{layer.name}.weight"].reshape(32, 256))
    # The quantized copies stay close to the weights they were made from.
    with open_gguf(path) as checkpoint:
        by_name = {layer.name: layer for layer in checkpoint.layers()}
        for name, tolerance in (("q8_0", 0.01), ("q4_0", 0.1), ("q4_k", 0.1), ("bf16", 0.01)):
            (matrix,) = checkpoint.matrices(by_name[name])
            assert np.abs(matrix - weights).max() < tolerance * np.abs(weights).max(), name


def test_quantization_moves_alpha_little() -> None:
    """Q8_0 of the F32 fixture: the same layers analyzed, alphas within 2% (the note measures
    this on larger, heavy-tailed models)."""
    from wwcli.analysis import analyze_path
    from wwcli.results import CheckpointReport
    from wwcli.settings import RunSettings

    reports = [analyze_path(FIXTURES[q], RunSettings()) for q in ("F32", "Q8_0")]
    assert all(isinstance(report, CheckpointReport) for report in reports)
    f32, q8 = ({r.spec.name: r.metrics.alpha for r in report.layers} for report in reports)  # type: ignore[union-attr]
    assert f32.keys() == q8.keys() and len(f32) >= 10
    for name, alpha in f32.items():
        assert q8[name] == pytest.approx(alpha, rel=0.02), name


# --- Headers that declare more than the file holds ----------------------------------------------


def _header(
    tensors: list[tuple[str, list[int], int, int]], kv: bytes = b"", kv_count: int = 0
) -> bytes:
    """A GGUF v3 header: `kv_count` entries of `kv`, then tensor infos (name, dims, type,
    offset), padded to 32 bytes."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), kv_count) + kv
    for name, dims, type_code, offset in tensors:
        raw = name.encode()
        out += struct.pack("<Q", len(raw)) + raw + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", side) for side in dims)
        out += struct.pack("<IQ", type_code, offset)
    return out + b"\0" * (-len(out) % 32)


class _NoReader:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("GGUFReader was called on a header wwcli should have refused")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (
            _header([("big.weight", [2**20, 2**20], 0, 0)]) + b"\0" * 64,
            r"'big\.weight' declares 1099511627776 elements \(4398046511104 bytes",
        ),
        (
            _header([("w.weight", [16, 16], 0, 0)]) + b"\0" * 64,
            r"beyond the file's \d+ bytes",
        ),
        (_header([("w.weight", [2**63, 4], 0, 0)]), r"impossible for its type"),
        (_header([("w.weight", [4, 4, 4, 4, 4], 0, 0)]), r"has 5 dimensions"),
        (_header([("w.weight", [16], 999, 0)]), r"unknown type code 999"),
        (_header([("w.weight", [33, 2], 8, 0)]) + b"\0" * 256, r"impossible for its type"),
        (
            b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0) + b"\0" * 64,
            r"lists 1099511627776 tensors",
        ),
        (
            b"GGUF" + struct.pack("<IQQ", 3, 0, 2**40) + b"\0" * 64,
            r"1099511627776 metadata entries, more than its \d+ bytes can hold",
        ),
        (
            # An array of 2^40 strings: GGUFReader would loop over them for hours.
            _header(
                [],
                struct.pack("<Q", 3) + b"key" + struct.pack("<IIQ", 9, 8, 2**40),
                kv_count=1,
            ),
            r"declares 1099511627776 strings",
        ),
        (
            _header([], struct.pack("<Q", 3) + b"key" + struct.pack("<IIQ", 9, 0, 2**40), 1),
            r"array 'key' of 1099511627776 bytes",
        ),
        (b"GGUF" + struct.pack("<IQQ", 7, 0, 0) + b"\0" * 8, r"GGUF version 7"),
        (b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + b"\0" * 30, r"beyond the file's 54 bytes"),
    ],
    ids=[
        "2_pow_40_elements",
        "tensor_beyond_the_file",
        "dims_past_2_pow_63",
        "five_dims",
        "unknown_type",
        "q8_0_row_not_whole_blocks",
        "2_pow_40_tensors",
        "2_pow_40_metadata_entries",
        "array_of_2_pow_40_strings",
        "array_of_2_pow_40_bytes",
        "unknown_version",
        "truncated_tensor_info",
    ],
)
def test_crafted_headers_are_refused_before_the_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, problem: str
) -> None:
    path = tmp_path / "crafted.gguf"
    path.write_bytes(content)
    monkeypatch.setattr(gguf, "GGUFReader", _NoReader)
    with pytest.raises(LoaderError, match=problem):
        open_gguf(path)


def test_detected_by_content_and_named_without_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(FIXTURES["Q8_0"].read_bytes())
    with open_checkpoint(renamed) as checkpoint:
        assert checkpoint.format == "gguf"
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(LoaderError, match=r"a GGUF file: install wwcli\[gguf\]"):
        open_checkpoint(renamed)


def test_the_quantization_is_a_column_of_gguf_reports_only() -> None:
    from wwcli.analysis import analyze_path, list_path
    from wwcli.report.rows import analyze_rows
    from wwcli.report.table import render_describe_table
    from wwcli.results import CheckpointListing, CheckpointReport
    from wwcli.settings import RunSettings

    report = analyze_path(FIXTURES["Q4_K"], RunSettings())
    assert isinstance(report, CheckpointReport)
    rows = analyze_rows(report)
    assert rows[0]["quantization"] == "Q4_K"
    assert {row["quantization"] for row in rows} <= {"Q4_K", "F32", "F16", "Q8_0"}
    safetensors = REPO / "fixtures" / "safetensors" / "cnn.safetensors"
    other = analyze_path(safetensors, RunSettings())
    assert isinstance(other, CheckpointReport)
    assert "quantization" not in analyze_rows(other)[0]
    listing = list_path(FIXTURES["Q4_K"], RunSettings())
    assert isinstance(listing, CheckpointListing)
    header = render_describe_table(listing, width=160, color=False).splitlines()[2]
    assert "dtype" in header.split()
    plain = list_path(safetensors, RunSettings())
    assert isinstance(plain, CheckpointListing)
    assert "dtype" not in render_describe_table(plain, width=160, color=False).splitlines()[2]
