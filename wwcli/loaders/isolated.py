"""Reads HDF5-based checkpoints (`.keras`, `.h5`, `.weights.h5`) in a helper process, so that a
crash or a hang of the HDF5 C library on a damaged or crafted file becomes a LoaderError naming
the file, never a segfault or an endless hang of wwcli itself.

h5py hands the file's bytes to HDF5's C parser, which has had many memory-safety bugs on crafted
input (a new batch of CVEs found by fuzzing most years); Python can neither catch a segfault nor
interrupt a C call that never returns. So the main process never calls HDF5. A helper process
(`python -m wwcli.loaders.isolated`, started at the first Keras file of a run and reused for
the next ones) opens the file with the in-process reader (`keras.open_keras`), sends back its
layer list, then each layer's matrices when asked. The main process waits for every answer with
a deadline:

- the helper dies (a signal, any exit)  -> "HDF5 library crashed (SIGSEGV) while reading ..."
- no answer before the deadline         -> the helper is killed; "HDF5 library hung ..."

Either way a fresh helper serves the next file. On Linux the helper's address space is capped
(`RLIMIT_AS`) at what it uses plus 1 GiB plus 4 times the HDF5 bytes it reads (the file, or a
`.keras` file's weights member once unpacked: real sizes, never what a zip directory claims),
and never above the machine's physical memory, so a file whose metadata makes HDF5 allocate
without end fails quickly instead of exhausting the machine's memory.

The helper holds nothing of the user's: it starts with a minimal environment (`_helper_environment`:
no tokens or keys a file could read back through /proc/self/environ), dies with the process that
started it (Linux `PR_SET_PDEATHSIG`, so a SIGTERM or SIGKILL of wwcli cannot leave it spinning
in a hung HDF5 call), and `stop_helpers()` kills it at once, for signal handlers.

ONNX models are read in the same helper (`open_onnx_isolated`): onnx's C++ protobuf parser is
untrusted-input code too. An open request names its reader (`"kind": "keras"` or `"onnx"`);
errors then speak of the "ONNX parser".

Requests and replies are length-prefixed JSON; matrices follow as raw bytes of an allow-listed
little-endian float dtype: nothing from the helper is ever unpickled.
`WWCLI_HDF5_TIMEOUT` (seconds) sets the base deadline; `WWCLI_HDF5_IN_PROCESS=1` reads in this
process instead (no protection; for debugging, and for platforms without `select` on pipes).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import math
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

import numpy as np

from wwcli.loaders.interface import Checkpoint, LayerSpec, LayerType, LoaderError

TIMEOUT_ENV = "WWCLI_HDF5_TIMEOUT"
IN_PROCESS_ENV = "WWCLI_HDF5_IN_PROCESS"
DEFAULT_TIMEOUT_S = 60.0
"""Deadline for opening a file and listing its layers, and the base of every other deadline."""
SLOWEST_READ_BYTES_PER_S = 20_000_000
"""Reading a layer may take its size at this rate on top of the base deadline (a slow disk),
and the first layer also the whole file (the CRC-32 of a `.keras` weights member is checked
then)."""
START_TIMEOUT_S = 60.0
"""Deadline for the helper to start (import numpy and h5py) and say it is ready."""
MEMORY_HEADROOM_BYTES = 1 << 30
"""What the helper may allocate beyond 4 times the file's size (Linux only)."""

_FRAME = struct.Struct("<Q")
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_ALLOWED_DTYPES = frozenset({"<f2", "<f4", "<f8"})
"""What the helper may send a matrix as (numpy's names)."""


_KEPT_VARIABLES = frozenset(
    {
        # Finding programs, libraries and the user's site-packages (`pip install --user`).
        "PATH",
        "HOME",
        "LD_LIBRARY_PATH",
        # Text: how names in messages are encoded.
        "LANG",
        "LANGUAGE",
        # Where the unpacked copy of a deflated weights member goes.
        "TMPDIR",
        "TEMP",
        "TMP",
        # Python's own settings: how the helper finds wwcli, numpy and h5py.
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONNOUSERSITE",
        "PYTHONUSERBASE",
        "PYTHONSAFEPATH",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONPYCACHEPREFIX",
        "PYTHONUTF8",
        "PYTHONIOENCODING",
        # HDF5 refuses to open files on some network file systems without this.
        "HDF5_USE_FILE_LOCKING",
        "SYSTEMROOT",
    }
)
_KEPT_PREFIXES = ("LC_", "WWCLI_")
"""What the helper process inherits of wwcli's environment; nothing else (no AWS_*, *_TOKEN,
SSH_AUTH_SOCK, ...): a crafted file that still got the helper to read its own environment
would find nothing worth taking."""

