"""Reads model folders: sharded safetensors with `model.safetensors.index.json`, folders of
safetensors files without an index, Hugging Face model folders (config.json beside the
weights) and folders of `pytorch_model*.bin` files, numbered as weightwatcher 0.7.7 numbers a
model folder (ids from 0), except that ids count on across files without gaps.

Neither safetensors nor `.bin` folders import torch: `.bin` shards go through the PyTorch
reader, which reads them without it.

Every file read (index, shards, config.json) must be a regular file whose real path, links
followed, lies inside the folder, or, for a snapshot of a Hugging Face cache, inside the
cache's `blobs/` of that repository (`ReadableFiles`).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wwcli.loaders._statedict import (
    StateDictCheckpoint,
    TensorEntry,
    TensorReader,
    metadata_ties,
    tied_head_pairs,
)
from wwcli.loaders.interface import (
    Checkpoint,
    LoaderError,
    check_layer_count,
    file_kind,
    open_regular,
)
from wwcli.loaders.safetensors import (
    lone_surrogate,
    read_header,
    shown,
    tensor_entry,
    tensor_reader,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_GLOBS = ("model*.safetensors", "adapter_model*.safetensors")
"""What weightwatcher looks for, in its order; any `*.safetensors` is wwcli's last resort."""
BIN_GLOBS = ("pytorch_model*.bin", "adapter_model*.bin")
"""What makes weightwatcher read a folder as `.bin` files."""
BIN_READ_GLOB = "*model*bin"
"""The files weightwatcher then reads, in sorted order."""

MAX_INDEX_BYTES = 100_000_000
"""An index lists one line per tensor; past the size of the largest safetensors header it is
refused, before it is read."""
MAX_CONFIG_BYTES = 16_000_000
"""config.json is informative only; a larger one is not read (and not mentioned)."""

