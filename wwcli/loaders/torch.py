"""Reads PyTorch checkpoints (`.pt`, `.pth`, `.bin`, `.ckpt`): state dicts and the dicts
training code writes around them, and TorchScript archives, without torch: wwcli's own
restricted unpickler (`_torchpickle`) over the memory-mapped file (`_torchfiles`), in torch's
zip format and in its legacy format. Nothing in a pickle runs, and nothing a file names is
imported.

torch is imported only with `--trust-pickle` (`torch.load(weights_only=False)`, which can run
the file's code, for a pickled `nn.Module`), when `WWCLI_TORCH_READER=torch` asks for torch's
own `weights_only` reader, or for the rare tensors only torch rebuilds (a wrapper subclass, a
device tensor from numpy), which torch's `weights_only` reader then reads as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import re
import signal
import struct
import sys
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import numpy as np

from wwcli.loaders._statedict import (
    WEIGHT_SUFFIX,
    StateDictCheckpoint,
    TensorEntry,
    TensorReader,
    layer_name,
    matrices_of_tensor,
)
from wwcli.loaders.interface import (
    ZIP_ERRORS,
    Checkpoint,
    LayerSpec,
    LayerType,
    LoaderError,
    read_head,
)

if TYPE_CHECKING:
    import torch

ZIP_SIGNATURE = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"
"""Every pickle of protocol 2 or later, torch's legacy format included, starts with PROTO."""

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
"""Keys under which training code stores the weights, tried first and in this order:
Lightning's `state_dict`, the tutorial `model_state_dict`, fairseq's `model`, DeepSpeed's
`module`."""

INSTALL_HINT = "pip install 'wwcli[torch]'"

READER_ENV = "WWCLI_TORCH_READER"
"""`torch` reads PyTorch files with torch.load(weights_only=True), as wwcli did before it had a
reader of its own (for comparing the two, and as a way back should the own reader refuse a
file torch reads)."""


def torch_reader_asked() -> bool:
    """Whether `WWCLI_TORCH_READER=torch` asks for torch's weights_only reader."""
    return os.environ.get(READER_ENV, "").strip().lower() == "torch"


def _torch_loaded() -> Any | None:
    """The torch module when something already imported it; None otherwise (never imports)."""
    return sys.modules.get("torch")


def is_tensor(value: object) -> bool:
    """A tensor of either reader: a StoredTensor, or a torch.Tensor when torch is loaded."""
    from wwcli.loaders._torchpickle import StoredTensor

    if isinstance(value, StoredTensor):
        return True
    torch = _torch_loaded()
    return torch is not None and isinstance(value, torch.Tensor)


def is_module(value: object) -> bool:
    """An nn.Module (only torch.load with --trust-pickle builds one)."""
    torch = _torch_loaded()
    return torch is not None and isinstance(value, torch.nn.Module)


def _import_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError as error:
        raise LoaderError(
            f"{path}: reading PyTorch checkpoints needs torch; install it with: {INSTALL_HINT}"
        ) from error
    return torch


@dataclass(frozen=True)
class LoadedStateDict:
    """The tensors a checkpoint file holds, and where in the file they were found."""

    tensors: Mapping[str, Any]
    """Key -> torch.Tensor (or another value the file stores under that key), in stored order."""
    source_note: str | None
    """What was chosen when the file wraps the state dict; None for a bare state dict."""


def open_torch(path: Path, *, trust_pickle: bool = False) -> Checkpoint:
    """Open a PyTorch checkpoint file.

    A state dict, bare or wrapped (Lightning's `state_dict`, `model_state_dict`, `model`,
    `module`, nested dicts), is numbered as weightwatcher numbers a state dict read from a model
    folder: the keys ending in `.weight`, in stored order, from 0. With `trust_pickle` the file
    may also hold a whole `nn.Module`, numbered as weightwatcher numbers a live module.

    Raises LoaderError when torch is missing, the file is missing, unreadable or not a PyTorch
    checkpoint, or (without `trust_pickle`) it holds Python objects whose loading can run code.
    """
    with reading_boundary(path), deadline(path, torch_timeout(path)):
        if _container_kind(path) == "torchscript":
            return torchscript_checkpoint(path)
        found = find_weights(path, load_checkpoint_object(path, trust_pickle=trust_pickle))
        if is_module(found.weights):
            return TorchModuleCheckpoint(path, found.weights, source_note=found.note)
        loaded = LoadedStateDict(checked_state_dict(path, found.weights), found.note)
        return state_dict_checkpoint(path, loaded, "torch")


def load_state_dict(path: Path, *, trust_pickle: bool = False) -> LoadedStateDict:
    """The state dict a file holds (unwrapped), for readers of folders of `.bin` shards.

    Raises LoaderError as `open_torch` does, and when the file holds a whole module.
    """
    with reading_boundary(path), deadline(path, torch_timeout(path)):
        if _container_kind(path) == "torchscript":
            script = torchscript_state_dict(path)
            return LoadedStateDict(checked_state_dict(path, script.tensors), _SCRIPT_NOTE)
        found = find_weights(path, load_checkpoint_object(path, trust_pickle=trust_pickle))
        if is_module(found.weights):
            raise LoaderError(
                f"{path}: holds a whole {type(found.weights).__name__} module, not a state dict; "
                "open the file itself to number its modules"
            )
        return LoadedStateDict(checked_state_dict(path, found.weights), found.note)


def state_dict_checkpoint(
    path: Path, loaded: LoadedStateDict, file_format: str
) -> StateDictCheckpoint:
    """A checkpoint over one loaded state dict, in its stored order."""
    tensors = {str(key): value for key, value in loaded.tensors.items()}
    return StateDictCheckpoint(
        path,
        file_format,
        [(tensor_entry(key, value), tensor_reader(tensors)) for key, value in tensors.items()],
        source_note=loaded.source_note,
        close=tensors.clear,
        tied=storage_ties(tensors),
    )