PARENT_OPTION = "--parent"
"""`python -m wwcli.loaders.isolated --parent PID [--die-with-parent]`"""
DIE_WITH_PARENT_OPTION = "--die-with-parent"


def in_process() -> bool:
    """True when HDF5 files are read in this process (opted out, or no `select` on pipes)."""
    return os.environ.get(IN_PROCESS_ENV, "") not in ("", "0") or os.name == "nt"


def base_timeout() -> float:
    """The base deadline in seconds: `WWCLI_HDF5_TIMEOUT` when it is a positive number."""
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, ""))
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return timeout if math.isfinite(timeout) and timeout > 0 else DEFAULT_TIMEOUT_S


@dataclasses.dataclass(frozen=True)
class _Reader:
    """A reader the helper process runs: its request name and its words in error messages."""

    kind: str
    """The `kind` of an open request: "keras" or "onnx"."""
    library: str
    """What crashes or hangs: "HDF5 library", "ONNX parser"."""
    process: str
    """The helper as the errors name it: "HDF5 reader process", ..."""


_KERAS = _Reader("keras", "HDF5 library", "HDF5 reader process")
_ONNX = _Reader("onnx", "ONNX parser", "ONNX reader process")


def open_keras_isolated(path: Path) -> Checkpoint:
    """Open a Keras checkpoint in the helper process (see the module docstring).

    Raises LoaderError for everything `keras.open_keras` refuses, and when the HDF5 library
    crashes or hangs on the file.
    """
    if in_process():
        from wwcli.loaders.keras import open_keras

        return open_keras(path)
    return _open_isolated(path, _KERAS)


def open_onnx_isolated(path: Path) -> Checkpoint:
    """Open an ONNX model in the helper process: onnx's C++ protobuf parser sees the file there,
    under the same deadlines, memory cap and environment as HDF5 (`WWCLI_HDF5_IN_PROCESS=1`
    reads it in this process too). Raises LoaderError for everything `onnx.open_onnx` refuses,
    and when the parser crashes or hangs on the file."""
    if in_process():
        from wwcli.loaders.onnx import open_onnx

        return open_onnx(path)
    return _open_isolated(path, _ONNX)


def _open_isolated(path: Path, reader: _Reader) -> Checkpoint:
    worker = _shared_worker(path)
    try:
        reply, _ = worker.request(
            # The path as given (error messages name it), read from this process's folder.
            {"op": "open", "kind": reader.kind, "path": os.fspath(path), "cwd": os.getcwd()},
            timeout=base_timeout(),
            path=path,
            what="its layer list",
            library=reader.library,
        )
    except _HelperError as failure:
        raise LoaderError(str(failure)) from failure.__cause__
    try:
        layers = [_spec_from_json(item) for item in reply["layers"]]
        handle = int(reply["handle"])
        file_format = str(reply["format"])
        notes = (_optional_text(reply["ids_note"]), _optional_text(reply["source_note"]))
    except (KeyError, TypeError, ValueError) as error:
        worker.stop()
        raise LoaderError(f"{path}: the {reader.process} sent a malformed answer") from error
    return IsolatedCheckpoint(path, worker, handle, file_format, layers, notes, reader)


