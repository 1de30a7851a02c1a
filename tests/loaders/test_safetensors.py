"""The safetensors reader and the model-folder reader on safetensors: ids, names, types and shapes
as weightwatcher 0.7.7 reports them, matrices byte-equal to what the safetensors library and torch
load, BF16 decoded exactly, one tensor read at a time, and every malformed file refused."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from tests.loaders.layer_views import our_rows, ww_rows
from wwcli.loaders.folder import open_folder
from wwcli.loaders.interface import Checkpoint, LayerSpec, LayerType, LoaderError
from wwcli.loaders.safetensors import MAX_HEADER_BYTES, open_safetensors

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"
CNN = FIXTURES / "safetensors" / "cnn.safetensors"
SHARDED = FIXTURES / "safetensors" / "hf_sharded_bf16"

# weightwatcher 0.7.7 builds its DataFrame in a way pandas now deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Passing a dict to DataFrame.from_records")


# --- helpers ---------------------------------------------------------------------------------


def ww_folder(tmp_path_factory: pytest.TempPathFactory, source: Path, name: str) -> Path:
    """A copy of a model folder at a path without the word "safetensors" in it: weightwatcher
    replaces every "safetensors" in the folder's path when it looks for the index, so under
    fixtures/safetensors/ it would silently ignore model.safetensors.index.json."""
    folder = tmp_path_factory.mktemp("wwfolder") / name
    assert "safetensors" not in str(folder)
    if source.is_dir():
        shutil.copytree(source, folder)
    else:
        folder.mkdir()
        shutil.copy(source, folder / "model.safetensors")
    return folder


def raw_safetensors(
    path: Path,
    header: dict[str, Any] | bytes,
    data: bytes,
    *,
    header_length: int | None = None,
) -> Path:
    """Write a safetensors file by hand, so that any part of it can be wrong."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(header_bytes) if header_length is None else header_length
    path.write_bytes(struct.pack("<Q", length) + header_bytes + data)
    return path


def layer(checkpoint: Checkpoint, name: str) -> LayerSpec:
    return next(spec for spec in checkpoint.layers() if spec.name == name)