def _same_weights_key(tensor: Any) -> tuple[object, ...] | None:
    """What makes two stored tensors the same weights: one storage, the same offset, shape,
    strides and dtype (torch.save keeps a tied weight as one storage, and torch.load gives
    both keys tensors over it). None for a tensor without plain storage (meta, nested,
    sparse, quantized, subclasses): such a one is never called tied."""
    from wwcli.loaders._torchpickle import StoredTensor

    if isinstance(tensor, StoredTensor):
        if tensor.kind is not None or tensor.storage is None or tensor.numel() == 0:
            return None
        return (
            tensor.storage.begin + tensor.offset * tensor.element_size,
            tensor.shape,
            tensor.stride,
            tensor.dtype,
        )
    torch = _torch_loaded()
    if torch is None:
        return None
    if (
        type(tensor) not in (torch.Tensor, torch.nn.Parameter)
        or tensor.layout != torch.strided
        or tensor.is_meta
        or tensor.is_nested
        or tensor.is_quantized
        or tensor.numel() == 0
    ):
        return None
    return (
        int(tensor.untyped_storage().data_ptr()),
        int(tensor.storage_offset()),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        str(tensor.dtype),
    )


def storage_ties(tensors: Mapping[str, Any]) -> dict[str, str]:
    """Key -> the layer it shares its weights with, for the `.weight` tensors of a loaded state
    dict that are one tensor (a tied embedding and lm_head): each names the first other key of
    its group (the first names the second). Reads no values."""
    groups: dict[tuple[object, ...], list[str]] = {}
    for key, value in tensors.items():
        if not key.endswith(WEIGHT_SUFFIX):
            continue
        same = _same_weights_key(value)
        if same is not None:
            groups.setdefault(same, []).append(key)
    ties: dict[str, str] = {}
    for keys in groups.values():
        if len(keys) > 1:
            ties[keys[0]] = layer_name(keys[1])
            ties.update({key: layer_name(keys[0]) for key in keys[1:]})
    return ties


def tensor_reader(tensors: Mapping[str, Any]) -> TensorReader:
    """Reads a tensor of a loaded state dict as numpy, one tensor at a time."""

    def read(key: str) -> np.ndarray:
        return tensor_to_numpy(tensors[key])

    return read


def load_checkpoint_object(path: Path, *, trust_pickle: bool) -> object:
    """What the file's pickle holds. Without `trust_pickle`, read by wwcli's restricted
    unpickler (tensors as StoredTensor over the memory-mapped file; torch is not imported),
    or by torch.load(weights_only=True) when `WWCLI_TORCH_READER=torch` asks or the file holds
    a tensor only torch rebuilds. With `trust_pickle`, torch.load(weights_only=False). The
    pickle's shape is checked first either way."""
    from wwcli.loaders._torchpickle import NeedsTorchError

    container = _container_kind(path)
    if container == "torchscript":
        raise LoaderError(f"{path}: a TorchScript archive; open it with open_torch")
    check_pickle_shape(path, container)
    if not trust_pickle and not torch_reader_asked():
        try:
            return _load_without_torch(path, container)
        except NeedsTorchError:
            pass  # a tensor torch's weights_only reader rebuilds: as before, through torch
    return _torch_load(path, container, trust_pickle=trust_pickle)


def _load_without_torch(path: Path, container: str) -> object:
    """The file's object through wwcli's restricted unpickler; LoaderError with today's
    messages for what it refuses (`_unsafe_message`) and for a damaged pickle. NeedsTorchError
    passes through."""
    from wwcli.loaders._torchfiles import read_legacy, read_zip
    from wwcli.loaders._torchpickle import DamagedPickleError, RefusedPickleError

    try:
        file = read_zip(path) if container == "zip" else read_legacy(path)
    except RefusedPickleError as refused:
        raise _refusal(path, container, refused.name) from None
    except DamagedPickleError as damaged:
        raise LoaderError(
            f"{path}: not a readable PyTorch checkpoint (damaged pickle: {damaged})"
        ) from None
    return file.loaded


def _refusal(path: Path, container: str, detail: str | None) -> LoaderError:
    """The error for a pickle a reader refused: it names what the file holds (`detail`, or the
    first global of the pickle that torch's allow-list lacks), with --trust-pickle offered."""
    if detail is None:
        globals_named = pickle_globals(path, container)
        if globals_named is None:
            return LoaderError(f"{path}: not a readable PyTorch checkpoint (damaged pickle)")
        detail = next(
            (_python3_name(name) for name in globals_named if not _is_torch_allowed(name)),
            None,
        )
    return LoaderError(_unsafe_message(path, detail))


def _torch_load(path: Path, container: str, *, trust_pickle: bool) -> object:
    """torch.load the file: weights_only (allow-listed types only) unless `trust_pickle`,
    memory-mapped when the file is in torch's zip format."""
    torch = _import_torch(path)
    try:
        with warnings.catch_warnings():
            # torch's notes about pickle protocols and TorchScript are not for our users.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(
                path,
                map_location="cpu",
                weights_only=not trust_pickle,
                mmap=container == "zip",
            )
    except Exception as error:
        if not trust_pickle and _is_weights_only_refusal(error):
            raise _refusal(path, container, _refused_object(str(error))) from None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise LoaderError(
            f"{path}: not a readable PyTorch checkpoint "
            f"({type(error).__name__}{': ' + first_line if first_line else ''})"
        ) from error


def _container_kind(path: Path) -> str:
    """The container by the file's content: "zip", "torchscript" or "pickle"; LoaderError for
    anything else, so that torch never sees a file that is not one of its own."""
    if not path.exists():
        raise LoaderError(f"{path}: no such file")
    head = read_head(path, 4)
    if head == ZIP_SIGNATURE:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                check_members(path, archive)
        except ZIP_ERRORS as error:
            raise LoaderError(f"{path}: damaged zip archive (truncated?): {error}") from error
        if any(name.endswith("/constants.pkl") for name in names):
            return "torchscript"
        if _data_pkl_member(names) is None:
            raise LoaderError(f"{path}: a zip archive without data.pkl, not a PyTorch checkpoint")
        return "zip"
    if head[:1] == PICKLE_PROTO and 2 <= head[1] <= 5:
        return "pickle"
    raise LoaderError(f"{path}: not a PyTorch checkpoint (neither torch's zip format nor a pickle)")


