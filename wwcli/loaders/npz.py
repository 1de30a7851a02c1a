"""Reads NumPy weight archives: `.npz` (`np.savez(**state_dict)`) and single `.npy` arrays.

Arrays are loaded with `allow_pickle=False`, always: an object array (a pickle inside the
archive) is refused, never unpickled. Each member's header (dtype, shape, order) is read and
checked against the bytes the archive stores for it before any value is read; a `.npy` file is
memory-mapped. The names are the archive's keys (a `.npy` file's stem), numbered and typed like
state-dict keys (`_statedict.py`: the `.weight` tensors get the ids, 2-D dense, 4-D conv2d,
embeddings by name). weightwatcher 0.7.7 reads neither format.
"""

from __future__ import annotations

import os
import tokenize
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np

from wwcli.loaders._statedict import StateDictCheckpoint, TensorEntry, TensorReader
from wwcli.loaders.interface import (
    ZIP_ERRORS,
    Checkpoint,
    LoaderError,
    check_layer_count,
    open_regular,
)

NPY_MAGIC = b"\x93NUMPY"
_FLOAT_KINDS = ("float16", "float32", "float64")
_MAX_HEADER_BYTES = 1 << 20
"""numpy itself refuses `.npy` headers longer than 10,000 bytes unless told otherwise."""
_IDS_NOTE = "weightwatcher 0.7.7 reads no NumPy archive: ids follow the state-dict rules"


def _header(stream: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """(shape, fortran order, dtype, header bytes) of a `.npy` stream, read with numpy's own
    header parser (a Python literal read by `ast.literal_eval`, never unpickled)."""
    from numpy.lib import format as npy_format

    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"format version {version}")
    except (ValueError, SyntaxError, TypeError, EOFError, tokenize.TokenError) as error:
        detail = " ".join(str(error).split())[:200]
        raise LoaderError(f"{where}: not a valid .npy array header ({detail})") from error
    return tuple(int(side) for side in shape), bool(fortran), dtype, stream.tell()


def _entry(key: str, shape: tuple[int, ...], dtype: np.dtype[Any], where: str) -> TensorEntry:
    if dtype.hasobject:
        raise LoaderError(
            f"{where}: array {key!r} holds Python objects (a pickle), which wwcli never loads"
        )
    name = dtype.name
    unreadable = None if name in _FLOAT_KINDS else f"{name} array, not analyzed"
    return TensorEntry(key, shape, name, unreadable)


def _checked_size(shape: tuple[int, ...], dtype: np.dtype[Any], stored: int, where: str) -> None:
    needed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if needed != stored:
        raise LoaderError(
            f"{where}: declares shape {list(shape)} of {dtype.name} ({needed} bytes) but stores "
            f"{stored} bytes"
        )


def open_npy(path: Path) -> Checkpoint:
    """Open one `.npy` array, memory-mapped; its layer is named by the file's stem."""
    with open_regular(path) as stream:
        size = os.fstat(stream.fileno()).st_size
        shape, _, dtype, offset = _header(stream, str(path))
    entry = _entry(path.stem, shape, dtype, str(path))
    _checked_size(shape, dtype, size - offset, str(path))

    def read(key: str) -> np.ndarray:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        return np.asarray(array)

    return StateDictCheckpoint(path, "npy", [(entry, read)], ids_note=_IDS_NOTE)


def open_npz(path: Path) -> Checkpoint:
    """Open a `.npz` archive: member headers now, each array when its layer is read."""
    try:
        with open_regular(path) as stream:
            archive = zipfile.ZipFile(stream)
            infos = [info for info in archive.infolist() if not info.is_dir()]
            check_layer_count(path, len(infos), "arrays")
            entries: list[tuple[TensorEntry, TensorReader]] = []
            keys: dict[str, zipfile.ZipInfo] = {}
            for info in infos:
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if key in keys:
                    raise LoaderError(f"{path}: the archive holds {key!r} twice")
                where = f"{path}: member {info.filename!r}"
                with archive.open(info) as member:
                    shape, _, dtype, offset = _header(member, where)
                entry = _entry(key, shape, dtype, where)
                _checked_size(shape, dtype, info.file_size - offset, where)
                keys[key] = info
                entries.append((entry, _member_reader(path, info)))
    except ZIP_ERRORS as error:
        raise LoaderError(f"{path}: damaged .npz archive: {error}") from error
    return StateDictCheckpoint(path, "npz", entries, ids_note=_IDS_NOTE)


def _member_reader(path: Path, info: zipfile.ZipInfo) -> TensorReader:
    def read(key: str) -> np.ndarray:
        # zipfile never unpacks past the size the entry declares, and checks its CRC.
        with (
            open_regular(path) as stream,
            zipfile.ZipFile(stream) as archive,
            archive.open(info) as member,
        ):
            array = np.lib.format.read_array(member, allow_pickle=False)
        return np.asarray(array)

    return read
