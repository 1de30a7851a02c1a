"""Reads `.safetensors` files without torch: our own header parser, one tensor at a time.

A safetensors file is an 8-byte little-endian header length n, n bytes of JSON (tensor name ->
dtype, shape, data_offsets; an optional `__metadata__` of strings), then the data section. The
header is validated as the reference implementation does; a tensor's bytes are read only when
its matrices are asked for, so memory follows the largest tensor, not the file.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wwcli.loaders._statedict import StateDictCheckpoint, TensorEntry, TensorReader
from wwcli.loaders.interface import Checkpoint, LoaderError

MAX_HEADER_BYTES = 100_000_000
"""The reference implementation refuses headers above this size (a header bomb)."""

HEADER_LENGTH_BYTES = 8


@dataclass(frozen=True)
class SafetensorsDtype:
    """A dtype code of the safetensors format."""

    code: str
    """The code in the header: "F32", "BF16", "F8_E4M3", ..."""
    bits: int
    """Width of one element in bits (4 and 6 for the packed sub-byte floats)."""
    name: str
    """The same dtype in torch's words, as `LayerSpec.dtype` reports it."""


DTYPES: dict[str, SafetensorsDtype] = {
    dtype.code: dtype
    for dtype in (
        SafetensorsDtype("BOOL", 8, "bool"),
        SafetensorsDtype("F4", 4, "float4_e2m1fn"),
        SafetensorsDtype("F6_E2M3", 6, "float6_e2m3fn"),
        SafetensorsDtype("F6_E3M2", 6, "float6_e3m2fn"),
        SafetensorsDtype("U8", 8, "uint8"),
        SafetensorsDtype("I8", 8, "int8"),
        SafetensorsDtype("F8_E5M2", 8, "float8_e5m2"),
        SafetensorsDtype("F8_E4M3", 8, "float8_e4m3fn"),
        SafetensorsDtype("F8_E8M0", 8, "float8_e8m0fnu"),
        SafetensorsDtype("F8_E4M3FNUZ", 8, "float8_e4m3fnuz"),
        SafetensorsDtype("F8_E5M2FNUZ", 8, "float8_e5m2fnuz"),
        SafetensorsDtype("I16", 16, "int16"),
        SafetensorsDtype("U16", 16, "uint16"),
        SafetensorsDtype("F16", 16, "float16"),
        SafetensorsDtype("BF16", 16, "bfloat16"),
        SafetensorsDtype("I32", 32, "int32"),
        SafetensorsDtype("U32", 32, "uint32"),
        SafetensorsDtype("F32", 32, "float32"),
        SafetensorsDtype("C64", 64, "complex64"),
        SafetensorsDtype("F64", 64, "float64"),
        SafetensorsDtype("I64", 64, "int64"),
        SafetensorsDtype("U64", 64, "uint64"),
    )
}
"""Every dtype the safetensors 0.8 reference implementation accepts, in its order."""

_NUMPY_FLOATS: dict[str, np.dtype[Any]] = {
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}

