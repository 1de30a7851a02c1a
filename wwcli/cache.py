"""The result cache: a checkpoint analyzed once under some settings is not analyzed again, so a
re-run of a sweep over a growing training run analyzes only the new checkpoints.

An entry is keyed by what decides the numbers: the input's fingerprint (its resolved path and,
for every file it is (a folder: every file under it), the size, the mtime and a SHA-256 of its
first and last MiB), the settings that change numbers (`RunSettings.to_json()` without the
gate's keys, which only judge them; a setting naming a file brings that file's fingerprint),
the wwcli version and a fingerprint of wwcli's own code (an edited install never reads results
of the code before). The entry is wwcli's own JSON, never a pickle: dataclasses and enums are
written with their wwcli type names and rebuilt only from wwcli's own types, with exactly their
fields (an entry written before a field was added is stale, not an error), so a
`CheckpointReport` comes back equal, value for value, to the one written. A corrupt or stale
entry is ignored (counted) and rewritten; entries are written atomically (a temporary file and a
rename), so concurrent runs never read half an entry.

`CachingRunner` puts the cache in front of any `Runner`: hits come from the cache, misses go to
the runner, and the results are yielded in input order as before.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import importlib
import json
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from wwcli import __version__

if TYPE_CHECKING:
    from wwcli.results import CheckpointReport
    from wwcli.runners import Runner
    from wwcli.settings import RunSettings

Unit = TypeVar("Unit")
Outcome = TypeVar("Outcome")

CACHE_FORMAT = 1
"""The layout of an entry; changing it makes every older entry stale."""

CACHE_ENV = "WWCLI_CACHE_DIR"
"""Where the cache is when --cache is not given (else the user cache directory)."""

HASHED_BYTES = 1 << 20
"""How much of each file's start and end the key hashes (1 MiB each): the header (where every
format wwcli reads keeps its layout) and the last tensors."""


class CacheError(ValueError):
    """A value cannot be written to, or read back from, a cache entry."""


def default_cache_dir() -> Path:
    """$WWCLI_CACHE_DIR, or wwcli's folder in the user cache directory (platformdirs)."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("wwcli", appauthor=False)) / "results"


# --- Values to JSON and back -------------------------------------------------------------------


def encode(value: Any) -> Any:
    """A run-layer value as JSON data: dataclasses, enums, tuples, dicts, NumPy arrays and
    scalars are tagged with what they are; floats (NaN and infinities too) are written as
    Python writes them, which reads back to the same float. CacheError for anything else."""
    if isinstance(value, enum.Enum):  # first: a StrEnum is a str too
        return {"__enum__": _type_name(type(value)), "value": encode(value.value)}
    if value is None or type(value) in (bool, str, int, float):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "__dataclass__": _type_name(type(value)),
            "fields": {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)},
        }
    if isinstance(value, tuple):
        return {"__tuple__": [encode(item) for item in value]}
    if isinstance(value, list):
        return [encode(item) for item in value]
    if isinstance(value, dict):
        return {"__dict__": [[encode(key), encode(item)] for key, item in value.items()]}
    return _encode_numpy(value)


def _encode_numpy(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise CacheError("an array of Python objects cannot be cached")
        data = np.ascontiguousarray(value)
        return {
            "__ndarray__": data.dtype.str,
            "shape": list(data.shape),
            "data": base64.b64encode(data.tobytes()).decode("ascii"),
        }
    if isinstance(value, np.generic):
        return {"__npscalar__": value.dtype.str, "value": value.item()}
    raise CacheError(f"a {type(value).__name__} cannot be cached")


def decode(data: Any) -> Any:
    """The value `encode` wrote. Only wwcli's own dataclasses and enums are rebuilt, with exactly
    the fields they have now; CacheError otherwise (a corrupt or stale entry)."""
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, list):
        return [decode(item) for item in data]
    if not isinstance(data, dict):
        raise CacheError(f"unexpected {type(data).__name__}")
    if "__dataclass__" in data:
        return _decode_dataclass(data)
    if "__enum__" in data:
        kind = _wwcli_type(data["__enum__"])
        if not (isinstance(kind, type) and issubclass(kind, enum.Enum)):
            raise CacheError(f"{data['__enum__']} is not an enum")
        try:
            return kind(decode(data["value"]))
        except ValueError as error:
            raise CacheError(str(error)) from error
    if "__tuple__" in data:
        return tuple(decode(item) for item in _list(data["__tuple__"]))
    if "__dict__" in data:
        return {decode(key): decode(item) for key, item in _list(data["__dict__"])}
    if "__ndarray__" in data:
        import numpy as np

        dtype = np.dtype(data["__ndarray__"])
        if dtype.hasobject:
            raise CacheError("an array of Python objects")
        raw = base64.b64decode(data["data"], validate=True)
        return np.frombuffer(raw, dtype=dtype).reshape(data["shape"]).copy()
    if "__npscalar__" in data:
        import numpy as np

        return np.dtype(data["__npscalar__"]).type(data["value"])
    raise CacheError("an object of no known kind")