def sharded_expected_order(folder: Path) -> list[str]:
    """The `.weight` keys of an index folder as weightwatcher reads them: shards in sorted
    order, keys within a shard in weight_map order."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return [
        key
        for shard in sorted(set(weight_map.values()))
        for key, key_shard in weight_map.items()
        if key_shard == shard and key.endswith(".weight")
    ]


# --- ids, names, types, shapes against weightwatcher ----------------------------------------


def test_single_file_layers_equal_weightwatcher(tmp_path_factory: pytest.TempPathFactory) -> None:
    checkpoint = open_safetensors(CNN)
    expected = ww_rows(str(ww_folder(tmp_path_factory, CNN, "cnn")))
    assert our_rows(checkpoint) == expected
    assert set(expected) == {2, 3, 4, 5}  # conv1, conv2, fc1, fc2 after bn1, bn2 (sorted keys)


def test_single_file_numbers_weight_tensors_in_sorted_key_order() -> None:
    checkpoint = open_safetensors(CNN)
    stored = load_numpy(str(CNN))
    weight_keys = sorted(key for key in stored if key.endswith(".weight"))
    assert [spec.name + ".weight" for spec in checkpoint.layers()] == weight_keys
    assert [spec.layer_id for spec in checkpoint.layers()] == list(range(len(weight_keys)))
    for spec in checkpoint.layers():
        assert spec.shape == stored[spec.name + ".weight"].shape
        assert spec.dtype == "float32"


def test_single_file_order_is_sorted_even_when_the_header_is_not(tmp_path: Path) -> None:
    header = {
        "zeta.weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
        "alpha.weight": {"dtype": "F32", "shape": [4, 3], "data_offsets": [48, 96]},
    }
    path = raw_safetensors(tmp_path / "unsorted.safetensors", header, bytes(96))
    assert [(s.layer_id, s.name) for s in open_safetensors(path).layers()] == [
        (0, "alpha"),
        (1, "zeta"),
    ]


def test_single_file_types_and_skips() -> None:
    checkpoint = open_safetensors(CNN)
    assert layer(checkpoint, "bn1").layer_type is LayerType.NORM
    assert layer(checkpoint, "bn1").skip_reason is not None
    conv2 = layer(checkpoint, "conv2")
    assert (conv2.layer_type, conv2.N, conv2.M, conv2.rf, conv2.num_evals) == (
        LayerType.CONV2D,
        16,
        8,
        9,
        72,
    )
    fc1 = layer(checkpoint, "fc1")
    assert (fc1.layer_type, fc1.shape, fc1.N, fc1.M, fc1.rf) == (
        LayerType.DENSE,
        (32, 64),
        64,
        32,
        1,
    )


def test_sharded_index_layers_equal_weightwatcher(tmp_path_factory: pytest.TempPathFactory) -> None:
    checkpoint = open_folder(SHARDED)
    expected = ww_rows(str(ww_folder(tmp_path_factory, SHARDED, "sharded")))
    assert our_rows(checkpoint) == expected
    assert checkpoint.format == "safetensors-index"
    assert checkpoint.ids_note is None


def test_sharded_index_order_is_weight_map_order_shard_by_shard() -> None:
    checkpoint = open_folder(SHARDED)
    names = [spec.name + ".weight" for spec in checkpoint.layers()]
    expected = sharded_expected_order(SHARDED)
    assert names == expected
    # The fixture's index is neither sorted nor shard-ordered, so both shortcuts would fail.
    weight_map = json.loads((SHARDED / "model.safetensors.index.json").read_text())["weight_map"]
    assert names != sorted(names)
    assert names != [key for key in weight_map if key.endswith(".weight")]
    assert layer(checkpoint, "lm_head").layer_id == 19  # listed first, but in the last shard
    assert layer(checkpoint, "model.layers.0.self_attn.q_proj").layer_id == 2
    assert layer(checkpoint, "model.layers.0.input_layernorm").skip_reason is not None


def test_sharded_index_counts_on_across_shards() -> None:
    checkpoint = open_folder(SHARDED)
    assert [spec.layer_id for spec in checkpoint.layers()] == list(range(21))
    # shard 2 starts at id 10, right after the 10 weights of shard 1
    assert layer(checkpoint, "model.layers.1.input_layernorm").layer_id == 10
    for spec in checkpoint.layers():
        assert spec.dtype == "bfloat16"


def three_files(folder: Path) -> None:
    """Three safetensors files without an index, keys deliberately not in sorted order."""
    rng = np.random.default_rng(7)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols)).astype(np.float32)

    folder.mkdir()
    save_numpy(
        {"z.weight": matrix(20, 10), "a.weight": matrix(30, 12), "a.bias": matrix(1, 30)[0]},
        str(folder / "model-00001-of-00003.safetensors"),
    )
    save_numpy(
        {"y.weight": matrix(40, 10), "b.weight": rng.standard_normal((16, 8, 3, 3)).astype("f4")},
        str(folder / "model-00002-of-00003.safetensors"),
    )
    save_numpy(
        {"c.weight": matrix(25, 9), "n.weight": matrix(1, 12)[0]},
        str(folder / "model-00003-of-00003.safetensors"),
    )


def test_folder_without_index_counts_on_without_weightwatchers_gaps(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    folder = tmp_path_factory.mktemp("noindex") / "three"
    three_files(folder)
    checkpoint = open_folder(folder)
    names = [spec.name for spec in checkpoint.layers()]
    assert names == ["a", "z", "b", "y", "c", "n"]  # file by file, sorted keys within a file
    assert [spec.layer_id for spec in checkpoint.layers()] == list(range(6))
    assert checkpoint.ids_note is not None and "#268" in checkpoint.ids_note

    expected = ww_rows(str(folder))
    ours = our_rows(checkpoint)
    # weightwatcher reads the same layers in the same order ...
    assert [expected[i][0] for i in sorted(expected)] == [ours[i][0] for i in sorted(ours)]
    assert sorted(expected.values()) == sorted(ours.values())
    # ... and agrees on the ids of the first two files, then jumps (its issue #268).
    assert {i: row for i, row in expected.items() if i < 4} == {
        i: row for i, row in ours.items() if i < 4
    }
    assert max(expected) > max(ours)


def test_folder_with_one_file_and_config_is_a_hugging_face_folder(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(CNN, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architectures": ["SmallCNN"]}))
    checkpoint = open_folder(folder)
    assert our_rows(checkpoint) == our_rows(open_safetensors(CNN))
    assert checkpoint.ids_note is None
    assert "SmallCNN" in (getattr(checkpoint, "source_note", None) or "")


def test_folder_of_other_safetensors_names_is_read_with_a_note(tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(CNN, folder / "weights.safetensors")
    checkpoint = open_folder(folder)
    assert our_rows(checkpoint) == our_rows(open_safetensors(CNN))
    assert checkpoint.ids_note is not None and "does not read this folder" in checkpoint.ids_note


def test_index_shards_ignore_tensors_the_index_does_not_list(tmp_path: Path) -> None:
    folder = tmp_path / "partial"
    shutil.copytree(SHARDED, folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    index_path.write_text(json.dumps(index))
    checkpoint = open_folder(folder)
    assert "model.layers.1.mlp.up_proj" not in [spec.name for spec in checkpoint.layers()]
    assert len(checkpoint.layers()) == 20
    assert "1 tensors" in (getattr(checkpoint, "source_note", None) or "")


def test_no_weight_suffix_numbers_every_tensor(tmp_path: Path) -> None:
    path = tmp_path / "keras_export.safetensors"
    save_numpy(
        {
            "dense/kernel:0": np.ones((12, 10), np.float32),
            "dense/bias:0": np.ones(10, np.float32),
        },
        str(path),
    )
    checkpoint = open_safetensors(path)
    assert [(s.layer_id, s.name) for s in checkpoint.layers()] == [
        (0, "dense/bias:0"),
        (1, "dense/kernel:0"),
    ]
    assert checkpoint.layers()[1].analyzable
    assert checkpoint.ids_note is not None and ".weight" in checkpoint.ids_note


# --- matrices -------------------------------------------------------------------------------


def test_matrices_byte_equal_to_the_safetensors_library() -> None:
    checkpoint = open_safetensors(CNN)
    stored = load_numpy(str(CNN))
    for spec in checkpoint.layers():
        if not spec.analyzable:
            with pytest.raises(LoaderError, match="not analyzable"):
                checkpoint.matrices(spec)
            continue
        weight = stored[spec.name + ".weight"]
        matrices = checkpoint.matrices(spec)
        assert len(matrices) == spec.rf
        if weight.ndim == 2:
            expected = [weight]
        else:  # weightwatcher's conv2D_Wmats order: kernel row i outer, column j inner
            kh, kw = weight.shape[2:]
            expected = [weight[:, :, i, j] for i in range(kh) for j in range(kw)]
        for ours, theirs in zip(matrices, expected, strict=True):
            assert ours.dtype == theirs.dtype
            assert ours.tobytes() == np.ascontiguousarray(theirs).tobytes()


def test_bf16_shards_byte_equal_to_torch() -> None:
    checkpoint = open_folder(SHARDED)
    weight_map = json.loads((SHARDED / "model.safetensors.index.json").read_text())["weight_map"]
    for spec in checkpoint.layers():
        if not spec.analyzable:
            continue
        key = spec.name + ".weight"
        tensor = load_torch(str(SHARDED / weight_map[key]))[key]
        assert tensor.dtype == torch.bfloat16
        (matrix,) = checkpoint.matrices(spec)
        assert matrix.dtype == np.float32
        assert matrix.tobytes() == tensor.float().numpy().tobytes()


def test_bf16_decode_is_exact_for_every_bit_pattern(tmp_path: Path) -> None:
    # All 65536 BF16 values: normals, subnormals, both zeros, infinities and NaNs.
    bits = np.arange(2**16, dtype=np.uint16).reshape(256, 256)
    path = raw_safetensors(
        tmp_path / "all.safetensors",
        {"all.weight": {"dtype": "BF16", "shape": [256, 256], "data_offsets": [0, bits.nbytes]}},
        bits.astype("<u2").tobytes(),
    )
    checkpoint = open_safetensors(path)
    (matrix,) = checkpoint.matrices(checkpoint.layers()[0])
    expected = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert matrix.view(np.uint32).tobytes() == expected.view(np.uint32).tobytes()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_float_dtypes_keep_their_dtype(tmp_path: Path, dtype: type) -> None:
    weight: np.ndarray = np.random.default_rng(1).standard_normal((9, 17)).astype(dtype)
    path = tmp_path / "w.safetensors"
    save_numpy({"w.weight": weight}, str(path))
    checkpoint = open_safetensors(path)
    spec = checkpoint.layers()[0]
    assert spec.dtype == np.dtype(dtype).name
    (matrix,) = checkpoint.matrices(spec)
    assert matrix.dtype == dtype
    assert matrix.tobytes() == weight.tobytes()


@pytest.mark.parametrize(
    ("torch_dtype", "code"),
    [(torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2")],
)
def test_float8_through_ml_dtypes(tmp_path: Path, torch_dtype: torch.dtype, code: str) -> None:
    pytest.importorskip("ml_dtypes")
    tensor = (torch.randn(12, 10, generator=torch.Generator().manual_seed(3)) * 4).to(torch_dtype)
    path = tmp_path / "f8.safetensors"
    save_torch({"f8.weight": tensor}, str(path))
    header_text = path.read_bytes()[8:200].decode(errors="replace")
    assert code in header_text
    checkpoint = open_safetensors(path)
    spec = checkpoint.layers()[0]
    assert spec.analyzable
    (matrix,) = checkpoint.matrices(spec)
    assert matrix.tobytes() == tensor.float().numpy().tobytes()


def test_float8_without_ml_dtypes_is_skipped_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f8.safetensors"
    save_torch({"f8.weight": torch.ones(12, 10).to(torch.float8_e4m3fn)}, str(path))
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # makes `import ml_dtypes` fail
    spec = open_safetensors(path).layers()[0]
    assert spec.layer_type is LayerType.DENSE
    assert spec.skip_reason == "unsupported dtype F8_E4M3 (install ml_dtypes)"


def test_integer_bool_and_one_dimensional_tensors_are_listed_not_analyzed(tmp_path: Path) -> None:
    path = tmp_path / "mixed.safetensors"
    save_numpy(
        {
            "a_int.weight": np.ones((16, 16), np.int8),
            "b_bool.weight": np.ones((16, 16), np.bool_),
            "c_scale.weight": np.ones(16, np.float32),
            "d_norm.weight": np.ones(16, np.float32),
            "e_dense.weight": np.ones((16, 16), np.float32),
            "e_dense.bias": np.ones(16, np.float32),
        },
        str(path),
    )
    specs = open_safetensors(path).layers()
    assert [(s.layer_id, s.name) for s in specs] == [
        (0, "a_int"),
        (1, "b_bool"),
        (2, "c_scale"),
        (3, "d_norm"),
        (4, "e_dense"),
    ]
    assert specs[0].layer_type is LayerType.DENSE and specs[0].skip_reason is not None
    assert "integer" in specs[0].skip_reason
    assert specs[1].skip_reason is not None and "boolean" in specs[1].skip_reason
    assert (specs[2].layer_type, specs[2].skip_reason) == (LayerType.OTHER, "1-D tensor")
    assert specs[3].layer_type is LayerType.NORM
    assert specs[4].analyzable


def test_conv1d_and_conv2d_slices(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    conv1d = rng.standard_normal((32, 16, 3)).astype(np.float32)
    conv2d = rng.standard_normal((12, 20, 2, 3)).astype(np.float32)
    path = tmp_path / "convs.safetensors"
    save_numpy({"c1.weight": conv1d, "c2.weight": conv2d}, str(path))
    checkpoint = open_safetensors(path)
    c1, c2 = checkpoint.layers()
    assert (c1.layer_type, c1.N, c1.M, c1.rf) == (LayerType.CONV1D, 32, 16, 3)
    assert (c2.layer_type, c2.N, c2.M, c2.rf) == (LayerType.CONV2D, 20, 12, 6)
    for ours, k in zip(checkpoint.matrices(c1), range(3), strict=True):
        assert np.array_equal(ours, conv1d[:, :, k])
    expected = [conv2d[:, :, i, j] for i in range(2) for j in range(3)]
    for ours, theirs in zip(checkpoint.matrices(c2), expected, strict=True):
        assert np.array_equal(ours, theirs)


def test_matrices_refuses_a_layer_of_another_checkpoint() -> None:
    checkpoint = open_safetensors(CNN)
    stranger = LayerSpec(layer_id=2, name="not-conv1", layer_type=LayerType.DENSE, shape=(2, 2))
    with pytest.raises(LoaderError, match="not-conv1"):
        checkpoint.matrices(stranger)
    with pytest.raises(LoaderError, match="no layer with id 99"):
        checkpoint.matrices(LayerSpec(99, "x", LayerType.DENSE, (2, 2)))


# --- bad input ------------------------------------------------------------------------------

F32_4 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def bad_files() -> list[tuple[str, Any, str]]:
    """(id, writer(tmp_path) -> Path, expected message pattern)."""
    cases: list[tuple[str, Any, str]] = [
        ("empty", lambda p: _write(p, b""), "empty file"),
        ("too-small", lambda p: _write(p, b"\x01\x02\x03"), "too small"),
        (
            "random-bytes",
            lambda p: _write(p, np.random.default_rng(0).bytes(4096)),
            "header length .* (exceeds|runs past)",
        ),
        (
            "header-length-beyond-file",
            lambda p: raw_safetensors(p, {"w": F32_4}, bytes(16), header_length=10_000),
            "runs past the end",
        ),
        (
            "header-length-above-100MB",
            lambda p: raw_safetensors(p, b"{}", b"", header_length=MAX_HEADER_BYTES + 1),
            "exceeds the 100000000-byte limit",
        ),
        ("header-not-json", lambda p: raw_safetensors(p, b"{not json", b""), "not valid JSON"),
        ("header-not-utf8", lambda p: raw_safetensors(p, b'{"\xff": 1}', b""), "UTF-8"),
        ("header-json-array", lambda p: raw_safetensors(p, b"[1, 2]", b""), "JSON array"),
        ("header-json-number", lambda p: raw_safetensors(p, b"42", b""), "JSON number"),
        (
            "duplicate-key",
            lambda p: raw_safetensors(
                p, b'{"w": ' + json.dumps(F32_4).encode() + b', "w": 1}', bytes(16)
            ),
            "twice",
        ),
        (
            "unknown-dtype",
            lambda p: raw_safetensors(
                p, {"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}}, bytes(4)
            ),
            "unknown dtype 'Q4'",
        ),
        (
            "missing-shape",
            lambda p: raw_safetensors(p, {"w": {"dtype": "F32", "data_offsets": [0, 4]}}, bytes(4)),
            "no 'shape'",
        ),
        (
            "negative-dim",
            lambda p: raw_safetensors(
                p, {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)
            ),
            "non-negative integers",
        ),
        (
            "overlapping-offsets",
            lambda p: raw_safetensors(
                p,
                {
                    "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
                },
                bytes(24),
            ),
            "overlaps",
        ),
        (
            "gap-between-tensors",
            lambda p: raw_safetensors(
                p,
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
                },
                bytes(20),
            ),
            "gap",
        ),
        (
            "offsets-out-of-range",
            lambda p: raw_safetensors(
                p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)
            ),
            "run past the end",
        ),
        (
            "offsets-reversed",
            lambda p: raw_safetensors(
                p, {"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, bytes(8)
            ),
            "end before they begin",
        ),
        (
            "shape-bytes-mismatch",
            lambda p: raw_safetensors(
                p, {"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}, bytes(16)
            ),
            "needs 24 bytes but the offsets hold 16",
        ),
        (
            "trailing-bytes",
            lambda p: raw_safetensors(p, {"w": F32_4}, bytes(20)),
            "4 bytes after the last tensor",
        ),
        (
            "metadata-not-strings",
            lambda p: raw_safetensors(p, {"__metadata__": {"epoch": 3}}, b""),
            "__metadata__",
        ),
        (
            "truncated",
            lambda p: _write(p, CNN.read_bytes()[: CNN.stat().st_size // 2]),
            "truncated",
        ),
    ]
    return cases


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("writer", "pattern"), [c[1:] for c in bad_files()], ids=[c[0] for c in bad_files()]
)
def test_bad_files_are_refused_naming_the_file(tmp_path: Path, writer: Any, pattern: str) -> None:
    path = writer(tmp_path / "bad.safetensors")
    with pytest.raises(LoaderError, match=pattern) as raised:
        open_safetensors(path)
    message = str(raised.value)
    assert message.startswith(str(path))
    assert "\n" not in message


def test_the_reference_implementation_refuses_them_too(tmp_path: Path) -> None:
    """Our validation is not stricter than the safetensors library on any of these cases."""
    from safetensors import safe_open

    for case_id, writer, _ in bad_files():
        path = writer(tmp_path / f"{case_id}.safetensors")
        with pytest.raises(Exception), safe_open(str(path), framework="np"):  # noqa: B017
            pass


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="no such file"):
        open_safetensors(tmp_path / "absent.safetensors")
    with pytest.raises(LoaderError, match="cannot read"):
        open_safetensors(tmp_path)


def test_valid_edge_cases_are_accepted(tmp_path: Path) -> None:
    empty = raw_safetensors(tmp_path / "empty.safetensors", b"{}      ", b"")
    assert open_safetensors(empty).layers() == []
    with_metadata = raw_safetensors(
        tmp_path / "meta.safetensors",
        {"__metadata__": {"format": "pt"}, "w.weight": F32_4},
        np.arange(4, dtype="<f4").tobytes(),
    )
    (spec,) = open_safetensors(with_metadata).layers()
    assert spec.shape == (2, 2)


def test_file_that_shrinks_after_opening_fails_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "shrinks.safetensors"
    shutil.copy(CNN, path)
    checkpoint = open_safetensors(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(LoaderError, match="ended"):
        checkpoint.matrices(layer(checkpoint, "fc2"))


# --- folders: bad input ---------------------------------------------------------------------


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(SHARDED, folder)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        LoaderError, match=r"names shard 'model-00002-of-00003\.safetensors'.*missing"
    ):
        open_folder(folder)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(SHARDED, folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "model-00003-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(LoaderError, match=r"up_proj\.weight.*no such tensor"):
        open_folder(folder)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [("{oops", "not valid JSON"), ("[]", "weight_map"), ('{"weight_map": {"a": 1}}', "weight_map")],
)
def test_malformed_index(tmp_path: Path, content: str, pattern: str) -> None:
    folder = tmp_path / "model"
    shutil.copytree(SHARDED, folder)
    (folder / "model.safetensors.index.json").write_text(content)
    with pytest.raises(LoaderError, match=pattern):
        open_folder(folder)


def test_index_naming_a_shard_outside_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(SHARDED, folder)
    shutil.copy(CNN, tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"fc1.weight": "../outside.safetensors"}})
    )
    with pytest.raises(LoaderError, match="outside"):
        open_folder(folder)


def test_damaged_shard_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(SHARDED, folder)
    shard = folder / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(LoaderError, match=r"model-00003-of-00003\.safetensors"):
        open_folder(folder)


def test_folder_without_weights(tmp_path: Path) -> None:
    folder = tmp_path / "just-config"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(LoaderError, match=r"just-config: no weights .*looked for") as raised:
        open_folder(folder)
    assert "model.safetensors.index.json" in str(raised.value)
    assert "pytorch_model*.bin" in str(raised.value)


def test_folder_reader_refuses_missing_and_non_folders(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="no such folder"):
        open_folder(tmp_path / "absent")
    with pytest.raises(LoaderError, match="not a folder"):
        open_folder(CNN)


# --- no torch, one tensor at a time, fast headers -------------------------------------------


def test_safetensors_readers_never_import_torch() -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from wwcli.loaders.folder import open_folder
        from wwcli.loaders.safetensors import open_safetensors
        single = open_safetensors(Path({str(CNN)!r}))
        for checkpoint in (single, open_folder(Path({str(SHARDED)!r}))):
            for spec in checkpoint.layers():
                if spec.analyzable:
                    checkpoint.matrices(spec)
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if "torch" in m)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def big_sparse_file(path: Path, rows: int, cols: int) -> Path:
    """A safetensors file with a (rows, cols) F32 tensor and a small one after it, written as a
    sparse file: the disk holds almost nothing, but reading all of it would cost its size."""
    big_bytes = rows * cols * 4
    small = np.arange(64 * 32, dtype="<f4").reshape(64, 32)
    header = {
        "big.weight": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, big_bytes]},
        "small.weight": {
            "dtype": "F32",
            "shape": [64, 32],
            "data_offsets": [big_bytes, big_bytes + small.nbytes],
        },
    }
    header_bytes = json.dumps(header).encode()
    with path.open("wb") as stream:
        stream.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        stream.seek(8 + len(header_bytes) + big_bytes)
        stream.write(small.tobytes())
    return path


def test_reading_one_tensor_reads_only_that_tensor(tmp_path: Path) -> None:
    path = big_sparse_file(tmp_path / "big.safetensors", 10_000, 5_000)  # 200 MB
    assert path.stat().st_size > 200_000_000
    tracemalloc.start()
    try:
        started = time.perf_counter()
        checkpoint = open_safetensors(path)
        specs = checkpoint.layers()
        describe_seconds = time.perf_counter() - started
        _, describe_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        (small,) = checkpoint.matrices(specs[1])
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert specs[0].shape == (10_000, 5_000)
    assert np.array_equal(small, np.arange(64 * 32, dtype=np.float32).reshape(64, 32))
    assert describe_seconds < 1.0
    assert describe_peak < 1_000_000
    assert read_peak < 4 * small.nbytes + 100_000  # 8 KB tensor; the file is 200 MB


@pytest.mark.slow
def test_reading_the_big_tensor_costs_about_its_own_size(tmp_path: Path) -> None:
    path = big_sparse_file(tmp_path / "big.safetensors", 10_000, 5_000)
    checkpoint = open_safetensors(path)
    tracemalloc.start()
    try:
        (big,) = checkpoint.matrices(checkpoint.layers()[0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert big.nbytes == 200_000_000
    assert peak < 1.1 * big.nbytes


@pytest.mark.parametrize(
    ("fc2", "problem"),
    [
        ({"shape": [2**63, 0]}, r"shape \[9223372036854775808, 0\] is out of range"),
        ({"shape": [2**32, 2**32]}, r"has more than 2\*\*63 - 1 elements"),
        ({"data_offsets": [2048, 2**63]}, r"data_offsets \[2048, 9223372036854775808\] are out"),
        ({"shape": [16, True]}, r"is not a list of non-negative integers"),
        ({"data_offsets": [2048, 2560, 3000]}, r"are not two non-negative integers"),
    ],
)
def test_every_number_is_range_checked(tmp_path: Path, fc2: dict[str, Any], problem: str) -> None:
    header, data = _with_fc2(fc2)
    path = raw_safetensors(tmp_path / "ranges.safetensors", header, data)
    with pytest.raises(LoaderError, match=problem):
        open_safetensors(path)


def test_the_largest_counts_are_still_read(tmp_path: Path) -> None:
    header, data = _with_fc2({"shape": [2**63 - 1, 0], "data_offsets": [2048, 2048]})
    path = raw_safetensors(tmp_path / "zero.safetensors", header, data[:2048])
    spec = layer(open_safetensors(path), "fc2")
    assert (spec.shape, spec.skip_reason) == ((2**63 - 1, 0), "empty tensor")


def _with_fc2(fc2: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    rng = np.random.default_rng(0)
    first = rng.standard_normal((32, 16)).astype("<f4").tobytes()
    second = rng.standard_normal((16, 8)).astype("<f4").tobytes()
    header: dict[str, Any] = {
        "fc1.weight": {"dtype": "F32", "shape": [32, 16], "data_offsets": [0, 2048]},
        "fc2.weight": {"dtype": "F32", "shape": [16, 8], "data_offsets": [2048, 2560], **fc2},
    }
    return header, first + second
