"""Reads ONNX models (`.onnx`, with external data files beside them): the initializers, typed by
the op that consumes them, numbered as weightwatcher 0.7.7 numbers an ONNX model.

The protobuf is parsed by the `onnx` package (`onnx.load(..., load_external_data=False)`), whose
C++ parser is untrusted-input code like HDF5's: `open_onnx` runs in the helper process
(`isolated.open_onnx_isolated`) under the same deadlines, memory cap and minimal environment.
External data is never loaded by onnx: wwcli reads it itself, one tensor at a time, after
checking its `location` (relative, no `..`, no NUL, a regular file whose real path is inside the
model's folder), `offset` and `length` (decimal integers, the bytes the tensor's shape and dtype
need, within the file).

Ids: weightwatcher 0.7.7 (`ONNXLayer`) numbers `model.graph.initializer` in order, every
initializer consuming one, and types them by rank (2-D dense, 4-D conv2d). wwcli keeps those ids
and types each initializer by the op that consumes it instead:

- `MatMul` (either input, 2-D) and `Gemm` (`transA`, `transB`) -> dense, read as (out, in);
- `Conv` and `ConvTranspose` -> conv2d (4-D) or conv1d (3-D), sliced as PyTorch's kernels;
- `Gather` of a 2-D initializer (its data input) -> embedding;
- `LSTM`, `GRU`, `RNN` `W` and `R` (num_directions, gates x hidden, in) -> dense, one matrix
  per gate block and direction (4, 3 and 1 gates), pooled like conv kernel positions;
- the scale of `BatchNormalization`, `LayerNormalization`, ... -> norm, never analyzed;
- anything else by rank, as weightwatcher types it (2-D dense, 4-D conv2d).

PyTorch's exporter names an initializer it made itself `onnx::MatMul_238`; such a layer takes
the name of the module that consumes it (`/fc2/MatMul` -> `fc2`, `/lstm/LSTM` -> `lstm.W`,
`lstm.R`) when that name is free. A `.weight` suffix is dropped, as for state dicts.
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wwcli.loaders._statedict import WEIGHT_SUFFIX, matrices_of_tensor
from wwcli.loaders.interface import (
    Checkpoint,
    LayerSpec,
    LayerType,
    LoaderError,
    check_layer_count,
    open_regular,
)

MAX_MODEL_BYTES = 2**31
"""protobuf's limit for one message: larger models keep their weights in external data."""

MAX_COUNT = 2**63 - 1
"""The largest dimension, element count, offset or length accepted."""

_FLOAT_DTYPES: dict[int, tuple[str, str]] = {
    1: ("float32", "<f4"),
    10: ("float16", "<f2"),
    11: ("float64", "<f8"),
    16: ("bfloat16", "<u2"),
}
"""ONNX TensorProto data types wwcli reads: code -> (name, numpy dtype of the raw bytes)."""

_OTHER_DTYPES = {
    0: "undefined",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    8: "string",
    9: "bool",
    12: "uint32",
    13: "uint64",
    14: "complex64",
    15: "complex128",
    17: "float8e4m3fn",
    18: "float8e4m3fnuz",
    19: "float8e5m2",
    20: "float8e5m2fnuz",
    21: "uint4",
    22: "int4",
    23: "float4e2m1",
}

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
"""Gate blocks of an ONNX recurrent op's W and R."""

_BIAS_INPUTS = {"Gemm": 2, "Conv": 2, "ConvTranspose": 2, "LSTM": 3, "GRU": 3, "RNN": 3}
"""The first input of an op that is a bias, sequence lengths or initial state, never a matrix."""

_NORM_OPS = frozenset(
    {
        "BatchNormalization",
        "LayerNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "RMSNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
    }
)

_EXTERNAL = 1
"""TensorProto.DataLocation.EXTERNAL"""

_MODULE_PATH = re.compile(r"^/(.+)/[^/]+$")
"""PyTorch's exporter names a node by its module path and op: `/encoder/fc2/MatMul`."""