def _list(data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise CacheError(f"expected a list, got {type(data).__name__}")
    return data


def _type_name(kind: type) -> str:
    return f"{kind.__module__}:{kind.__qualname__}"


def _wwcli_type(name: Any) -> Any:
    """The wwcli class a tagged object names; CacheError for anything outside wwcli."""
    if not isinstance(name, str) or ":" not in name:
        raise CacheError(f"bad type name {name!r}")
    module, _, qualname = name.partition(":")
    if module != "wwcli" and not module.startswith("wwcli."):
        raise CacheError(f"{name}: not a wwcli type")
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        raise CacheError(f"{name}: no such type") from error
    return found


def _decode_dataclass(data: dict[str, Any]) -> Any:
    kind = _wwcli_type(data["__dataclass__"])
    if not (dataclasses.is_dataclass(kind) and isinstance(kind, type)):
        raise CacheError(f"{data['__dataclass__']} is not a dataclass")
    stored = data.get("fields")
    if not isinstance(stored, dict):
        raise CacheError("a dataclass without fields")
    fields = dataclasses.fields(kind)
    if set(stored) != {f.name for f in fields}:
        raise CacheError(f"{kind.__qualname__} has other fields now (a stale entry)")
    values = {f.name: decode(stored[f.name]) for f in fields}
    try:
        instance = kind(**{f.name: values[f.name] for f in fields if f.init})
    except (TypeError, ValueError) as error:
        raise CacheError(f"{kind.__qualname__}: {error}") from error
    for f in fields:
        if not f.init:
            object.__setattr__(instance, f.name, values[f.name])
    return instance


def report_to_json(report: CheckpointReport) -> Any:
    """A checkpoint report as cache JSON data."""
    return encode(report)


def report_from_json(data: Any) -> CheckpointReport:
    """The report `report_to_json` wrote; CacheError when the data is not one."""
    from wwcli.results import CheckpointReport

    report = decode(data)
    if not isinstance(report, CheckpointReport):
        raise CacheError("not a checkpoint report")
    return report


# --- Keys --------------------------------------------------------------------------------------


def _file_fingerprint(path: Path) -> list[Any]:
    """[size, mtime_ns, sha256 of the first and last HASHED_BYTES] of a regular file."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        info = os.fstat(stream.fileno())
        digest.update(stream.read(HASHED_BYTES))
        if info.st_size > 2 * HASHED_BYTES:
            stream.seek(info.st_size - HASHED_BYTES)
        digest.update(stream.read(HASHED_BYTES))
    return [info.st_size, info.st_mtime_ns, digest.hexdigest()]


def input_fingerprint(path: str | Path) -> dict[str, Any]:
    """What the key knows of an input: its resolved path, and for each file it is (a folder:
    every file under it, links followed, names starting with "." left out) the file's name
    relative to it, size, mtime and head-and-tail hash. OSError when it cannot be read."""
    resolved = Path(os.path.realpath(path))
    info = resolved.stat()
    if not stat.S_ISDIR(info.st_mode):
        return {"path": str(resolved), "files": [["", *_file_fingerprint(resolved)]]}
    files = []
    for folder, subfolders, names in os.walk(resolved, followlinks=True):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            member = Path(folder) / name
            if member.is_file():
                relative = member.relative_to(resolved).as_posix()
                files.append([relative, *_file_fingerprint(member)])
    return {"path": str(resolved), "files": files}


def _code_fingerprint() -> str:
    """A hash of the names, sizes and mtimes of wwcli's own modules: results of other code
    (an upgrade, an edited checkout) are never read back."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name != "__pycache__")
        for name in sorted(names):
            if name.endswith(".py"):
                info = (Path(folder) / name).stat()
                relative = (Path(folder) / name).relative_to(root).as_posix()
                digest.update(f"{relative}:{info.st_size}:{info.st_mtime_ns};".encode())
    return digest.hexdigest()


def numbers_settings(settings: RunSettings) -> dict[str, Any]:
    """The settings that change a report's values: the JSON options without the gate's keys
    (which judge the numbers and change none); a setting naming a file or folder also brings
    that input's fingerprint (a base checkpoint edited since is a different key)."""
    from wwcli.gate import GatePolicy

    gate_keys = {f.name for f in dataclasses.fields(GatePolicy)}
    values = {
        key: value for key, value in settings.to_json().items() if key not in gate_keys | {"gate"}
    }
    for key, value in list(values.items()):
        if key != "layers" and isinstance(value, str) and value and os.path.exists(value):
            values[f"{key}@input"] = input_fingerprint(value)
    return values


# --- The cache ---------------------------------------------------------------------------------


@dataclass
class CacheStats:
    """What a run did with the cache: the figures its stderr line reports."""

    hits: int = 0
    """Reports read from the cache."""
    misses: int = 0
    """Inputs analyzed because the cache had no entry for them."""
    stale: int = 0
    """Entries found but unreadable (corrupt, or written by other code): ignored, rewritten."""
    written: int = 0
    """Entries written."""

    def line(self, folder: Path) -> str:
        """One line for people."""
        text = (
            f"cache: {self.hits} of {self.hits + self.misses} checkpoints read from the cache, "
            f"{self.misses} analyzed, {self.written} entries written ({folder})"
        )
        if self.stale:
            text += f"; {self.stale} unreadable entries ignored and rewritten"
        return text


@dataclass
class ResultCache:
    """Cache entries in a folder: one JSON file per (input, settings, wwcli) key."""

    folder: Path
    """Where the entries are (created on the first write)."""
    stats: CacheStats = field(default_factory=CacheStats)
    """What this cache object did."""

    def key(self, path: str | Path, settings: RunSettings) -> dict[str, Any] | None:
        """The key of an input under `settings`; None when the input cannot be read (the run
        then reports it as usual, and nothing is cached)."""
        try:
            fingerprint = input_fingerprint(path)
        except OSError:
            return None
        return {
            "format": CACHE_FORMAT,
            "wwcli_version": __version__,
            "code": _code_fingerprint(),
            "settings": numbers_settings(settings),
            "input": fingerprint,
        }

    def entry_path(self, key: dict[str, Any]) -> Path:
        """The file an entry of this key is in."""
        text = json.dumps(key, sort_keys=True, allow_nan=True)
        return self.folder / f"{hashlib.sha256(text.encode('utf-8')).hexdigest()}.json"

    def read(self, key: dict[str, Any]) -> CheckpointReport | None:
        """The cached report of `key`, or None (no entry; a corrupt or stale one is counted)."""
        target = self.entry_path(key)
        try:
            text = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            self.stats.stale += 1
            return None
        try:
            entry = json.loads(text)
            if not isinstance(entry, dict) or entry.get("key") != key:
                raise CacheError("another key")
            return report_from_json(entry["report"])
        except (ValueError, KeyError, TypeError, RecursionError):  # CacheError, JSON errors
            self.stats.stale += 1
            return None

    def write(self, key: dict[str, Any], report: CheckpointReport) -> bool:
        """Store `report` under `key`, atomically; False when it cannot be (a value the cache
        cannot hold, a folder that cannot be written): the run goes on without it."""
        try:
            text = json.dumps(
                {"key": key, "report": report_to_json(report)}, allow_nan=True, sort_keys=True
            )
        except (CacheError, TypeError, ValueError):
            return False
        target = self.entry_path(key)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, target)
        except OSError:
            temporary.unlink(missing_ok=True)
            return False
        self.stats.written += 1
        return True


