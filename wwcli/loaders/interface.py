"""The contract every checkpoint reader implements: its layers, and their matrices on demand."""

from __future__ import annotations

import abc
import dataclasses
import enum
import functools
import io
import os
import stat
import struct
import types
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import numpy as np


class LoaderError(Exception):
    """A checkpoint cannot be read: missing, malformed, unsupported or unsafe.

    The message is for people: it names the file and says what is wrong, in one line.
    """


ZIP_ERRORS: tuple[type[Exception], ...] = (
    zipfile.BadZipFile,
    OSError,
    ValueError,  # UnicodeDecodeError of a member name among others
    NotImplementedError,  # an unknown "version needed to extract" or compression method
    RuntimeError,  # an encrypted member
    EOFError,
    struct.error,
    zlib.error,
)
"""What the zipfile module raises on a damaged or crafted archive, opening it or reading a member
(the fuzzer in tests/hostile found NotImplementedError, which BadZipFile does not cover)."""


MAX_LAYERS = 200_000
"""The most tensors or layers one checkpoint may list. The largest public models list under
100,000 tensors (a 256-expert mixture of experts); past this a file is refused, so that a small
crafted file cannot make listing it take minutes."""


def check_layer_count(path: Path, count: int, what: str = "tensors") -> None:
    """LoaderError when a checkpoint lists more than MAX_LAYERS `what`."""
    if count > MAX_LAYERS:
        raise LoaderError(
            f"{path}: lists {count} {what}, more than the {MAX_LAYERS} wwcli reads "
            "(a crafted or broken file?)"
        )


READ_ERRORS: tuple[type[Exception], ...] = (
    ValueError,  # UnicodeError, json's errors, int() past Python's 4300-digit limit, numpy shapes
    ArithmeticError,  # OverflowError of a huge number turned into a float, ZeroDivisionError
    LookupError,  # KeyError, IndexError of a structure that is not what the format says
    TypeError,
    RecursionError,
    RuntimeError,  # what torch and zipfile raise on a damaged file
    struct.error,
    zlib.error,
    EOFError,
)
"""What a reader's own code can raise on crafted or damaged bytes it did not expect. At the
loader boundary (`reading`) they become a LoaderError naming the file; other exceptions
(AttributeError, NameError, AssertionError, ...) are wwcli's bugs and stay internal errors."""


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn an exception a crafted file provoked in a reader into a one-line LoaderError that
    names `path`, chained to the original so that `--debug` shows where it came from.

    KeyboardInterrupt, SystemExit and GeneratorExit are not Exceptions and pass through.
    """
    try:
        yield
    except LoaderError:
        raise
    except MemoryError as error:
        raise LoaderError(
            f"{path}: ran out of memory while reading it (damaged or crafted sizes?)"
        ) from error
    except OSError as error:
        raise LoaderError(f"{path}: cannot read: {error.strerror or error}") from error
    except READ_ERRORS as error:
        raise LoaderError(
            f"{path}: cannot read: {type(error).__name__} while reading the file "
            "(crafted or damaged?)"
        ) from error


_GUARDED_METHODS = ("layers", "matrices", "source_files", "close")
"""The Checkpoint methods a caller uses after opening; `guard_checkpoint` wraps them."""

_Result = TypeVar("_Result")


def _guarded_method(method: Callable[..., _Result]) -> Callable[..., _Result]:
    @functools.wraps(method)
    def guarded(self: Checkpoint, *args: Any, **kwargs: Any) -> _Result:
        with reading(getattr(self, "path", Path("checkpoint"))):
            return method(self, *args, **kwargs)

    return guarded


@functools.cache
def _guarded_class(cls: type[Checkpoint]) -> type[Checkpoint]:
    """A subclass of `cls` whose public methods run inside `reading`. It adds no fields
    (`__slots__ = ()`), so an instance of `cls` can become one in place."""
    namespace: dict[str, Any] = {
        "__slots__": (),
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "_guarded": True,
    }
    for name in _GUARDED_METHODS:
        namespace[name] = _guarded_method(getattr(cls, name))
    guarded = types.new_class(cls.__name__, (cls,), exec_body=lambda body: body.update(namespace))
    return cast(type[Checkpoint], guarded)


def guard_checkpoint(checkpoint: Checkpoint) -> Checkpoint:
    """The same checkpoint, its layers(), matrices(), source_files() and close() turning what
    a crafted file provokes (READ_ERRORS, MemoryError, OSError) into a LoaderError naming it.

    The object itself is kept (its class becomes a guarded subclass of its own), so that its
    attributes and `isinstance` checks against the reader's class stay as they were.
    """
    if not getattr(type(checkpoint), "_guarded", False):
        checkpoint.__class__ = _guarded_class(type(checkpoint))
    return checkpoint


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words: "a FIFO", "a character device", ..."""
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a plain file")


