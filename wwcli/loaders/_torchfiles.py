"""torch's containers read without torch: the zip format, the legacy format and TorchScript
archives, over one memory map of the file. The pickles go through the restricted unpickler of
`_torchpickle`; the storages are placed in the file (and checked to lie within their zip member
or the file) so that each tensor's numbers can later be read as a numpy view.

The zip archive's sizes and compression were checked before (`loaders.torch.check_members`);
what is read here is checked again where it is used: a storage member must be stored, not
compressed, and hold at least the bytes its persistent id declares.
"""

from __future__ import annotations

import mmap
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from wwcli.loaders._torchpickle import (
    ELEMENT_SIZES,
    MAGIC_NUMBER,
    PROTOCOL_VERSION,
    DamagedPickleError,
    ScriptObject,
    Storage,
    StoredTensor,
    load_pickle,
    storage_from_id,
)
from wwcli.loaders.interface import ZIP_ERRORS, LoaderError, open_regular

ZIP_SIGNATURE = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")
MAX_CODE_BYTES = 256 << 20
"""The most bytes of TorchScript code (class declarations) read to learn which attributes are
parameters and buffers."""
MAX_MODULE_DEPTH = 1_000
"""The deepest nesting of TorchScript modules walked (real models nest a few dozen deep)."""
MAX_WALK_ENTRIES = 1_000_000
"""The most module attributes the walk of a TorchScript module looks at (a DAG of shared
modules is walked once per path, as `state_dict()` walks it)."""


@dataclass
class TorchFile:
    """A PyTorch file read without torch: the object its pickle holds, and the memory map the
    storages lie in."""

    loaded: Any
    """What the pickle holds: dicts, lists, primitive values, StoredTensor (and ScriptObject in
    a TorchScript archive)."""
    buffer: Any
    """The memory-mapped file (a private, copy-on-write map)."""
    little_endian: bool
    """The byte order of the storages."""
    script_classes: dict[str, ScriptClass] | None = None
    """For a TorchScript archive: what the declarations of its classes list."""


def map_file(path: Path) -> mmap.mmap:
    """The whole file, memory-mapped privately (writes stay in this process, as torch's mmap)."""
    with open_regular(path) as stream:
        try:
            return mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as error:
            raise LoaderError(f"{path}: cannot read: cannot map the file ({error})") from error


def member_start(path: Path, buffer: Any, info: zipfile.ZipInfo) -> int:
    """Where a member's packed bytes begin, from its local header."""
    header = bytes(buffer[info.header_offset : info.header_offset + _LOCAL_HEADER.size])
    if len(header) < _LOCAL_HEADER.size or header[:4] != ZIP_SIGNATURE:
        raise LoaderError(f"{path}: damaged zip archive (no entry header for {info.filename!r})")
    fields = _LOCAL_HEADER.unpack(header)
    return int(info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10])