HF_CACHE_REPO_PREFIXES = ("models--", "datasets--", "spaces--")
"""How huggingface_hub names a repository's folder in its cache (`models--org--name`)."""

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
    missing shard or tensor, a weight file cannot be read, a file to read is a link out of the
    folder or not a regular file, or the files list more than MAX_LAYERS tensors in all.
    """
    if not path.exists():
        raise LoaderError(f"{path}: no such folder")
    if not path.is_dir():
        raise LoaderError(f"{path}: not a folder")
    files = ReadableFiles.of(path)
    hf_note = _hugging_face_note(files)
    index = path / SAFETENSORS_INDEX
    if os.path.lexists(index):
        return _open_safetensors_index(files, index, hf_note)
    for pattern in SAFETENSORS_GLOBS:
        found = _files(path, pattern)
        if found:
            return _open_safetensors_files(files, found, hf_note, read_by_weightwatcher=True)
    if any(_files(path, pattern) for pattern in BIN_GLOBS) or os.path.lexists(path / BIN_INDEX):
        return _open_bin_files(files, hf_note, trust_pickle=trust_pickle)
    found = _files(path, "*.safetensors")
    if found:
        return _open_safetensors_files(files, found, hf_note, read_by_weightwatcher=False)
    _refuse_other_folders(path)
    looked_for = [SAFETENSORS_INDEX, *SAFETENSORS_GLOBS, *BIN_GLOBS, "*.safetensors"]
    raise LoaderError(f"{path}: no weights in this folder (looked for {', '.join(looked_for)})")


CHECKPOINT_SUFFIXES = (
    ".pt",
    ".pth",
    ".ckpt",
    ".bin",
    ".keras",
    ".h5",
    ".hdf5",
    ".onnx",
    ".gguf",
    ".npz",
    ".npy",
)
"""Files that are each a checkpoint of their own: a folder of them is a run, not one model."""
_SHOWN_FILES = 8


def _refuse_other_folders(path: Path) -> None:
    """LoaderError naming what a folder that holds no single model is instead: a TensorFlow
    SavedModel, or a folder of checkpoint files (listed, with the commands that read them)."""
    if os.path.lexists(path / "saved_model.pb") or os.path.lexists(path / "saved_model.pbtxt"):
        raise LoaderError(
            f"{path}: a TensorFlow SavedModel folder: not supported; save the model as .keras "
            "(model.save('model.keras')) or export it to ONNX (tf2onnx)"
        )
    checkpoints = sorted(
        (
            file
            for file in path.iterdir()
            if file.suffix.lower() in CHECKPOINT_SUFFIXES and not file.is_dir()
        ),
        key=lambda file: file.name,
    )
    if not checkpoints:
        return
    if len(checkpoints) == 1:
        raise LoaderError(
            f"{path}: holds no model folder but one checkpoint file, "
            f"{shown_name(checkpoints[0].name)}: give it as the path "
            f"(`wwcli describe {path}/{shown_name(checkpoints[0].name)}`)"
        )
    shown_files = ", ".join(shown_name(file.name) for file in checkpoints[:_SHOWN_FILES])
    if len(checkpoints) > _SHOWN_FILES:
        shown_files += f", ... ({len(checkpoints) - _SHOWN_FILES} more)"
    suffixes = sorted({file.suffix.lower() for file in checkpoints})
    pattern = f"*{suffixes[0]}" if len(suffixes) == 1 else "*"
    raise LoaderError(
        f"{path}: a folder of {len(checkpoints)} checkpoint files, not one model: "
        f"{shown_files}; analyze them with `wwcli analyze {path}/{pattern}` or "
        f"`wwcli sweep {path}`"
    )


@dataclass(frozen=True)
class ReadableFiles:
    """Where the files a model folder's reader opens may really be, links followed.

    A model folder is data someone else wrote, and a link in it can lead anywhere (an SSH key,
    another model, /dev/zero, a FIFO that blocks whoever opens it). So a file is read only when
    its real path lies under one of `roots`: the folder itself (its real path), and, when the
    folder is in a snapshot of a Hugging Face cache, that repository's `blobs/`, where the
    cache's links lead (`models--org--name/snapshots/<rev>/model.safetensors ->
    ../../blobs/<sha256>`). It must also be a regular file.
    """

    folder: Path
    """The folder as given."""
    roots: tuple[Path, ...]
    """Real paths under which a file may be read."""

    @classmethod
    def of(cls, folder: Path) -> ReadableFiles:
        """The roots for a folder: itself, and its Hugging Face cache repository's blobs."""
        real = Path(os.path.realpath(folder))
        roots = [real]
        for snapshot in (real, *real.parents):
            repo = snapshot.parent.parent
            if (
                snapshot.parent.name == "snapshots"
                and repo.name.startswith(HF_CACHE_REPO_PREFIXES)
                and (repo / "blobs").is_dir()
            ):
                roots.append(Path(os.path.realpath(repo / "blobs")))
                break
        return cls(folder=folder, roots=tuple(roots))

    def check(self, file: Path) -> Path:
        """The real path of `file`, after checking that wwcli may read it; raises LoaderError
        naming the file (and where its link leads) when it may not."""
        real = Path(os.path.realpath(file))
        if not any(real.is_relative_to(root) for root in self.roots):
            allowed = "the folder" if len(self.roots) == 1 else "the folder or the cache's blobs/"
            raise LoaderError(
                f"{file}: is a link to {real}, outside {self.folder}; wwcli reads only files "
                f"inside {allowed}"
            )
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError as error:
            if os.path.islink(file):
                raise LoaderError(f"{file}: is a link to {real}, which does not exist") from error
            raise LoaderError(f"{file}: no such file") from error
        except OSError as error:
            raise LoaderError(f"{file}: cannot read: {error.strerror or error}") from error
        if not stat.S_ISREG(mode):
            raise LoaderError(f"{file}: not a regular file ({file_kind(mode)})")
        return real


def _files(folder: Path, pattern: str) -> list[Path]:
    """Entries matching `pattern`, sorted by name as weightwatcher sorts its glob. Folders are
    left out; FIFOs, devices and links that lead out of the folder are kept, to be refused
    by name when they are read rather than skipped in silence."""
    return sorted(
        (file for file in folder.glob(pattern) if not file.is_dir()), key=lambda f: f.name
    )


def _read_config(files: ReadableFiles) -> dict[str, Any] | None:
    """config.json as a dict; None when there is none, or it is not a JSON object or too large
    to be a config (it is informative only). One that is a link out of the folder or not a
    regular file is refused like any file read."""
    config_path = files.folder / "config.json"
    if not os.path.lexists(config_path) or config_path.is_dir():
        return None
    files.check(config_path)
    try:
        with open_regular(config_path) as stream:
            if os.fstat(stream.fileno()).st_size > MAX_CONFIG_BYTES:
                return None
            config = json.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def _ties_word_embeddings(files: ReadableFiles) -> bool:
    """Whether config.json says `"tie_word_embeddings": true` (the JSON literal, nothing
    else: Hugging Face's default when the key is absent is not what the file says)."""
    config = _read_config(files)
    return config is not None and config.get("tie_word_embeddings") is True


def _folder_ties(
    files: ReadableFiles,
    tensors: Sequence[tuple[TensorEntry, TensorReader]],
    found_ties: dict[str, str],
) -> dict[str, str]:
    """The ties the weight files recorded (`found_ties`), and the input embedding and
    `lm_head` when config.json ties them."""
    ties = dict(found_ties)
    if _ties_word_embeddings(files):
        keys = [entry.key for entry, _ in tensors]
        shapes = {entry.key: entry.shape for entry, _ in tensors}
        for key, other in tied_head_pairs(keys, shapes).items():
            ties.setdefault(key, other)
    return ties


def _hugging_face_note(files: ReadableFiles) -> str | None:
    """'Hugging Face model folder (LlamaForCausalLM)' when config.json says so; informative
    only, so a config.json that is not JSON, or too large to be a config, is ignored. One that
    is a link out of the folder or not a regular file is refused like any file read."""
    config = _read_config(files)
    if config is None:
        return None
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        return f"Hugging Face model folder ({', '.join(map(shown_name, architectures))})"
    model_type = config.get("model_type")
    named = shown_name(model_type) if model_type else "no architecture named"
    return f"Hugging Face model folder ({named})"


def shown_name(value: object) -> str:
    """A name from config.json for a note: a string as it is (cut at 100 characters), anything
    else as its short repr; a lone surrogate escaped so that the note can be printed."""
    text = value if isinstance(value, str) else shown(value)
    if lone_surrogate(text) is not None:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 100 else text[:97] + "..."


def _join_notes(*notes: str | None) -> str | None:
    return "; ".join(note for note in notes if note) or None


def _read_index(files: ReadableFiles, index: Path) -> dict[str, str]:
    """The `weight_map` of a Hugging Face index file: tensor key -> shard file name."""
    files.check(index)
    try:
        with open_regular(index) as stream:
            size = os.fstat(stream.fileno()).st_size
            if size > MAX_INDEX_BYTES:
                raise LoaderError(
                    f"{index}: {size} bytes, more than the {MAX_INDEX_BYTES} an index may have"
                )
            raw = stream.read()
    except OSError as error:
        raise LoaderError(f"{index}: cannot read: {error.strerror or error}") from error
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise LoaderError(f"{index}: not valid UTF-8 ({error})") from error
    except RecursionError as error:
        raise LoaderError(f"{index}: JSON nested too deeply") from error
    except ValueError as error:
        raise LoaderError(f"{index}: not valid JSON ({shown(str(error))[1:-1]})") from error
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(shard, str) for shard in weight_map.values()
    ):
        raise LoaderError(f"{index}: has no 'weight_map' object of tensor name -> file name")
    check_layer_count(index, len(weight_map))
    return weight_map


def _shard_path(files: ReadableFiles, index: Path, shard: str) -> Path:
    """The shard file an index names; it must be a regular file inside the folder (or, in a
    Hugging Face cache, a link into the repository's blobs)."""
    folder = files.folder
    if "\0" in shard or lone_surrogate(shard) is not None:
        raise LoaderError(f"{index}: names shard {shown(shard)}, which is not a file name")
    shard_path = folder / shard
    if not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
        raise LoaderError(f"{index}: names shard {shown(shard)}, which is outside {folder}")
    if not os.path.lexists(shard_path):
        raise LoaderError(f"{index}: names shard {shown(shard)}, which is missing from {folder}")
    files.check(shard_path)
    return shard_path


class FolderCheckpoint(StateDictCheckpoint):
    """A model folder's checkpoint: the state-dict numbering, and the files it reads."""

    def __init__(
        self,
        path: Path,
        file_format: str,
        tensors: Sequence[tuple[TensorEntry, TensorReader]],
        *,
        read: Sequence[Path],
        ids_note: str | None = None,
        source_note: str | None = None,
        close: Callable[[], None] | None = None,
        tied: dict[str, str] | None = None,
    ) -> None:
        """`read`: every file opened for this checkpoint, as real paths."""
        super().__init__(
            path,
            file_format,
            tensors,
            ids_note=ids_note,
            source_note=source_note,
            close=close,
            tied=tied,
        )
        self._read = tuple(dict.fromkeys(read))

    def source_files(self) -> tuple[Path, ...]:
        """The index, every shard and config.json, when read: real paths, links followed."""
        return self._read


def _config_read(files: ReadableFiles, hf_note: str | None) -> list[Path]:
    """config.json's real path when it was read for the note."""
    return [files.check(files.folder / "config.json")] if hf_note is not None else []


def _open_safetensors_index(files: ReadableFiles, index: Path, hf_note: str | None) -> Checkpoint:
    weight_map = _read_index(files, index)
    read = [files.check(index), *_config_read(files, hf_note)]
    keys_by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        keys_by_shard.setdefault(shard, []).append(key)
    tensors: list[tuple[TensorEntry, TensorReader]] = []
    ties: dict[str, str] = {}
    listed = 0
    in_shards = 0
    # weightwatcher takes the shards in sorted order (numpy.unique of the weight_map's values)
    # and, for each, the keys the weight_map assigns to it in weight_map order.
    for shard in sorted(keys_by_shard):
        shard_path = _shard_path(files, index, shard)
        read.append(files.check(shard_path))
        header = read_header(shard_path)
        infos = header.by_key()
        ties.update(metadata_ties(header.metadata, list(infos)))
        in_shards += len(infos)
        check_layer_count(files.folder, in_shards)
        for key in keys_by_shard[shard]:
            info = infos.get(key)
            if info is None:
                raise LoaderError(
                    f"{index}: says tensor {shown(key)} is in {shown(shard)[1:-1]}, which has "
                    "no such tensor"
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
    return FolderCheckpoint(
        files.folder,
        "safetensors-index",
        tensors,
        read=read,
        source_note=_join_notes(hf_note, unlisted_note),
        tied=_folder_ties(files, tensors, ties),
    )


def _open_safetensors_files(
    files: ReadableFiles,
    found: Sequence[Path],
    hf_note: str | None,
    *,
    read_by_weightwatcher: bool,
) -> Checkpoint:
    tensors: list[tuple[TensorEntry, TensorReader]] = []
    ties: dict[str, str] = {}
    read = _config_read(files, hf_note)
    for file in found:
        read.append(files.check(file))
        header = read_header(file)
        for info in sorted(header.tensors, key=lambda info: info.key):
            tensors.append((tensor_entry(info), tensor_reader(file, info)))
        ties.update(metadata_ties(header.metadata, [info.key for info in header.tensors]))
        check_layer_count(files.folder, len(tensors))
    ids_note = GAP_NOTE if len(found) >= 3 else None
    if not read_by_weightwatcher:
        ids_note = _join_notes(
            "weightwatcher 0.7.7 does not read this folder (it looks for model*.safetensors); "
            "ids follow its rule for a folder without an index",
            ids_note,
        )
    return FolderCheckpoint(
        files.folder,
        "safetensors-folder",
        tensors,
        read=read,
        ids_note=ids_note,
        source_note=hf_note,
        tied=_folder_ties(files, tensors, ties),
    )


def _open_bin_files(files: ReadableFiles, hf_note: str | None, *, trust_pickle: bool) -> Checkpoint:
    from wwcli.loaders.torch import load_state_dict, storage_ties, tensor_entry, tensor_reader

    folder = files.folder
    read = _config_read(files, hf_note)
    bin_index = folder / BIN_INDEX
    if os.path.lexists(bin_index):
        # weightwatcher ignores this index (it globs the files), so it only has to be right.
        read.append(files.check(bin_index))
        for shard in sorted(set(_read_index(files, bin_index).values())):
            _shard_path(files, bin_index, shard)
    found = _files(folder, BIN_READ_GLOB)
    tensors: list[tuple[TensorEntry, TensorReader]] = []
    ties: dict[str, str] = {}
    closers: list[Callable[[], None]] = []
    notes: list[str] = []
    for file in found:
        read.append(files.check(file))
        loaded = load_state_dict(file, trust_pickle=trust_pickle)
        state: dict[str, Any] = {str(key): value for key, value in loaded.tensors.items()}
        read_tensor = tensor_reader(state)
        tensors.extend((tensor_entry(key, value), read_tensor) for key, value in state.items())
        ties.update(storage_ties(state))
        closers.append(state.clear)
        if loaded.source_note:
            notes.append(f"{file.name}: {loaded.source_note}")
        check_layer_count(folder, len(tensors))

    def close() -> None:
        for clear in closers:
            clear()

    return FolderCheckpoint(
        folder,
        "torch-folder",
        tensors,
        read=read,
        ids_note=GAP_NOTE if len(found) >= 3 else None,
        source_note=_join_notes(hf_note, *notes),
        close=close,
        tied=_folder_ties(files, tensors, ties),
    )