# ---------------------------------------------------------------------------------------------
# Before torch sees a zip: every member's sizes are checked, and nothing is inflated unbounded.

BOMB_BYTES = 1 << 32
"""A member that claims to unpack past this many bytes *and* past `BOMB_RATIO` times its packed
size is refused as a likely decompression bomb: the bound keras applies to `.keras` archives,
and wwcli's Keras reader too."""
BOMB_RATIO = 100
"""Also the most a deflated record (data.pkl, version, ...) may claim to expand, whatever its
size: a pickle deflates by 3 to 10 times, zeros by 1000."""
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")
_STORAGE_MEMBER = re.compile(r"(^|/)data/[^/]+$")
"""torch's storages: `<archive>/data/<key>`, one per storage, raw bytes."""


def check_members(path: Path, archive: zipfile.ZipFile) -> None:
    """Refuse a zip whose members' sizes cannot be believed, before torch (miniz) reads it.

    - Every member: the bomb bound above, on the sizes the central directory declares (a ZIP64
      size of 2**62 ends here).
    - A stored member (torch.save stores every member): packed size equal to its size, and its
      bytes within the file, before the central directory.
    - A deflated storage is refused: torch.save never compresses one, and torch's memory-mapped
      reader, which wwcli uses, takes the packed bytes for the numbers (silently wrong weights).
    - A deflated record must claim at most `BOMB_RATIO` times its packed size, and is inflated
      here once, `BOMB_RATIO` times its packed size at most, to check that it does not unpack
      past the size it declares: a central directory that lies cannot get more past.
    """
    file_size = path.stat().st_size
    directory_start = archive.start_dir
    for info in archive.infolist():
        name = info.filename
        if info.file_size > max(BOMB_BYTES, BOMB_RATIO * info.compress_size):
            raise LoaderError(
                f"{path}: zip member {name!r} would unpack from {info.compress_size} to "
                f"{info.file_size} bytes: refusing a likely decompression bomb"
            )
        start = _member_start(path, archive, info)
        if start + info.compress_size > min(directory_start, file_size):
            raise LoaderError(
                f"{path}: zip member {name!r} claims {info.compress_size} packed bytes, past the "
                "end of the archive's data (truncated or crafted)"
            )
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise LoaderError(
                    f"{path}: zip member {name!r} is stored (not compressed) but claims "
                    f"{info.compress_size} bytes packed and {info.file_size} unpacked"
                )
            continue
        if _STORAGE_MEMBER.search(name):
            raise LoaderError(
                f"{path}: tensor storage {name!r} is compressed in the zip; torch.save never "
                "compresses storages and torch's reader would take the packed bytes for the "
                "weights; re-save the file with torch.save"
            )
        if info.file_size > BOMB_RATIO * max(info.compress_size, 1):
            raise LoaderError(
                f"{path}: zip member {name!r} would unpack from {info.compress_size} to "
                f"{info.file_size} bytes (over {BOMB_RATIO} times): refusing a likely "
                "decompression bomb"
            )
        _check_inflated_size(path, archive, info, start)


def _member_start(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Where a member's packed bytes begin, from its local header."""
    stream = archive.fp
    if stream is None:
        raise LoaderError(f"{path}: damaged zip archive")
    stream.seek(info.header_offset)
    header = stream.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or header[:4] != ZIP_SIGNATURE:
        raise LoaderError(f"{path}: damaged zip archive (no entry header for {info.filename!r})")
    fields = _LOCAL_HEADER.unpack(header)
    return int(info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10])


def _check_inflated_size(
    path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, start: int
) -> None:
    """Inflate a deflated member's packed bytes, never producing more than its declared size
    plus one byte, and refuse it when it produces more. Another method is left to torch, whose
    reader (miniz) unpacks nothing but deflate and says so."""
    import zlib

    if info.compress_type != zipfile.ZIP_DEFLATED:
        return
    stream = archive.fp
    assert stream is not None  # checked by _member_start
    stream.seek(start)
    inflater = zlib.decompressobj(-15)
    produced = 0
    left = info.compress_size
    pending = b""
    while left > 0 or pending:
        if not pending:
            pending = stream.read(min(left, 1 << 20))
            left -= len(pending)
            if not pending:
                break
        produced += len(inflater.decompress(pending, info.file_size + 1 - produced))
        pending = inflater.unconsumed_tail
        if produced > info.file_size:
            raise LoaderError(
                f"{path}: zip member {info.filename!r} unpacks past the {info.file_size} bytes "
                "its zip entry declares (a crafted archive)"
            )
        if inflater.eof:
            break


# ---------------------------------------------------------------------------------------------
# Before torch unpickles: the pickle's shape, read statically (nothing is built, nothing runs).

MAX_PICKLE_NODES = 20_000_000
"""The most objects a pickle may expand to when every shared reference is counted again (a
tree, as hashing a tuple or printing a key walks it). pickle's memo lets a file of 600 bytes
share each level of a DAG twice, so that hashing its one dict key walks 2**40 tuples, inside
C, where no deadline can stop it. A real checkpoint expands to some 15 objects per tensor
(a million tensors fit) and shares little: tied weights, repeated strings."""
MAX_PICKLE_DEPTH = 10_000
"""The deepest nesting a pickle may build (real checkpoints nest under 10); hashing a tuple
nested 100,000 deep recurses in C as deep."""
_MUTATORS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_LEAF: tuple[()] = ()


def check_pickle_shape(path: Path, container: str) -> None:
    """Refuse a pickle that would expand past `MAX_PICKLE_NODES` or nest past
    `MAX_PICKLE_DEPTH`; say nothing of a pickle that does not parse (torch will say why)."""
    import io

    if container in ("zip", "torchscript"):
        try:
            with zipfile.ZipFile(path) as archive:
                member = _data_pkl_member(archive.namelist())
                if member is None:
                    return
                data = archive.read(member)  # its size checked by check_members
        except ZIP_ERRORS:
            return  # the reader will say what is wrong with the member
        _check_pickles(path, io.BytesIO(data), len(data), 1)
        return
    with path.open("rb") as stream:
        # torch's legacy format: magic number, protocol, system info, the object, storage keys.
        _check_pickles(path, stream, path.stat().st_size, 5)