class _Archive:
    """A torch zip archive over the memory map: its members by name, each name once."""

    def __init__(self, path: Path, buffer: Any) -> None:
        self.path = path
        self.buffer = buffer
        try:
            self.zip = zipfile.ZipFile(_MapReader(buffer))
            infos = self.zip.infolist()
        except ZIP_ERRORS as error:
            raise LoaderError(f"{path}: damaged zip archive (truncated?): {error}") from error
        self.members: dict[str, zipfile.ZipInfo] = {}
        self.twice: set[str] = set()
        for info in infos:
            if info.filename in self.members:
                self.twice.add(info.filename)
            self.members[info.filename] = info
        data_pkl = [n for n in self.members if n.endswith("/data.pkl") and n.count("/") == 1]
        if not data_pkl:
            raise LoaderError(f"{path}: a zip archive without data.pkl, not a PyTorch checkpoint")
        self.prefix = data_pkl[0].removesuffix("/data.pkl")
        """The archive's top folder (torch.save names it after the file; any name is read)."""

    def info(self, name: str) -> zipfile.ZipInfo | None:
        """The member `<prefix>/<name>`; LoaderError when the archive holds it twice."""
        full = f"{self.prefix}/{name}"
        if full in self.twice:
            raise LoaderError(
                f"{self.path}: zip member {full!r} appears twice (a crafted archive: which one "
                "is read would depend on the reader)"
            )
        return self.members.get(full)

    def read(self, name: str, *, limit: int) -> bytes | None:
        """The bytes of `<prefix>/<name>` (None when absent), at most `limit` bytes unpacked;
        the zip module checks its CRC-32. Its sizes were checked by `check_members`."""
        info = self.info(name)
        if info is None:
            return None
        if info.file_size > limit:
            raise LoaderError(
                f"{self.path}: zip member {info.filename!r} holds {info.file_size} bytes, more "
                f"than the {limit} wwcli reads for it"
            )
        try:
            with self.zip.open(info) as member:
                data = member.read(limit + 1)
        except NotImplementedError as error:
            # The words torch's reader used, so that the line is the same whichever reads it.
            raise LoaderError(
                f"{self.path}: not a readable PyTorch checkpoint (RuntimeError: zip member "
                f"{info.filename!r} is packed with an unsupported method: {error})"
            ) from error
        except ZIP_ERRORS as error:
            raise LoaderError(
                f"{self.path}: damaged zip member {info.filename!r}: {error}"
            ) from error
        if len(data) > limit:
            raise LoaderError(f"{self.path}: zip member {info.filename!r} unpacks past {limit}")
        return data

    def place(self, storage: Storage, *, little_endian: bool) -> None:
        """Place a storage at the bytes of its member `data/<key>`, refusing a member that is
        missing, compressed, or smaller than the storage."""
        info = self.info(f"data/{storage.key}")
        name = f"{self.prefix}/data/{storage.key}"
        if info is None:
            raise LoaderError(
                f"{self.path}: not a readable PyTorch checkpoint (its pickle uses storage "
                f"{storage.key!r}, but the archive has no member {name!r})"
            )
        if info.compress_type != zipfile.ZIP_STORED:
            raise LoaderError(
                f"{self.path}: tensor storage {name!r} is compressed in the zip; torch.save never "
                "compresses storages; re-save the file with torch.save"
            )
        if info.file_size < storage.nbytes or info.compress_size != info.file_size:
            raise LoaderError(
                f"{self.path}: storage {storage.key!r} declares {storage.nbytes} bytes, but its "
                f"member {name!r} holds {info.file_size} (truncated or crafted)"
            )
        start = member_start(self.path, self.buffer, info)
        if start + info.file_size > len(self.buffer):
            raise LoaderError(f"{self.path}: zip member {name!r} reaches past the end of the file")
        storage.placed_at = start
        storage.buffer = self.buffer
        storage.little_endian = little_endian