@dataclass(frozen=True)
class ExternalData:
    """Where an initializer's bytes are outside the model file, checked against that file."""

    file: Path
    """The data file, inside the model's folder."""
    offset: int
    """First byte of the tensor in the file."""
    length: int
    """Bytes of the tensor: exactly what its shape and dtype need."""


@dataclass(frozen=True)
class _Initializer:
    """One initializer as listed: where its values are and how its matrices are cut."""

    spec: LayerSpec
    """The layer as listed."""
    index: int
    """Index in `model.graph.initializer`."""
    external: ExternalData | None
    """Where its bytes are when they are not in the model file."""
    transpose: bool
    """True when the stored 2-D matrix is (in, out) (MatMul's B, Gemm's B without transB)."""
    gates: int
    """Gate blocks of a recurrent op's W or R (1 for every other layer)."""


class OnnxCheckpoint(Checkpoint):
    """An ONNX model's initializers; values read one initializer at a time."""

    def __init__(self, path: Path, model: Any, initializers: list[_Initializer]) -> None:
        self.path = path
        self.format = "onnx"
        self._model = model
        self._initializers = initializers
        self.data_size = sum(
            {
                init.external.file: init.external.file.stat().st_size
                for init in initializers
                if init.external is not None
            }.values()
        )
        """Bytes of external data files: the helper process sizes its memory cap by them."""

    def layers(self) -> list[LayerSpec]:
        return [initializer.spec for initializer in self._initializers]

    def matrices(self, layer: LayerSpec) -> list[np.ndarray]:
        if self._model is None:
            raise LoaderError(f"{self.path}: the checkpoint is closed")
        if not 0 <= layer.layer_id < len(self._initializers):
            raise LoaderError(f"{self.path}: no layer with id {layer.layer_id}")
        initializer = self._initializers[layer.layer_id]
        spec = initializer.spec
        if spec.name != layer.name:
            raise LoaderError(f"{self.path}: layer {layer.layer_id} is {spec.name!r}")
        if spec.skip_reason is not None:
            raise LoaderError(
                f"{self.path}: layer {layer.layer_id} ({spec.name}) is not analyzable: "
                f"{spec.skip_reason}"
            )
        tensor = self.tensor(layer.layer_id)
        return _matrices(tensor, initializer)

    def tensor(self, layer_id: int) -> np.ndarray:
        """The values of initializer `layer_id`, as stored (float32 for bfloat16)."""
        initializer = self._initializers[layer_id]
        proto = self._model.graph.initializer[initializer.index]
        shape = initializer.spec.shape
        name, raw_dtype = _FLOAT_DTYPES[int(proto.data_type)]
        if initializer.external is not None:
            data = _read_external(self.path, initializer.external)
            values = np.frombuffer(data, dtype=raw_dtype).reshape(shape)
        else:
            from onnx import numpy_helper

            values = np.asarray(numpy_helper.to_array(proto))
            if values.shape != shape:
                raise LoaderError(
                    f"{self.path}: initializer {proto.name!r} holds shape {values.shape}, "
                    f"not its declared {shape}"
                )
            if name == "bfloat16":
                values = np.ascontiguousarray(values).view(np.uint16)
        if name == "bfloat16":
            # bfloat16 is the upper half of a float32: widening is exact.
            values = (values.astype(np.uint32) << 16).view(np.float32)
        return values

    def close(self) -> None:
        self._model = None


