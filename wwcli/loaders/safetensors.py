"""Reads `.safetensors` files without torch: our own header parser, one tensor at a time.

A safetensors file is an 8-byte little-endian header length n, n bytes of JSON (tensor name ->
dtype, shape, data_offsets; an optional `__metadata__` of strings), then the data section. The
header is validated as the reference implementation does; a tensor's bytes are read only when
its matrices are asked for, so memory follows the largest tensor, not the file.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wwcli.loaders._statedict import (
    StateDictCheckpoint,
    TensorEntry,
    TensorReader,
    metadata_ties,
)
from wwcli.loaders.interface import (
    MAX_LAYERS,
    Checkpoint,
    LoaderError,
    check_layer_count,
    open_regular,
)

MAX_HEADER_BYTES = 100_000_000
"""The reference implementation refuses headers above this size (a header bomb)."""

HEADER_LENGTH_BYTES = 8

MAX_COUNT = 2**63 - 1
"""The largest shape dimension, element count and data offset accepted: the reference
implementation reads them as 64-bit unsigned integers and numpy indexes with signed ones."""

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
"""A UTF-16 surrogate on its own: JSON's `\\ud800` escape allows it, Unicode does not."""

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""The JSON escape of a surrogate, paired or not."""

_SHORT = reprlib.Repr()
_SHORT.maxstring = 80
_SHORT.maxother = 80
_SHORT.maxlist = 8
_SHORT.maxdict = 4
_SHORT.maxlevel = 3


def shown(value: object) -> str:
    """`repr(value)`, cut short: a value from a crafted file may be a string of megabytes or a
    list nested a thousand deep, and an error message is one line for people."""
    return _SHORT.repr(value)


def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in `text`, as its `\\uXXXX` escape; None when there is none."""
    if text.isascii():
        return None
    found = _LONE_SURROGATE.search(text)
    return None if found is None else f"\\u{ord(found.group()):04x}"


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
        with open_regular(path) as stream:
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
            header_bytes = _read_exactly(stream, header_length)
    except OSError as error:
        raise LoaderError(f"{path}: cannot read: {error.strerror or error}") from error
    if len(header_bytes) < header_length:
        raise LoaderError(f"{path}: file ended inside the safetensors header (changed since?)")
    header = _parse_json_object(path, header_bytes)
    metadata = _parse_metadata(path, header.pop("__metadata__", None))
    check_layer_count(path, len(header))
    tensors = tuple(
        _parse_tensor_info(path, key, value, data_start) for key, value in header.items()
    )
    _check_layout(path, tensors, data_start, file_size)
    return SafetensorsHeader(path=path, tensors=tensors, metadata=metadata)


