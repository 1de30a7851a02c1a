"""PyTorch's file formats read without torch: a restricted unpickler and the two containers.

torch.save writes a pickle whose tensors are calls of `torch._utils._rebuild_tensor_v2` (and a
few siblings) over storages named by persistent ids, and the storages' raw bytes beside it:

- the zip format (torch >= 1.6): `<top>/data.pkl`, one stored member `<top>/data/<key>` per
  storage, `<top>/byteorder` ("little" or "big"); `<top>` is any folder name;
- the legacy format (`_use_new_zipfile_serialization=False`): five pickles in a row (a magic
  number, a protocol version, system information, the object, the storage keys), then each
  storage as an 8-byte element count and its bytes, in the order of the keys;
- a TorchScript archive (`torch.jit.save`) is the zip format whose data.pkl holds the module as
  objects of `__torch__.*` classes whose state is a dict of attributes, with the classes' code
  under `<top>/code/`.

`load_pickle` interprets the opcodes itself, in pure Python (so the loader's deadline stops it
between two opcodes), and builds only what torch's `weights_only` unpickler accepts for
tensors and containers: dicts, OrderedDicts, lists, tuples, sets, primitive values, and tensors
as `StoredTensor` values that record where their bytes are. Nothing is imported, no callable a
file names is ever called: a global is looked up in a fixed table of names, and every other
global, every opcode that builds arbitrary objects, raises `RefusedPickleError`. `__torch__.*`
objects are built only when reading a TorchScript archive, and only as `ScriptObject`, an inert
holder of the attributes the file gives it; their code is never read as code.

The numbers of a tensor are read later, as a numpy view on the memory-mapped file
(`tensor_array`): float16/32/64 as stored, bfloat16 and float8 widened to float32 exactly.
"""

from __future__ import annotations

import _compat_pickle
import dataclasses
import math
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
"""The first pickle of torch's legacy format."""
PROTOCOL_VERSION = 1001
"""The second pickle of torch's legacy format."""

MAX_MEMO = 10_000_000
"""The most memo entries a pickle may fill (each costs a Python object)."""
MAX_MARKS = 10_000
"""The deepest MARK nesting (the loader's shape check refuses deeper nesting first)."""


class RefusedPickleError(Exception):
    """The pickle asks for something the restricted reader never builds: a global outside the
    allow-list, an opcode that builds arbitrary objects, a call of an allowed global on values
    it does not take. `name` is the global (module.name, as Python 3 names it) when one was
    named."""

    def __init__(self, reason: str, name: str | None = None) -> None:
        super().__init__(reason)
        self.name = name


class DamagedPickleError(Exception):
    """The pickle does not parse: truncated, an opcode on an empty stack, a bad argument."""


class NeedsTorchError(Exception):
    """The pickle rebuilds a tensor with a function torch's `weights_only` unpickler allows but
    this reader does not decode (a wrapper subclass, a device tensor from numpy); the loader
    then hands the file to torch."""


# --- dtypes and storages ----------------------------------------------------------------------

ELEMENT_SIZES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "bool": 1,
    "complex128": 16,
    "complex64": 8,
    "complex32": 4,
    "qint8": 1,
    "quint8": 1,
    "qint32": 4,
    "quint4x2": 1,
    "quint2x4": 1,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "bits8": 1,
    "bits16": 2,
    "bits1x8": 1,
    "bits2x4": 1,
    "bits4x2": 1,
    **{f"uint{bits}": 1 for bits in range(1, 8)},
    **{f"int{bits}": 1 for bits in range(1, 8)},
}
"""Every dtype torch's weights_only unpickler knows (as `torch.<name>` globals), in bytes."""

STORAGE_CLASSES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}
"""torch's legacy typed storage classes (`torch.FloatStorage`, `torch.cuda.FloatStorage`) and
the dtype of their elements; `torch.storage.UntypedStorage` holds bytes (uint8)."""

FLOAT8_DTYPES = frozenset(
    {"float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"}
)
"""The 8-bit floats, decoded with ml_dtypes (its names are torch's)."""


