"""Reads model folders: sharded safetensors with `model.safetensors.index.json`, folders of
safetensors files without an index, Hugging Face model folders (config.json beside the
weights) and folders of `pytorch_model*.bin` files, numbered as weightwatcher 0.7.7 numbers a
model folder (ids from 0), except that ids count on across files without gaps.

Safetensors folders never import torch; `.bin` folders import it when opened.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from wwcli.loaders._statedict import StateDictCheckpoint, TensorEntry, TensorReader
from wwcli.loaders.interface import Checkpoint, LoaderError
from wwcli.loaders.safetensors import read_header, tensor_entry, tensor_reader

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_GLOBS = ("model*.safetensors", "adapter_model*.safetensors")
"""What weightwatcher looks for, in its order; any `*.safetensors` is wwcli's last resort."""
BIN_GLOBS = ("pytorch_model*.bin", "adapter_model*.bin")
"""What makes weightwatcher read a folder as `.bin` files."""
BIN_READ_GLOB = "*model*bin"
"""The files weightwatcher then reads, in sorted order."""

GAP_NOTE = (
    "weightwatcher 0.7.7 leaves gaps in the ids of a folder from its third weight file on "
    "(its issue #268); wwcli counts on across files without gaps"
)


def open_folder(path: Path, *, trust_pickle: bool = False) -> Checkpoint:
    """Open a model folder; only headers (safetensors) or pickles of tensors (`.bin`) are read.

    Order of ids: with `model.safetensors.index.json`, shard by shard in sorted file-name order
    and, within a shard, in the index's `weight_map` order (how weightwatcher reads it); without
    an index, file by file in sorted name order and, within a file, in sorted key order; `.bin`
    files in sorted name order, each in its stored order. `trust_pickle` is passed on to the
    reader of `.bin` files.

    Raises LoaderError when the folder holds no weights, its index is malformed or names a
    missing shard or tensor, or a weight file cannot be read.
    """
    if not path.exists():
        raise LoaderError(f"{path}: no such folder")
    if not path.is_dir():
        raise LoaderError(f"{path}: not a folder")
    hf_note = _hugging_face_note(path)
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        return _open_safetensors_index(path, index, hf_note)
    for pattern in SAFETENSORS_GLOBS:
        files = _files(path, pattern)
        if files:
            return _open_safetensors_files(path, files, hf_note, read_by_weightwatcher=True)
    if any(_files(path, pattern) for pattern in BIN_GLOBS) or (path / BIN_INDEX).is_file():
        return _open_bin_files(path, hf_note, trust_pickle=trust_pickle)
    files = _files(path, "*.safetensors")
    if files:
        return _open_safetensors_files(path, files, hf_note, read_by_weightwatcher=False)
    looked_for = [SAFETENSORS_INDEX, *SAFETENSORS_GLOBS, *BIN_GLOBS, "*.safetensors"]
    raise LoaderError(f"{path}: no weights in this folder (looked for {', '.join(looked_for)})")


def _files(folder: Path, pattern: str) -> list[Path]:
    """Files matching `pattern`, sorted by name as weightwatcher sorts its glob."""
    return sorted((file for file in folder.glob(pattern) if file.is_file()), key=lambda f: f.name)


