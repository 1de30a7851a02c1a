"""Read Keras checkpoints (`.keras` zip, legacy `.h5`, weights-only `.weights.h5`) with zipfile,
json and h5py only, numbering the layers as weightwatcher 0.7.7 numbers the loaded model.

Nothing here imports tensorflow or keras, and nothing from a file's config is ever evaluated:
`keras.models.load_model` can run code named in the config (CVE-2024-3660, CVE-2025-1550,
CVE-2025-9905), so the config is only read as data. Unknown or unsafe layers (Lambda, custom
classes) are listed as OTHER.

Where the weights are (Keras 3.15, `keras/src/saving/saving_lib.py`):
- `.keras` is a zip of `config.json`, `metadata.json` and `model.weights.h5`; keras writes the
  weights member uncompressed (ZIP_STORED), so h5py reads it in place through a byte-range view.
- In `model.weights.h5` (and in a `.weights.h5` file) the variables of the i-th layer of
  `model.layers` are the datasets `layers/<snake_case(class)>[_<n>]/vars/0, 1, ...`, where `_<n>`
  counts the earlier layers of the same class in that list (`dense`, `dense_1`, ...). A nested
  model repeats the scheme under its own path: `layers/sequential/layers/dense/vars/0`.
  `vars/0` is the kernel (Dense, Conv*), the embedding table, or gamma (norms).
- A legacy `.h5` (`model.save("x.h5")`) holds the config in the root attribute `model_config` and
  the weights in `model_weights/<layer name>/`, whose attribute `weight_names` lists the dataset
  paths below it, trainable first (Keras 3: `sequential/dense/kernel`; tf-keras 2:
  `dense/kernel:0`).

Nothing is read from outside the file either. HDF5 lets a dataset take its bytes from any other
file (external raw storage, virtual datasets) and lets a link point into another file (external
links): a crafted "layer" could hold /proc/self/environ or a private key, and its eigenvalues
would end up in the report. Opening a file therefore walks every link and every dataset once
(`_check_self_contained`) and refuses any of these, naming it; datasets are opened with HDF5's
external-file and virtual-dataset prefixes set to an empty folder as a second guard. A layer
tensor whose logical size is far above the bytes the file stores (never written, or compressed
more than `_BOMB_RATIO` times) is refused too, so a small file cannot ask for gigabytes.

Layer ids follow weightwatcher 0.7.7 on `keras.models.load_model(path)`: the index in
`model.layers`, every layer consuming one (a Functional model's InputLayer is layer 0; a
Sequential model's InputLayer is not in `model.layers`). Unlike weightwatcher, which gives a
nested sub-model one id and never looks inside it, wwcli numbers the sub-model's own
`layers` in its place (REFERENCE.md "Layer ids").
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import re
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from wwcli.loaders.interface import (
    MAX_LAYERS,
    Checkpoint,
    LayerSpec,
    LayerType,
    LoaderError,
    check_layer_count,
    read_head,
)

CONFIG_MEMBER = "config.json"
WEIGHTS_MEMBER = "model.weights.h5"

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_MAX_CONFIG_BYTES = 256 * 1024 * 1024
_ZIP_BOMB_BYTES = 1 << 32
_ZIP_BOMB_RATIO = 100
"""A zip member that claims to unpack to more than _ZIP_BOMB_BYTES *and* more than
_ZIP_BOMB_RATIO times its packed size is refused (the bound keras applies)."""
_BOMB_RATIO = 100
_BOMB_MIN_BYTES = 16 * 1024 * 1024
"""A layer tensor of more than _BOMB_MIN_BYTES whose logical size is more than _BOMB_RATIO times
the bytes the file stores for it is refused. Float weights compress 1.1-1.5x with gzip or lzf
(4x for heavily quantized values): 100x is far above any real layer and far below what gzip
(1000x on constant data) or a never-written dataset (infinite) gives. Under 16 MiB (a 2048 x
2048 float32 matrix, seconds of work) anything goes, so small all-zero test layers still work."""
MAX_HDF5_LINKS = 5 * MAX_LAYERS
"""The most links (and datasets) one HDF5 file may hold: about 5 per layer (its group, `vars`,
kernel, bias, ...) for MAX_LAYERS layers. Walking them all takes seconds at most."""

_NESTED_MODEL_CLASSES = frozenset({"Sequential", "Functional", "Model"})
_WEIGHT_BEARING_TYPES = frozenset(
    {LayerType.DENSE, LayerType.CONV1D, LayerType.CONV2D, LayerType.EMBEDDING}
)

# What h5py, zipfile and json raise on malformed input; turned into LoaderError at the boundary.
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    RuntimeError,
    UnicodeError,
    RecursionError,
    struct.error,
    zlib.error,
    zipfile.BadZipFile,
    NotImplementedError,
)


def _h5py() -> Any:
    """h5py, imported when a Keras file is opened rather than when wwcli starts."""
    import h5py

    return h5py


@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn any error from reading `what` into a one-line LoaderError naming the file."""
    try:
        yield
    except LoaderError:
        raise
    except _READ_ERRORS as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        raise LoaderError(f"{path}: cannot read {what}: {detail}") from error


def layer_type_of(class_name: str) -> LayerType:
    """The kind of a Keras layer class, by the substrings weightwatcher 0.7.7 tests in order
    (dense, conv1d, conv2d, embedding), plus every normalization layer as NORM.

    So EinsumDense is dense, Conv2DTranspose/DepthwiseConv2D/SeparableConv2D are conv2d, like in
    weightwatcher. Works on class names ("Conv2D") and on their snake-case forms ("conv2d_3").
    """
    key = class_name.lower().replace("_", "")
    if "dense" in key:
        return LayerType.DENSE
    if "conv1d" in key:
        return LayerType.CONV1D
    if "conv2d" in key:
        return LayerType.CONV2D
    if "embedding" in key:
        return LayerType.EMBEDDING
    if "normalization" in key:
        return LayerType.NORM
    return LayerType.OTHER


def snake_case(class_name: str) -> str:
    """keras' `naming.to_snake_case`, which names each layer's group in model.weights.h5."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


@dataclass(frozen=True)
class MatrixSizes:
    """How weightwatcher 0.7.7 sizes a layer's weight tensor."""

    N: int
    """Larger side of each matrix (0 when the tensor is not a matrix of this layer type)."""
    M: int
    """Smaller side of each matrix; the pooled spectrum has M * rf eigenvalues."""
    rf: int = 1
    """Number of matrices the tensor counts as (kernel positions of a Conv2D)."""
    skip_reason: str | None = None
    """Why the tensor cannot be analyzed as this layer type; None when it can."""