class IsolatedCheckpoint(Checkpoint):
    """A Keras checkpoint held open by the helper process; `matrices` asks it for each layer."""

    def __init__(
        self,
        path: Path,
        worker: _Worker,
        handle: int,
        file_format: str,
        layers: list[LayerSpec],
        notes: tuple[str | None, str | None],
        reader: _Reader = _KERAS,
    ) -> None:
        self.path = path
        self._reader = reader
        self.format = file_format
        self.ids_note, self.source_note = notes
        self._worker: _Worker | None = worker
        self._handle = handle
        self._layers = layers
        self._first_read = True

    def layers(self) -> list[LayerSpec]:
        return list(self._layers)

    def matrices(self, layer: LayerSpec) -> list[np.ndarray]:
        worker = self._worker
        if worker is None:
            raise LoaderError(f"{self.path}: the checkpoint is closed")
        if not worker.alive:
            raise LoaderError(
                f"{self.path}: the {self._reader.process} was stopped after an earlier failure; "
                "open the file again"
            )
        nbytes = layer.N * layer.M * layer.rf * 8
        if self._first_read:
            with contextlib.suppress(OSError):
                nbytes += self.path.stat().st_size
        what = f"layer {layer.layer_id} ({layer.name})"
        try:
            _, arrays = worker.request(
                {"op": "matrices", "handle": self._handle, "layer": _spec_to_json(layer)},
                timeout=base_timeout() + nbytes / SLOWEST_READ_BYTES_PER_S,
                path=self.path,
                what=what,
                library=self._reader.library,
            )
        except _HelperError as failure:
            raise LoaderError(str(failure)) from failure.__cause__
        except MemoryError as error:
            # The helper was stopped (the pipe holds half an answer); the run goes on.
            raise LoaderError(
                f"{self.path}: ran out of memory receiving {what} from the {self._reader.process}"
            ) from error
        self._first_read = False
        for matrix in arrays:
            if sorted(matrix.shape) != sorted((layer.M, layer.N)):
                raise LoaderError(
                    f"{self.path}: the {self._reader.process} sent a matrix of shape "
                    f"{matrix.shape} for {what}"
                )
        return arrays

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None and worker.alive:
            with contextlib.suppress(_HelperError, LoaderError, RuntimeError):
                worker.request(
                    {"op": "close", "handle": self._handle},
                    timeout=base_timeout(),
                    path=self.path,
                    what="the file",
                )