def _data_pkl_member(names: list[str]) -> str | None:
    """The archive's `<top>/data.pkl`, the one member every reader here reads as the pickle."""
    return next((n for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)


def _check_pickles(path: Path, stream: BinaryIO, size: int, count: int) -> None:
    for _ in range(count):
        shape = _pickle_shape(stream)
        if shape is None:
            return
        nodes, depth = shape
        if depth > MAX_PICKLE_DEPTH:
            raise LoaderError(
                f"{path}: its pickle nests objects more than {MAX_PICKLE_DEPTH} deep "
                "(a crafted file; real checkpoints nest a few levels)"
            )
        if nodes > MAX_PICKLE_NODES:
            raise LoaderError(
                f"{path}: its pickle shares objects so that they expand to more than "
                f"{MAX_PICKLE_NODES} (a crafted DAG that would take forever to hash or walk; "
                "real checkpoints expand to a few objects per tensor)"
            )
        if stream.tell() >= size:
            return


def _pickle_shape(stream: BinaryIO) -> tuple[int, int] | None:
    """(objects expanded as a tree, depth) of the pickle at the stream's position, by replaying
    its opcodes on a graph of lists (each object is the list of what it holds); None when it
    does not parse. Mutable objects (dicts, lists, an OrderedDict being filled) are the same
    list wherever the memo hands them out, so later additions count everywhere."""
    import pickletools

    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[object, Any] = {}
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if name == "STOP":
                break
            if name in ("PROTO", "FRAME"):
                continue
            if name == "MARK":
                marks.append(len(stack))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name == "POP":
                stack.pop()
            elif name == "POP_MARK":
                del stack[marks.pop() :]
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in _MUTATORS:
                if name in ("APPEND", "BUILD"):
                    items = [stack.pop()]
                elif name == "SETITEM":
                    items = stack[-2:]
                    del stack[-2:]
                else:
                    start = marks.pop()
                    items = stack[start:]
                    del stack[start:]
                target = stack[-1]
                if not isinstance(target, list):
                    return None
                target.extend(items)
            else:
                if pickletools.markobject in opcode.stack_before:
                    start = marks.pop()
                else:
                    start = len(stack) - len(opcode.stack_before)
                if start < 0:
                    return None
                items = stack[start:]
                del stack[start:]
                for _ in opcode.stack_after:
                    stack.append(list(items) if items or name.startswith("EMPTY") else _LEAF)
        else:
            return None
    except Exception:
        return None
    if not stack:
        return None
    return _tree_size(stack[-1])


def _tree_size(root: Any) -> tuple[int, int]:
    """Objects under `root` counted as a tree (a shared object once per reference; a cycle's
    back reference as one), and the longest chain; each object is visited once, without
    recursion. Stops counting past the budget."""
    sizes: dict[int, tuple[int, int]] = {}
    on_path: set[int] = set()
    walk: list[tuple[Any, int]] = [(root, 0)]
    on_path.add(id(root))
    while walk:
        node, index = walk[-1]
        if index < len(node):
            walk[-1] = (node, index + 1)
            child = node[index]
            if child and id(child) not in sizes and id(child) not in on_path:
                on_path.add(id(child))
                walk.append((child, 0))
            continue
        walk.pop()
        on_path.discard(id(node))
        total, depth = 1, 0
        for child in node:
            child_size, child_depth = sizes.get(id(child), (1, 0))
            total += child_size
            depth = max(depth, child_depth)
        sizes[id(node)] = (min(total, MAX_PICKLE_NODES + 1), depth + 1)
        if total > MAX_PICKLE_NODES or depth > MAX_PICKLE_DEPTH:
            return total, depth + 1
    return sizes[id(root)]


# ---------------------------------------------------------------------------------------------
# torch's unpickler under a deadline, and every unexpected exception turned into a LoaderError.

TIMEOUT_ENV = "WWCLI_TORCH_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
"""Deadline for unpickling a file and finding its weights; the file's size at
`SLOWEST_READ_BYTES_PER_S` is added (torch's legacy format reads every storage)."""
SLOWEST_READ_BYTES_PER_S = 20_000_000


class DeadlinePassed(BaseException):
    """Raised by the SIGALRM handler inside torch's unpickler. A BaseException, so that no
    `except Exception` in torch or here can swallow it on its way out."""


def torch_timeout(path: Path) -> float:
    """The deadline in seconds: `WWCLI_TORCH_TIMEOUT` when it is a positive number, else 60 s;
    plus the file's size at 20 MB/s."""
    try:
        base = float(os.environ.get(TIMEOUT_ENV, ""))
    except ValueError:
        base = DEFAULT_TIMEOUT_S
    if not (math.isfinite(base) and base > 0):
        base = DEFAULT_TIMEOUT_S
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    return base + size / SLOWEST_READ_BYTES_PER_S


@contextlib.contextmanager
def deadline(path: Path, seconds: float) -> Iterator[None]:
    """Raise LoaderError when the block runs past `seconds`.

    torch.load(weights_only=True) unpickles with torch/_weights_only_unpickler.py, a pure-Python
    loop over the opcodes, so a SIGALRM handler that raises stops it between two opcodes. A
    helper process would also stop a C call that never returns, but would pay torch's import
    (~2 s) again for every file and have to send tensors back; the calls in C that could run
    for ever on a crafted pickle (hashing or printing a shared or deep tuple) are refused
    before torch runs, by `check_pickle_shape`. The timer is set only in the main thread (the
    only one Python delivers signals to) and where setitimer exists; the previous handler and
    timer are put back afterwards.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "setitimer"
    ):
        yield
        return
    armed = [True]

    def expire(signum: int, frame: object) -> None:
        if armed[0]:
            raise DeadlinePassed

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, expire)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except DeadlinePassed:
        raise LoaderError(
            f"{path}: reading its pickle took longer than {seconds:.3g} s, the deadline "
            f"(a crafted or very large file; set {TIMEOUT_ENV} to allow more seconds)"
        ) from None
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            left = previous_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6), previous_interval)


@contextlib.contextmanager
def reading_boundary(path: Path) -> Iterator[None]:
    """The edge of the torch reader: whatever torch or a crafted object raises becomes a
    LoaderError naming the file, never an internal error."""
    try:
        yield
    except LoaderError:
        raise
    except MemoryError:
        raise LoaderError(f"{path}: not enough memory to read this PyTorch checkpoint") from None
    except RecursionError:
        raise LoaderError(
            f"{path}: holds objects nested too deeply to read (RecursionError)"
        ) from None
    except Exception as error:
        text = str(error).strip()
        first_line = text.splitlines()[0][:200] if text else ""
        raise LoaderError(
            f"{path}: not a readable PyTorch checkpoint "
            f"({type(error).__name__}{': ' + first_line if first_line else ''})"
        ) from error


def _is_weights_only_refusal(error: Exception) -> bool:
    """torch's weights-only unpickler met something outside its allow-list."""
    return isinstance(error, pickle.UnpicklingError) or (
        isinstance(error, RuntimeError) and "TorchScript" in str(error)
    )


def _is_torch_allowed(name: str) -> bool:
    """Globals a plain state dict refers to (torch's rebuild helpers, OrderedDict)."""
    return name.startswith("torch.") or name in ("collections.OrderedDict", "_codecs.encode")


_STRING_OPCODES = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING"}
)