@dataclass(eq=False)
class Storage:
    """One storage a pickle refers to: `nbytes` bytes of the file, typed `dtype`. Tensors over
    the same storage share this object (so it compares by identity); the container sets where
    its bytes begin once it knows (`placed_at`)."""

    key: str
    """Its key: the member `data/<key>` of the zip format, the key of the legacy format."""
    dtype: str
    """The dtype of its elements (uint8 for an UntypedStorage)."""
    nbytes: int
    """Its size in bytes."""
    root: Storage | None = None
    """For a view of another storage (legacy format only): that storage."""
    view_offset: int = 0
    """For a view: bytes into its root where it begins."""
    placed_at: int = -1
    """Offset of its first byte in the file (a root storage); -1 until placed."""
    buffer: Any = None
    """What its bytes are read from: the memory-mapped file (a root storage, once placed)."""
    little_endian: bool = True
    """The byte order of its elements."""

    @property
    def begin(self) -> int:
        """Offset of its first byte in the file; -1 while it is not placed."""
        if self.root is not None:
            return -1 if self.root.placed_at < 0 else self.root.placed_at + self.view_offset
        return self.placed_at


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as the file stores it: a strided view over a storage; no byte is read."""

    dtype: str
    """torch's name of its dtype: "float32", "bfloat16", "float8_e4m3fn", "int8", ..."""
    shape: tuple[int, ...]
    """Its size, as stored."""
    stride: tuple[int, ...]
    """Its strides, in elements."""
    offset: int
    """Its storage offset, in elements."""
    storage: Storage | None
    """The storage it views; None for tensors without one (meta)."""
    kind: str | None = None
    """Why it is not a plain dense tensor ("quantized tensor (qint8), not analyzed", "sparse_coo
    tensor, not analyzed", "nested tensor, not analyzed", "tensor holds no data (meta device)");
    None for a dense one."""
    parameter: bool = False
    """Whether it was stored as an nn.Parameter."""

    @property
    def element_size(self) -> int:
        """Bytes per element."""
        return ELEMENT_SIZES[self.dtype]

    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


class ScriptObject:
    """An object of a TorchScript class (`__torch__.<...>`), rebuilt as an inert holder of the
    attributes its file gives it. Nothing of its class is imported or run."""

    __slots__ = ("attributes", "qualname", "state")

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname
        """The class's qualified name, e.g. `__torch__.torch.nn.modules.linear.Linear`."""
        self.attributes: dict[str, Any] = {}
        """Its attributes, in slot order (the state dict the file builds it with)."""
        self.state: object = None
        """A state that is not a dict of attributes (a `__getstate__` value), kept as given."""

    @property
    def original_name(self) -> str:
        """The class's own name, as `ScriptModule.original_name` gives it: `Linear`."""
        return self.qualname.rsplit(".", 1)[-1]


# --- the allow-list -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Global:
    """A global the file named and the allow-list knows: what it is, never the object itself."""

    kind: str
    """What calling it does here (a key of the REDUCE dispatch)."""
    name: str
    """Its full name (module.name)."""
    value: str = ""
    """For a dtype, storage class, layout or qscheme: the dtype / layout name it stands for."""


def _allowed_globals() -> dict[str, _Global]:
    table: dict[str, _Global] = {}

    def add(name: str, kind: str, value: str = "") -> None:
        table[name] = _Global(kind, name, value)

    for rebuild in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"):
        add(f"torch._utils.{rebuild}", rebuild)
    for simple in (
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
        "_rebuild_qtensor",
        "_rebuild_sparse_tensor",
        "_rebuild_meta_tensor_no_storage",
        "_rebuild_nested_tensor",
    ):
        add(f"torch._utils.{simple}", simple)
    for torch_only in (
        "_rebuild_wrapper_subclass",
        "_rebuild_device_tensor_from_numpy",
        "_rebuild_device_tensor_from_cpu_tensor",
    ):
        add(f"torch._utils.{torch_only}", "needs_torch")
    add("torch._tensor._rebuild_from_type_v2", "_rebuild_from_type_v2")
    add("collections.OrderedDict", "ordered_dict")
    add("collections.Counter", "counter")
    add("torch.serialization._get_layout", "get_layout")
    add("torch.Size", "size")
    add("torch.device", "device")
    add("torch.Tensor", "tensor_class")
    add("torch.nn.parameter.Parameter", "parameter_class")
    add("_codecs.encode", "codecs_encode")
    add("builtins.bytearray", "bytearray")
    add("builtins.set", "set")
    add("builtins.complex", "complex")
    for dtype in ELEMENT_SIZES:
        add(f"torch.{dtype}", "dtype", dtype)
    for storage_class, dtype in STORAGE_CLASSES.items():
        add(f"torch.{storage_class}", "storage_type", dtype)
        add(f"torch.cuda.{storage_class}", "storage_type", dtype)
    add("torch.storage.UntypedStorage", "storage_type", "uint8")
    add("torch.storage.TypedStorage", "needs_torch")
    for qscheme in (
        "per_tensor_affine",
        "per_tensor_symmetric",
        "per_channel_affine",
        "per_channel_symmetric",
        "per_channel_affine_float_qparams",
    ):
        add(f"torch.{qscheme}", "qscheme", qscheme)
    return table