def _optional_text(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError("a note is not a string")
    return value


def _spec_to_json(spec: LayerSpec) -> dict[str, Any]:
    fields = dataclasses.asdict(spec)
    fields["layer_type"] = spec.layer_type.value
    fields["shape"] = list(spec.shape)
    return fields


def _spec_from_json(fields: object) -> LayerSpec:
    if not isinstance(fields, dict):
        raise TypeError("a layer is not an object")
    known = {field.name for field in dataclasses.fields(LayerSpec)}
    values = {key: value for key, value in fields.items() if key in known}
    values["layer_type"] = LayerType(values["layer_type"])
    values["shape"] = tuple(int(side) for side in values["shape"])
    return LayerSpec(**values)


# --- The main process's side ---------------------------------------------------------------------


def _helper_environment() -> dict[str, str]:
    """The helper's environment: what Python, numpy and h5py need (`_KEPT_VARIABLES`) and
    wwcli's own settings, with the helper's fixed settings on top."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if name in _KEPT_VARIABLES or name.startswith(_KEPT_PREFIXES)
    }
    environment["PYTHONFAULTHANDLER"] = "1"  # a crash leaves its stack on stderr, for --debug
    # The helper does no arithmetic: one BLAS thread keeps its address space small.
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        environment[variable] = "1"
    return environment


class _HelperError(Exception):
    """The helper crashed, hung or broke the protocol; the message is the user's error line."""


class _HelperOutputError(Exception):
    """What the helper wrote on stderr before it failed (the cause shown with `--debug`)."""


class _RemoteTracebackError(Exception):
    """The traceback of an unexpected error inside the helper (shown with `--debug`)."""


class _CrashedError(Exception):
    """The helper's pipe closed or it broke the protocol; the message says how."""


class _TimedOutError(Exception):
    """The deadline passed before the whole answer arrived."""


class _Worker:
    """One helper process and the pipes to it; requests are answered one at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the worker
        command = [sys.executable, "-m", "wwcli.loaders.isolated", PARENT_OPTION, str(os.getpid())]
        # Linux sends the death signal when the *thread* that started the helper ends: only the
        # main thread lives as long as the process.
        if threading.current_thread() is threading.main_thread():
            command.append(DIE_WITH_PARENT_OPTION)
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=_helper_environment(),
            close_fds=True,
        )
        self.alive = True
        try:
            reply = self._receive_json(time.monotonic() + START_TIMEOUT_S)
        except (_CrashedError, _TimedOutError) as error:
            self.stop()
            raise _HelperError(f"the HDF5 reader process did not start ({error})") from (
                self._output()
            )
        if reply.get("ready") is not True:
            self.stop()
            raise _HelperError("the HDF5 reader process did not start (unexpected greeting)")

    @property
    def pid(self) -> int:
        """The helper's process id."""
        return self._process.pid

    def request(
        self,
        message: dict[str, Any],
        *,
        timeout: float,
        path: Path,
        what: str,
        library: str = "HDF5 library",
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        """Send one request and read its whole answer within `timeout` seconds; `library`
        names what crashed or hung in the error ("HDF5 library", "ONNX parser").

        Raises LoaderError when the helper reports one; _HelperError when it crashes, hangs or
        answers nonsense (the helper is then stopped); RuntimeError for a bug inside it.
        """
        with self._lock:
            if not self.alive:
                raise _HelperError(f"{path}: the HDF5 reader process is not running")
            deadline = time.monotonic() + timeout
            try:
                self._send(message)
                reply = self._receive_json(deadline)
                arrays = [self._receive_array(spec, deadline) for spec in reply.get("arrays", [])]
            except _CrashedError as crash:
                self.stop()
                raise _HelperError(
                    f"{path}: {library} crashed ({crash}) while reading {what}; the file "
                    "is damaged or crafted"
                ) from self._output()
            except _TimedOutError:
                self.stop()
                raise _HelperError(
                    f"{path}: {library} hung while reading {what}: no answer in "
                    f"{timeout:.0f} s, stopped; the file is damaged or crafted"
                ) from self._output()
            except BaseException:
                # Interrupted mid-answer (Ctrl-C): the pipe holds half a reply; start afresh.
                self.stop()
                raise
        if reply.get("ok") is True:
            return reply, arrays
        if reply.get("error") == "loader":
            raise LoaderError(str(reply.get("message") or f"{path}: cannot read {what}"))
        raise RuntimeError(
            f"{reply.get('type', 'Exception')} in the HDF5 reader process: "
            f"{reply.get('message', '')}"
        ) from _RemoteTracebackError(str(reply.get("traceback", "")))

    def _send(self, message: dict[str, Any]) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        data = json.dumps(message).encode("utf-8")
        try:
            stdin.write(_FRAME.pack(len(data)) + data)
            stdin.flush()
        except OSError as error:
            raise _CrashedError(self._death()) from error

    def _read_into(self, buffer: memoryview, deadline: float) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        descriptor = stdout.fileno()
        filled = 0
        while filled < len(buffer):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _TimedOutError
            ready, _, _ = select.select([descriptor], [], [], remaining)
            if not ready:
                raise _TimedOutError
            count = os.readv(descriptor, [buffer[filled:]])
            if count == 0:
                raise _CrashedError(self._death())
            filled += count

    def _receive_json(self, deadline: float) -> dict[str, Any]:
        header = bytearray(_FRAME.size)
        self._read_into(memoryview(header), deadline)
        (length,) = _FRAME.unpack(header)
        if length > _MAX_MESSAGE_BYTES:
            raise _CrashedError("protocol error: an oversized message")
        data = bytearray(length)
        self._read_into(memoryview(data), deadline)
        try:
            reply = json.loads(data)
        except ValueError as error:
            raise _CrashedError("protocol error: a message that is not JSON") from error
        if not isinstance(reply, dict):
            raise _CrashedError("protocol error: a message that is not an object")
        return reply

    def _receive_array(self, spec: object, deadline: float) -> np.ndarray:
        try:
            assert isinstance(spec, dict)
            dtype = str(spec["dtype"])
            shape = tuple(int(side) for side in spec["shape"])
        except (AssertionError, KeyError, TypeError, ValueError) as error:
            raise _CrashedError("protocol error: a malformed array header") from error
        if dtype not in _ALLOWED_DTYPES or len(shape) != 2 or min(shape) < 0:
            raise _CrashedError(f"protocol error: an array of dtype {dtype} and shape {shape}")
        array = np.empty(shape, dtype=np.dtype(dtype))
        if array.nbytes:
            self._read_into(array.data.cast("B"), deadline)
        return array

    def _death(self) -> str:
        """How the helper ended: "SIGSEGV", "exit code 1", ... (waits a moment for it)."""
        try:
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "closed its pipe"
        if code < 0:
            with contextlib.suppress(ValueError):
                return signal.Signals(-code).name
            return f"signal {-code}"
        return f"exit code {code}"

    def _output(self) -> _HelperOutputError | None:
        try:
            self._stderr.seek(0)
            text = self._stderr.read()[-20_000:].decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return None
        return _HelperOutputError(f"the HDF5 reader process wrote:\n{text}") if text else None

    def stop(self) -> None:
        """Stop the helper now (it holds nothing worth keeping); safe to call twice."""
        self.alive = False
        with contextlib.suppress(OSError):
            if self._process.stdin is not None:
                self._process.stdin.close()
        if self._process.poll() is None:
            with contextlib.suppress(OSError):
                self._process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=5)
        with contextlib.suppress(OSError):
            if self._process.stdout is not None:
                self._process.stdout.close()


_worker_lock = threading.Lock()
_worker: _Worker | None = None


def _shared_worker(path: Path) -> _Worker:
    """The running helper, started now if there is none (or the last one was stopped)."""
    global _worker
    with _worker_lock:
        if _worker is None or not _worker.alive:
            try:
                _worker = _Worker()
            except (OSError, _HelperError) as error:
                detail = error.strerror if isinstance(error, OSError) else str(error)
                raise LoaderError(
                    f"{path}: cannot start the HDF5 reader process ({detail}); set "
                    f"{IN_PROCESS_ENV}=1 to read HDF5 files in this process instead"
                ) from error
        return _worker


def helper_pid() -> int | None:
    """The running helper's process id, None when there is none (for tests and diagnostics)."""
    with _worker_lock:
        return _worker.pid if _worker is not None and _worker.alive else None


def stop_helpers() -> None:
    """Kill the running helper now, without waiting for it or taking a lock: safe in a signal
    handler (SIGTERM, SIGINT) that then ends wwcli. The helper also dies by itself when wwcli
    ends (PR_SET_PDEATHSIG), but a handler that exits cleanly should not rely on that alone."""
    worker = _worker
    if worker is not None and worker.alive:
        worker.alive = False
        with contextlib.suppress(OSError):
            os.kill(worker.pid, signal.SIGKILL)


@atexit.register
def _stop_shared_worker() -> None:
    with _worker_lock:
        if _worker is not None:
            _worker.stop()


# --- The helper process --------------------------------------------------------------------------


def _write_message(replies: IO[bytes], message: dict[str, Any]) -> None:
    data = json.dumps(message).encode("utf-8")
    replies.write(_FRAME.pack(len(data)) + data)


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError):
        return None