def _read_exactly(stream: Any, size: int) -> bytes:
    """Up to `size` bytes, fewer only at the end of the file (an unbuffered read may return
    less than asked)."""
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _parse_json_object(path: Path, header_bytes: bytes) -> dict[str, Any]:
    """The header as a dict, parsed as strictly as the reference implementation parses it: no
    key twice, no lone surrogate in a string, no NaN or Infinity, no integer of thousands of
    digits.

    A header of more than MAX_LAYERS tensors is refused before it is parsed, from a count of
    its "data_offsets" strings (50 ms for 100 MB), so that a header of a million tensors does
    not take a minute and gigabytes to list. A header that hides them (a `\\u005f` escape in
    the key) is stopped by its objects instead: at most MAX_LAYERS + 2 are built (the header,
    `__metadata__` and one per tensor; any other object is an error anyway).
    """
    entries = header_bytes.count(b'"data_offsets"')
    if entries > MAX_LAYERS + 2:  # + a tensor and a metadata key of that name
        raise LoaderError(
            f"{path}: lists {entries} tensors ('data_offsets' entries), more than the "
            f"{MAX_LAYERS} wwcli reads (a crafted or broken file?)"
        )
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LoaderError(f"{path}: safetensors header is not valid UTF-8 ({error})") from error
    # A lone surrogate can only come from a \\uD800-\\uDFFF escape (the UTF-8 decoder refuses
    # encoded ones); the strings are searched only when the text has such an escape.
    check_strings = _SURROGATE_ESCAPE.search(header_bytes) is not None
    objects = 0

    def strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal objects
        objects += 1
        if objects > MAX_LAYERS + 2:
            raise LoaderError(
                f"{path}: safetensors header lists more than the {MAX_LAYERS} tensors wwcli "
                "reads (a crafted or broken file?)"
            )
        if check_strings:
            for key, value in pairs:
                _check_unicode(path, key, "key")
                if isinstance(value, str):
                    _check_unicode(path, value, "string")
        result = dict(pairs)
        if len(result) < len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise LoaderError(f"{path}: safetensors header has the key {shown(key)} twice")
                seen.add(key)
        return result

    def no_constant(name: str) -> None:
        raise LoaderError(f"{path}: safetensors header is not valid JSON ({name} is not JSON)")

    try:
        header = json.loads(text, object_pairs_hook=strict_object, parse_constant=no_constant)
    except RecursionError as error:
        raise LoaderError(f"{path}: safetensors header is JSON nested too deeply") from error
    except json.JSONDecodeError as error:
        message = shown(str(error))[1:-1]
        raise LoaderError(f"{path}: safetensors header is not valid JSON ({message})") from error
    except ValueError as error:  # int() refuses more digits than sys.get_int_max_str_digits()
        raise LoaderError(
            f"{path}: safetensors header holds an integer of more than "
            f"{sys.get_int_max_str_digits()} digits, out of range"
        ) from error
    if not isinstance(header, dict):
        raise LoaderError(
            f"{path}: safetensors header is a JSON {_json_kind(header)}, not an object"
        )
    return header


def _check_unicode(path: Path, text: str, what: str) -> None:
    """LoaderError when `text` holds a lone surrogate: valid JSON, but not a Unicode string
    (the reference implementation refuses it; Python would fail later, printing it)."""
    surrogate = lone_surrogate(text)
    if surrogate is not None:
        raise LoaderError(
            f"{path}: safetensors header has a {what} that is not valid Unicode: "
            f"{shown(text)} holds a lone surrogate ({surrogate} escape)"
        )


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


def _are_counts(values: list[Any]) -> bool:
    """Every value a JSON integer from 0 to MAX_COUNT (JSON true/false are not counts).

    Written with C-level builtins (one set of types, min, max): a header lists up to
    MAX_LAYERS tensors, and this runs twice for each.
    """
    if not values:
        return True
    return set(map(type, values)) == _INT_ONLY and min(values) >= 0 and max(values) <= MAX_COUNT


_INT_ONLY = {int}


def _parse_tensor_info(path: Path, key: str, value: object, data_start: int) -> TensorInfo:
    if not isinstance(value, dict):
        raise LoaderError(f"{path}: tensor {shown(key)}: header entry is not an object")
    try:
        code = value["dtype"]
        shape = value["shape"]
        offsets = value["data_offsets"]
    except KeyError as missing:
        raise LoaderError(
            f"{path}: tensor {shown(key)}: header entry has no {missing.args[0]!r}"
        ) from None
    dtype = DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise LoaderError(f"{path}: tensor {shown(key)}: unknown dtype {shown(code)}")
    if not (isinstance(shape, list) and _are_counts(shape)):
        raise LoaderError(_bad_counts(path, key, "shape", shape))
    if not (isinstance(offsets, list) and len(offsets) == 2 and _are_counts(offsets)):
        raise LoaderError(_bad_counts(path, key, "data_offsets", offsets))
    # Zeros left out: numpy refuses a shape (0, 2**62, 2**62) although it has no elements.
    if (
        len(shape) > 1
        and (len(shape) > 2 or max(shape) > 2**31)
        and math.prod(filter(None, shape)) > MAX_COUNT
    ):
        raise LoaderError(
            f"{path}: tensor {shown(key)}: shape {shown(shape)} has more than 2**63 - 1 elements"
        )
    return TensorInfo(
        key=key,
        dtype=dtype,
        shape=tuple(shape),
        begin=data_start + offsets[0],
        end=data_start + offsets[1],
    )