class _MapReader:
    """A seekable, read-only file over a memory map, for zipfile (the map is read in place)."""

    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer
        self.position = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self.position, len(self.buffer))[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        end = len(self.buffer) if size is None or size < 0 else self.position + size
        data = bytes(self.buffer[self.position : end])
        self.position += len(data)
        return data

    def seekable(self) -> bool:
        return True


MAX_PICKLE_BYTES = 1 << 30
"""The largest data.pkl read (a million tensors pickle to about 200 MB)."""


def _byte_order(path: Path, archive: _Archive) -> bool:
    """True for little-endian storages: the `byteorder` record, "little" when absent."""
    record = archive.read("byteorder", limit=16)
    if record is None or record == b"little":
        return True
    if record == b"big":
        return False
    raise LoaderError(f"{path}: its byteorder record says {record[:16]!r}, not little or big")


def read_zip(path: Path, *, script: bool = False) -> TorchFile:
    """torch's zip format (or, with `script`, a TorchScript archive): data.pkl through the
    restricted unpickler, each storage placed at its member's bytes."""
    buffer = map_file(path)
    archive = _Archive(path, buffer)
    little_endian = _byte_order(path, archive)
    data = archive.read("data.pkl", limit=MAX_PICKLE_BYTES)
    assert data is not None  # _Archive found it
    storages: dict[str, Storage] = {}

    def persistent_load(pid: tuple[Any, ...]) -> Storage:
        storage, _ = storage_from_id(pid, legacy=False)
        if storage.key in storages:  # torch keeps the first one (and its dtype)
            return storages[storage.key]
        archive.place(storage, little_endian=little_endian)
        storages[storage.key] = storage
        return storage

    loaded, _ = load_pickle(data, 0, persistent_load, script=script)
    return TorchFile(
        loaded=loaded,
        buffer=buffer,
        little_endian=little_endian,
        script_classes=_script_classes(path, archive) if script else None,
    )


def read_legacy(path: Path) -> TorchFile:
    """torch's legacy format: the magic number, protocol version and system information, the
    object, the storage keys, then each storage (an 8-byte element count and its bytes) in the
    order of the keys."""
    buffer = map_file(path)
    magic, position = load_pickle(buffer, 0)
    if type(magic) is not int or magic != MAGIC_NUMBER:
        # torch's own words, so that the line is the same whichever reader reads the file.
        raise LoaderError(
            f"{path}: not a readable PyTorch checkpoint (RuntimeError: Invalid magic number; "
            "corrupt file?)"
        )
    version, position = load_pickle(buffer, position)
    if version != PROTOCOL_VERSION:
        raise LoaderError(
            f"{path}: not a readable PyTorch checkpoint (legacy format version {version!r}, "
            f"not {PROTOCOL_VERSION})"
        )
    system, position = load_pickle(buffer, position)
    little_endian = system.get("little_endian", True) if isinstance(system, dict) else True
    if type(little_endian) is not bool:
        raise DamagedPickleError("a little_endian flag that is not a bool")
    roots: dict[str, Storage] = {}
    views: dict[str, Storage] = {}

    def persistent_load(pid: tuple[Any, ...]) -> Storage:
        storage, view = storage_from_id(pid, legacy=True)
        root = roots.setdefault(storage.key, storage)
        if view is None:
            return root
        view_key, offset, size = view
        if view_key not in views:
            element = ELEMENT_SIZES[storage.dtype]
            begin, length = offset * element, size * element
            if begin + length > root.nbytes:
                raise LoaderError(
                    f"{path}: storage view {view_key!r} reaches byte {begin + length} of a "
                    f"storage of {root.nbytes} bytes"
                )
            views[view_key] = Storage(
                key=view_key, dtype=storage.dtype, nbytes=length, root=root, view_offset=begin
            )
        return views[view_key]

    loaded, position = load_pickle(buffer, position, persistent_load)
    keys, position = load_pickle(buffer, position)
    if type(keys) is not list or not all(isinstance(key, str) for key in keys):
        raise DamagedPickleError("the storage keys are not a list of strings")
    order: Literal["little", "big"] = "little" if little_endian else "big"
    for key in keys:
        root = roots.get(key)
        if root is None:
            raise LoaderError(f"{path}: lists storage {key!r}, which its pickle never uses")
        if root.placed_at >= 0:
            raise LoaderError(f"{path}: lists storage {key!r} twice")
        element = ELEMENT_SIZES[root.dtype]
        count = int.from_bytes(bytes(buffer[position : position + 8]), order)
        if position + 8 + root.nbytes > len(buffer):
            raise LoaderError(
                f"{path}: the file ends inside storage {key!r} (truncated): it needs "
                f"{root.nbytes} bytes at offset {position + 8}"
            )
        if count * element != root.nbytes:
            raise LoaderError(
                f"{path}: storage {key!r} is recorded with {count} elements, its pickle "
                f"declares {root.nbytes // element}"
            )
        root.placed_at = position + 8
        root.buffer = buffer
        root.little_endian = little_endian
        position += 8 + root.nbytes
    missing = [key for key, root in roots.items() if root.placed_at < 0]
    if missing:
        raise LoaderError(f"{path}: storage {missing[0]!r} has no bytes in the file (truncated?)")
    return TorchFile(loaded=loaded, buffer=buffer, little_endian=little_endian)


# --- TorchScript: parameters and buffers by attribute path ---------------------------------------


@dataclass(frozen=True)
class ScriptClass:
    """What a TorchScript class's declaration in `code/` says (read as text, never run)."""

    is_module: bool
    """Whether it derives from Module."""
    parameters: tuple[str, ...] | None
    """Its `__parameters__`; None when the declaration does not list them."""
    buffers: tuple[str, ...] | None
    """Its `__buffers__`; None when the declaration does not list them."""


_CLASS_LINE = re.compile(r"^class ([A-Za-z_][A-Za-z0-9_]*)\(([A-Za-z_][A-Za-z0-9_.]*)\):\s*$")
_NAMES_LINE = re.compile(r"^  (__parameters__|__buffers__) = \[(.*)\]\s*$")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _script_classes(path: Path, archive: _Archive) -> dict[str, ScriptClass]:
    """Every class declared in the archive's `code/` files: qualified name -> what its
    declaration lists. Only the declaration lines are looked at, with regular expressions."""
    classes: dict[str, ScriptClass] = {}
    budget = MAX_CODE_BYTES
    start = f"{archive.prefix}/code/"
    for name in archive.members:
        if not (name.startswith(start) and name.endswith(".py")):
            continue
        data = archive.read(name.removeprefix(f"{archive.prefix}/"), limit=budget)
        if data is None:
            continue
        budget -= len(data)
        module = name.removeprefix(start).removesuffix(".py").replace("/", ".")
        text = data.decode("utf-8", "replace")
        current: str | None = None
        lists: dict[str, tuple[str, ...]] = {}
        base = ""
        for line in [*text.splitlines(), "class _end_(object):"]:
            found = _CLASS_LINE.match(line)
            if found:
                if current is not None:
                    classes[f"{module}.{current}"] = ScriptClass(
                        is_module=base == "Module",
                        parameters=lists.get("__parameters__"),
                        buffers=lists.get("__buffers__"),
                    )
                current, base, lists = found.group(1), found.group(2), {}
                continue
            names = _NAMES_LINE.match(line)
            if names and current is not None:
                lists[names.group(1)] = tuple(_QUOTED.findall(names.group(2)))
    return classes


@dataclass(frozen=True)
class ScriptStateDict:
    """The state dict of a TorchScript module, as `torch.jit.load(f).state_dict()` gives it."""

    tensors: OrderedDict[str, Any]
    """Attribute path -> StoredTensor (or None for an absent optional parameter, left out)."""
    owners: dict[str, str]
    """Attribute path -> the `original_name` of the module that holds it (`Linear`)."""


def script_state_dict(path: Path, file: TorchFile) -> ScriptStateDict:
    """Walk the module tree of a TorchScript archive read by `read_zip(script=True)`: each
    module's parameters, then its buffers, in attribute order, then its submodules', named by
    attribute path. Which attributes are parameters and buffers comes from each class's
    declaration (`__parameters__`, `__buffers__`); where the archive has none, every tensor
    attribute counts. A module reached again on its own path (a cycle) is not walked again."""
    root, classes = file.loaded, file.script_classes or {}
    if not isinstance(root, ScriptObject):
        raise LoaderError(
            f"{path}: a TorchScript archive whose data.pkl holds a {type(root).__name__}, not a "
            "module"
        )
    tensors: OrderedDict[str, Any] = OrderedDict()
    owners: dict[str, str] = {}
    looked_at = 0

    def emit(module: ScriptObject, prefix: str) -> list[tuple[str, ScriptObject]]:
        nonlocal looked_at
        looked_at += len(module.attributes)
        if looked_at > MAX_WALK_ENTRIES:
            raise LoaderError(
                f"{path}: its TorchScript modules hold more than {MAX_WALK_ENTRIES} attributes "
                "to walk (a crafted file)"
            )
        declared = classes.get(module.qualname)
        groups: list[tuple[str, ...] | None] = [None]
        if declared is not None and declared.parameters is not None:
            groups = [declared.parameters, declared.buffers or ()]
        for wanted in groups:
            for name, value in module.attributes.items():
                if (wanted is None or name in wanted) and isinstance(value, StoredTensor):
                    key = prefix + name
                    if key in tensors:
                        raise LoaderError(f"{path}: two tensors both named {key!r}")
                    tensors[key] = value
                    owners[key] = module.original_name
        children = []
        for name, value in module.attributes.items():
            if isinstance(value, ScriptObject):
                child = classes.get(value.qualname)
                if child is None or child.is_module:
                    children.append((name, value))
        return children

    stack: list[tuple[str, Iterator[tuple[str, ScriptObject]]]] = [("", iter(emit(root, "")))]
    on_path = [root]
    while stack:
        prefix, children = stack[-1]
        step = next(children, None)
        if step is None:
            stack.pop()
            on_path.pop()
            continue
        name, child = step
        if any(child is module for module in on_path):
            continue
        if len(stack) >= MAX_MODULE_DEPTH:
            raise LoaderError(
                f"{path}: its TorchScript modules nest more than {MAX_MODULE_DEPTH} deep"
            )
        child_prefix = f"{prefix}{name}."
        stack.append((child_prefix, iter(emit(child, child_prefix))))
        on_path.append(child)
    return ScriptStateDict(tensors=tensors, owners=owners)
