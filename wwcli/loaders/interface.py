"""The contract every checkpoint reader implements: its layers, and their matrices on demand."""

from __future__ import annotations

import abc
import enum
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

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


def read_head(path: Path, size: int) -> bytes:
    """The first `size` bytes of a file, for telling formats apart; LoaderError when the file
    cannot be read or is empty."""
    try:
        with path.open("rb") as stream:
            head = stream.read(size)
    except FileNotFoundError as error:
        raise LoaderError(f"{path}: no such file") from error
    except IsADirectoryError as error:
        raise LoaderError(f"{path}: is a directory, not a checkpoint file") from error
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

    @property
    def num_evals(self) -> int:
        """Number of eigenvalues of the pooled spectrum: M per matrix, rf matrices."""
        return self.M * self.rf

    @property
    def analyzable(self) -> bool:
        """True when the loader can hand this layer's matrices to the engine."""
        return self.skip_reason is None


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
