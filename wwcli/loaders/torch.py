"""Reads PyTorch checkpoints (`.pt`, `.pth`, `.bin`, `.ckpt`): state dicts and the dicts
training code writes around them, with `torch.load(weights_only=True)`, memory-mapped where the
file is in torch's zip format. Nothing in a pickle runs unless the user says `--trust-pickle`.

torch is imported only when a file of this format is opened.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from wwcli.loaders._statedict import (
    StateDictCheckpoint,
    TensorEntry,
    TensorReader,
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
    found = find_weights(path, load_checkpoint_object(path, trust_pickle=trust_pickle))
    torch = _import_torch(path)
    if isinstance(found.weights, torch.nn.Module):
        return TorchModuleCheckpoint(path, found.weights, source_note=found.note)
    return state_dict_checkpoint(path, LoadedStateDict(found.weights, found.note), "torch")


def load_state_dict(path: Path, *, trust_pickle: bool = False) -> LoadedStateDict:
    """The state dict a file holds (unwrapped), for readers of folders of `.bin` shards.

    Raises LoaderError as `open_torch` does, and when the file holds a whole module.
    """
    found = find_weights(path, load_checkpoint_object(path, trust_pickle=trust_pickle))
    torch = _import_torch(path)
    if isinstance(found.weights, torch.nn.Module):
        raise LoaderError(
            f"{path}: holds a whole {type(found.weights).__name__} module, not a state dict; "
            "open the file itself to number its modules"
        )
    return LoadedStateDict(found.weights, found.note)


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
    )


def tensor_reader(tensors: Mapping[str, Any]) -> TensorReader:
    """Reads a tensor of a loaded state dict as numpy, one tensor at a time."""

    def read(key: str) -> np.ndarray:
        return tensor_to_numpy(tensors[key])

    return read


def load_checkpoint_object(path: Path, *, trust_pickle: bool) -> object:
    """torch.load the file: weights_only (allow-listed types only) unless `trust_pickle`,
    memory-mapped when the file is in torch's zip format."""
    container = _container_kind(path)
    torch = _import_torch(path)
    if container == "torchscript" and not trust_pickle:
        raise LoaderError(_unsafe_message(path, "a TorchScript program"))
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
            detail = _refused_object(str(error))
            if detail is None:
                globals_named = pickle_globals(path, container)
                if globals_named is None:
                    raise LoaderError(
                        f"{path}: not a readable PyTorch checkpoint (damaged pickle)"
                    ) from None
                detail = next(
                    (_python3_name(name) for name in globals_named if not _is_torch_allowed(name)),
                    None,
                )
            raise LoaderError(_unsafe_message(path, detail)) from None
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
        except ZIP_ERRORS as error:
            raise LoaderError(f"{path}: damaged zip archive (truncated?): {error}") from error
        if any(name.endswith("/constants.pkl") for name in names):
            return "torchscript"
        if not any(name.endswith("/data.pkl") for name in names):
            raise LoaderError(f"{path}: a zip archive without data.pkl, not a PyTorch checkpoint")
        return "zip"
    if head[:1] == PICKLE_PROTO and 2 <= head[1] <= 5:
        return "pickle"
    raise LoaderError(f"{path}: not a PyTorch checkpoint (neither torch's zip format nor a pickle)")


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
        if container == "zip":
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
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
    import torch

    found = _search(loaded, ())
    if found is None:
        raise LoaderError(f"{path}: holds no tensors to analyze ({_describe(loaded)})")
    weights, trail = found
    if not trail:
        return FoundWeights(weights, None)
    where = "".join(f"[{key!r}]" for key in trail)
    kind = "module" if isinstance(weights, torch.nn.Module) else "state dict"
    others = [str(key) for key in loaded if key != trail[0]] if isinstance(loaded, Mapping) else []
    also = f"; the file also holds: {', '.join(others)}" if others else ""
    return FoundWeights(weights, f"the {kind} under {where}{also}")


def _describe(loaded: object) -> str:
    if isinstance(loaded, Mapping):
        keys = ", ".join(str(key) for key in list(loaded)[:8])
        return f"a dict with keys: {keys}" if keys else "an empty dict"
    return f"a {type(loaded).__name__}"


def _score(weights: Any) -> tuple[int, int]:
    """(number of `.weight` tensors, number of tensors): how much a candidate looks like the
    model's weights."""
    import torch

    if isinstance(weights, torch.nn.Module):
        weights = weights.state_dict()
    keys = [key for key, value in weights.items() if isinstance(value, torch.Tensor)]
    return sum(str(key).endswith(".weight") for key in keys), len(keys)


MAX_NESTING = 64
"""How deep in nested dicts the weights are looked for (real checkpoints nest 1 to 3 deep); a
crafted file can nest thousands deep."""


def _search(loaded: object, trail: tuple[object, ...]) -> tuple[Any, tuple[object, ...]] | None:
    """Depth-first search for the weights; `trail` is the keys walked so far."""
    import torch

    if isinstance(loaded, torch.nn.Module):
        return loaded, trail
    if not isinstance(loaded, Mapping) or len(trail) > MAX_NESTING:
        return None
    for key in WRAPPER_KEYS:
        if key in loaded:
            found = _search(loaded[key], (*trail, key))
            if found is not None and _score(found[0])[1] > 0:
                return found
    if any(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        return loaded, trail
    best: tuple[Any, tuple[object, ...]] | None = None
    for key, value in loaded.items():
        found = _search(value, (*trail, key))
        if found is not None and (best is None or _score(found[0]) > _score(best[0])):
            best = found
    if best is None or _score(best[0])[1] == 0:
        return None
    return best


def tensor_entry(key: str, value: object) -> TensorEntry:
    """The state-dict view of one stored value (a tensor, or whatever else the file put there)."""
    import torch

    if not isinstance(value, torch.Tensor):
        return TensorEntry(
            key=key, shape=(), dtype="", unreadable=f"not a tensor ({type(value).__name__})"
        )
    shape = tuple(int(dim) for dim in value.shape)
    dtype = str(value.dtype).removeprefix("torch.")
    return TensorEntry(key=key, shape=shape, dtype=dtype, unreadable=_unreadable(value))


def _unreadable(tensor: torch.Tensor) -> str | None:
    """Why a tensor cannot become a float matrix; None when it can."""
    import torch

    dtype = str(tensor.dtype).removeprefix("torch.")
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
    if not tensor.is_floating_point():
        return f"integer tensor ({dtype}), not analyzed"
    return None


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A float tensor as numpy: float16/32/64 as stored (sharing memory where torch allows),
    bfloat16 and float8 widened exactly to float32."""
    import torch

    tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.float32, torch.float64):
        return tensor.numpy()
    return tensor.float().numpy()


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