# ml_dtypes' names of the 8-bit floats; they decode exactly to float32.
_ML_DTYPES_FLOAT8 = {
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header."""

    key: str
    """Tensor name in the header."""
    dtype: SafetensorsDtype
    """Stored dtype."""
    shape: tuple[int, ...]
    """Stored shape (C order, little endian)."""
    begin: int
    """Offset of its first byte in the file (not in the data section)."""
    end: int
    """Offset one past its last byte in the file."""


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of a safetensors file."""

    path: Path
    """The file."""
    tensors: tuple[TensorInfo, ...]
    """Its tensors in the header's order."""
    metadata: Mapping[str, str]
    """The free-form `__metadata__` strings ({} when absent)."""

    def by_key(self) -> dict[str, TensorInfo]:
        """The tensors by name."""
        return {info.key: info for info in self.tensors}


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file; no tensor data is read.

    Raises LoaderError naming the file and the problem: too small, header length below 2, above
    100 MB or past the end of the file, header not UTF-8 / JSON / a JSON object, a malformed or
    duplicated entry, an unknown dtype, data_offsets out of range, overlapping or leaving a gap,
    a byte count that does not match shape x dtype width, or bytes after the last tensor.
    """
    try:
        with path.open("rb") as stream:
            file_size = stream.seek(0, 2)
            stream.seek(0)
            if file_size == 0:
                raise LoaderError(f"{path}: empty file")
            if file_size < HEADER_LENGTH_BYTES:
                raise LoaderError(
                    f"{path}: only {file_size} bytes, too small for a safetensors header"
                )
            (header_length,) = struct.unpack("<Q", stream.read(HEADER_LENGTH_BYTES))
            if header_length < 2:
                raise LoaderError(
                    f"{path}: safetensors header length {header_length} is too small for a "
                    "JSON object (not a safetensors file, or damaged)"
                )
            if header_length > MAX_HEADER_BYTES:
                raise LoaderError(
                    f"{path}: safetensors header length {header_length} exceeds the "
                    f"{MAX_HEADER_BYTES}-byte limit (not a safetensors file, or damaged)"
                )
            data_start = HEADER_LENGTH_BYTES + header_length
            if data_start > file_size:
                raise LoaderError(
                    f"{path}: safetensors header length {header_length} runs past the end "
                    f"of the {file_size}-byte file (truncated or not a safetensors file)"
                )
            header_bytes = stream.read(header_length)
    except OSError as error:
        raise LoaderError(f"{path}: cannot read: {error.strerror or error}") from error
    header = _parse_json_object(path, header_bytes)
    metadata = _parse_metadata(path, header.pop("__metadata__", None))
    tensors = tuple(
        _parse_tensor_info(path, key, value, data_start) for key, value in header.items()
    )
    _check_layout(path, tensors, data_start, file_size)
    return SafetensorsHeader(path=path, tensors=tensors, metadata=metadata)


def _parse_json_object(path: Path, header_bytes: bytes) -> dict[str, Any]:
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LoaderError(f"{path}: safetensors header is not valid UTF-8 ({error})") from error

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise LoaderError(f"{path}: safetensors header has the key {key!r} twice")
            result[key] = value
        return result

    try:
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as error:
        raise LoaderError(f"{path}: safetensors header is not valid JSON ({error})") from error
    except RecursionError as error:
        raise LoaderError(f"{path}: safetensors header is JSON nested too deeply") from error
    if not isinstance(header, dict):
        raise LoaderError(
            f"{path}: safetensors header is a JSON {_json_kind(header)}, not an object"
        )
    return header


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool) or value is None:
        return "literal"
    return "number"


def _parse_metadata(path: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoaderError(f"{path}: safetensors __metadata__ must map strings to strings")
    return dict(metadata)


def _is_count(value: object) -> bool:
    """A non-negative JSON integer (JSON true/false are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_tensor_info(path: Path, key: str, value: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {key!r}"
    if not isinstance(value, dict):
        raise LoaderError(f"{where}: header entry is not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in value:
            raise LoaderError(f"{where}: header entry has no {field!r}")
    code = value["dtype"]
    if not isinstance(code, str) or code not in DTYPES:
        raise LoaderError(f"{where}: unknown dtype {code!r}")
    shape = value["shape"]
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise LoaderError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    offsets = value["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise LoaderError(f"{where}: data_offsets {offsets!r} are not two non-negative integers")
    return TensorInfo(
        key=key,
        dtype=DTYPES[code],
        shape=tuple(shape),
        begin=data_start + offsets[0],
        end=data_start + offsets[1],
    )


def _check_layout(
    path: Path, tensors: tuple[TensorInfo, ...], data_start: int, file_size: int
) -> None:
    """The tensors must tile the data section exactly: from its start, in offset order, no
    overlap, no gap, each as long as its shape and dtype say, the last ending with the file."""
    data_size = file_size - data_start
    expected_begin = data_start
    for info in sorted(tensors, key=lambda info: (info.begin, info.end)):
        offsets = [info.begin - data_start, info.end - data_start]
        where = f"{path}: tensor {info.key!r} (data_offsets {offsets})"
        if info.end < info.begin:
            raise LoaderError(f"{where}: offsets end before they begin")
        if info.end > file_size:
            raise LoaderError(
                f"{where}: offsets run past the end of the {data_size}-byte data section "
                "(truncated file?)"
            )
        if info.begin < expected_begin:
            raise LoaderError(f"{where}: overlaps the tensor before it")
        if info.begin > expected_begin:
            raise LoaderError(f"{where}: leaves a gap after the tensor before it")
        bits = math.prod(info.shape) * info.dtype.bits
        if bits % 8 or bits // 8 != info.end - info.begin:
            raise LoaderError(
                f"{where}: shape {list(info.shape)} of dtype {info.dtype.code} needs "
                f"{bits / 8:g} bytes but the offsets hold {info.end - info.begin}"
            )
        expected_begin = info.end
    if expected_begin != file_size:
        raise LoaderError(
            f"{path}: {file_size - expected_begin} bytes after the last tensor; the header "
            f"accounts for {expected_begin - data_start} of the {data_size} data bytes"
        )


def unreadable_reason(dtype: SafetensorsDtype) -> str | None:
    """Why tensors of this dtype cannot become float matrices here; None when they can."""
    if dtype.code in _NUMPY_FLOATS or dtype.code == "BF16":
        return None
    if dtype.code in _ML_DTYPES_FLOAT8:
        try:
            import ml_dtypes
        except ImportError:
            return f"unsupported dtype {dtype.code} (install ml_dtypes)"
        if not hasattr(ml_dtypes, _ML_DTYPES_FLOAT8[dtype.code]):
            return f"unsupported dtype {dtype.code} (upgrade ml_dtypes)"
        return None
    if dtype.code == "BOOL":
        return "boolean tensor, not analyzed"
    if dtype.code[0] in "IU":
        return f"integer tensor ({dtype.name}), not analyzed"
    if dtype.code == "C64":
        return "complex tensor (complex64), not analyzed"
    return f"unsupported dtype {dtype.code}"


def tensor_entry(info: TensorInfo) -> TensorEntry:
    """The state-dict view of a header entry."""
    return TensorEntry(
        key=info.key,
        shape=info.shape,
        dtype=info.dtype.name,
        unreadable=unreadable_reason(info.dtype),
    )


def read_tensor(path: Path, info: TensorInfo) -> np.ndarray:
    """Read one tensor's bytes (only those) and decode them to a float array of its shape.

    F16, F32 and F64 keep their dtype; BF16 is widened exactly to float32 by shifting its
    16 bits into the high half of a float32; 8-bit floats go through ml_dtypes to float32.
    """
    reason = unreadable_reason(info.dtype)
    if reason is not None:
        raise LoaderError(f"{path}: tensor {info.key!r}: {reason}")
    raw = np.empty(info.end - info.begin, dtype=np.uint8)
    try:
        with path.open("rb", buffering=0) as stream:
            stream.seek(info.begin)
            view = raw.data
            filled = 0
            while filled < raw.size:
                count = stream.readinto(view[filled:])
                if not count:
                    raise LoaderError(
                        f"{path}: tensor {info.key!r}: file ended {raw.size - filled} bytes "
                        "early (changed or truncated since it was opened?)"
                    )
                filled += count
    except OSError as error:
        raise LoaderError(f"{path}: cannot read: {error.strerror or error}") from error
    code = info.dtype.code
    if code in _NUMPY_FLOATS:
        stored = _NUMPY_FLOATS[code]
        values = raw.view(stored).astype(stored.newbyteorder("="), copy=False)
    elif code == "BF16":
        values = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        import ml_dtypes

        float8: np.dtype[Any] = np.dtype(getattr(ml_dtypes, _ML_DTYPES_FLOAT8[code]))
        values = raw.view(float8).astype(np.float32)
    return values.reshape(info.shape)


def open_safetensors(path: Path) -> Checkpoint:
    """Open one `.safetensors` file: its `.weight` tensors in sorted key order, ids from 0.

    Only the header is read now. Raises LoaderError when the file is missing, unreadable or
    not a valid safetensors file.
    """
    if not path.exists():
        raise LoaderError(f"{path}: no such file")
    header = read_header(path)
    infos = sorted(header.tensors, key=lambda info: info.key)
    return StateDictCheckpoint(
        path,
        "safetensors",
        [(tensor_entry(info), tensor_reader(path, info)) for info in infos],
    )


def tensor_reader(path: Path, info: TensorInfo) -> TensorReader:
    """A reader bound to one tensor of one file (the key it is called with is that tensor's)."""

    def read(key: str) -> np.ndarray:
        return read_tensor(path, info)

    return read