ALLOWED_GLOBALS = _allowed_globals()
"""What a pickle may name: torch's weights_only allow-list for tensors and containers."""

SCRIPT_GLOBALS = {
    "torch.jit._pickle.restore_type_tag": _Global("first_argument", "restore_type_tag"),
    **{
        f"torch.jit._pickle.{name}": _Global("list_argument", name)
        for name in ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist")
    },
}
"""What a TorchScript data.pkl may name besides: the typed-list helpers of TorchScript's
pickler, which return their argument (plus any `__torch__.*` class, built as ScriptObject)."""


def python3_name(module: str, name: str) -> str:
    """A global's name as Python 3 knows it (protocol 2 names `__builtin__.exec`)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


# --- the unpickler --------------------------------------------------------------------------------

PersistentLoad = Callable[[tuple[Any, ...]], Storage]

_MARK = object()

_SETTABLE = (dict, OrderedDict, Counter)


class _Unpickler:
    """The opcode loop. `data[position:]` holds the pickle; `load()` returns its object and
    leaves `position` just past its STOP."""

    def __init__(
        self,
        data: Any,
        position: int,
        persistent_load: PersistentLoad | None,
        *,
        script: bool,
    ) -> None:
        self.data = data
        self.position = position
        self.persistent_load = persistent_load
        self.script = script
        self.memo: dict[int, Any] = {}

    # Reading the bytes.

    def _take(self, count: int) -> bytes:
        start = self.position
        end = start + count
        if count < 0 or end > len(self.data):
            raise DamagedPickleError("the pickle ends early (truncated?)")
        self.position = end
        return bytes(self.data[start:end])

    def _line(self) -> str:
        data = self.data
        start = self.position
        end = start
        limit = min(len(data), start + 1024)
        while end < limit and data[end] != 0x0A:
            end += 1
        if end >= limit:
            raise DamagedPickleError("a GLOBAL name without its end of line")
        self.position = end + 1
        try:
            return bytes(data[start:end]).decode("utf-8")
        except UnicodeDecodeError:
            raise DamagedPickleError("a GLOBAL name that is not text") from None

    def _global(self, module: str, name: str) -> object:
        full = python3_name(module, name)
        found = ALLOWED_GLOBALS.get(full)
        if found is not None:
            return found
        if self.script:
            if full in SCRIPT_GLOBALS:
                return SCRIPT_GLOBALS[full]
            if module == "__torch__" or module.startswith("__torch__."):
                return _Global("script_class", full)
        raise RefusedPickleError(f"the global {full} is not allowed", full)

    def load(self) -> Any:
        stack: list[Any] = []
        marks: list[int] = []
        memo = self.memo
        data = self.data
        size = len(data)
        take = self._take
        while True:
            if self.position >= size:
                raise DamagedPickleError("the pickle ends without STOP (truncated?)")
            code = data[self.position]
            self.position += 1
            try:
                if code == 0x80:  # PROTO
                    if take(1)[0] > 5:
                        raise DamagedPickleError("an unknown pickle protocol")
                elif code == 0x95:  # FRAME
                    take(8)
                elif code == 0x2E:  # STOP
                    if len(stack) != 1 or marks:
                        raise DamagedPickleError("STOP with a stack that is not one object")
                    return stack.pop()
                elif code == 0x28:  # MARK
                    if len(marks) >= MAX_MARKS:
                        raise DamagedPickleError(f"MARKs nested more than {MAX_MARKS} deep")
                    marks.append(len(stack))
                elif code == 0x4E:  # NONE
                    stack.append(None)
                elif code == 0x88:  # NEWTRUE
                    stack.append(True)
                elif code == 0x89:  # NEWFALSE
                    stack.append(False)
                elif code == 0x4B:  # BININT1
                    stack.append(take(1)[0])
                elif code == 0x4D:  # BININT2
                    stack.append(struct.unpack("<H", take(2))[0])
                elif code == 0x4A:  # BININT
                    stack.append(struct.unpack("<i", take(4))[0])
                elif code == 0x8A:  # LONG1
                    raw = take(take(1)[0])
                    stack.append(int.from_bytes(raw, "little", signed=True))
                elif code == 0x47:  # BINFLOAT
                    stack.append(struct.unpack(">d", take(8))[0])
                elif code == 0x58:  # BINUNICODE
                    stack.append(self._text(struct.unpack("<I", take(4))[0]))
                elif code == 0x8C:  # SHORT_BINUNICODE
                    stack.append(self._text(take(1)[0]))
                elif code == 0x8D:  # BINUNICODE8
                    stack.append(self._text(struct.unpack("<Q", take(8))[0]))
                elif code in (0x55, 0x43):  # SHORT_BINSTRING (Python 2 str), SHORT_BINBYTES
                    stack.append(take(take(1)[0]))
                elif code == 0x42:  # BINBYTES
                    stack.append(take(struct.unpack("<I", take(4))[0]))
                elif code == 0x29:  # EMPTY_TUPLE
                    stack.append(())
                elif code == 0x5D:  # EMPTY_LIST
                    stack.append([])
                elif code == 0x7D:  # EMPTY_DICT
                    stack.append({})
                elif code == 0x8F:  # EMPTY_SET
                    stack.append(set())
                elif code == 0x74:  # TUPLE
                    start = marks.pop()
                    items = tuple(stack[start:])
                    del stack[start:]
                    stack.append(items)
                elif code == 0x85:  # TUPLE1
                    stack[-1] = (stack[-1],)
                elif code == 0x86:  # TUPLE2
                    stack[-2:] = [(stack[-2], stack[-1])]
                elif code == 0x87:  # TUPLE3
                    stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
                elif code == 0x61:  # APPEND
                    item = stack.pop()
                    self._list(stack[-1]).append(item)
                elif code == 0x65:  # APPENDS
                    start = marks.pop()
                    items_list = stack[start:]
                    del stack[start:]
                    self._list(stack[-1]).extend(items_list)
                elif code == 0x73:  # SETITEM
                    value = stack.pop()
                    key = stack.pop()
                    self._dict(stack[-1])[key] = value
                elif code == 0x75:  # SETITEMS
                    start = marks.pop()
                    pairs = stack[start:]
                    del stack[start:]
                    if len(pairs) % 2:
                        raise DamagedPickleError("SETITEMS with an odd number of items")
                    target = self._dict(stack[-1])
                    for index in range(0, len(pairs), 2):
                        target[pairs[index]] = pairs[index + 1]
                elif code == 0x90:  # ADDITEMS
                    start = marks.pop()
                    members = stack[start:]
                    del stack[start:]
                    if type(stack[-1]) is not set:
                        raise RefusedPickleError("ADDITEMS to something that is not a set")
                    stack[-1].update(members)
                elif code == 0x71:  # BINPUT
                    self._put(take(1)[0], stack)
                elif code == 0x72:  # LONG_BINPUT
                    self._put(struct.unpack("<I", take(4))[0], stack)
                elif code == 0x94:  # MEMOIZE
                    self._put(len(memo), stack)
                elif code == 0x68:  # BINGET
                    stack.append(memo[take(1)[0]])
                elif code == 0x6A:  # LONG_BINGET
                    stack.append(memo[struct.unpack("<I", take(4))[0]])
                elif code == 0x30:  # POP
                    if marks and marks[-1] == len(stack):
                        marks.pop()
                    else:
                        stack.pop()
                elif code == 0x31:  # POP_MARK
                    del stack[marks.pop() :]
                elif code == 0x32:  # DUP
                    stack.append(stack[-1])
                elif code == 0x63:  # GLOBAL
                    module = self._line()
                    name = self._line()
                    stack.append(self._global(module, name))
                elif code == 0x93:  # STACK_GLOBAL
                    name = stack.pop()
                    module = stack.pop()
                    if not isinstance(module, str) or not isinstance(name, str):
                        raise DamagedPickleError("STACK_GLOBAL of names that are not text")
                    stack.append(self._global(module, name))
                elif code == 0x51:  # BINPERSID
                    stack.append(self._persistent(stack.pop()))
                elif code == 0x52:  # REDUCE
                    arguments = stack.pop()
                    if not isinstance(arguments, tuple):
                        raise DamagedPickleError("REDUCE with arguments that are not a tuple")
                    stack[-1] = self._call(stack[-1], arguments)
                elif code == 0x81:  # NEWOBJ
                    arguments = stack.pop()
                    cls = stack.pop()
                    if not isinstance(arguments, tuple):
                        raise DamagedPickleError("NEWOBJ with arguments that are not a tuple")
                    stack.append(self._new(cls, arguments))
                elif code == 0x62:  # BUILD
                    state = stack.pop()
                    self._build(stack[-1], state)
                else:
                    raise RefusedPickleError(f"the pickle opcode {bytes([code])!r} is not allowed")
            except IndexError:
                raise DamagedPickleError("an opcode on an empty stack") from None
            except KeyError:
                raise DamagedPickleError("an unknown memo entry") from None

    # Helpers of the loop.

    def _text(self, length: int) -> str:
        raw = self._take(length)
        try:
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise DamagedPickleError("a string that is not UTF-8") from None

    def _put(self, index: int, stack: list[Any]) -> None:
        if index not in self.memo and len(self.memo) >= MAX_MEMO:
            raise DamagedPickleError(f"more than {MAX_MEMO} memo entries")
        self.memo[index] = stack[-1]

    @staticmethod
    def _list(target: object) -> list[Any]:
        if type(target) is not list:
            raise RefusedPickleError(f"appending to a {type(target).__name__}, not a list")
        return target

    @staticmethod
    def _dict(target: object) -> dict[Any, Any]:
        if type(target) not in _SETTABLE:
            raise RefusedPickleError(f"setting items of a {type(target).__name__}, not a dict")
        assert isinstance(target, dict)
        return target

    def _persistent(self, pid: object) -> Storage:
        if self.persistent_load is None:
            raise RefusedPickleError("a persistent id where no storage may be")
        if type(pid) is not tuple or not pid:
            raise RefusedPickleError("a persistent id that is not a storage")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename != "storage":
            raise RefusedPickleError("a persistent id that is not a storage")
        return self.persistent_load(pid)

    def _call(self, function: object, arguments: tuple[Any, ...]) -> Any:
        if not isinstance(function, _Global):
            raise RefusedPickleError(f"calling a {type(function).__name__}")
        return _REDUCERS.get(function.kind, _refuse_call)(function, arguments)

    def _new(self, cls: object, arguments: tuple[Any, ...]) -> Any:
        if not isinstance(cls, _Global):
            raise RefusedPickleError(f"building a {type(cls).__name__}")
        if cls.kind == "parameter_class":
            if not arguments or not isinstance(arguments[0], StoredTensor):
                raise DamagedPickleError("a Parameter of something that is not a tensor")
            return dataclasses.replace(arguments[0], parameter=True)
        if cls.kind == "script_class" and self.script:
            if arguments:
                raise DamagedPickleError("a TorchScript object built with arguments")
            return ScriptObject(cls.name)
        if cls.kind in ("ordered_dict", "counter", "set") and not arguments:
            return {"ordered_dict": OrderedDict, "counter": Counter, "set": set}[cls.kind]()
        if cls.kind in ("tensor_class", "needs_torch"):
            raise NeedsTorchError(f"{cls.name} built by NEWOBJ")
        raise RefusedPickleError(f"building {cls.name} by NEWOBJ", None)

    @staticmethod
    def _build(target: object, state: object) -> None:
        if isinstance(target, ScriptObject):
            if type(state) is dict:
                for key in state:
                    if not isinstance(key, str):
                        raise DamagedPickleError("a TorchScript attribute name that is not text")
                target.attributes = state
            else:
                target.state = state
            return
        if type(target) is OrderedDict or isinstance(target, StoredTensor):
            return  # a state dict's `_metadata`, a Parameter's attributes: not needed
        raise RefusedPickleError(f"setting the state of a {type(target).__name__}")


def _refuse_call(function: _Global, arguments: tuple[Any, ...]) -> Any:
    raise RefusedPickleError(f"calling {function.name}", None)


# --- what calling an allowed global builds -----------------------------------------------------


def _ints(value: object, what: str) -> tuple[int, ...]:
    if type(value) is not tuple or not all(type(item) is int and item >= 0 for item in value):
        raise DamagedPickleError(f"a tensor {what} that is not a tuple of counts")
    return value


def _dense(arguments: tuple[Any, ...], dtype: str | None) -> StoredTensor:
    storage, offset, size, stride = arguments
    if not isinstance(storage, Storage):
        raise DamagedPickleError("a tensor over something that is not a storage")
    if type(offset) is not int or offset < 0:
        raise DamagedPickleError("a tensor storage offset that is not a count")
    shape = _ints(size, "size")
    strides = _ints(stride, "stride")
    if len(shape) != len(strides):
        raise DamagedPickleError("a tensor whose size and stride differ in length")
    return StoredTensor(
        dtype=storage.dtype if dtype is None else dtype,
        shape=shape,
        stride=strides,
        offset=offset,
        storage=storage,
    )


def _rebuild_tensor(function: _Global, arguments: tuple[Any, ...]) -> StoredTensor:
    if len(arguments) != 4:
        raise DamagedPickleError("_rebuild_tensor with other than 4 arguments")
    return _dense(arguments, None)


def _rebuild_tensor_v2(function: _Global, arguments: tuple[Any, ...]) -> StoredTensor:
    if len(arguments) not in (6, 7):
        raise DamagedPickleError("_rebuild_tensor_v2 with other than 6 or 7 arguments")
    return _dense(arguments[:4], None)


def _rebuild_tensor_v3(function: _Global, arguments: tuple[Any, ...]) -> StoredTensor:
    if len(arguments) not in (7, 8):
        raise DamagedPickleError("_rebuild_tensor_v3 with other than 7 or 8 arguments")
    dtype = arguments[6]
    if not isinstance(dtype, _Global) or dtype.kind != "dtype":
        raise DamagedPickleError("_rebuild_tensor_v3 without a dtype")
    return _dense(arguments[:4], dtype.value)


def _rebuild_parameter(function: _Global, arguments: tuple[Any, ...]) -> StoredTensor:
    expected = 4 if function.kind == "_rebuild_parameter_with_state" else 3
    if len(arguments) != expected or not isinstance(arguments[0], StoredTensor):
        raise DamagedPickleError(f"{function.name} of something that is not a tensor")
    return dataclasses.replace(arguments[0], parameter=True)


def _rebuild_qtensor(function: _Global, arguments: tuple[Any, ...]) -> StoredTensor:
    if len(arguments) != 7:
        raise DamagedPickleError("_rebuild_qtensor with other than 7 arguments")
    tensor = _dense(arguments[:4], None)
    return dataclasses.replace(tensor, kind=f"quantized tensor ({tensor.dtype}), not analyzed")


def _rebuild_sparse_tensor(function: _Global, arguments: tuple[Any, ...]) -> StoredTensor:
    if (
        len(arguments) != 2
        or not isinstance(arguments[0], _Global)
        or type(arguments[1]) is not tuple
    ):
        raise DamagedPickleError("_rebuild_sparse_tensor without a layout and its data")
    layout, parts = arguments[0].value, arguments[1]
    sizes = [part for part in parts if type(part) is tuple]
    values = [part for part in parts if isinstance(part, StoredTensor)]
    if not sizes or not values:
        raise DamagedPickleError("a sparse tensor without its size or values")
    return StoredTensor(
        dtype=values[-1].dtype,
        shape=_ints(sizes[-1], "size"),
        stride=(),
        offset=0,
        storage=None,
        kind=f"{layout} tensor, not analyzed",
    )


def _rebuild_meta(function: _Global, arguments: tuple[Any, ...]) -> StoredTensor:
    if len(arguments) != 4 or not isinstance(arguments[0], _Global):
        raise DamagedPickleError("_rebuild_meta_tensor_no_storage without a dtype")
    if arguments[0].kind != "dtype":
        raise DamagedPickleError("_rebuild_meta_tensor_no_storage without a dtype")
    return StoredTensor(
        dtype=arguments[0].value,
        shape=_ints(arguments[1], "size"),
        stride=_ints(arguments[2], "stride"),
        offset=0,
        storage=None,
        kind="tensor holds no data (meta device)",
    )


def _rebuild_nested(function: _Global, arguments: tuple[Any, ...]) -> StoredTensor:
    if len(arguments) != 4 or not isinstance(arguments[0], StoredTensor):
        raise DamagedPickleError("_rebuild_nested_tensor without its buffer")
    return StoredTensor(
        dtype=arguments[0].dtype,
        shape=(),
        stride=(),
        offset=0,
        storage=None,
        kind="nested tensor, not analyzed",
    )


def _rebuild_from_type_v2(function: _Global, arguments: tuple[Any, ...]) -> Any:
    if len(arguments) != 4 or not isinstance(arguments[0], _Global):
        raise DamagedPickleError("_rebuild_from_type_v2 without its function")
    inner, new_type, inner_arguments, _state = arguments
    if not isinstance(new_type, _Global) or new_type.kind not in (
        "tensor_class",
        "parameter_class",
    ):
        raise RefusedPickleError("_rebuild_from_type_v2 of a type that is not a tensor")
    if type(inner_arguments) is not tuple:
        raise DamagedPickleError("_rebuild_from_type_v2 with arguments that are not a tuple")
    rebuilt = _REDUCERS.get(inner.kind, _refuse_call)(inner, inner_arguments)
    if not isinstance(rebuilt, StoredTensor):
        raise RefusedPickleError("_rebuild_from_type_v2 of something that is not a tensor")
    if new_type.kind == "parameter_class":
        return dataclasses.replace(rebuilt, parameter=True)
    return rebuilt


def _ordered_dict(function: _Global, arguments: tuple[Any, ...]) -> Any:
    made: dict[Any, Any] = OrderedDict() if function.kind == "ordered_dict" else Counter()
    if not arguments:
        return made
    if len(arguments) != 1 or type(arguments[0]) not in (list, tuple):
        raise DamagedPickleError(f"{function.name} of something that is not a list of pairs")
    for pair in arguments[0]:
        if type(pair) not in (list, tuple) or len(pair) != 2:
            raise DamagedPickleError(f"{function.name} of something that is not a list of pairs")
        made[pair[0]] = pair[1]
    return made


def _primitive(function: _Global, arguments: tuple[Any, ...]) -> Any:
    kind = function.kind
    if kind == "size":
        if len(arguments) != 1:
            raise DamagedPickleError("torch.Size of other than one tuple")
        return _ints(tuple(arguments[0]) if type(arguments[0]) is list else arguments[0], "size")
    if kind == "device" and arguments and all(type(a) in (str, int) for a in arguments):
        return ":".join(str(argument) for argument in arguments)
    if kind == "get_layout" and len(arguments) == 1 and isinstance(arguments[0], str):
        return _Global("layout", arguments[0], arguments[0].removeprefix("torch."))
    codecs = ("latin1", "latin-1", "utf-8", "utf8", "ascii")
    encodable = len(arguments) == 2 and isinstance(arguments[0], str) and arguments[1] in codecs
    if kind == "codecs_encode" and encodable:
        return arguments[0].encode(arguments[1])
    if kind == "bytearray" and (not arguments or type(arguments[0]) is bytes):
        return bytearray(*arguments)
    if kind == "set" and (not arguments or type(arguments[0]) in (list, tuple)):
        return set(*arguments)
    if (
        kind == "complex"
        and all(type(a) in (int, float) for a in arguments)
        and len(arguments) <= 2
    ):
        return complex(*arguments)
    if kind == "first_argument" and arguments:
        return arguments[0]
    if kind == "list_argument" and len(arguments) == 1 and type(arguments[0]) is list:
        return arguments[0]
    raise DamagedPickleError(f"{function.name} called with arguments it does not take")


def _needs_torch(function: _Global, arguments: tuple[Any, ...]) -> Any:
    raise NeedsTorchError(function.name)


_REDUCERS: dict[str, Callable[[_Global, tuple[Any, ...]], Any]] = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter,
    "_rebuild_qtensor": _rebuild_qtensor,
    "_rebuild_sparse_tensor": _rebuild_sparse_tensor,
    "_rebuild_meta_tensor_no_storage": _rebuild_meta,
    "_rebuild_nested_tensor": _rebuild_nested,
    "_rebuild_from_type_v2": _rebuild_from_type_v2,
    "ordered_dict": _ordered_dict,
    "counter": _ordered_dict,
    "needs_torch": _needs_torch,
    **{
        kind: _primitive
        for kind in (
            "size",
            "device",
            "get_layout",
            "codecs_encode",
            "bytearray",
            "set",
            "complex",
            "first_argument",
            "list_argument",
        )
    },
}


def load_pickle(
    data: Any,
    position: int = 0,
    persistent_load: PersistentLoad | None = None,
    *,
    script: bool = False,
) -> tuple[Any, int]:
    """The object of the pickle at `data[position:]`, and the position just past it.

    `persistent_load` turns a storage's persistent id into a `Storage`; None refuses persistent
    ids. `script` also builds `__torch__.*` objects (as ScriptObject). Raises
    RefusedPickleError for anything outside the allow-list, DamagedPickleError when the pickle
    does not parse, NeedsTorchError for a tensor only torch can rebuild.
    """
    unpickler = _Unpickler(data, position, persistent_load, script=script)
    try:
        loaded = unpickler.load()
    except (TypeError, ValueError, OverflowError) as error:  # an unhashable key, a bad number
        raise DamagedPickleError(f"{type(error).__name__}: {error}"[:200]) from None
    return loaded, unpickler.position


def storage_from_id(
    pid: tuple[Any, ...], *, legacy: bool
) -> tuple[Storage, tuple[Any, ...] | None]:
    """The storage a persistent id names: `('storage', type, key, location, numel)` in the zip
    format, with a sixth item (a view of a root storage, or None) in the legacy format. Returns
    the storage (its root, for a view) and the view's (key, offset, size) in elements."""
    if len(pid) != (6 if legacy else 5):
        raise DamagedPickleError("a storage persistent id of the wrong length")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _Global) or storage_type.kind != "storage_type":
        if isinstance(storage_type, _Global) and storage_type.kind == "needs_torch":
            raise NeedsTorchError(storage_type.name)
        raise DamagedPickleError("a storage persistent id without a storage type")
    if not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise DamagedPickleError("a storage persistent id with a bad key or size")
    dtype = storage_type.value
    view = pid[5] if legacy else None
    if view is not None and (
        type(view) is not tuple
        or len(view) != 3
        or not isinstance(view[0], str)
        or not all(type(item) is int and item >= 0 for item in view[1:])
    ):
        raise DamagedPickleError("a storage view that is not (key, offset, size)")
    return Storage(key=key, dtype=dtype, nbytes=numel * ELEMENT_SIZES[dtype]), view


