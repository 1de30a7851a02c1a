"""Tests of the NumPy archive reader (`wwcli.loaders.npz`): `.npz` files list and read like the
state dict they were saved from, `.npy` files are one layer, and nothing is ever unpickled."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from wwcli.loaders.detect import open_checkpoint
from wwcli.loaders.interface import LoaderError
from wwcli.loaders.npz import open_npy, open_npz
from wwcli.loaders.safetensors import open_safetensors

REPO = Path(__file__).resolve().parents[2]
FORMATS = REPO / "fixtures" / "formats"
NPZ = FORMATS / "cnn_lstm.npz"
NPY = FORMATS / "fc.weight.npy"
SAFETENSORS = FORMATS / "cnn_lstm.safetensors"


def test_npz_lists_and_reads_like_its_state_dict() -> None:
    """The same tensors as the safetensors fixture: the same layers (ids follow each file's
    order of keys, so the layers are compared by name) and the same matrices."""
    with open_npz(NPZ) as archive, open_safetensors(SAFETENSORS) as state_dict:
        ours = {layer.name: layer for layer in archive.layers()}
        theirs = {layer.name: layer for layer in state_dict.layers()}
        assert archive.format == "npz"
        assert ours.keys() == theirs.keys()
        for name, layer in ours.items():
            other = theirs[name]
            assert (layer.layer_type, layer.shape, layer.N, layer.M, layer.rf) == (
                other.layer_type,
                other.shape,
                other.N,
                other.M,
                other.rf,
            )
            for a, b in zip(archive.matrices(layer), state_dict.matrices(other), strict=True):
                np.testing.assert_array_equal(a, b)
        # The `.weight` tensors come first, in the archive's order, then the recurrent ones.
        assert [layer.name for layer in archive.layers()][:5] == [
            "conv",
            "conv1",
            "emb",
            "fc",
            "fc2",
        ]


def test_npz_through_open_checkpoint_and_compressed(tmp_path: Path) -> None:
    arrays = dict(np.load(NPZ))
    compressed = tmp_path / "weights.npz"
    np.savez_compressed(compressed, **arrays)
    renamed = tmp_path / "weights.zip"  # content decides, not the suffix
    renamed.write_bytes(compressed.read_bytes())
    for path in (NPZ, compressed, renamed):
        with open_checkpoint(path) as checkpoint:
            assert checkpoint.format == "npz"
            fc = next(layer for layer in checkpoint.layers() if layer.name == "fc")
            np.testing.assert_array_equal(checkpoint.matrices(fc)[0], arrays["fc.weight"])


def test_npy_is_one_layer_named_by_its_stem() -> None:
    with open_checkpoint(NPY) as checkpoint:
        (layer,) = checkpoint.layers()
        assert checkpoint.format == "npy"
        assert (layer.name, layer.shape, layer.dtype) == ("fc", (20, 48), "float32")
        np.testing.assert_array_equal(checkpoint.matrices(layer)[0], np.load(NPY))


def test_fortran_order_and_float64(tmp_path: Path) -> None:
    matrix = np.asfortranarray(np.arange(60, dtype=np.float64).reshape(6, 10))
    path = tmp_path / "w.npy"
    np.save(path, matrix)
    with open_npy(path) as checkpoint:
        (layer,) = checkpoint.layers()
        np.testing.assert_array_equal(checkpoint.matrices(layer)[0], matrix)


def _npz_with(tmp_path: Path, **arrays: np.ndarray) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.save(member, array, allow_pickle=True)
            archive.writestr(f"{name}.npy", member.getvalue())
    path = tmp_path / "archive.npz"
    path.write_bytes(buffer.getvalue())
    return path


def test_pickled_object_array_is_refused(tmp_path: Path) -> None:
    path = _npz_with(
        tmp_path, **{"fc.weight": np.ones((4, 4)), "evil": np.array([{"a": 1}], dtype=object)}
    )
    with pytest.raises(LoaderError, match=r"array 'evil' holds Python objects \(a pickle\)"):
        open_npz(path)
    single = tmp_path / "evil.npy"
    np.save(single, np.array([print], dtype=object), allow_pickle=True)
    with pytest.raises(LoaderError, match=r"holds Python objects"):
        open_checkpoint(single)


def test_integer_arrays_are_listed_not_analyzed(tmp_path: Path) -> None:
    path = _npz_with(tmp_path, **{"fc.weight": np.ones((4, 4), dtype=np.int32)})
    with open_npz(path) as checkpoint:
        (layer,) = checkpoint.layers()
        assert layer.skip_reason == "int32 array, not analyzed"


def _huge_header() -> bytes:
    stream = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (2**20, 2**20)}
    np.lib.format.write_array_header_1_0(stream, header)
    return stream.getvalue()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'", r"not a valid \.npy array header"),
        (
            b"\x93NUMPY\x01\x00\x46\x00{'descr': '<f4', 'shape': (1048576, " + b" " * 40 + b"\n",
            r"not a valid \.npy array header",
        ),
        (_huge_header(), r"declares shape \[1048576, 1048576\] of float32 \(4398046511104 "),
    ],
    ids=["truncated_header", "unterminated_header", "huge_shape"],
)
def test_bad_npy_headers(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bad.npy"
    path.write_bytes(content)
    with pytest.raises(LoaderError, match=problem):
        open_checkpoint(path)