def open_regular(path: Path) -> io.FileIO:
    """Open a file for reading, unbuffered, refusing anything but a regular file.

    The check is made on the opened descriptor (fstat), so what is checked is what is read.
    The open itself does not wait: O_NONBLOCK makes opening a FIFO return at once, where a
    plain open would block until another process writes to it. Raises LoaderError.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError as error:
        raise LoaderError(f"{path}: no such file") from error
    except IsADirectoryError as error:
        raise LoaderError(f"{path}: is a directory, not a checkpoint file") from error
    except OSError as error:
        raise LoaderError(f"{path}: cannot read: {error.strerror or error}") from error
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise LoaderError(f"{path}: cannot read: is a directory, not a checkpoint file")
        if not stat.S_ISREG(mode):
            raise LoaderError(f"{path}: not a regular file ({file_kind(mode)})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(descriptor, True)
        return io.FileIO(descriptor, "rb", closefd=True)
    except BaseException:
        os.close(descriptor)
        raise


def read_head(path: Path, size: int) -> bytes:
    """The first `size` bytes of a file, for telling formats apart; LoaderError when the file
    cannot be read or is empty."""
    try:
        with open_regular(path) as stream:  # a FIFO swapped in cannot make this wait
            head = stream.read(size)
    except OSError as error:
        raise LoaderError(f"{path}: cannot read: {error.strerror or error}") from error
    if not head:
        raise LoaderError(f"{path}: empty file")
    return head


class LayerType(enum.StrEnum):
    """What a layer is, in the words `describe` and the reports use."""

    DENSE = "dense"
    CONV1D = "conv1d"
    CONV2D = "conv2d"
    EMBEDDING = "embedding"
    NORM = "norm"
    """LayerNorm, BatchNorm, RMSNorm and friends: listed, never analyzed."""
    OTHER = "other"
    """Everything else: input, flatten, dropout, pooling, activations, 1-D or unknown tensors."""


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a checkpoint as weightwatcher 0.7.7 would number it; no weights are read."""

    layer_id: int
    """weightwatcher's id for this layer (REFERENCE.md "Layer ids")."""
    name: str
    """Full name in the file: Keras layer path, or tensor key without its `.weight` suffix."""
    layer_type: LayerType
    """Kind of layer; decides how its weight tensor becomes matrices."""
    shape: tuple[int, ...]
    """Shape of the weight tensor as stored; () when the layer has no weights."""
    dtype: str = ""
    """Stored dtype of the weight tensor ("float32", "bfloat16", ...); "" when there is none."""
    N: int = 0
    """Larger side of each matrix (0 when the layer is not a matrix)."""
    M: int = 0
    """Smaller side of each matrix (0 when the layer is not a matrix)."""
    rf: int = 1
    """Number of matrices the tensor splits into (kernel positions of a conv; 1 for dense)."""
    skip_reason: str | None = None
    """Why this layer cannot be analyzed whatever the options ("no weights", "normalization layer",
    "unsupported dtype F8_E5M2", ...); None when its weights can be analyzed."""
    tied_to: str | None = None
    """The name of the other layer whose weights this one shares (a tied input embedding and
    output head), set only where the file says so: a PyTorch state dict or module whose two
    `.weight` tensors are one tensor (same storage, offset, shape and strides), safetensors
    `__metadata__` recording a tensor removed as a duplicate of this one (`save_model`), or a
    model folder whose config.json says `"tie_word_embeddings": true`. The name need not be a
    listed layer: a head left out of the file as a duplicate is named all the same. None
    otherwise; it changes no number and no id."""
    kernel_axis: int | None = None
    """For a conv1d layer with a 3-D kernel: the axis of `shape` that is the kernel position, the
    axis `Checkpoint.matrices` splits along (0 for Keras' (k, in, out), 2 for PyTorch's
    (out, in, k)). None for every other layer. `weightwatcher_conv1d_matrices` needs it to
    rebuild the kernel as stored."""

    @property
    def num_evals(self) -> int:
        """Number of eigenvalues of the pooled spectrum: M per matrix, rf matrices."""
        return self.M * self.rf

    @property
    def analyzable(self) -> bool:
        """True when the loader can hand this layer's matrices to the engine."""
        return self.skip_reason is None