def _in_use() -> int | None:
    """This process's address space now (Linux), in bytes."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[0]) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return None


def memory_cap(in_use: int, hdf5_bytes: int) -> int:
    """The address-space cap for reading `hdf5_bytes` of HDF5 data: what the process uses, plus
    1 GiB, plus 4 times the data (reading needs a layer in at most three copies, and no layer
    outgrows its file); never above the machine's physical memory (nor below what is in use +
    1 GiB), so any size, however crafted, gives a cap setrlimit takes."""
    limit = in_use + MEMORY_HEADROOM_BYTES + 4 * max(0, hdf5_bytes)
    physical = _physical_memory()
    if physical is not None:
        limit = min(limit, max(physical, in_use + MEMORY_HEADROOM_BYTES))
    return limit


def _cap_memory(in_use: int | None, hdf5_bytes: int) -> None:
    """Set RLIMIT_AS to memory_cap (Linux; never above the hard limit)."""
    if in_use is None or not sys.platform.startswith("linux"):
        return
    import resource

    try:
        limit = memory_cap(in_use, hdf5_bytes)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError, OverflowError):
        pass  # no cap is better than no reading


def _answer(message: dict[str, Any], checkpoints: dict[int, Checkpoint]) -> dict[str, Any]:
    """The reply to one request, and the arrays to send after it (under "_arrays")."""
    op = message["op"]
    if op == "open":
        os.chdir(message["cwd"])
        path = Path(message["path"])
        in_use = _in_use()
        # Listing reads metadata only: the file's own size bounds it. Reading layers may then
        # need the unpacked weights member (real bytes, on disk now) in up to three copies,
        # or an ONNX model's external data files.
        file_size = path.stat().st_size if path.is_file() else 0
        _cap_memory(in_use, file_size)
        kind = message.get("kind", _KERAS.kind)
        if kind == _ONNX.kind:
            from wwcli.loaders.onnx import open_onnx

            checkpoint = open_onnx(path)
            data_size = file_size + int(getattr(checkpoint, "data_size", 0))
        else:
            from wwcli.loaders.keras import open_keras

            checkpoint = open_keras(path)
            data_size = max(file_size, int(getattr(checkpoint, "hdf5_size", 0)))
        _cap_memory(in_use, data_size)
        handle = max(checkpoints, default=0) + 1
        checkpoints[handle] = checkpoint
        return {
            "ok": True,
            "handle": handle,
            "format": checkpoint.format,
            "ids_note": checkpoint.ids_note,
            "source_note": checkpoint.source_note,
            "layers": [_spec_to_json(spec) for spec in checkpoint.layers()],
        }
    if op == "matrices":
        matrices = checkpoints[message["handle"]].matrices(_spec_from_json(message["layer"]))
        arrays = [_sendable(matrix) for matrix in matrices]
        return {
            "ok": True,
            "arrays": [{"dtype": array.dtype.str, "shape": list(array.shape)} for array in arrays],
            "_arrays": arrays,
        }
    if op == "close":
        closing = checkpoints.pop(message["handle"], None)
        if closing is not None:
            closing.close()
        return {"ok": True}
    raise ValueError(f"unknown request {op!r}")


def _serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    """Answer requests until the main process closes the pipe."""
    checkpoints: dict[int, Checkpoint] = {}
    while True:
        header = requests.read(_FRAME.size)
        if len(header) < _FRAME.size:
            return
        (length,) = _FRAME.unpack(header)
        message = json.loads(requests.read(length))
        handle = message.get("handle")
        where = message.get("path") or (checkpoints[handle].path if handle in checkpoints else "")
        try:
            reply = _answer(message, checkpoints)
        except LoaderError as error:
            reply = {"ok": False, "error": "loader", "message": str(error)}
        except MemoryError:
            reply = {
                "ok": False,
                "error": "loader",
                "message": f"{where}: ran out of memory while reading it (damaged or crafted "
                "sizes?)",
            }
        except Exception as error:
            reply = {
                "ok": False,
                "error": "internal",
                "type": type(error).__name__,
                "message": str(error),
                "traceback": traceback.format_exc(),
            }
        arrays: list[np.ndarray] = reply.pop("_arrays", [])
        _write_message(replies, reply)
        for array in arrays:
            replies.write(array.data.cast("B"))
        replies.flush()


def _sendable(matrix: np.ndarray) -> np.ndarray:
    """A C-contiguous little-endian float copy (or view) of a matrix, in an allowed dtype."""
    if matrix.dtype.kind == "f" and f"<f{matrix.dtype.itemsize}" in _ALLOWED_DTYPES:
        return np.ascontiguousarray(matrix, dtype=f"<f{matrix.dtype.itemsize}")
    return np.ascontiguousarray(matrix, dtype="<f8")


def _die_with_parent(parent: int) -> None:
    """Have Linux kill this process when its parent ends (PR_SET_PDEATHSIG), and end now if the
    parent already has (then this process was handed to another, and no signal will come)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(3)


