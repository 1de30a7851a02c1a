"""Reads GGUF files (llama.cpp's format) with the `gguf` package's GGUFReader, each tensor
dequantized to float32 by `gguf.quants.dequantize` when its layer is analyzed.

Before the reader sees a file, wwcli walks its header itself (`scan_header`): counts, string
and array lengths, dimensions and tensor offsets are checked against the file's size with exact
integers. GGUFReader trusts them: a tensor count or an array length of 2^40 makes it loop for
hours, and a dimension product past 2^64 wraps around in numpy. So a header declaring a tensor
of 2^40 elements, or one whose bytes lie beyond the file, is refused before anything is
allocated; the reader then only maps the file (`np.memmap`) and slices it.

GGUF lists a tensor's dimensions innermost first (ne[0] is the row length); wwcli reports the
numpy shape, reversed, which is PyTorch's (out, in) for a linear weight converted from a
Hugging Face model. The quantization type (Q4_K, Q8_0, F16, ...) is the layer's dtype.

Layers are typed by llama.cpp's tensor names: `token_embd` (and `pos_embd`, `token_types`) ->
embedding; `blk.N.attn_q/k/v/output`, `ffn_up/down/gate`, `output` and every other 2-D weight
-> dense; `*_norm` -> norm. weightwatcher 0.7.7 reads no GGUF file; ids number the `.weight`
tensors in file order, as for a state dict.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wwcli.loaders._statedict import StateDictCheckpoint, TensorEntry, TensorReader
from wwcli.loaders.interface import (
    MAX_LAYERS,
    Checkpoint,
    LoaderError,
    check_layer_count,
    open_regular,
)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
"""GGML_MAX_DIMS: no GGUF tensor has more dimensions."""
MAX_COUNT = 2**63 - 1

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""GGUF metadata value type -> bytes of one value (8 is a string, 9 an array)."""
_STRING, _ARRAY, _UINT32 = 8, 9, 4

_DEQUANTIZED = frozenset(
    {
        "F32",
        "F16",
        "BF16",
        "F64",
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ2_S",
        "IQ3_XXS",
        "IQ3_S",
        "IQ1_S",
        "IQ1_M",
        "IQ4_NL",
        "IQ4_XS",
        "TQ1_0",
        "TQ2_0",
        "MXFP4",
    }
)
"""Quantization types gguf.quants.dequantize turns into float32 (F64 is cast)."""

INSTALL_HINT = "install wwcli[gguf] to read it"


@dataclass(frozen=True)
class GgufTensor:
    """One tensor as the header declares it, checked against the file."""

    name: str
    """Tensor name (`blk.0.attn_q.weight`)."""
    dims: tuple[int, ...]
    """Dimensions as GGUF lists them, innermost first."""
    type_code: int
    """GGML quantization type code."""
    offset: int
    """First byte in the file (the data section's start plus the tensor's offset)."""
    nbytes: int
    """Bytes its data takes."""

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy shape: dims reversed."""
        return tuple(reversed(self.dims))


class _Header:
    """A bounded cursor over a GGUF header: every read is checked against the file's end."""

    def __init__(self, path: Path, data: Any, size: int, order: str) -> None:
        self.path = path
        self.data = data
        self.size = size
        self.order = order
        self.offset = 0

    def take(self, count: int) -> bytes:
        if count < 0 or self.offset + count > self.size:
            raise LoaderError(
                f"{self.path}: GGUF header runs past the end of the file at byte {self.offset} "
                "(truncated or crafted)"
            )
        chunk = bytes(self.data[self.offset : self.offset + count])
        self.offset += count
        return chunk

    def skip(self, count: int, what: str) -> None:
        if count < 0 or self.offset + count > self.size:
            raise LoaderError(
                f"{self.path}: GGUF header declares {what} of {count} bytes at byte "
                f"{self.offset}, beyond the file's {self.size} bytes"
            )
        self.offset += count

    def u32(self) -> int:
        value: int = struct.unpack(self.order + "I", self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack(self.order + "Q", self.take(8))[0]
        return value

    def string(self, what: str) -> str:
        length = self.u64()
        if length > self.size - self.offset:
            raise LoaderError(
                f"{self.path}: GGUF header declares {what} of {length} bytes, beyond the file's "
                f"{self.size} bytes"
            )
        raw = self.take(length)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise LoaderError(f"{self.path}: GGUF {what} is not UTF-8") from error


def scan_header(path: Path, data: Any, size: int) -> tuple[list[GgufTensor], dict[str, Any]]:
    """The tensors a GGUF header declares and its scalar metadata, every count, length, shape and
    offset checked against the file's `size` before anything is allocated for it. Raises
    LoaderError for a header that is truncated, inconsistent or declares data beyond the file."""
    if size < 24 or bytes(data[:4]) != GGUF_MAGIC:
        raise LoaderError(f"{path}: not a GGUF file (no GGUF magic)")
    order = "<"
    (version,) = struct.unpack("<I", bytes(data[4:8]))
    if version & 0xFFFF == 0:
        order = ">"
        (version,) = struct.unpack(">I", bytes(data[4:8]))
    if version not in SUPPORTED_VERSIONS:
        raise LoaderError(f"{path}: GGUF version {version}, not one wwcli reads (2, 3)")
    header = _Header(path, data, size, order)
    header.offset = 8
    tensor_count, kv_count = header.u64(), header.u64()
    # Each metadata entry takes at least 12 bytes (key length, type), each tensor 24.
    if tensor_count > MAX_LAYERS:
        check_layer_count(path, tensor_count)
    if kv_count * 12 + tensor_count * 24 > size:
        raise LoaderError(
            f"{path}: GGUF header declares {tensor_count} tensors and {kv_count} metadata "
            f"entries, more than its {size} bytes can hold"
        )
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = header.string("a metadata key")
        value_type = header.u32()
        metadata[key] = _value(header, value_type, key)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise LoaderError(f"{path}: GGUF general.alignment {alignment!r} is not a power of two")
    declared: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(tensor_count):
        name = header.string("a tensor name")
        n_dims = header.u32()
        if n_dims > MAX_DIMS:
            raise LoaderError(f"{path}: GGUF tensor {name!r} has {n_dims} dimensions (at most 4)")
        dims = tuple(header.u64() for _ in range(n_dims))
        declared.append((name, dims, header.u32(), header.u64()))
    data_start = -(-header.offset // alignment) * alignment
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors: list[GgufTensor] = []
    names: set[str] = set()
    for name, dims, type_code, relative in declared:
        if name in names:
            raise LoaderError(f"{path}: GGUF file lists tensor {name!r} twice")
        names.add(name)
        try:
            block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_code)]
        except (ValueError, KeyError) as error:
            raise LoaderError(
                f"{path}: GGUF tensor {name!r} has unknown type code {type_code}"
            ) from error
        elements = math.prod(dims)
        if elements > MAX_COUNT or (dims and dims[0] % block_size):
            raise LoaderError(
                f"{path}: GGUF tensor {name!r} declares dims {list(dims)} ({elements} elements), "
                "impossible for its type"
            )
        nbytes = elements // block_size * type_size
        start = data_start + relative
        if start + nbytes > size:
            raise LoaderError(
                f"{path}: GGUF tensor {name!r} declares {elements} elements ({nbytes} bytes at "
                f"byte {start}), beyond the file's {size} bytes"
            )
        tensors.append(GgufTensor(name, dims, type_code, start, nbytes))
    return tensors, metadata