def open_onnx(path: Path) -> Checkpoint:
    """Open an ONNX model in this process (the helper process calls this; see the module
    docstring). Raises LoaderError for a file onnx cannot parse or whose external data is not
    where it may be."""
    try:
        import onnx
    except ImportError as error:
        raise LoaderError(f"{path}: an ONNX model: install wwcli[onnx] to read it") from error
    with open_regular(path) as stream:
        size = os.fstat(stream.fileno()).st_size
        if size > MAX_MODEL_BYTES:
            raise LoaderError(f"{path}: an ONNX file over 2 GiB, the most protobuf parses")
        content = stream.read()
    try:
        model = onnx.load_model_from_string(content)
    except Exception as error:  # protobuf's DecodeError and whatever else the parser raises
        raise LoaderError(
            f"{path}: not a readable ONNX model ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:200]})"
        ) from error
    del content
    graph = model.graph
    check_layer_count(path, len(graph.initializer), "initializers")
    check_layer_count(path, len(graph.node), "nodes")
    consumers = _consumers(graph)
    names = _layer_names(graph, consumers)
    folder = path.resolve().parent
    initializers = [
        _describe(path, folder, index, proto, consumers.get(proto.name, []), names[index])
        for index, proto in enumerate(graph.initializer)
    ]
    return OnnxCheckpoint(path, model, initializers)


@dataclass(frozen=True)
class _Use:
    """One input of a node that an initializer feeds."""

    op: str
    """The node's op_type."""
    node_name: str
    """The node's name."""
    position: int
    """Which input of the node."""
    attributes: dict[str, int]
    """The node's integer attributes (transA, transB, ...)."""


def _consumers(graph: Any) -> dict[str, list[_Use]]:
    """Initializer name -> the inputs of the main graph's nodes it feeds, in node order."""
    initializer_names = {proto.name for proto in graph.initializer}
    uses: dict[str, list[_Use]] = {}
    for node in graph.node:
        attributes = {
            attribute.name: int(attribute.i) for attribute in node.attribute if attribute.type == 2
        }
        for position, name in enumerate(node.input):
            if name in initializer_names:
                uses.setdefault(name, []).append(
                    _Use(str(node.op_type), str(node.name), position, attributes)
                )
    return uses


def _layer_names(graph: Any, consumers: dict[str, list[_Use]]) -> list[str]:
    """Each initializer's layer name (see the module docstring), unique."""
    names = [_strip_weight(str(proto.name)) for proto in graph.initializer]
    taken = set(names)
    for index, proto in enumerate(graph.initializer):
        if not str(proto.name).startswith("onnx::"):
            continue
        uses = consumers.get(proto.name, [])
        if not uses:
            continue
        use = uses[0]
        found = _MODULE_PATH.match(use.node_name)
        if found is None:
            continue
        module = found.group(1).replace("/", ".")
        if use.op in _GATES:
            module = f"{module}.{'XWRB'[use.position] if use.position < 4 else use.position}"
        if module not in taken:
            taken.add(module)
            names[index] = module
    return names


def _strip_weight(name: str) -> str:
    return name[: -len(WEIGHT_SUFFIX)] if name.endswith(WEIGHT_SUFFIX) else name