def pickle_globals(path: Path, container: str) -> list[str] | None:
    """The Python globals (module.name) the file's pickles refer to, read statically with
    pickletools: nothing is unpickled, nothing runs. None when not even one pickle in the file
    parses to its end (a damaged file rather than one holding Python objects).

    torch's legacy format is several pickles in a row, then raw storage bytes; the zip format
    keeps its one pickle in `*/data.pkl`.
    """
    import io

    try:
        if container in ("zip", "torchscript"):
            with zipfile.ZipFile(path) as archive:
                member = _data_pkl_member(archive.namelist())
                if member is None:
                    return None
                data = archive.read(member)
            return _scan_pickles(io.BytesIO(data), len(data))
        with path.open("rb") as stream:
            return _scan_pickles(stream, path.stat().st_size)
    except ZIP_ERRORS:
        return None


def _scan_pickles(stream: BinaryIO, size: int) -> list[str] | None:
    """Globals named by the pickles at the start of `stream`; None when none parses."""
    import pickletools

    names: list[str] = []
    complete = 0
    # Legacy files hold 5 pickles (magic number, protocol, system info, object, storage keys).
    for _ in range(5):
        found: list[str] = []
        strings: list[str] = []
        memo: dict[int, str] = {}
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in _STRING_OPCODES:
                    strings.append(str(arg))
                elif opcode.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                # Protocol 4+ names modules and classes by strings that it memoizes and fetches
                # again; tracking only strings is enough to name a global, which is all this is for.
                elif opcode.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif opcode.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                    memo[int(str(arg))] = strings[-1]
                elif opcode.name in ("BINGET", "LONG_BINGET", "GET") and int(str(arg)) in memo:
                    strings.append(memo[int(str(arg))])
        except Exception:
            break
        complete += 1
        names.extend(found)
        if stream.tell() >= size:
            break
    return names if complete else None


def _refused_object(message: str) -> str | None:
    """The name of what the weights-only unpickler refused, from torch's message."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return _python3_name(match.group(1)) if match else None


def _python3_name(name: str) -> str:
    """A global's name as Python 3 knows it: pickles of protocol 2 and below (torch.save's
    default) name some modules as Python 2 did (`commands.check_call` for
    `subprocess.check_call`, `__builtin__.exec`), and the message should say what would run."""
    import _compat_pickle

    module, _, attribute = name.rpartition(".")
    if not module:
        return name
    if (module, attribute) in _compat_pickle.NAME_MAPPING:
        module, attribute = _compat_pickle.NAME_MAPPING[(module, attribute)]
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attribute}"


def _unsafe_message(path: Path, detail: str | None) -> str:
    """One line: the file, why it was refused, and the two ways forward."""
    what = f"Python objects ({detail})" if detail else "Python objects"
    return (
        f"{path}: holds {what} whose loading can run code, so it was not loaded; if you trust "
        "the file, rerun with --trust-pickle, or re-save it as a state dict "
        "(torch.save(model.state_dict(), path)) or as safetensors"
    )


@dataclass(frozen=True)
class FoundWeights:
    """The part of a loaded checkpoint that holds the weights."""

    weights: Any
    """A mapping of key -> tensor, or an nn.Module."""
    note: str | None
    """How it was found when it is not the whole file; None when it is."""


def find_weights(path: Path, loaded: object) -> FoundWeights:
    """The state dict (or module) inside what torch.load returned.

    A mapping with tensor values is a state dict. Otherwise the wrapper keys are tried in order
    (`state_dict`, `model_state_dict`, `model`, `module`, ...), then every nested mapping; the
    candidate with the most `.weight` tensors wins, so an optimizer state (int keys, no
    `.weight`) never beats the model's weights.
    """
    found = _search(loaded, (), _SearchBudget(path, set()))
    if found is None:
        raise LoaderError(f"{path}: holds no tensors to analyze ({_describe(loaded)})")
    weights, trail = found
    if not trail:
        return FoundWeights(weights, None)
    where = "".join(f"[{key!r}]" for key in trail)
    kind = "module" if is_module(weights) else "state dict"
    others = [str(key) for key in loaded if key != trail[0]] if isinstance(loaded, Mapping) else []
    also = f"; the file also holds: {', '.join(others)}" if others else ""
    return FoundWeights(weights, printable(f"the {kind} under {where}{also}"))


def _describe(loaded: object) -> str:
    if isinstance(loaded, Mapping):
        keys = printable(", ".join(str(key) for key in list(loaded)[:8]))
        return f"a dict with keys: {keys}" if keys else "an empty dict"
    return f"a {type(loaded).__name__}"


def _score(weights: Any) -> tuple[int, int]:
    """(number of `.weight` tensors, number of tensors): how much a candidate looks like the
    model's weights."""
    if is_module(weights):
        weights = weights.state_dict()
    keys = [key for key, value in weights.items() if is_tensor(value)]
    return sum(str(key).endswith(".weight") for key in keys), len(keys)


