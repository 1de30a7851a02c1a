"""Chooses the reader for a path: by content first (zip, HDF5, safetensors header, pickle),
by suffix second. Readers are imported only when a file of their format is opened."""

from __future__ import annotations

import stat
import struct
import zipfile
from pathlib import Path

from wwcli.loaders.interface import (
    ZIP_ERRORS,
    Checkpoint,
    LoaderError,
    file_kind,
    guard_checkpoint,
    read_head,
    reading,
)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
ONNX_SUFFIXES = (".onnx",)
GGUF_MAGIC = b"GGUF"
NPY_MAGIC = b"\x93NUMPY"
TFLITE_IDENTIFIER = b"TFL3"

_UNSUPPORTED_SUFFIXES = {
    ".tflite": "a TensorFlow Lite model: not supported; export the model to ONNX or save it "
    "as .keras or safetensors instead",
    ".pb": "a TensorFlow protobuf (a frozen graph or part of a SavedModel): not supported; "
    "save the model as .keras or export it to ONNX",
    ".msgpack": "a Flax msgpack checkpoint: not supported; save it as safetensors",
    ".mlmodel": "a Core ML model: not supported",
    ".pdparams": "a PaddlePaddle checkpoint: not supported",
    ".pkl": "a Python pickle: wwcli reads pickles only as PyTorch checkpoints (.pt, .pth, .bin, "
    ".ckpt); if it is one, rename it",
    ".pickle": "a Python pickle: wwcli reads pickles only as PyTorch checkpoints (.pt, .pth, "
    ".bin, .ckpt); if it is one, rename it",
    ".joblib": "a joblib pickle (scikit-learn?): not supported",
    ".ggml": "a GGML file (the format before GGUF): not supported; convert it to GGUF",
}
"""Formats people have that wwcli does not read, by suffix: what to say instead of
"unrecognized"."""


def sniff_format(path: Path) -> str:
    """ "keras", "torch", "safetensors", "onnx", "gguf", "npy" or "npz" for a file, from its
    first bytes, then its suffix.

    Raises LoaderError when the file cannot be read or looks like none of them.
    """
    head = read_head(path, 16)
    suffix = path.suffix.lower()
    if head.startswith(HDF5_SIGNATURE):
        return "keras"
    if head.startswith(GGUF_MAGIC):
        return "gguf"
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head[4:8] == TFLITE_IDENTIFIER:
        raise LoaderError(f"{path}: {_UNSUPPORTED_SUFFIXES['.tflite']}")
    if head.startswith(ZIP_SIGNATURE):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except ZIP_ERRORS as error:
            raise LoaderError(f"{path}: damaged zip archive (truncated?): {error}") from error
        if "config.json" in names or "model.weights.h5" in names or suffix == ".keras":
            return "keras"
        if suffix == ".npz" or (names and all(name.endswith(".npy") for name in names)):
            return "npz"
        if any(name.endswith("data.pkl") for name in names) or suffix in TORCH_SUFFIXES:
            return "torch"
        raise LoaderError(
            f"{path}: a zip archive that is neither a Keras model nor a PyTorch checkpoint"
        )
    if len(head) >= 9 and head[8:9] == b"{":
        (header_length,) = struct.unpack("<Q", head[:8])
        if header_length > 1:
            return "safetensors"
    if head[:1] == b"\x80" and suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in KERAS_SUFFIXES:
        return "keras"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in (".gguf", ".npz", ".npy"):
        return suffix[1:]  # not its magic: the reader says what is wrong
    if suffix in _UNSUPPORTED_SUFFIXES:
        raise LoaderError(f"{path}: {_UNSUPPORTED_SUFFIXES[suffix]}")
    if head[:1] == b"\x80":
        raise LoaderError(
            f"{path}: a Python pickle: wwcli reads pickles only as PyTorch checkpoints (.pt, "
            ".pth, .bin, .ckpt); if it is one, rename it"
        )
    raise LoaderError(
        f"{path}: unrecognized file format (supported: .keras, .h5, .weights.h5, "
        ".pt, .pth, .bin, .ckpt, .safetensors, .onnx, .gguf, .npz, .npy, and model folders)"
    )


def open_checkpoint(path: Path, *, trust_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint file or model folder with the reader its content calls for.

    `trust_pickle` lets the PyTorch reader unpickle arbitrary Python objects (which can run
    code); without it only plain tensors and containers are ever loaded.

    This is the loader boundary: whatever a crafted file makes a reader raise, opening it or
    later in the checkpoint's layers(), matrices() or close(), reaches the caller as a
    LoaderError naming the file (`interface.reading`), never as an internal error.
    """
    with reading(path):
        checkpoint = _open(path, trust_pickle=trust_pickle)
    return guard_checkpoint(checkpoint)


def _open(path: Path, *, trust_pickle: bool) -> Checkpoint:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as error:
        raise LoaderError(f"{path}: no such file or directory") from error
    if stat.S_ISDIR(mode):
        from wwcli.loaders.folder import open_folder

        return open_folder(path, trust_pickle=trust_pickle)
    # A link given on the command line is the user's choice and is followed; what it leads
    # to must be a regular file (opening a FIFO would wait forever for a writer).
    if not stat.S_ISREG(mode):
        raise LoaderError(f"{path}: not a regular file ({file_kind(mode)})")
    file_format = sniff_format(path)
    if file_format == "keras":
        # HDF5 is parsed in a helper process: a crash or hang there is a LoaderError here.
        from wwcli.loaders.isolated import open_keras_isolated

        return open_keras_isolated(path)
    if file_format == "torch":
        from wwcli.loaders.torch import open_torch

        return open_torch(path, trust_pickle=trust_pickle)
    if file_format == "onnx":
        # onnx's C++ protobuf parser runs in the helper process too.
        from wwcli.loaders.isolated import open_onnx_isolated

        return open_onnx_isolated(path)
    if file_format == "gguf":
        from wwcli.loaders.gguf import open_gguf

        return open_gguf(path)
    if file_format in ("npy", "npz"):
        from wwcli.loaders.npz import open_npy, open_npz

        return open_npy(path) if file_format == "npy" else open_npz(path)
    from wwcli.loaders.safetensors import open_safetensors

    return open_safetensors(path)