# --- reading the numbers ------------------------------------------------------------------------

NUMPY_FLOATS = {"float16": "f2", "float32": "f4", "float64": "f8"}


def float8_dtype(dtype: str) -> np.dtype[Any] | None:
    """ml_dtypes' numpy dtype for one of torch's 8-bit floats; None when ml_dtypes lacks it."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    found = getattr(ml_dtypes, dtype, None)
    return None if found is None else np.dtype(found)


def tensor_array(tensor: StoredTensor) -> np.ndarray:
    """A dense float tensor's numbers as numpy, over its storage's memory-mapped file:
    float16/32/64 as stored (a view; big-endian files converted), bfloat16 widened to float32
    by shifting its bits, float8 through ml_dtypes to float32. The view's extent was checked
    against its storage when the file was read (`loaders.torch.check_view`)."""
    storage = tensor.storage
    if storage is None or storage.begin < 0:
        raise ValueError("a tensor without stored bytes")
    root = storage.root or storage
    buffer, little_endian = root.buffer, root.little_endian
    order = "<" if little_endian else ">"
    size = tensor.element_size
    if tensor.dtype in NUMPY_FLOATS:
        stored = np.dtype(order + NUMPY_FLOATS[tensor.dtype])
    elif tensor.dtype == "bfloat16":
        stored = np.dtype(order + "u2")
    else:
        stored = np.dtype("u1")
    array = np.ndarray(
        tensor.shape,
        dtype=stored,
        buffer=buffer,
        offset=storage.begin + tensor.offset * size,
        strides=tuple(step * size for step in tensor.stride),
    )
    if tensor.dtype in NUMPY_FLOATS:
        return array if little_endian else array.astype(stored.newbyteorder("="))
    if tensor.dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    float8 = float8_dtype(tensor.dtype)
    if float8 is None:
        raise ValueError(f"dtype {tensor.dtype} needs ml_dtypes")
    return array.view(float8).astype(np.float32)