MAX_NESTING = 64
"""How deep in nested dicts the weights are looked for (real checkpoints nest 1 to 3 deep); a
crafted file can nest thousands deep."""
MAX_SEARCH_ENTRIES = 1_000_000
"""The most dict entries the search for the weights looks at. Each dict is looked at once
(a DAG of dicts sharing their children, or a dict holding itself, costs no more than its
distinct dicts), and a real checkpoint has a few entries per tensor: an optimizer state for
a million tensors fits."""


@dataclass
class _SearchBudget:
    """What the search has looked at: dicts by id, and how many entries are left to look at."""

    path: Path
    seen: set[int]
    entries_left: int = MAX_SEARCH_ENTRIES


def _search(
    loaded: object, trail: tuple[object, ...], budget: _SearchBudget
) -> tuple[Any, tuple[object, ...]] | None:
    """Depth-first search for the weights; `trail` is the keys walked so far."""
    if is_module(loaded):
        return loaded, trail
    if not isinstance(loaded, Mapping) or len(trail) > MAX_NESTING or id(loaded) in budget.seen:
        return None
    budget.seen.add(id(loaded))
    budget.entries_left -= len(loaded)
    if budget.entries_left < 0:
        raise LoaderError(
            f"{budget.path}: holds more than {MAX_SEARCH_ENTRIES} dict entries to search for "
            "the weights (a crafted file; real checkpoints hold a few per tensor)"
        )
    for key in WRAPPER_KEYS:
        if key in loaded:
            found = _search(loaded[key], (*trail, key), budget)
            if found is not None and _score(found[0])[1] > 0:
                return found
    if any(isinstance(key, str) and is_tensor(value) for key, value in loaded.items()):
        return loaded, trail
    best: tuple[Any, tuple[object, ...]] | None = None
    for key, value in loaded.items():
        found = _search(value, (*trail, key), budget)
        if found is not None and (best is None or _score(found[0]) > _score(best[0])):
            best = found
    if best is None or _score(best[0])[1] == 0:
        return None
    return best