def matrix_sizes(layer_type: LayerType, shape: tuple[int, ...]) -> MatrixSizes:
    """N, M and rf of a weight tensor as weightwatcher 0.7.7 sizes it.

    - dense, embedding: a 2-D (a, b) matrix; N = max, M = min, rf = 1.
    - conv2d: a Keras kernel (kh, kw, in, out) is rf = kh*kw slices W[i, j] of (in, out);
      N = max(in, out), M = min(in, out). (weightwatcher's own N, M can come out swapped here,
      see `KerasCheckpoint.matrices`; its eigenvalues do not.)
    - conv1d: a kernel (k, in, out) is rf = k slices W[i] of (in, out), pooled like conv2d
      (REFERENCE.md). weightwatcher 0.7.7 differs: it sizes the kernel over all three sides
      (M = min(k, in, out), usually k) and keeps only the M largest pooled eigenvalues, so a
      Conv1D with a kernel under 8 is never analyzed there. wwcli follows REFERENCE.md by
      default; `--conv1d weightwatcher` re-sizes the layer as weightwatcher does
      (`interface.weightwatcher_conv1d_spec`, from `LayerSpec.kernel_axis` = 0).
    """
    if layer_type in (LayerType.DENSE, LayerType.EMBEDDING):
        if len(shape) != 2:
            return MatrixSizes(0, 0, 1, f"weight of shape {shape} is not a matrix")
        return MatrixSizes(max(shape), min(shape))
    if layer_type == LayerType.CONV2D:
        if len(shape) != 4:
            return MatrixSizes(0, 0, 1, f"conv2d kernel of shape {shape} is not 4-D")
        kh, kw, fan_in, fan_out = shape
        return MatrixSizes(max(fan_in, fan_out), min(fan_in, fan_out), kh * kw)
    if layer_type == LayerType.CONV1D:
        if len(shape) != 3:
            return MatrixSizes(0, 0, 1, f"conv1d kernel of shape {shape} is not 3-D")
        kernel_size, fan_in, fan_out = shape
        return MatrixSizes(max(fan_in, fan_out), min(fan_in, fan_out), kernel_size)
    return MatrixSizes(0, 0)


@dataclass(frozen=True)
class _StoredMember:
    """Where an uncompressed zip member's bytes are, and the CRC-32 they must have."""

    raw: io.BufferedIOBase
    """The open zip file."""
    start: int
    """Offset of the member's first byte in the zip file."""
    size: int
    """Length of the member in bytes."""
    crc: int
    """CRC-32 recorded in the zip's central directory."""


@dataclass(frozen=True)
class _Found:
    """A layer as the config (or the weights file) lists it, and where its main tensor is."""

    name: str
    """Layer path: the layer's name, prefixed by its enclosing sub-models' names."""
    class_name: str
    """Keras class name ("Dense"), or the snake-case group name when there is no config."""
    tensor: str | None
    """HDF5 path of the layer's first variable (kernel, embeddings, gamma); None when none."""
    gates: int = 0
    """For a recurrent kernel (LSTM 4, GRU 3, SimpleRNN 1): its gate blocks; 0 otherwise."""
    extras: tuple[_Found, ...] = ()
    """The layer's other kernels (a recurrent kernel, a pointwise kernel, a Bidirectional
    layer's backward kernels), listed after every layer of the model, with the next ids."""


RECURRENT_CLASSES = frozenset({"LSTM", "GRU", "SimpleRNN"})
"""Keras recurrent layers: kernel (in, gates x units) and recurrent_kernel (units, gates x
units), both under `<layer>/cell/vars` (0 and 1)."""
_SEPARABLE_CLASSES = frozenset({"SeparableConv1D", "SeparableConv2D"})
"""Depthwise kernel (vars/0, the one weightwatcher analyzes) and pointwise kernel (vars/1)."""
_KERAS_GATES = (1, 3, 4)