def _bad_counts(path: Path, key: str, field: str, value: object) -> str:
    """The message for a shape or data_offsets that is not what the format allows."""
    where = f"{path}: tensor {shown(key)}: {field} {shown(value)}"
    if isinstance(value, list) and value and set(map(type, value)) == _INT_ONLY and min(value) >= 0:
        if field == "data_offsets" and len(value) != 2:
            return f"{where} are not two non-negative integers"
        return f"{where} {'is' if field == 'shape' else 'are'} out of range (above 2**63 - 1)"
    if field == "shape":
        return f"{where} is not a list of non-negative integers"
    return f"{where} are not two non-negative integers"


def _check_layout(
    path: Path, tensors: tuple[TensorInfo, ...], data_start: int, file_size: int
) -> None:
    """The tensors must tile the data section exactly: from its start, in offset order, no
    overlap, no gap, each as long as its shape and dtype say, the last ending with the file."""
    data_size = file_size - data_start
    expected_begin = data_start

    def where(info: TensorInfo) -> str:
        offsets = [info.begin - data_start, info.end - data_start]
        return f"{path}: tensor {shown(info.key)} (data_offsets {offsets})"

    for info in sorted(tensors, key=lambda info: (info.begin, info.end)):
        if info.end < info.begin:
            raise LoaderError(f"{where(info)}: offsets end before they begin")
        if info.end > file_size:
            raise LoaderError(
                f"{where(info)}: offsets run past the end of the {data_size}-byte data section "
                "(truncated file?)"
            )
        if info.begin < expected_begin:
            raise LoaderError(f"{where(info)}: overlaps the tensor before it")
        if info.begin > expected_begin:
            raise LoaderError(f"{where(info)}: leaves a gap after the tensor before it")
        # Exact integers: elements are at most 2**63 - 1, so bits at most 2**69, but a float
        # would round a byte count past 2**53 (and a crafted shape overflowed it before).
        bits = math.prod(info.shape) * info.dtype.bits
        if bits % 8 or bits // 8 != info.end - info.begin:
            needs = str(bits // 8) if bits % 8 == 0 else f"{bits / 8:g}"
            raise LoaderError(
                f"{where(info)}: shape {shown(list(info.shape))} of dtype {info.dtype.code} "
                f"needs {needs} bytes but the offsets hold {info.end - info.begin}"
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
        raise LoaderError(f"{path}: tensor {shown(info.key)}: {reason}")
    raw = np.empty(info.end - info.begin, dtype=np.uint8)
    try:
        with open_regular(path) as stream:
            stream.seek(info.begin)
            view = raw.data
            filled = 0
            while filled < raw.size:
                count = stream.readinto(view[filled:])
                if not count:
                    raise LoaderError(
                        f"{path}: tensor {shown(info.key)}: file ended {raw.size - filled} bytes "
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

    Only the header is read now. A tensor that `__metadata__` records as kept for a dropped
    duplicate (`safetensors.torch.save_model` writes `{"lm_head.weight":
    "model.embed_tokens.weight"}`) gets `tied_to` the dropped one's name. Raises LoaderError
    when the file is missing, unreadable or not a valid safetensors file.
    """
    if not path.exists():
        raise LoaderError(f"{path}: no such file")
    header = read_header(path)
    infos = sorted(header.tensors, key=lambda info: info.key)
    return StateDictCheckpoint(
        path,
        "safetensors",
        [(tensor_entry(info), tensor_reader(path, info)) for info in infos],
        tied=metadata_ties(header.metadata, [info.key for info in infos]),
    )


def tensor_reader(path: Path, info: TensorInfo) -> TensorReader:
    """A reader bound to one tensor of one file (the key it is called with is that tensor's)."""

    def read(key: str) -> np.ndarray:
        return read_tensor(path, info)

    return read