def _describe(
    path: Path, folder: Path, index: int, proto: Any, uses: list[_Use], name: str
) -> _Initializer:
    shape = tuple(int(side) for side in proto.dims)
    if any(side < 0 or side > MAX_COUNT for side in shape) or math.prod(shape) > MAX_COUNT:
        raise LoaderError(f"{path}: initializer {proto.name!r} has an impossible shape {shape}")
    data_type = int(proto.data_type)
    dtype_name = _FLOAT_DTYPES.get(data_type, (_OTHER_DTYPES.get(data_type, str(data_type)), ""))[0]
    external = None
    if int(proto.data_location) == _EXTERNAL:
        external = _external_data(path, folder, proto, shape, data_type)
    layer_type, transpose, gates, kernel_axis = _layer_type(shape, uses)
    skip_reason: str | None = None
    rank = len(shape)
    if layer_type is LayerType.NORM:
        skip_reason = "normalization layer"
    elif layer_type is LayerType.OTHER and any(
        use.op in _BIAS_INPUTS and use.position >= _BIAS_INPUTS[use.op] for use in uses
    ):
        skip_reason = "bias or state of " + next(use.op for use in uses if use.op in _BIAS_INPUTS)
    elif layer_type is LayerType.OTHER:
        skip_reason = "scalar" if rank == 0 else f"{rank}-D initializer, not analyzed"
    elif data_type not in _FLOAT_DTYPES:
        skip_reason = f"{dtype_name} initializer, not analyzed"
    elif 0 in shape:
        skip_reason = "empty tensor"
    elif external is None and not _holds_values(proto, shape):
        skip_reason = "holds no values for its shape"
    N = M = 0
    rf = 1
    if layer_type in (LayerType.DENSE, LayerType.EMBEDDING) and rank == 2:
        N, M = max(shape), min(shape)
    elif layer_type is LayerType.DENSE and rank == 3:
        # A recurrent op's W or R: (num_directions, gates x hidden, in or hidden).
        directions, rows, columns = shape
        hidden = rows // gates if rows % gates == 0 else 0
        if hidden == 0:
            skip_reason = skip_reason or f"recurrent weight of shape {shape} has no {gates} gates"
        N, M, rf = max(hidden, columns), min(hidden, columns), directions * gates
    elif layer_type in (LayerType.CONV1D, LayerType.CONV2D):
        N, M, rf = max(shape[:2]), min(shape[:2]), math.prod(shape[2:])
    spec = LayerSpec(
        layer_id=index,
        name=name,
        layer_type=layer_type,
        shape=shape,
        dtype=dtype_name,
        N=N,
        M=M,
        rf=rf,
        skip_reason=skip_reason,
        kernel_axis=kernel_axis,
    )
    return _Initializer(spec, index, external, transpose, gates)


def _layer_type(
    shape: tuple[int, ...], uses: list[_Use]
) -> tuple[LayerType, bool, int, int | None]:
    """(type, stored as (in, out), gate blocks, conv1d kernel axis) of an initializer."""
    rank = len(shape)
    for use in uses:
        if use.op in _BIAS_INPUTS and use.position >= _BIAS_INPUTS[use.op]:
            return LayerType.OTHER, False, 1, None
        if use.op == "Gemm" and use.position in (0, 1) and rank == 2:
            flag = use.attributes.get("transB" if use.position == 1 else "transA", 0)
            # Gemm computes A' B' (a prime: transposed when its flag is set). A weight on the
            # right is B' = (in, out): stored so unless transB. One on the left is A' = (out, in).
            return LayerType.DENSE, (flag == 0) if use.position == 1 else (flag != 0), 1, None
        if use.op == "MatMul" and use.position in (0, 1) and rank == 2:
            return LayerType.DENSE, use.position == 1, 1, None
        if use.op in ("Conv", "ConvTranspose") and use.position == 1:
            if rank == 4:
                return LayerType.CONV2D, False, 1, None
            if rank == 3:
                return LayerType.CONV1D, False, 1, 2
        if use.op == "Gather" and use.position == 0 and rank == 2:
            return LayerType.EMBEDDING, False, 1, None
        if use.op in _GATES and use.position in (1, 2) and rank == 3:
            return LayerType.DENSE, False, _GATES[use.op], None
        if use.op in _NORM_OPS and use.position == 1:
            return LayerType.NORM, False, 1, None
    if rank == 2:
        return LayerType.DENSE, False, 1, None
    if rank == 4:
        return LayerType.CONV2D, False, 1, None
    return LayerType.OTHER, False, 1, None


def _holds_values(proto: Any, shape: tuple[int, ...]) -> bool:
    """Whether an embedded float initializer stores as many values as its shape needs."""
    count = math.prod(shape)
    data_type = int(proto.data_type)
    if proto.raw_data:
        return len(proto.raw_data) == count * int(_FLOAT_DTYPES[data_type][1][2])
    if data_type == 1:
        return len(proto.float_data) == count
    if data_type == 11:
        return len(proto.double_data) == count
    return len(proto.int32_data) == count  # float16 and bfloat16 as 16-bit integers