class _ByteRange(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start + size) of an open file, so that h5py
    can read a stored zip member in place instead of a copy of it in memory."""

    def __init__(self, raw: io.BufferedIOBase, start: int, size: int) -> None:
        super().__init__()
        self._raw = raw
        self._start = start
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._size - self._position))
        if count == 0:
            return 0
        self._raw.seek(self._start + self._position)
        read = self._raw.readinto(view[:count]) or 0
        self._position += read
        return read


class KerasCheckpoint(Checkpoint):
    """An opened Keras checkpoint: layers from the config, tensors read one at a time."""

    def __init__(
        self,
        path: Path,
        format_name: str,
        h5file: Any,
        found: list[_Found],
        *,
        ids_note: str | None = None,
        handles: tuple[Any, ...] = (),
        unverified: _StoredMember | None = None,
        hdf5_size: int = 0,
    ) -> None:
        self.path = path
        self.format = format_name
        self.ids_note = ids_note
        self.hdf5_size = hdf5_size
        """Bytes of HDF5 data this checkpoint reads (a `.keras` file's unpacked weights member):
        no layer is larger, so the helper process sizes its memory cap by it."""
        self._h5 = h5file
        self._handles = handles
        self._unverified = unverified
        self._tensors: dict[int, str] = {}
        self._layers = self._describe(found)

    def _describe(self, found: list[_Found]) -> list[LayerSpec]:
        # Extra kernels come after every layer of the model, so that no weightwatcher id moves.
        entries = found + [extra for entry in found for extra in entry.extras]
        check_layer_count(self.path, len(entries), "layers")
        specs: list[LayerSpec] = []
        for layer_id, entry in enumerate(entries):
            layer_type = layer_type_of(entry.class_name)
            if entry.gates:
                layer_type = LayerType.DENSE
            shape: tuple[int, ...] = ()
            dtype = ""
            if entry.tensor is not None:
                with _reading(self.path, f"the weights of layer {entry.name!r}"):
                    dataset = _open_dataset(self.path, self._h5, entry.tensor)
                    shape = tuple(int(side) for side in dataset.shape)
                    dtype = _dtype_name(dataset)
                self._tensors[layer_id] = entry.tensor
            sizes = matrix_sizes(layer_type, shape)
            if entry.gates and len(shape) == 2 and shape[1] % entry.gates == 0:
                units = shape[1] // entry.gates
                sizes = MatrixSizes(max(shape[0], units), min(shape[0], units), entry.gates)
            skip_reason = sizes.skip_reason
            if entry.tensor is None:
                skip_reason = "no weights"
            elif layer_type == LayerType.NORM:
                skip_reason = "normalization layer"
            elif layer_type == LayerType.OTHER:
                skip_reason = f"unsupported layer type {entry.class_name}"
            elif skip_reason is None and dtype not in ("float16", "float32", "float64", "bfloat16"):
                skip_reason = f"unsupported dtype {dtype}"
            specs.append(
                LayerSpec(
                    layer_id=layer_id,
                    name=entry.name,
                    layer_type=layer_type,
                    shape=shape,
                    dtype=dtype,
                    N=sizes.N,
                    M=sizes.M,
                    rf=sizes.rf,
                    skip_reason=skip_reason,
                    kernel_axis=0 if layer_type == LayerType.CONV1D and len(shape) == 3 else None,
                )
            )
        return specs

    def layers(self) -> list[LayerSpec]:
        return list(self._layers)

    def matrices(self, layer: LayerSpec) -> list[np.ndarray]:
        """The layer's matrices, in weightwatcher's slice order, as stored (no transposes; the
        spectrum does not depend on orientation):

        - dense, embedding: [W].
        - conv2d: kernel[i, j] for i in range(kh) for j in range(kw), each (in, out). For Keras
          kernels with out < in and an even kh*kw, weightwatcher reports N and M swapped (N < M),
          and N = in, M = out when kh + kw >= in + out; its eigenvalues are still those of these
          slices.
        - conv1d: kernel[i] for i in range(k), each (in, out): rf = k matrices.
        - a recurrent kernel (in or units, gates x units): its gate blocks along the last axis
          (LSTM's i, f, c, o; GRU's z, r, h), each (in or units, units).

        bfloat16 tensors come back as float32 (exactly); other dtypes as stored.
        """
        if self._h5 is None:
            raise LoaderError(f"{self.path}: the checkpoint is closed")
        tensor = self._tensors.get(layer.layer_id)
        if tensor is None or layer.skip_reason is not None:
            reason = layer.skip_reason or "no weights"
            raise LoaderError(
                f"{self.path}: layer {layer.layer_id} ({layer.name}) cannot be analyzed: {reason}"
            )
        self._verify_weights_member()
        with _reading(self.path, f"the weights of layer {layer.name!r}"):
            dataset = _open_dataset(self.path, self._h5, tensor)
            weights = np.asarray(dataset[()])
            if _dtype_name(dataset) == "bfloat16":
                weights = _bfloat16_to_float32(weights)
        if weights.shape != layer.shape:
            raise LoaderError(
                f"{self.path}: layer {layer.name!r} has shape {weights.shape}, "
                f"expected {layer.shape}"
            )
        if layer.layer_type == LayerType.CONV2D:
            kh, kw = weights.shape[:2]
            return [weights[i, j] for i in range(kh) for j in range(kw)]
        if layer.layer_type == LayerType.CONV1D:
            return [weights[i] for i in range(weights.shape[0])]
        if weights.ndim == 2 and layer.rf > 1:
            return [np.ascontiguousarray(block) for block in np.split(weights, layer.rf, axis=1)]
        return [weights]

    def _verify_weights_member(self) -> None:
        """Check the CRC-32 of the stored weights member once, before its first tensor is used:
        `describe` only reads headers, but numbers must not come from silently corrupted bytes."""
        member = self._unverified
        if member is None:
            return
        with _reading(self.path, WEIGHTS_MEMBER):
            member.raw.seek(member.start)
            crc = 0
            remaining = member.size
            while remaining > 0:
                chunk = member.raw.read(min(remaining, 1 << 22))
                if not chunk:
                    raise LoaderError(f"{self.path}: {WEIGHTS_MEMBER} is truncated")
                crc = zlib.crc32(chunk, crc)
                remaining -= len(chunk)
        if crc != member.crc:
            raise LoaderError(f"{self.path}: {WEIGHTS_MEMBER} is corrupted (CRC-32 mismatch)")
        self._unverified = None

    def close(self) -> None:
        handles = (self._h5, *self._handles) if self._h5 is not None else self._handles
        self._h5, self._handles, self._unverified = None, (), None
        _close_all(handles)


def _dtype_name(dataset: Any) -> str:
    # keras stores bfloat16 as 2-byte opaque data tagged with a `dtype` attribute.
    tag = dataset.attrs.get("dtype")
    if isinstance(tag, bytes):
        tag = tag.decode("utf-8", "replace")
    if tag == "bfloat16":
        return "bfloat16"
    return str(dataset.dtype)


def _bfloat16_to_float32(weights: np.ndarray) -> np.ndarray:
    # bfloat16 is the upper half of a float32: widening is exact.
    bits = np.ascontiguousarray(weights).view(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32)


# --- HDF5: nothing from outside the file, no data that is not stored -----------------------------


@functools.cache
def empty_folder() -> str:
    """An empty folder of this process (removed at exit): where HDF5 looks for the files that
    relative external-storage, virtual-dataset and external-link names point to."""
    folder = tempfile.mkdtemp(prefix="wwcli-no-external-files-")
    atexit.register(_remove_folder, folder)
    return folder


def _remove_folder(folder: str) -> None:
    with contextlib.suppress(OSError):
        Path(folder).rmdir()


def _check_self_contained(path: Path, h5file: Any, what: str) -> None:
    """Refuse a file that reaches outside itself: an external link (or a link of a kind HDF5
    does not define) anywhere, a dataset anywhere with external raw storage or a virtual layout.

    Visits each link once and each object once, whatever hard links make of the tree (HDF5's
    own visits keep track of the objects seen), without following soft or external links; a soft
    link that leads outside goes through an external link, which is refused where it is.
    """
    h5py = _h5py()
    inside = (h5py.h5l.TYPE_HARD, h5py.h5l.TYPE_SOFT)
    counted = 0
    refusal: list[str] = []

    def link(name: bytes, info: Any) -> object:
        nonlocal counted
        counted += 1
        where = "/" + name.decode("utf-8", "replace")
        if counted > MAX_HDF5_LINKS:
            refusal.append(f"holds more than {MAX_HDF5_LINKS} links (a crafted file?)")
        elif info.type == h5py.h5l.TYPE_EXTERNAL:
            refusal.append(
                f"{where} is an external link (to another file), which wwcli never follows"
            )
        elif info.type not in inside:
            refusal.append(
                f"{where} is a link of unknown type {info.type}, which wwcli never follows"
            )
        return True if refusal else None

    datasets: list[bytes] = []

    def item(name: bytes, info: Any) -> object:
        if info.type == h5py.h5o.TYPE_DATASET:
            datasets.append(name)
        return None

    with _reading(path, what):
        h5file.id.links.visit(link, info=True)
        if refusal:
            raise LoaderError(f"{path}: {refusal[0]}")
        h5py.h5o.visit(h5file.id, item, info=True)
        for name in datasets:
            _check_data_inside(
                path, "/" + name.decode("utf-8", "replace"), _dataset_id(h5file, name)
            )


def _dataset_id(h5file: Any, name: bytes) -> Any:
    """A dataset opened with the external-file and virtual-dataset prefixes set to an empty
    folder, so that no relative name in it can reach a file (absolute ones are refused by
    _check_data_inside before any byte is read)."""
    h5py = _h5py()
    access = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    folder = empty_folder().encode()
    access.set_efile_prefix(folder)
    access.set_virtual_prefix(folder)
    return h5py.h5d.open(h5file.id, name, dapl=access)


def _check_data_inside(path: Path, name: str, dataset_id: Any) -> None:
    h5py = _h5py()
    plist = dataset_id.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        reason = "a virtual dataset"
    elif plist.get_external_count() > 0:
        reason = "external raw storage"
    else:
        return
    raise LoaderError(
        f"{path}: dataset {name} takes its data from outside the file ({reason}), which wwcli "
        "never reads"
    )


def _check_stored_size(path: Path, name: str, dataset_id: Any) -> None:
    """Refuse a tensor whose logical size is far above the bytes the file stores for it."""
    logical = int(dataset_id.get_space().get_simple_extent_npoints()) * int(
        dataset_id.get_type().get_size()
    )
    stored = int(dataset_id.get_storage_size())
    if logical <= _BOMB_MIN_BYTES or logical <= _BOMB_RATIO * stored:
        return
    if stored == 0:
        raise LoaderError(
            f"{path}: dataset {name} was never written: its {logical} bytes would all be its "
            "fill value (a crafted file?)"
        )
    raise LoaderError(
        f"{path}: dataset {name} expands from {stored} stored bytes to {logical}, more than "
        f"{_BOMB_RATIO} times: refusing a likely decompression bomb"
    )


def _open_dataset(path: Path, h5file: Any, name: str) -> Any:
    """A layer's tensor, checked: its data is in the file, and stored rather than implied."""
    dataset_id = _dataset_id(h5file, name.encode())
    shown = name if name.startswith("/") else f"/{name}"
    _check_data_inside(path, shown, dataset_id)
    _check_stored_size(path, shown, dataset_id)
    return _h5py().Dataset(dataset_id)


def open_keras(path: Path) -> Checkpoint:
    """Open a `.keras` zip, a legacy `.h5` or a weights-only `.weights.h5`, told apart by content.

    Raises LoaderError naming the file and the problem when it is none of these or is damaged.
    """
    path = Path(path)
    head = read_head(path, 8)
    if head.startswith(_ZIP_SIGNATURES):
        return _open_zip(path)
    if head.startswith(_HDF5_SIGNATURE) or _is_hdf5_with_userblock(path):
        return _open_hdf5(path)
    raise LoaderError(
        f"{path}: not a Keras checkpoint (neither a .keras zip archive nor an HDF5 file)"
    )


def _is_hdf5_with_userblock(path: Path) -> bool:
    # HDF5 may start after a user block of 512, 1024, ... bytes; h5py knows where to look.
    try:
        return bool(_h5py().is_hdf5(str(path)))
    except _READ_ERRORS:
        return False


# --- .keras zip -------------------------------------------------------------------------------


def _open_zip(path: Path) -> Checkpoint:
    raw = path.open("rb")
    handles: list[Any] = [raw]  # closed in reverse order if anything below fails
    try:
        try:
            archive = zipfile.ZipFile(raw)
        except (zipfile.BadZipFile, *_READ_ERRORS) as error:
            detail = " ".join(str(error).split())
            raise LoaderError(f"{path}: truncated or corrupted zip archive ({detail})") from error
        handles.append(archive)
        names = set(archive.namelist())
        if WEIGHTS_MEMBER not in names:
            if "model.weights.npz" in names:
                raise LoaderError(f"{path}: weights stored as model.weights.npz are not supported")
            raise LoaderError(f"{path}: zip archive without {WEIGHTS_MEMBER}: not a .keras file")
        if CONFIG_MEMBER not in names:
            raise LoaderError(f"{path}: zip archive without {CONFIG_MEMBER}: not a .keras file")
        config = _read_config(path, archive)
        member, stored = _weights_member(path, raw, archive.getinfo(WEIGHTS_MEMBER), archive)
        handles.append(member)
        raw_bytes = _RawBytes(raw, stored.start) if stored else _RawBytes(member)
        h5file = _open_h5(path, member, WEIGHTS_MEMBER)
        handles.append(h5file)
        found, ids_note = _layers_of_keras3(path, h5file, config, raw_bytes)
        return KerasCheckpoint(
            path,
            "keras",
            h5file,
            found,
            ids_note=ids_note,
            handles=(member, archive, raw),
            unverified=stored,
            hdf5_size=member.seek(0, io.SEEK_END),
        )
    except BaseException:
        _close_all(reversed(handles))
        raise


def _close_all(handles: Any) -> None:
    for handle in handles:
        # Closing a file that failed to read must not mask the error that is being raised.
        with contextlib.suppress(*_READ_ERRORS):
            handle.close()


def _check_member_size(path: Path, info: zipfile.ZipInfo) -> None:
    """Refuse a member that claims to expand like a zip bomb (the bound keras itself applies:
    over 4 GiB and over 100 times its stored size), before a byte of it is unpacked."""
    if info.file_size > max(_ZIP_BOMB_BYTES, _ZIP_BOMB_RATIO * info.compress_size):
        raise LoaderError(
            f"{path}: {info.filename} would unpack from {info.compress_size} to "
            f"{info.file_size} bytes: refusing a likely decompression bomb"
        )


def _read_config(path: Path, archive: zipfile.ZipFile) -> Any:
    info = archive.getinfo(CONFIG_MEMBER)
    _check_member_size(path, info)
    if info.file_size > _MAX_CONFIG_BYTES:
        raise LoaderError(f"{path}: {CONFIG_MEMBER} is implausibly large ({info.file_size} bytes)")
    with _reading(path, CONFIG_MEMBER), archive.open(info) as member:
        # zipfile stops at the declared size (and checks the CRC-32 there); never read more.
        text = member.read(info.file_size + 1)
    if len(text) != info.file_size:
        raise LoaderError(
            f"{path}: {CONFIG_MEMBER} unpacks to {len(text)} bytes, not the {info.file_size} "
            "its zip entry declares"
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        detail = " ".join(str(error).split())
        raise LoaderError(f"{path}: {CONFIG_MEMBER} is not valid JSON ({detail})") from error


def _weights_member(
    path: Path, raw: io.BufferedIOBase, info: zipfile.ZipInfo, archive: zipfile.ZipFile
) -> tuple[IO[bytes], _StoredMember | None]:
    """A seekable file for model.weights.h5: a view into the zip when the member is stored (as
    keras writes it), else an unpacked temporary copy, whose size and CRC-32 are checked while
    it is unpacked."""
    if info.flag_bits & 0x1:
        raise LoaderError(f"{path}: {WEIGHTS_MEMBER} is encrypted")
    _check_member_size(path, info)
    start = _member_start(path, raw, info)
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise LoaderError(
                f"{path}: the zip entry of {WEIGHTS_MEMBER} declares {info.file_size} bytes but "
                f"stores {info.compress_size}"
            )
        view = io.BufferedReader(_ByteRange(raw, start, info.file_size), buffer_size=1 << 16)
        return view, _StoredMember(raw, start, info.file_size, info.CRC)
    copy = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the checkpoint, closed by it
    try:
        with _reading(path, WEIGHTS_MEMBER):
            if info.compress_type == zipfile.ZIP_DEFLATED:
                _inflate(path, raw, info, start, copy)
            else:
                _unpack_with_zipfile(path, archive, info, copy)
        copy.seek(0)
    except BaseException:
        copy.close()
        raise
    return copy, None


def _member_start(path: Path, raw: io.BufferedIOBase, info: zipfile.ZipInfo) -> int:
    """Offset of a member's first packed byte, from its local header; checks it is in the file."""
    with _reading(path, f"the zip entry of {info.filename}"):
        raw.seek(info.header_offset)
        header = raw.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size:
            raise LoaderError(f"{path}: truncated file ({info.filename} entry is cut off)")
        fields = _LOCAL_HEADER.unpack(header)
        end = raw.seek(0, io.SEEK_END)
    signature, name_length, extra_length = fields[0], fields[9], fields[10]
    if signature != b"PK\x03\x04":
        raise LoaderError(f"{path}: corrupted zip entry for {info.filename}")
    start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    if start + info.compress_size > end:
        raise LoaderError(f"{path}: truncated file ({info.filename} is cut off)")
    return int(start)


def _oversized(path: Path, info: zipfile.ZipInfo) -> LoaderError:
    return LoaderError(
        f"{path}: {info.filename} unpacks to more than the {info.file_size} bytes its zip entry "
        "declares"
    )


def _inflate(
    path: Path, raw: io.BufferedIOBase, info: zipfile.ZipInfo, start: int, copy: IO[bytes]
) -> None:
    """Unpack a deflated member into `copy`, never writing more than the size its directory
    entry declares (the memory cap and the bomb rule trust that size), then check the CRC-32.

    zipfile would silently cut a longer stream at the declared size; here that is an error.
    """
    decompressor = zlib.decompressobj(-zlib.MAX_WBITS)
    raw.seek(start)
    left = info.compress_size
    written = 0
    crc = 0
    while left > 0 and not decompressor.eof:
        packed = raw.read(min(left, 1 << 16))
        if not packed:
            raise LoaderError(f"{path}: truncated file ({info.filename} is cut off)")
        left -= len(packed)
        while packed and not decompressor.eof:
            # At most one byte past the declared size per step: enough to tell it lies.
            data = decompressor.decompress(packed, info.file_size - written + 1)
            packed = decompressor.unconsumed_tail
            written += len(data)
            if written > info.file_size:
                raise _oversized(path, info)
            crc = zlib.crc32(data, crc)
            copy.write(data)
            if not data and packed:
                break  # cannot happen for a valid stream; zlib needs more input
    if not decompressor.eof:
        raise LoaderError(f"{path}: {info.filename} is truncated or corrupted (deflate stream)")
    if written != info.file_size:
        raise LoaderError(
            f"{path}: {info.filename} unpacks to {written} bytes, not the {info.file_size} its "
            "zip entry declares"
        )
    if crc != info.CRC:
        raise LoaderError(f"{path}: {info.filename} is corrupted (CRC-32 mismatch)")


def _unpack_with_zipfile(
    path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, copy: IO[bytes]
) -> None:
    """Other compressions (bzip2, lzma): zipfile stops at the declared size and checks the CRC;
    a member that ends early is an error here."""
    written = 0
    with archive.open(info) as member:
        while chunk := member.read(1 << 22):
            written += len(chunk)
            copy.write(chunk)
    if written != info.file_size:
        raise LoaderError(
            f"{path}: {info.filename} unpacks to {written} bytes, not the {info.file_size} its "
            "zip entry declares"
        )


def _open_h5(path: Path, source: Any, what: str) -> Any:
    """The HDF5 file, once checked to read nothing from outside itself."""
    try:
        h5file = _h5py().File(source, "r")
    except _READ_ERRORS as error:
        detail = " ".join(str(error).split())
        if "truncated" in detail:
            raise LoaderError(f"{path}: truncated file ({what}: {detail})") from error
        raise LoaderError(f"{path}: {what} is not a readable HDF5 file ({detail})") from error
    try:
        _check_self_contained(path, h5file, what)
    except BaseException:
        _close_all([h5file])
        raise
    return h5file


def _model_layers(path: Path, model: Any, where: str) -> list[Any]:
    """The `layers` list of a Sequential/Functional config, as `model.layers` has them."""
    if not isinstance(model, dict) or not isinstance(model.get("config"), dict):
        raise LoaderError(f"{path}: {where} does not describe a Keras model")
    layers = model["config"].get("layers")
    if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
        raise LoaderError(f"{path}: {where} has no list of layers")
    # Sequential.layers leaves out the InputLayer its config starts with; Functional keeps it.
    if (
        model.get("class_name") == "Sequential"
        and layers
        and layers[0].get("class_name") == "InputLayer"
    ):
        layers = layers[1:]
    return layers


def _class_and_name(path: Path, layer: dict[str, Any], where: str) -> tuple[str, str]:
    class_name = layer.get("class_name")
    config = layer.get("config")
    name = config.get("name") if isinstance(config, dict) else None
    if name is None:
        name = layer.get("name")
    if not isinstance(class_name, str) or not isinstance(name, str) or not name:
        raise LoaderError(f"{path}: {where} lists a layer without a class name or a name")
    return class_name, name


def _is_nested_model(layer: dict[str, Any]) -> bool:
    config = layer.get("config")
    class_name = layer.get("class_name")
    return (
        isinstance(class_name, str)
        and class_name in _NESTED_MODEL_CLASSES
        and isinstance(config, dict)
        and isinstance(config.get("layers"), list)
    )


def _layers_of_keras3(
    path: Path, h5file: Any, config: Any, raw: _RawBytes
) -> tuple[list[_Found], str | None]:
    """Walk config.json the way keras saved the model; weights under generated group paths."""
    with _reading(path, WEIGHTS_MEMBER):
        segment = _layers_segment(h5file)
    if not (isinstance(config, dict) and isinstance(config.get("class_name"), str)):
        raise LoaderError(f"{path}: {CONFIG_MEMBER} does not describe a Keras model")
    if not _is_nested_model(config):
        # A subclassed model's config does not list its layers: take them from the weights.
        return _saved_layers(path, h5file, "", "", raw), (
            f"config.json does not list the layers of {config['class_name']} (a subclassed "
            "model): layers are numbered in the order the weights file stores them, which need "
            "not be weightwatcher's ids for the model"
        )
    check_layer_count(path, _config_layer_count(config), "layers")
    found: list[_Found] = []
    _walk_keras3(path, h5file, config, segment, "", found)
    return found, None


def _config_layer_count(model: Any) -> int:
    """How many layers a model config lists, those of its nested models included, counted
    before any is looked up in the weights file, so that a config listing a million layers is
    refused at once rather than after minutes of lookups. Stops counting past MAX_LAYERS."""
    count = 0
    pending = [model]
    while pending and count <= MAX_LAYERS:
        config = pending.pop().get("config")
        layers = config.get("layers") if isinstance(config, dict) else None
        if not isinstance(layers, list):
            continue
        count += len(layers)
        if count <= MAX_LAYERS:
            pending += [layer for layer in layers if isinstance(layer, dict)]
    return count


def _layers_segment(h5file: Any) -> str:
    """The group name keras gives a model's layer list: "layers", or in files written by keras
    2.13 "_layer_checkpoint_dependencies" (keras 3 reads those by renaming every segment)."""
    if "layers" not in h5file and "_layer_checkpoint_dependencies" in h5file:
        return "_layer_checkpoint_dependencies"
    return "layers"


def _walk_keras3(
    path: Path, h5file: Any, model: Any, container: str, prefix: str, found: list[_Found]
) -> None:
    segment = container.rsplit("/", 1)[-1]
    used: dict[str, int] = {}
    for layer in _model_layers(path, model, CONFIG_MEMBER):
        class_name, name = _class_and_name(path, layer, CONFIG_MEMBER)
        # keras' _get_unique_name: dense, dense_1, dense_2, ... per class within one container.
        base = snake_case(class_name)
        count = used.get(base)
        used[base] = 0 if count is None else count + 1
        group = f"{container}/{base}" if count is None else f"{container}/{base}_{count + 1}"
        if _is_nested_model(layer):
            _walk_keras3(path, h5file, layer, f"{group}/{segment}", f"{prefix}{name}/", found)
            continue
        tensor = _first_variable(path, h5file, group)
        if tensor is None and layer_type_of(class_name) in _WEIGHT_BEARING_TYPES:
            raise LoaderError(
                f"{path}: {CONFIG_MEMBER} names layer {prefix + name!r} ({class_name}) but "
                f"{WEIGHTS_MEMBER} has no weights for it at {group}/vars"
            )
        kernels = _keras3_kernels(path, h5file, group, _inner_class(layer, class_name))
        found.append(_with_kernels(path, h5file, f"{prefix}{name}", class_name, tensor, kernels))


def _inner_class(layer: dict[str, Any], class_name: str) -> str:
    """The class of the layer a Bidirectional wrapper holds (its `config.layer`), else the
    layer's own class."""
    config = layer.get("config")
    inner = config.get("layer") if isinstance(config, dict) else None
    if class_name == "Bidirectional" and isinstance(inner, dict):
        inner_class = inner.get("class_name")
        if isinstance(inner_class, str):
            return inner_class
    return class_name


def _keras3_kernels(path: Path, h5file: Any, group: str, class_name: str) -> list[tuple[str, str]]:
    """(role, HDF5 path) of every kernel of a multi-kernel layer in a Keras 3 weights file, the
    one listed as the layer first: a recurrent layer's kernel and recurrent_kernel (under
    `cell/vars`), a Bidirectional layer's forward and backward ones, a separable conv's
    depthwise and pointwise kernels. [] for every other layer."""
    if class_name in _SEPARABLE_CLASSES:
        return [
            (role, f"{group}/vars/{index}")
            for index, role in enumerate(("depthwise_kernel", "pointwise_kernel"))
        ]
    if class_name not in RECURRENT_CLASSES:
        return []
    cells = [("", f"{group}/cell/vars")]
    with _reading(path, f"{WEIGHTS_MEMBER} group {group}"):
        if f"{group}/forward_layer" in h5file:
            cells = [
                (f"{direction}/", f"{group}/{direction}_layer/cell/vars")
                for direction in ("forward", "backward")
            ]
    return [
        (f"{direction}{role}", f"{variables}/{index}")
        for direction, variables in cells
        for index, role in enumerate(("kernel", "recurrent_kernel"))
    ]


def _with_kernels(
    path: Path,
    h5file: Any,
    name: str,
    class_name: str,
    tensor: str | None,
    kernels: list[tuple[str, str]],
) -> _Found:
    """The layer's entry with its first kernel as the listed one and the others as `extras`.
    A separable conv keeps its depthwise kernel (what weightwatcher analyzes) and adds the
    pointwise one; a recurrent layer (or a Bidirectional one around it) lists its kernel, typed
    by its gate blocks (from the recurrent kernel's shape, (units, gates x units)), and adds the
    others. Kernels the file lacks are left out; without any, the entry is as before."""
    with _reading(path, f"the weights of layer {name!r}"):
        present = [(role, where) for role, where in kernels if where in h5file]
        shapes = {where: tuple(int(side) for side in h5file[where].shape) for _, where in present}
    if not present:
        return _Found(name, class_name, tensor)
    (first_role, first), *others = present
    if class_name in _SEPARABLE_CLASSES:
        if first_role != "depthwise_kernel":
            return _Found(name, class_name, tensor)
        extras = tuple(
            _Found(f"{name}/{role}", _kernel_class(class_name), where) for role, where in others
        )
        return _Found(name, class_name, first, extras=extras)
    recurrent = [shapes[where] for role, where in present if role.endswith("recurrent_kernel")]
    gates = 0
    if recurrent and len(recurrent[0]) == 2 and recurrent[0][0] > 0:
        units, width = recurrent[0]
        if width % units == 0 and width // units in _KERAS_GATES:
            gates = width // units
    if gates == 0:
        return _Found(name, class_name, tensor)
    extras = tuple(
        _Found(f"{name}/{role}", "Recurrent", where, gates=gates) for role, where in others
    )
    return _Found(name, class_name, first, gates=gates, extras=extras)


def _legacy_kernels(group: str, weight_names: list[str], class_name: str) -> list[tuple[str, str]]:
    """`_keras3_kernels` for a legacy `.h5` layer, from its `weight_names`
    (`lstm/lstm_cell/kernel`, `bidirectional/backward_lstm/lstm_cell/recurrent_kernel`, ...)."""
    if class_name not in RECURRENT_CLASSES | _SEPARABLE_CLASSES | {"Bidirectional"}:
        return []
    kernels = []
    for weight in weight_names:
        role = weight.split("/")[-1].split(":")[0]
        if not role.endswith("kernel"):
            continue
        components = weight.split("/")
        direction = ""
        if any(part.startswith("forward_") for part in components):
            direction = "forward/"
        elif any(part.startswith("backward_") for part in components):
            direction = "backward/"
        kernels.append((f"{direction}{role}", f"{group}/{weight}"))
    return kernels


def _kernel_class(class_name: str) -> str:
    """How a separable conv's pointwise kernel, (1, in x depth, out) or (1, 1, in x depth,
    out), is read: as the conv it is."""
    return "Conv1D" if class_name.endswith("1D") else "Conv2D"


def _first_variable(path: Path, h5file: Any, group: str) -> str | None:
    """Path of `<group>/vars/0` (the lowest-numbered variable); None when there is none."""
    with _reading(path, f"{WEIGHTS_MEMBER} group {group}"):
        variables = f"{group}/vars"
        if variables not in h5file:
            return None
        keys = [key for key in h5file[variables] if key.isdigit()]
    if not keys:
        return None
    return f"{variables}/{min(keys, key=int)}"


_NOT_LAYERS = frozenset({"vars", "optimizer"})
"""Groups below a weights file's root that are no layer: the model's own variables, the
optimizer's state."""


def _saved_layers(
    path: Path,
    h5file: Any,
    group_path: str,
    prefix: str,
    raw: _RawBytes,
    walked: dict[int, str] | None = None,
) -> list[_Found]:
    """Every layer saved below `group_path` of a weights file, depth first, each group's children
    in the order keras created them (that is the order of `model.layers`).

    Used where no config lists the layers: weights-only files, and subclassed models (whose
    layers keras saves under their attribute names: `encoder/vars/0`). A group with a `vars`
    child is a saved object (layer or model); one without is a list of them (`layers`). A model,
    or a layer made of sublayers, is replaced by its sublayers; its own variables, if any, make
    it a layer of its own too.

    Each group is walked once (`walked`: object address -> the path it was walked at): a group
    linked twice, which keras never writes, would make the walk exponential (a DAG of hard
    links) or endless (a cycle), so it is refused; so are more than MAX_LAYERS groups.
    """
    h5py = _h5py()
    found: list[_Found] = []
    walked = {} if walked is None else walked
    with _reading(path, f"the weights file's group {group_path or '/'}"):
        group = h5file[group_path or "/"]
        address = int(h5py.h5o.get_info(group.id).addr)
        if address in walked:
            raise LoaderError(
                f"{path}: group /{group_path} is also linked as /{walked[address]}: a link cycle "
                "or a shared group, which keras never writes"
            )
        walked[address] = group_path
        if len(walked) > MAX_LAYERS or len(group) > MAX_LAYERS:
            raise LoaderError(
                f"{path}: the weights file lists more than {MAX_LAYERS} layers, more than wwcli "
                "reads (a crafted or broken file?)"
            )
        skipped = _NOT_LAYERS if not group_path else {"vars"}
        keys = [key for key in group if key not in skipped and isinstance(group[key], h5py.Group)]
        order = _creation_order(h5file, group_path or "/", raw)
        if order is None or sorted(set(order) & set(keys)) != sorted(keys):
            order = _order_by_position(h5file, group_path, keys)
        for key in (key for key in order if key in keys):
            child_path = f"{group_path}/{key}" if group_path else key
            child = h5file[child_path]
            if not isinstance(child.get("vars"), h5py.Group):
                found += _saved_layers(path, h5file, child_path, prefix, raw, walked)
                continue
            name = _stored_name(child) or key
            tensor = _first_variable(path, h5file, child_path)
            inner = _saved_layers(path, h5file, child_path, f"{prefix}{name}/", raw, walked)
            if tensor is not None or not inner:
                # The group name is the class in snake case for a layer of a model's list, but
                # an attribute name in a subclassed model: then the layer's name tells more.
                kind = key if layer_type_of(key) != LayerType.OTHER else name
                found.append(_Found(f"{prefix}{name}", kind, tensor))
            found += inner
    return found


class _RawBytes:
    """Reads the bytes of an HDF5 file (a file of its own, or a member inside a zip)."""

    def __init__(self, file: IO[bytes], start: int = 0) -> None:
        self._file = file
        self._start = start

    def read(self, offset: int, size: int) -> bytes:
        self._file.seek(self._start + offset)
        data = self._file.read(size)
        if len(data) != size:
            raise EOFError(f"{size} bytes at {offset} are past the end of the file")
        return data


def _creation_order(h5file: Any, group_path: str, raw: _RawBytes) -> list[str] | None:
    """Child names of an HDF5 group in the order they were created; None when unknown.

    keras does not ask HDF5 to track creation order, and h5py lists children by name (dense_10
    before dense_2). But an old-style group, h5py's default, keeps its children's names in a
    local heap that only grows: each name is appended when its link is made, so the heap
    offsets are the creation order. This reads the group's object header (version 1) for its
    symbol-table message, then the heap (HDF5 file format spec, sections III.C and IV.A).
    """
    h5py = _h5py()
    try:
        plist = h5file.id.get_create_plist()
        offset_size, length_size = plist.get_sizes()
        base = int(plist.get_userblock())
        header_address = int(h5py.h5o.get_info(h5file[group_path].id).addr)
        heap_address = _symbol_table_heap(raw, base, header_address, offset_size)
        if heap_address is None:
            return None
        heap = raw.read(base + heap_address, 8 + 2 * length_size + offset_size)
        if heap[:4] != b"HEAP":
            return None
        segment_size = int.from_bytes(heap[8 : 8 + length_size], "little")
        segment_at = 8 + 2 * length_size
        segment_address = int.from_bytes(heap[segment_at : segment_at + offset_size], "little")
        if segment_size > 1 << 26:
            return None
        segment = raw.read(base + segment_address, segment_size)
    except _READ_ERRORS:
        return None
    # Entries are NUL-terminated names padded to 8 bytes; the free block at the end holds bytes
    # that are not names, so only names that are children of the group count.
    names: list[str] = []
    offset = 0
    while offset < len(segment):
        end = segment.find(b"\0", offset)
        if end < 0:
            break
        if end > offset:
            names.append(segment[offset:end].decode("utf-8", "replace"))
        offset = (end + 1 + 7) // 8 * 8
    return names


def _symbol_table_heap(raw: _RawBytes, base: int, address: int, offset_size: int) -> int | None:
    """Local-heap address from the symbol-table message of a version-1 object header."""
    prefix = raw.read(base + address, 16)
    if prefix[0] != 1:
        return None  # a version-2 header ("OHDR"): a new-style group, no local heap
    message_count = int.from_bytes(prefix[2:4], "little")
    blocks = [(address + 16, int.from_bytes(prefix[8:12], "little"))]
    seen = 0
    while blocks and seen < message_count:
        block_address, block_size = blocks.pop(0)
        block = raw.read(base + block_address, block_size)
        position = 0
        while position + 8 <= len(block) and seen < message_count:
            kind = int.from_bytes(block[position : position + 2], "little")
            size = int.from_bytes(block[position + 2 : position + 4], "little")
            data = block[position + 8 : position + 8 + size]
            seen += 1
            if kind == 0x11:  # symbol table: v1 B-tree address, then local heap address
                return int.from_bytes(data[offset_size : 2 * offset_size], "little")
            if kind == 0x10:  # continuation: the header goes on in another block
                continued = int.from_bytes(data[:offset_size], "little")
                length = int.from_bytes(data[offset_size : 2 * offset_size], "little")
                blocks.append((continued, length))
            position += 8 + size
    return None


def _order_by_position(h5file: Any, container: str, keys: list[str]) -> list[str]:
    """Fallback order when the heap cannot be read: layers of one class in keras' counter order
    (dense, dense_1, ..., dense_10: exact), classes interleaved by the file position of each
    layer's first object (a heuristic: HDF5 may put a later object into reused space)."""
    positions = []
    for key in keys:
        group_path = f"{container}/{key}" if container else key
        variables = [name for name in h5file[group_path].get("vars", {}) if name.isdigit()]
        first = f"{group_path}/vars/{min(variables, key=int)}" if variables else group_path
        positions.append((_address(h5file, first), key))
    positions.sort()
    per_class: dict[str, list[str]] = {}
    for _, key in positions:
        per_class.setdefault(_class_key(key), []).append(key)
    for members in per_class.values():
        members.sort(key=_counter)
    return [per_class[_class_key(key)].pop(0) for _, key in positions]


def _stored_name(group: Any) -> str | None:
    """The layer name keras 3 writes as the `name` attribute of `<layer group>/vars`."""
    variables = group.get("vars")
    if variables is None or not hasattr(variables, "attrs"):
        return None
    name = variables.attrs.get("name")
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name if isinstance(name, str) and name else None


def _class_key(group_name: str) -> str:
    return re.sub(r"_\d+$", "", group_name)


def _counter(group_name: str) -> int:
    match = re.search(r"_(\d+)$", group_name)
    return int(match.group(1)) if match else 0


def _address(h5file: Any, name: str) -> int:
    return int(_h5py().h5o.get_info(h5file[name].id).addr)


# --- HDF5: legacy .h5 and weights-only .weights.h5 ----------------------------------------------


def _open_hdf5(path: Path) -> Checkpoint:
    h5file = _open_h5(path, str(path), "the file")
    try:
        size = path.stat().st_size
        with _reading(path, "the HDF5 file"):
            attributes = h5file.attrs
            model_config = attributes.get("model_config")
            has_model_weights = "model_weights" in h5file
            has_layers = "layers" in h5file or "_layer_checkpoint_dependencies" in h5file
            has_layer_names = "layer_names" in attributes
        if model_config is not None:
            if not has_model_weights:
                raise LoaderError(f"{path}: HDF5 file with a model_config but no model_weights")
            config = _parse_json_attribute(path, model_config)
            found = _layers_of_legacy(path, h5file, config)
            return KerasCheckpoint(path, "h5", h5file, found, hdf5_size=size)
        if has_model_weights:
            found = _legacy_stored_layers(path, h5file, "model_weights")
            return KerasCheckpoint(
                path, "h5", h5file, found, ids_note=_NO_CONFIG_NOTE, hdf5_size=size
            )
        if has_layers:
            with path.open("rb") as file:
                found = _saved_layers(path, h5file, "", "", _RawBytes(file))
            return KerasCheckpoint(
                path, "keras-weights", h5file, found, ids_note=_NO_CONFIG_NOTE, hdf5_size=size
            )
        if has_layer_names:
            found = _legacy_stored_layers(path, h5file, "/")
            return KerasCheckpoint(
                path, "h5-weights", h5file, found, ids_note=_NO_CONFIG_NOTE, hdf5_size=size
            )
        raise LoaderError(
            f"{path}: HDF5 file without Keras weights (no model_weights or layers group)"
        )
    except BaseException:
        _close_all([h5file])
        raise


_NO_CONFIG_NOTE = (
    "weights-only file: without the model's config, layers are numbered in the order the file "
    "stores them; these are not necessarily weightwatcher's ids for the model"
)


def _parse_json_attribute(path: Path, value: Any) -> Any:
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        return json.loads(text)
    except (ValueError, UnicodeError, RecursionError) as error:
        detail = " ".join(str(error).split())
        raise LoaderError(f"{path}: model_config is not valid JSON ({detail})") from error


def _attribute_list(group: Any, name: str) -> list[str]:
    """keras' load_attributes_from_hdf5_group: a list attribute, possibly split in chunks."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values = []
        chunk = 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [value.decode("utf-8") if isinstance(value, bytes) else str(value) for value in values]


def _layers_of_legacy(path: Path, h5file: Any, config: Any) -> list[_Found]:
    if not (isinstance(config, dict) and _is_nested_model(config)):
        raise LoaderError(
            f"{path}: model_config does not describe a Sequential or Functional model"
        )
    check_layer_count(path, _config_layer_count(config), "layers")
    found: list[_Found] = []
    for layer in _model_layers(path, config, "model_config"):
        class_name, name = _class_and_name(path, layer, "model_config")
        group = f"model_weights/{name}"
        with _reading(path, f"model_weights/{name}"):
            weight_names = _attribute_list(h5file[group], "weight_names") if group in h5file else []
        if _is_nested_model(layer):
            _walk_legacy_nested(path, h5file, layer, group, weight_names, f"{name}/", found)
            continue
        tensor = f"{group}/{weight_names[0]}" if weight_names else None
        _check_legacy_tensor(path, h5file, class_name, f"{name}", tensor)
        kernels = _legacy_kernels(group, weight_names, class_name)
        found.append(_with_kernels(path, h5file, name, class_name, tensor, kernels))
    return found


def _walk_legacy_nested(
    path: Path,
    h5file: Any,
    model: Any,
    group: str,
    weight_names: list[str],
    prefix: str,
    found: list[_Found],
) -> None:
    # A nested model's weights all sit in its one group; each variable's path ends in
    # `<sublayer name>/<variable>`, which finds the sublayer's first variable.
    for layer in _model_layers(path, model, "model_config"):
        class_name, name = _class_and_name(path, layer, "model_config")
        if _is_nested_model(layer):
            _walk_legacy_nested(path, h5file, layer, group, weight_names, f"{prefix}{name}/", found)
            continue
        own = [weight for weight in weight_names if weight.split("/")[-2:-1] == [name]]
        tensor = f"{group}/{own[0]}" if own else None
        _check_legacy_tensor(path, h5file, class_name, f"{prefix}{name}", tensor)
        found.append(_Found(f"{prefix}{name}", class_name, tensor))


def _check_legacy_tensor(
    path: Path, h5file: Any, class_name: str, name: str, tensor: str | None
) -> None:
    with _reading(path, "model_weights"):
        present = tensor is not None and tensor in h5file
    if tensor is not None and not present:
        raise LoaderError(
            f"{path}: model_weights lists {tensor} for layer {name!r} but it is missing"
        )
    if tensor is None and layer_type_of(class_name) in _WEIGHT_BEARING_TYPES:
        raise LoaderError(
            f"{path}: model_config names layer {name!r} ({class_name}) but model_weights has "
            "no weights for it"
        )


def _legacy_stored_layers(path: Path, h5file: Any, root: str) -> list[_Found]:
    """A legacy weights group without a config: its `layer_names` attribute is model.layers'
    order; each layer's kind is guessed from its name (auto names like dense_3) or its first
    variable ("kernel" by its rank, "embeddings", "gamma")."""
    found: list[_Found] = []
    with _reading(path, "the layer weights"):
        group = h5file[root]
        names = _attribute_list(group, "layer_names")
        check_layer_count(path, len(names), "layers")
        for name in names:
            if name not in group:
                raise LoaderError(f"{path}: layer_names lists {name!r} but it has no group")
            weight_names = _attribute_list(group[name], "weight_names")
            prefix = "" if root == "/" else f"{root}/"
            tensor = f"{prefix}{name}/{weight_names[0]}" if weight_names else None
            if tensor is not None and tensor not in h5file:
                raise LoaderError(f"{path}: {tensor} is listed but missing")
            class_name = name
            if layer_type_of(name) == LayerType.OTHER and tensor is not None:
                class_name = _guess_class(weight_names, h5file[tensor].ndim)
            found.append(_Found(name, class_name, tensor))
    return found


def _guess_class(weight_names: list[str], ndim: int) -> str:
    variables = {weight.split("/")[-1].split(":")[0] for weight in weight_names}
    first = weight_names[0].split("/")[-1].split(":")[0]
    if "recurrent_kernel" in variables:
        return "Recurrent"
    if first == "kernel":
        return {2: "Dense", 3: "Conv1D", 4: "Conv2D"}.get(ndim, "Unknown")
    if first == "embeddings":
        return "Embedding"
    if first in ("gamma", "beta", "moving_mean"):
        return "Normalization"
    return "Unknown"