def printable(text: str) -> str:
    """`text` with what cannot be written as UTF-8 (lone surrogates, which a pickle can carry)
    escaped, for notes and messages."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def checked_state_dict(path: Path, weights: Mapping[Any, Any]) -> dict[str, Any]:
    """The state dict with str keys, after refusing what cannot be listed honestly: a key that
    is not valid text (a lone surrogate: refused rather than escaped, since an escaped name
    would match no key of the model), two keys that read the same, a tensor view that overlaps
    itself or reaches past its storage (`check_view`)."""
    checked: dict[str, Any] = {}
    for key, value in weights.items():
        name = key if isinstance(key, str) else str(key)
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise LoaderError(
                f"{path}: the tensor name {ascii(name)[:120]} is not valid text (a lone "
                "surrogate); refusing the file rather than guessing the name"
            ) from None
        if name in checked:
            raise LoaderError(f"{path}: two keys of the state dict both read as {name!r}")
        if is_tensor(value):
            check_view(path, name, value)
        checked[name] = value
    return checked


def check_view(path: Path, key: str, tensor: Any) -> None:
    """Refuse a dense tensor whose view of its storage a real state dict never has.

    A stored weight is contiguous, or a transpose, permutation or slice of a contiguous tensor
    (torch.save keeps a view's storage, offset and strides). All of these use each storage
    element at most once and stay within the storage. A crafted file can instead view a tiny
    storage as a huge matrix (strides (0, 1) or (1, 1): a 20000 x 6000 matrix over 26,000
    floats), which costs minutes and gigabytes to analyze and means nothing. So: every
    dimension of more than one element, in order of increasing stride, must step past
    everything the smaller ones reach (no element is used twice), and the last element must
    lie within the storage's bytes. Then the view's size is at most the bytes stored. Read from
    size, stride, storage_offset and untyped_storage().nbytes() (a StoredTensor's own fields):
    nothing is materialized. A StoredTensor's storage was checked to lie within its zip member
    or the file when the file was read (`_torchfiles`).
    """
    from wwcli.loaders._torchpickle import StoredTensor

    if isinstance(tensor, StoredTensor):
        if tensor.kind is not None or tensor.storage is None or tensor.numel() == 0:
            return
        shape, strides = tensor.shape, tensor.stride
        offset, element_size = tensor.offset, tensor.element_size
        stored = tensor.storage.nbytes
    else:
        import torch

        if (
            tensor.layout != torch.strided
            or tensor.is_meta
            or tensor.is_nested
            or tensor.is_quantized
            or tensor.numel() == 0
        ):
            return
        shape = tuple(int(dim) for dim in tensor.shape)
        strides = tuple(int(step) for step in tensor.stride())
        offset, element_size = int(tensor.storage_offset()), int(tensor.element_size())
        stored = int(tensor.untyped_storage().nbytes())
    reach = 0
    for step, size in sorted((st, sz) for sz, st in zip(shape, strides, strict=True) if sz > 1):
        if step <= reach:
            raise LoaderError(
                f"{path}: tensor {key!r} is a {'x'.join(map(str, shape))} view with strides "
                f"{strides} that uses storage elements more than once (a crafted file: a "
                "stored weight never does)"
            )
        reach += (size - 1) * step
    end = (offset + reach + 1) * element_size
    if end > stored:
        raise LoaderError(
            f"{path}: tensor {key!r} reaches byte {end} of a storage of {stored} bytes"
        )


def tensor_entry(key: str, value: object) -> TensorEntry:
    """The state-dict view of one stored value (a tensor, or whatever else the file put there)."""
    from wwcli.loaders._torchpickle import StoredTensor

    if isinstance(value, StoredTensor):
        return TensorEntry(
            key=key, shape=value.shape, dtype=value.dtype, unreadable=_stored_unreadable(value)
        )
    if not is_tensor(value):
        return TensorEntry(
            key=key, shape=(), dtype="", unreadable=f"not a tensor ({type(value).__name__})"
        )
    value = cast("torch.Tensor", value)
    unreadable = _unreadable(value)
    # A nested tensor has no single shape (its `.shape` raises); it is listed without one.
    shape = () if value.is_nested else tuple(int(dim) for dim in value.shape)
    dtype = str(value.dtype).removeprefix("torch.")
    return TensorEntry(key=key, shape=shape, dtype=dtype, unreadable=unreadable)


ANALYZABLE_DTYPES = frozenset(
    {
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    }
)
"""The dtypes read as matrices: numpy's floats as stored, the others widened to float32, which
holds every bfloat16 and float8 value exactly (torch's `.float()`). Anything else (float4 pairs,
complex, quantized, bits, integers, bool) is listed with its reason and never converted."""
INTEGER_DTYPES = frozenset(
    {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
)


def _stored_unreadable(tensor: Any) -> str | None:
    """`_unreadable` for a StoredTensor: the same reasons, in the same order."""
    from wwcli.loaders._torchpickle import FLOAT8_DTYPES, float8_dtype

    dtype = tensor.dtype
    if tensor.kind is not None:
        return str(tensor.kind)
    if dtype.startswith("complex"):
        return f"complex tensor ({dtype}), not analyzed"
    if dtype == "bool":
        return "boolean tensor, not analyzed"
    if dtype in INTEGER_DTYPES:
        return f"integer tensor ({dtype}), not analyzed"
    if dtype not in ANALYZABLE_DTYPES:
        return f"unsupported dtype {dtype}, not analyzed"
    if dtype in FLOAT8_DTYPES and float8_dtype(dtype) is None:
        return f"unsupported dtype {dtype} (install or upgrade ml_dtypes)"
    return None


def _unreadable(tensor: torch.Tensor) -> str | None:
    """Why a tensor cannot become a float matrix; None when it can: a plain dense tensor (or
    nn.Parameter) on a real device, of an allow-listed dtype."""
    import torch

    dtype = str(tensor.dtype).removeprefix("torch.")
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return f"tensor subclass {type(tensor).__name__}, not analyzed"
    if tensor.is_nested:
        return "nested tensor, not analyzed"
    if tensor.layout != torch.strided:
        return f"{str(tensor.layout).removeprefix('torch.')} tensor, not analyzed"
    if tensor.is_quantized:
        return f"quantized tensor ({dtype}), not analyzed"
    if tensor.is_meta:
        return "tensor holds no data (meta device)"
    if tensor.is_complex():
        return f"complex tensor ({dtype}), not analyzed"
    if tensor.dtype == torch.bool:
        return "boolean tensor, not analyzed"
    if dtype in INTEGER_DTYPES:
        return f"integer tensor ({dtype}), not analyzed"
    if dtype not in ANALYZABLE_DTYPES:
        return f"unsupported dtype {dtype}, not analyzed"
    return None


def tensor_to_numpy(tensor: Any) -> np.ndarray:
    """A float tensor as numpy: float16/32/64 as stored (sharing memory: a view of the mapped
    file, or of torch's tensor), bfloat16 and float8 widened exactly to float32."""
    from wwcli.loaders._torchpickle import StoredTensor, tensor_array

    if isinstance(tensor, StoredTensor):
        return tensor_array(tensor)
    import torch

    tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.float32, torch.float64):
        return cast(np.ndarray, tensor.numpy())
    return cast(np.ndarray, tensor.float().numpy())


# ---------------------------------------------------------------------------------------------
# TorchScript archives: the module's parameters and buffers, never its code.

_SCRIPT_NOTE = (
    "the parameters and buffers of a TorchScript module, named as its state_dict() names them "
    "(its code is never run)"
)


def torchscript_state_dict(path: Path) -> Any:
    """The state dict of a TorchScript archive (`_torchfiles.ScriptStateDict`), read by the
    restricted unpickler with its `__torch__.*` objects as inert attribute holders. Nothing is
    imported and no TorchScript code runs, so no `--trust-pickle` is needed (and torch.jit.load,
    which would compile the archive's code, is never used)."""
    from wwcli.loaders._torchfiles import read_zip, script_state_dict
    from wwcli.loaders._torchpickle import DamagedPickleError, NeedsTorchError, RefusedPickleError

    check_pickle_shape(path, "torchscript")
    try:
        file = read_zip(path, script=True)
    except RefusedPickleError as refused:
        what = f" ({refused.name})" if refused.name else ""
        raise LoaderError(
            f"{path}: a TorchScript archive whose data.pkl holds Python objects{what} that a "
            "TorchScript module never holds, so it was not loaded"
        ) from None
    except DamagedPickleError as damaged:
        raise LoaderError(
            f"{path}: not a readable TorchScript archive (damaged pickle: {damaged})"
        ) from None
    except NeedsTorchError as needs:
        raise LoaderError(
            f"{path}: a TorchScript archive holding a tensor rebuilt by {needs}, which wwcli "
            "does not read"
        ) from None
    return script_state_dict(path, file)


def torchscript_checkpoint(path: Path) -> StateDictCheckpoint:
    """A TorchScript archive as a state dict: its `.weight` tensors numbered in state_dict()
    order, typed by rank and by the `original_name` of the module that holds each (an
    Embedding's 2-D weight is an embedding, a Linear's a dense matrix, a BatchNorm's 1-D
    scale a norm), which changes no id and no number."""
    script = torchscript_state_dict(path)
    tensors = checked_state_dict(path, script.tensors)
    if not tensors:
        raise LoaderError(f"{path}: a TorchScript module that holds no parameters or buffers")
    checkpoint = state_dict_checkpoint(path, LoadedStateDict(tensors, _SCRIPT_NOTE), "torchscript")
    checkpoint._numbered = [
        dataclasses.replace(
            numbered, spec=_typed_by_module(numbered.spec, script.owners.get(numbered.key, ""))
        )
        for numbered in checkpoint._numbered
    ]
    return checkpoint


def _typed_by_module(spec: LayerSpec, owner: str) -> LayerSpec:
    """A state-dict layer retyped by the class name of the TorchScript module holding it."""
    words = owner.lower()
    rank = len(spec.shape)
    if rank == 2 and spec.layer_type in (LayerType.DENSE, LayerType.EMBEDDING):
        if "embedding" in words:
            return dataclasses.replace(spec, layer_type=LayerType.EMBEDDING)
        if "linear" in words:
            return dataclasses.replace(spec, layer_type=LayerType.DENSE)
    if rank == 1 and "norm" in words and spec.layer_type is LayerType.OTHER:
        return dataclasses.replace(
            spec, layer_type=LayerType.NORM, skip_reason="normalization layer (1-D scale)"
        )
    return spec


# ---------------------------------------------------------------------------------------------
# A whole nn.Module (only with --trust-pickle): numbered as weightwatcher numbers a live module.


def module_layer_type(module: object) -> LayerType:
    """weightwatcher's type for a live module: by class, else by words in the class's full
    name ('linear', 'conv1d', 'conv2d', 'embedding', 'norm'), in that order."""
    from torch import nn

    words = str(type(module)).lower()
    if isinstance(module, nn.Linear) or "linear" in words:
        return LayerType.DENSE
    if isinstance(module, nn.Conv1d) or "conv1d" in words:
        return LayerType.CONV1D
    if isinstance(module, nn.Conv2d) or "conv2d" in words:
        return LayerType.CONV2D
    if isinstance(module, nn.Embedding) or "embedding" in words:
        return LayerType.EMBEDDING
    if "norm" in words:
        return LayerType.NORM
    return LayerType.OTHER


# The weight rank each analyzable type is read with: a Dense/Embedding matrix (and HF GPT-2's
# Conv1D, which is a matrix), a Conv1d kernel (out, in, k), a Conv2d kernel (out, in, kh, kw).
_MATRIX_RANKS = {
    LayerType.DENSE: (2,),
    LayerType.EMBEDDING: (2,),
    LayerType.CONV1D: (2, 3),
    LayerType.CONV2D: (4,),
}


def module_layer_spec(layer_id: int, module_path: str, module: object) -> LayerSpec:
    """The LayerSpec of one entry of `named_modules()`; the root is named by its class."""
    import torch

    name = module_path or type(module).__name__
    layer_type = module_layer_type(module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        if layer_type is LayerType.NORM:
            return LayerSpec(layer_id, name, LayerType.NORM, (), skip_reason="normalization layer")
        return LayerSpec(layer_id, name, LayerType.OTHER, (), skip_reason="no weights")
    entry = tensor_entry(name, weight)
    shape = entry.shape
    skip_reason = entry.unreadable
    if layer_type is LayerType.NORM:
        skip_reason = "normalization layer"
    elif layer_type is LayerType.OTHER:
        skip_reason = f"{type(module).__name__} layer, not analyzed"
    elif len(shape) not in _MATRIX_RANKS[layer_type]:
        skip_reason = f"{len(shape)}-D weight in a {layer_type} layer, not analyzed"
    elif 0 in shape:
        skip_reason = "empty tensor"
    is_matrix = layer_type in _MATRIX_RANKS and len(shape) in _MATRIX_RANKS[layer_type]
    return LayerSpec(
        layer_id=layer_id,
        name=name,
        layer_type=layer_type,
        shape=shape,
        dtype=entry.dtype,
        N=max(shape[0], shape[1]) if is_matrix else 0,
        M=min(shape[0], shape[1]) if is_matrix else 0,
        rf=math.prod(shape[2:]) if is_matrix else 1,
        skip_reason=skip_reason,
        kernel_axis=2 if is_matrix and layer_type is LayerType.CONV1D and len(shape) == 3 else None,
    )


class TorchModuleCheckpoint(Checkpoint):
    """A pickled nn.Module, loaded with --trust-pickle: one layer per `named_modules()` entry,
    ids from 0 with the root module first, as weightwatcher numbers a live PyTorch model."""

    def __init__(self, path: Path, module: Any, *, source_note: str | None = None) -> None:
        self.path = path
        self.format = "torch-module"
        self.source_note = source_note
        """What part of the file the module was found in; None when it is the whole file."""
        self._modules: list[tuple[LayerSpec, Any]] = [
            (module_layer_spec(layer_id, module_path, submodule), submodule)
            for layer_id, (module_path, submodule) in enumerate(module.named_modules())
        ]
        # Modules whose `weight` is one tensor (a tied embedding and head) name each other.
        weights = {
            spec.name + WEIGHT_SUFFIX: submodule.weight
            for spec, submodule in self._modules
            if spec.shape
        }
        ties = storage_ties(weights)
        self._modules = [
            (
                dataclasses.replace(spec, tied_to=ties[spec.name + WEIGHT_SUFFIX])
                if spec.name + WEIGHT_SUFFIX in ties
                else spec,
                submodule,
            )
            for spec, submodule in self._modules
        ]
        self._close: Callable[[], None] | None = self._modules.clear

    def layers(self) -> list[LayerSpec]:
        return [spec for spec, _ in self._modules]

    def matrices(self, layer: LayerSpec) -> list[np.ndarray]:
        if not 0 <= layer.layer_id < len(self._modules):
            raise LoaderError(f"{self.path}: no layer with id {layer.layer_id}")
        spec, module = self._modules[layer.layer_id]
        if spec.name != layer.name:
            raise LoaderError(
                f"{self.path}: layer {layer.layer_id} is {spec.name!r}, not {layer.name!r}"
            )
        if spec.skip_reason is not None:
            raise LoaderError(
                f"{self.path}: layer {layer.layer_id} ({layer.name}) is not analyzable: "
                f"{spec.skip_reason}"
            )
        return matrices_of_tensor(tensor_to_numpy(module.weight), spec)

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None