def _matrices(tensor: np.ndarray, initializer: _Initializer) -> list[np.ndarray]:
    spec = initializer.spec
    if tensor.shape != spec.shape:
        raise LoaderError(f"{spec.name}: tensor has shape {tensor.shape}, expected {spec.shape}")
    if tensor.ndim == 2:
        return [np.ascontiguousarray(tensor.T) if initializer.transpose else tensor]
    if tensor.ndim == 3 and spec.layer_type is LayerType.DENSE:
        gates = initializer.gates
        return [
            np.ascontiguousarray(block)
            for direction in tensor
            for block in np.split(direction, gates, axis=0)
        ]
    return matrices_of_tensor(tensor, spec)  # Conv kernels: (out, in, k...) as PyTorch's


# --- External data: our own bounded reading ------------------------------------------------------


def _external_data(
    path: Path, folder: Path, proto: Any, shape: tuple[int, ...], data_type: int
) -> ExternalData | None:
    """The checked place of an initializer's external bytes; None for a tensor wwcli would not
    read anyway (not a float dtype). Raises LoaderError for a place outside the model's folder,
    a malformed offset or length, or bytes beyond the data file."""
    where = f"initializer {proto.name!r}"
    entries: dict[str, str] = {}
    for entry in proto.external_data:
        if entry.key in entries:
            raise LoaderError(f"{path}: {where} gives its external {entry.key!r} twice")
        entries[str(entry.key)] = str(entry.value)
    location = entries.get("location")
    if not location:
        raise LoaderError(f"{path}: {where} is external data without a location")
    data_file = checked_location(path, folder, location, where)
    offset = _count(path, where, "offset", entries.get("offset", "0"))
    if data_type not in _FLOAT_DTYPES:
        return None
    needed = math.prod(shape) * int(_FLOAT_DTYPES[data_type][1][2])
    length = _count(path, where, "length", entries.get("length", str(needed)))
    if length != needed:
        raise LoaderError(
            f"{path}: {where} has external length {length} but its shape {list(shape)} needs "
            f"{needed} bytes"
        )
    with open_regular(data_file) as stream:
        file_size = os.fstat(stream.fileno()).st_size
    if offset + length > file_size:
        raise LoaderError(
            f"{path}: {where} lies at bytes {offset}..{offset + length} of "
            f"{location!r}, beyond its {file_size} bytes"
        )
    return ExternalData(data_file, offset, length)


def checked_location(path: Path, folder: Path, location: str, where: str) -> Path:
    """The data file an external `location` names, refused unless it is a relative name without
    `..` whose real path (links followed) is a regular file inside `folder` (the model's real
    folder)."""
    parts = re.split(r"[/\\]", location)
    if (
        "\x00" in location
        or location.startswith(("/", "\\"))
        or re.match(r"^[A-Za-z]:", location)
        or ".." in parts
    ):
        raise LoaderError(
            f"{path}: {where} takes its data from {location!r}, outside the model's folder; "
            "wwcli reads external data only from files beside the model"
        )
    candidate = folder / Path(*[part for part in parts if part not in ("", ".")])
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError) as error:
        raise LoaderError(f"{path}: {where}: external data file {location!r} is missing") from error
    if real != folder and folder not in real.parents:
        raise LoaderError(
            f"{path}: {where}: external data file {location!r} is a link to {real}, outside "
            "the model's folder; wwcli reads only files inside it"
        )
    mode = real.stat().st_mode
    if not stat.S_ISREG(mode):
        raise LoaderError(f"{path}: {where}: external data file {location!r} is not a regular file")
    return real


def _count(path: Path, where: str, key: str, text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,19}", text) or int(text) > MAX_COUNT:
        raise LoaderError(f"{path}: {where} has an external {key} {text[:40]!r}, not a byte count")
    return int(text)


def _read_external(path: Path, external: ExternalData) -> bytes:
    with open_regular(external.file) as stream:
        stream.seek(external.offset)
        data = stream.read(external.length)
    if len(data) != external.length:
        raise LoaderError(f"{path}: external data file {external.file.name} was truncated")
    return data