@dataclass(frozen=True)
class CachingRunner:
    """A Runner that answers from the cache what it can and sends the rest to `inner`;
    outcomes in input order, as every runner's. Only reports are cached, never failures."""

    inner: Runner
    """The runner of the units the cache does not have."""
    cache: ResultCache
    """Where the reports are kept."""
    settings: RunSettings
    """The run's settings (the part of the key that is not the input)."""

    @property
    def layer_jobs(self) -> int:
        """The inner runner's."""
        return self.inner.layer_jobs

    @property
    def in_process(self) -> bool:
        """The inner runner's."""
        return self.inner.in_process

    def map(self, function: Callable[[Unit], Outcome], units: Sequence[Unit]) -> Iterator[Outcome]:
        """Cached reports for the units the cache has, function(unit) through the inner runner
        for the others (each then written to the cache), in input order."""
        from wwcli.results import CheckpointReport

        units = list(units)
        keys = [self.cache.key(cast(Any, unit), self.settings) for unit in units]
        found = [self.cache.read(key) if key is not None else None for key in keys]
        missing = [unit for unit, report in zip(units, found, strict=True) if report is None]
        self.cache.stats.hits += len(units) - len(missing)
        self.cache.stats.misses += len(missing)
        rest = iter(self.inner.map(function, missing)) if missing else iter(())
        for unit, key, report in zip(units, keys, found, strict=True):
            if report is not None:
                yield cast(Outcome, dataclasses.replace(report, checkpoint=str(unit)))
                continue
            outcome = next(rest)
            # Stored only when the input did not change while it was read.
            if (
                isinstance(outcome, CheckpointReport)
                and key is not None
                and key == self.cache.key(cast(Any, unit), self.settings)
            ):
                self.cache.write(key, outcome)
            yield outcome
        for _ in rest:  # nothing is left; this lets the inner runner close (its pool) now
            pass