def _hugging_face_note(folder: Path) -> str | None:
    """'Hugging Face model folder (LlamaForCausalLM)' when config.json says so; informative
    only, so a config.json that cannot be read is ignored."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(config, dict):
        return None
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        return f"Hugging Face model folder ({', '.join(map(str, architectures))})"
    model_type = config.get("model_type")
    return f"Hugging Face model folder ({model_type or 'no architecture named'})"


def _join_notes(*notes: str | None) -> str | None:
    return "; ".join(note for note in notes if note) or None


def _read_index(index: Path) -> dict[str, str]:
    """The `weight_map` of a Hugging Face index file: tensor key -> shard file name."""
    try:
        document = json.loads(index.read_text(encoding="utf-8"))
    except OSError as error:
        raise LoaderError(f"{index}: cannot read: {error.strerror or error}") from error
    except ValueError as error:
        raise LoaderError(f"{index}: not valid JSON ({error})") from error
    except RecursionError as error:
        raise LoaderError(f"{index}: JSON nested too deeply") from error
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(shard, str) for shard in weight_map.values()
    ):
        raise LoaderError(f"{index}: has no 'weight_map' object of tensor name -> file name")
    return weight_map


def _shard_path(folder: Path, index: Path, shard: str) -> Path:
    """The shard file an index names; it must be a file inside the folder."""
    shard_path = folder / shard
    if Path(shard).is_absolute() or ".." in Path(shard).parts:
        raise LoaderError(f"{index}: names shard {shard!r}, which is outside {folder}")
    if not shard_path.is_file():
        raise LoaderError(f"{index}: names shard {shard!r}, which is missing from {folder}")
    return shard_path


def _open_safetensors_index(folder: Path, index: Path, hf_note: str | None) -> Checkpoint:
    weight_map = _read_index(index)
    tensors: list[tuple[TensorEntry, TensorReader]] = []
    listed = 0
    in_shards = 0
    # weightwatcher takes the shards in sorted order (numpy.unique of the weight_map's values)
    # and, for each, the keys the weight_map assigns to it in weight_map order.
    for shard in sorted(set(weight_map.values())):
        shard_path = _shard_path(folder, index, shard)
        infos = read_header(shard_path).by_key()
        in_shards += len(infos)
        for key, key_shard in weight_map.items():
            if key_shard != shard:
                continue
            info = infos.get(key)
            if info is None:
                raise LoaderError(
                    f"{index}: says tensor {key!r} is in {shard}, which has no such tensor"
                )
            tensors.append((tensor_entry(info), tensor_reader(shard_path, info)))
            listed += 1
    unlisted = in_shards - listed
    unlisted_note = (
        f"{unlisted} tensors in the shards are not in the index and are not numbered "
        "(weightwatcher skips them too)"
        if unlisted
        else None
    )
    return StateDictCheckpoint(
        folder,
        "safetensors-index",
        tensors,
        source_note=_join_notes(hf_note, unlisted_note),
    )


def _open_safetensors_files(
    folder: Path, files: Sequence[Path], hf_note: str | None, *, read_by_weightwatcher: bool
) -> Checkpoint:
    tensors: list[tuple[TensorEntry, TensorReader]] = []
    for file in files:
        for info in sorted(read_header(file).tensors, key=lambda info: info.key):
            tensors.append((tensor_entry(info), tensor_reader(file, info)))
    ids_note = GAP_NOTE if len(files) >= 3 else None
    if not read_by_weightwatcher:
        ids_note = _join_notes(
            "weightwatcher 0.7.7 does not read this folder (it looks for model*.safetensors); "
            "ids follow its rule for a folder without an index",
            ids_note,
        )
    return StateDictCheckpoint(
        folder, "safetensors-folder", tensors, ids_note=ids_note, source_note=hf_note
    )


def _open_bin_files(folder: Path, hf_note: str | None, *, trust_pickle: bool) -> Checkpoint:
    from wwcli.loaders.torch import load_state_dict, tensor_entry, tensor_reader

    bin_index = folder / BIN_INDEX
    if bin_index.is_file():
        # weightwatcher ignores this index (it globs the files), so it only has to be right.
        for shard in sorted(set(_read_index(bin_index).values())):
            _shard_path(folder, bin_index, shard)
    files = _files(folder, BIN_READ_GLOB)
    tensors: list[tuple[TensorEntry, TensorReader]] = []
    closers: list[Callable[[], None]] = []
    notes: list[str] = []
    for file in files:
        loaded = load_state_dict(file, trust_pickle=trust_pickle)
        state: dict[str, Any] = {str(key): value for key, value in loaded.tensors.items()}
        read = tensor_reader(state)
        tensors.extend((tensor_entry(key, value), read) for key, value in state.items())
        closers.append(state.clear)
        if loaded.source_note:
            notes.append(f"{file.name}: {loaded.source_note}")

    def close() -> None:
        for clear in closers:
            clear()

    return StateDictCheckpoint(
        folder,
        "torch-folder",
        tensors,
        ids_note=GAP_NOTE if len(files) >= 3 else None,
        source_note=_join_notes(hf_note, *notes),
        close=close,
    )