def _parse_arguments(arguments: list[str]) -> tuple[int | None, bool]:
    """(parent pid, die with it) from `--parent PID [--die-with-parent]`."""
    parent = None
    if PARENT_OPTION in arguments:
        with contextlib.suppress(IndexError, ValueError):
            parent = int(arguments[arguments.index(PARENT_OPTION) + 1])
    return parent, DIE_WITH_PARENT_OPTION in arguments


def main() -> None:
    """The helper's entry point: requests on stdin, replies on the original stdout."""
    parent, die_with_parent = _parse_arguments(sys.argv[1:])
    if parent is not None and die_with_parent:
        _die_with_parent(parent)
    # Ctrl-C is the main process's to handle; this process ends when its stdin closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    # Whatever a library prints goes to stderr, never into the replies.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    from wwcli.loaders.keras import empty_folder

    # Second guard behind the refusal of external storage, links and virtual datasets: HDF5
    # looks for the files their relative names point to in an empty folder.
    for variable in ("HDF5_EXTFILE_PREFIX", "HDF5_VDS_PREFIX", "HDF5_EXT_PREFIX"):
        os.environ[variable] = empty_folder()
    import h5py  # noqa: F401 - imported before the greeting, so no deadline pays for it

    _write_message(replies, {"ready": True})
    replies.flush()
    _serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