def _value(header: _Header, value_type: int, key: str) -> Any:
    """A metadata value: scalars and strings decoded, arrays skipped over (bounded)."""
    if value_type == _STRING:
        return header.string(f"metadata {key!r}")
    if value_type in _SCALAR_SIZES:
        raw = header.take(_SCALAR_SIZES[value_type])
        if value_type == _UINT32:
            return struct.unpack(header.order + "I", raw)[0]
        return None
    if value_type == _ARRAY:
        item_type, count = header.u32(), header.u64()
        if item_type in _SCALAR_SIZES:
            header.skip(count * _SCALAR_SIZES[item_type], f"array {key!r}")
        elif item_type == _STRING:
            if count * 8 > header.size - header.offset:
                raise LoaderError(
                    f"{header.path}: GGUF array {key!r} declares {count} strings, more than the "
                    "file can hold"
                )
            for _ in range(count):
                header.skip(header.u64(), f"a string of array {key!r}")
        else:
            # Nested arrays: GGUFReader reads them one element at a time; so does this.
            if count * 12 > header.size - header.offset:
                raise LoaderError(f"{header.path}: GGUF array {key!r} is longer than the file")
            for _ in range(count):
                _value(header, item_type, key)
        return None
    raise LoaderError(f"{header.path}: GGUF metadata {key!r} has unknown value type {value_type}")


def gguf_dtype(type_code: int) -> str:
    """The quantization type's name ("Q4_K"), or its code when gguf does not know it."""
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_code).name
    except ValueError:
        return str(type_code)


def open_gguf(path: Path) -> Checkpoint:
    """Open a GGUF file; only its header is read (checked first, see `scan_header`)."""
    try:
        import gguf
    except ImportError as error:
        raise LoaderError(f"{path}: a GGUF file: {INSTALL_HINT}") from error
    with open_regular(path) as stream:
        size = os.fstat(stream.fileno()).st_size
        if size < 24:
            raise LoaderError(f"{path}: not a GGUF file (too short)")
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
            tensors, _ = scan_header(path, data, size)
    reader = gguf.GGUFReader(path)
    read = {tensor.name: tensor for tensor in reader.tensors}
    if sorted(read) != sorted(tensor.name for tensor in tensors):
        raise LoaderError(f"{path}: the gguf package reads other tensors than the header lists")
    entries: list[tuple[TensorEntry, TensorReader]] = []
    for tensor in tensors:
        dtype = gguf_dtype(tensor.type_code)
        unreadable = None if dtype in _DEQUANTIZED else f"{dtype} tensor, not dequantized"
        entry = TensorEntry(tensor.name, tensor.shape, dtype, unreadable)
        entries.append((entry, _reader(path, read, tensor)))
    return StateDictCheckpoint(
        path,
        "gguf",
        entries,
        ids_note="weightwatcher 0.7.7 reads no GGUF file: the ids number the '.weight' tensors "
        "in file order",
        close=lambda: _drop(read),
    )


def _drop(read: dict[str, Any]) -> None:
    read.clear()


def _reader(path: Path, read: dict[str, Any], declared: GgufTensor) -> TensorReader:
    def dequantized(key: str) -> np.ndarray:
        from gguf import GGMLQuantizationType, quants

        tensor = read.get(key)
        if tensor is None:
            raise LoaderError(f"{path}: the checkpoint is closed")
        if int(tensor.data_offset) != declared.offset or int(tensor.n_bytes) != declared.nbytes:
            raise LoaderError(f"{path}: tensor {key!r} is not where the header says")
        qtype = GGMLQuantizationType(declared.type_code)
        if qtype == GGMLQuantizationType.F64:
            values = np.asarray(tensor.data, dtype=np.float64)
        else:
            values = quants.dequantize(np.asarray(tensor.data), qtype)
        return np.asarray(values).reshape(declared.shape)

    return dequantized