def weightwatcher_conv1d(spec: LayerSpec) -> bool:
    """Whether `--conv1d weightwatcher` changes how this layer is read: a conv1d layer with a
    3-D kernel whose kernel axis is known (HF GPT-2's 2-D `Conv1D` is a matrix either way)."""
    return (
        spec.layer_type is LayerType.CONV1D
        and len(spec.shape) == 3
        and spec.kernel_axis is not None
    )


def weightwatcher_conv1d_spec(spec: LayerSpec) -> LayerSpec:
    """The layer as weightwatcher 0.7.7 sizes a Conv1D kernel: N = the largest of its three
    sides, M = the smallest (usually the kernel size), rf = 1, so num_evals = M and a kernel
    under min_evals (8) is skipped. Any layer `weightwatcher_conv1d` does not apply to comes
    back unchanged. Reads no weights."""
    if not weightwatcher_conv1d(spec) or 0 in spec.shape:
        return spec
    return dataclasses.replace(spec, N=max(spec.shape), M=min(spec.shape), rf=1)


def weightwatcher_conv1d_matrices(spec: LayerSpec, matrices: list[np.ndarray]) -> list[np.ndarray]:
    """weightwatcher 0.7.7's matrices of a Conv1D kernel, from the `rf` slices
    `Checkpoint.matrices` returned for `spec` (the spec as listed, not the re-sized one).

    weightwatcher hands the 3-D kernel, as stored, to `scipy.linalg.svd`, which takes it as a
    stack of matrices along its first axis: Keras' (k, in, out) kernel gives k matrices of
    (in, out) (the pooled slices themselves), PyTorch's (out, in, k) gives `out` matrices of
    (in, k). The kernel is rebuilt from the slices along `spec.kernel_axis` and cut along its
    first axis. Raises LoaderError when the slices do not make up the listed shape.
    """
    if not weightwatcher_conv1d(spec):
        return matrices
    assert spec.kernel_axis is not None  # weightwatcher_conv1d checked it
    kernel = np.stack(matrices, axis=spec.kernel_axis)
    if kernel.shape != spec.shape:
        raise LoaderError(
            f"{spec.name}: conv1d slices make a kernel of shape {kernel.shape}, expected "
            f"{spec.shape}"
        )
    return [kernel[i] for i in range(kernel.shape[0])]


class Checkpoint(abc.ABC):
    """An opened checkpoint. Layers are listed without reading weights; matrices are read one
    layer at a time, so memory follows the largest matrix, not the model."""

    path: Path
    """The file or folder that was opened."""
    format: str
    """Short format name: "keras", "h5", "keras-weights", "torch", "safetensors", ..."""
    ids_note: str | None = None
    """Set when the ids are not weightwatcher's ids for the model (e.g. a weights-only file)."""
    source_note: str | None = None
    """Set when the weights came from part of the file (e.g. the `state_dict` of a Lightning
    checkpoint): says which part, for people."""

    @abc.abstractmethod
    def layers(self) -> list[LayerSpec]:
        """Every layer, in id order, analyzable or not."""

    @abc.abstractmethod
    def matrices(self, layer: LayerSpec) -> list[np.ndarray]:
        """The layer's weights as 2-D arrays, read now: one matrix for dense/embedding layers, rf
        matrices (one per kernel position, weightwatcher's slice order) for convolutions.

        Raises LoaderError when the tensor cannot be read or the layer is not analyzable.
        """

    def source_files(self) -> tuple[Path, ...]:
        """Every file this checkpoint reads (a folder's index and shards); reports are never
        written over one of them."""
        return (self.path,)

    def close(self) -> None:  # noqa: B027 - formats without open handles need nothing here
        """Release open files; safe to call twice."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
