"""Bad-input corpus entries for PyTorch files: pickle DAGs and deep nesting, strided views over
tiny storages, zip member bombs, names that are not text, and what wwcli's own unpickler and
container readers (`wwcli/loaders/_torchpickle.py`, `_torchfiles.py`) must refuse: storages
smaller than declared or views past them, members twice, legacy records that lie, TorchScript
modules nested without end, code-running globals by every route. (Exotic dtypes and tensor types are
listed, not refused: tests/loaders/test_torch.py.)

Each entry is a `BadInput` (tests/hostile/make_corpus.py); test_corpus.py runs every one.

Every file is written here from scratch, without torch: the pickles opcode by opcode (as
torch.save writes them: `_rebuild_tensor_v2` over a persistent storage id), the archives with
`zipfile`, the decompression bomb as one deflate block repeated (so that writing it costs
milliseconds, not the seconds of compressing gigabytes).
"""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.hostile.make_corpus import BadInput

PREFIX = "archive"
"""The folder inside the zip that torch.save names after the file; torch accepts any name."""
STARTUP_SECONDS = 20.0
"""What one refusal may take, whole command (torch is no longer imported; the bombs and the
deadline entry spend seconds of their own on a loaded machine)."""
MEMORY_LIMIT_MIB = 3 * 1024
"""Address space for the bombs: `wwcli analyze` of fixtures/torch/cnn_state_dict.pt peaks at
0.9 GiB of VmPeak (torch maps its libraries; it runs even under a 1 GiB RLIMIT_AS); 3 GiB leaves
room for a normal read and none for the 2.5 GiB the bombs would unpack, nor the 8 GB they did."""


# --- A pickle assembler: the opcodes torch.save writes, and the shapes attacks want -------------


def _text(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value: int) -> bytes:
    if 0 <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tuple(items: Sequence[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as torch.save writes it: a view (offset, size, stride, in elements) over a
    storage of `numel` elements kept in the member `data/<storage>`."""

    key: str
    storage: str
    numel: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int = 0
    storage_class: str = "FloatStorage"


def tensor_pickle(tensor: StoredTensor) -> bytes:
    """The opcodes of `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False,
    OrderedDict())`, the storage a persistent id as torch.save writes it."""
    persistent_id = _tuple(
        [
            _text("storage"),
            _global("torch", tensor.storage_class),
            _text(tensor.storage),
            _text("cpu"),
            _int(tensor.numel),
        ]
    )
    arguments = _tuple(
        [
            persistent_id + b"Q",
            _int(tensor.offset),
            _tuple([_int(dim) for dim in tensor.size]),
            _tuple([_int(step) for step in tensor.stride]),
            b"\x89",  # NEWFALSE: requires_grad
            _global("collections", "OrderedDict") + b")R",
        ]
    )
    return _global("torch._utils", "_rebuild_tensor_v2") + arguments + b"R"


def state_dict_pickle(tensors: Sequence[StoredTensor]) -> bytes:
    """A protocol-2 pickle of {key: tensor, ...}."""
    items = b"".join(_text(tensor.key) + tensor_pickle(tensor) for tensor in tensors)
    return b"\x80\x02}(" + items + b"u."


def torch_zip(
    data_pkl: bytes,
    storages: dict[str, bytes] | None = None,
    *,
    compress: dict[str, int] | None = None,
) -> bytes:
    """torch's zip format: `archive/data.pkl`, `byteorder`, `version` and `data/<key>` members
    (stored, as torch.save writes them, unless `compress` names a member's method)."""
    members = {"data.pkl": data_pkl, "byteorder": b"little", "version": b"3\n"}
    members.update({f"data/{key}": raw for key, raw in (storages or {}).items()})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, raw in members.items():
            method = (compress or {}).get(name, zipfile.ZIP_STORED)
            archive.writestr(f"{PREFIX}/{name}", raw, compress_type=method)
    return buffer.getvalue()


def _writer(make: Callable[[], bytes]) -> Callable[[Path], None]:
    def write(target: Path) -> None:
        target.write_bytes(make())

    return write


# --- 1. Exponential walks and deep nesting -------------------------------------------------------


def dict_dag(depth: int) -> bytes:
    """{"a": d, "b": d} where d is the level below, `depth` levels: 2**depth paths through
    a file of a few hundred bytes (pickle's memo shares every level)."""
    level: object = {"leaf": 1}
    for _ in range(depth):
        level = {"a": level, "b": level}
    return torch_zip(pickle.dumps({"optimizer": level}, protocol=2))


def dict_cycle() -> bytes:
    """A dict that holds itself twice: endless paths."""
    loop: dict[str, object] = {}
    loop["a"] = loop
    loop["b"] = loop
    return torch_zip(pickle.dumps({"state": loop}, protocol=2))


def tuple_dag_key(depth: int) -> bytes:
    """A dict whose one key is a tuple DAG (t = (t', t')): hashing or printing that key walks
    2**depth leaves, inside C, where no signal handler runs."""
    key: object = ("leaf",)
    for _ in range(depth):
        key = (key, key)
    # pickle.dumps({key: 1}) would hash the key here; the tuple alone pickles in no time.
    shared = pickle.dumps(key, protocol=2)[2:-1]
    return torch_zip(b"\x80\x02}" + shared + b"K\x01s.")


def nested_tuple_key(depth: int) -> bytes:
    """A dict keyed by a tuple nested `depth` deep: (((...),),): built without recursion, by
    opcodes, as pickle.dumps would overflow its own stack."""
    body = b"\x80\x02}" + b"X\x04\x00\x00\x00leaf" + b"\x85" * depth + b"K\x01s."
    return torch_zip(body)


def tuple_dag_value(depth: int) -> bytes:
    """A state dict beside a value that is a list DAG: harmless unless something prints or
    walks it."""
    level: object = ["leaf"]
    for _ in range(depth):
        level = [level, level]
    tensor = StoredTensor("fc.weight", "0", 12, (3, 4), (4, 1))
    body = state_dict_pickle([tensor])
    shared = pickle.dumps(level, protocol=2)[2:-1]  # the list's opcodes, without PROTO and STOP
    body = body[:-2] + _text("history") + shared + b"u."
    return torch_zip(body, {"0": bytes(48)})


# --- 2. Small file, huge matrix: views over a tiny storage ---------------------------------------


def strided_view(size: tuple[int, ...], stride: tuple[int, ...], numel: int) -> bytes:
    """One `fc.weight` of `size` with `stride` over a storage of `numel` float32 zeros."""
    tensor = StoredTensor("fc.weight", "0", numel, size, stride)
    return torch_zip(state_dict_pickle([tensor]), {"0": bytes(4 * numel)})


# --- 3. Zip members without a decompression bound -------------------------------------------------


def deflate_zeros(size: int) -> tuple[bytes, int]:
    """A raw deflate stream of `size` zero bytes and their CRC-32, without compressing `size`
    bytes: one full-flushed block of 1 MiB of zeros is repeated (a full flush makes the blocks
    independent of each other), the CRC is combined the same way."""
    chunk = 1 << 20
    assert size % chunk == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    # Appending 1 MiB of zeros maps the inverted CRC register linearly (over GF(2)): learn the
    # map from the 32 basis vectors once, then apply it size // chunk times.
    zeros = bytes(chunk)
    columns = [~zlib.crc32(zeros, ~(1 << bit) & 0xFFFFFFFF) & 0xFFFFFFFF for bit in range(32)]
    register = ~0 & 0xFFFFFFFF
    for _ in range(size // chunk):
        register = _apply(columns, register)
    return block * (size // chunk) + end, ~register & 0xFFFFFFFF


def _apply(columns: list[int], register: int) -> int:
    result = 0
    for bit, column in enumerate(columns):
        if register >> bit & 1:
            result ^= column
    return result


def deflated_member(member: str, size: int, *, declared: int | None = None) -> bytes:
    """A state dict whose member `member` (`data.pkl` or `data/0`) is a deflate stream that
    inflates to `size` zero bytes from a few MB; `declared` is the uncompressed size the
    central directory (and the local header) claim, `size` unless given."""
    stream, crc = deflate_zeros(size)
    numel = size // 4
    tensor = StoredTensor("fc.weight", "0", numel, (numel // 1024, 1024), (1024, 1))
    seed = torch_zip(state_dict_pickle([tensor]), {"0": b""})
    return _replace_member(seed, member, stream, crc, size if declared is None else declared)


def deflated_small_storage() -> bytes:
    """A valid state dict whose one storage is deflated (as `zip -r` would re-pack a .pt): torch's
    memory-mapped reader takes the packed bytes for the numbers."""
    tensor = StoredTensor("fc.weight", "0", 12, (3, 4), (4, 1))
    values = struct.pack("<12f", *range(12))
    return torch_zip(
        state_dict_pickle([tensor]), {"0": values}, compress={"data/0": zipfile.ZIP_DEFLATED}
    )


def _replace_member(archive: bytes, name: str, packed: bytes, crc: int, declared: int) -> bytes:
    """A zip rewritten with one member's bytes replaced by an already deflated stream, its CRC
    and uncompressed size set to what the caller declares."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as source, zipfile.ZipFile(buffer, "w") as out:
        for info in source.infolist():
            raw = source.read(info)
            if info.filename == f"{PREFIX}/{name}":
                continue
            out.writestr(info, raw)
        header_offset = buffer.tell()
        encoded = f"{PREFIX}/{name}".encode()
        local = struct.pack(
            "<4sHHHHHIIIHH",
            b"PK\x03\x04",
            20,
            0,
            zipfile.ZIP_DEFLATED,
            0,
            0x21,
            crc,
            len(packed),
            declared & 0xFFFFFFFF,
            len(encoded),
            0,
        )
        buffer.write(local + encoded + packed)
        info = zipfile.ZipInfo(f"{PREFIX}/{name}")
        info.compress_type = zipfile.ZIP_DEFLATED
        info.header_offset = header_offset
        info.CRC = crc
        info.compress_size = len(packed)
        info.file_size = declared
        out.filelist.append(info)
        out.NameToInfo[info.filename] = info
        out.start_dir = buffer.tell()
    return buffer.getvalue()


def zip64_claim(claim: int) -> bytes:
    """torch's zip with `data/0`'s uncompressed size in the central directory's ZIP64 extra
    field set to `claim` (2**62): a number no reader may believe."""
    seed = strided_view((3, 4), (4, 1), 12)
    with zipfile.ZipFile(io.BytesIO(seed)) as archive:
        infos = archive.infolist()
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(seed)) as source, zipfile.ZipFile(buffer, "w") as out:
        for info in infos:
            out.writestr(info, source.read(info))
    data = bytearray(buffer.getvalue())
    name = f"{PREFIX}/data/0".encode()
    position = data.find(b"PK\x01\x02")
    while position >= 0:
        (name_length, extra_length) = struct.unpack_from("<HH", data, position + 28)
        if bytes(data[position + 46 : position + 46 + name_length]) == name:
            break
        position = data.find(b"PK\x01\x02", position + 4)
    # Uncompressed size 0xFFFFFFFF: "look in the ZIP64 extra field", which follows the name.
    struct.pack_into("<I", data, position + 24, 0xFFFFFFFF)
    extra = struct.pack("<HHQ", 1, 8, claim)
    cut = position + 46 + name_length
    struct.pack_into("<H", data, position + 30, extra_length + len(extra))
    data[cut:cut] = extra
    end = data.rfind(b"PK\x05\x06")
    (directory_size,) = struct.unpack_from("<I", data, end + 12)
    struct.pack_into("<I", data, end + 12, directory_size + len(extra))
    return bytes(data)


def many_opcodes(count: int) -> bytes:
    """A list of `count` small ints, appended in one go: linear, but `count` opcodes for the
    pure-Python readers to step through (the deadline's entry)."""
    return torch_zip(b"\x80\x02](" + b"K\x01" * count + b"e.")


def surrogate_key() -> bytes:
    """A state dict whose tensor name holds a lone surrogate (pickle's BINUNICODE carries one,
    as torch's unpickler decodes with surrogatepass)."""
    tensor = StoredTensor("fc\udc80.weight", "0", 12, (3, 4), (4, 1))
    return torch_zip(state_dict_pickle([tensor]), {"0": bytes(48)})


# --- 5. What the own reader checks: storages, members, legacy records, TorchScript --------------


def storage_smaller_than_declared() -> bytes:
    """A 3x4 float tensor over a storage declared as 12 floats whose member holds 12 bytes."""
    tensor = StoredTensor("fc.weight", "0", 12, (3, 4), (4, 1))
    return torch_zip(state_dict_pickle([tensor]), {"0": bytes(12)})


def view_offset_past_storage() -> bytes:
    """A 3x4 view at offset 40 of a 48-float storage: it would read 16 floats past its end."""
    tensor = StoredTensor("fc.weight", "0", 48, (3, 4), (4, 1), offset=40)
    return torch_zip(state_dict_pickle([tensor]), {"0": bytes(4 * 48)})


def member_twice(name: str) -> bytes:
    """A valid state dict whose archive holds `name` (data.pkl or data/0) twice: zipfile reads
    the last, another reader the first."""
    tensor = StoredTensor("fc.weight", "0", 12, (3, 4), (4, 1))
    body = torch_zip(state_dict_pickle([tensor]), {"0": bytes(48)})
    buffer = io.BytesIO(body)
    with zipfile.ZipFile(buffer, "a") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name: the point
        other = state_dict_pickle([StoredTensor("other.weight", "0", 12, (3, 4), (4, 1))])
        archive.writestr(f"{PREFIX}/{name}", other if name == "data.pkl" else bytes(48))
    return buffer.getvalue()


def legacy_file(storage_count: int, *, cut: int = 0, keys: list[str] | None = None) -> bytes:
    """torch's legacy format by hand: magic number, protocol version, system information, a
    state dict of one 3x4 float tensor over storage "0" (12 floats), the keys, then the storage
    record, which says it holds `storage_count` elements; `cut` bytes dropped at the end."""
    tensor = StoredTensor("fc.weight", "0", 12, (3, 4), (4, 1))
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    version = pickle.dumps(1001, protocol=2)
    system = pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
    # The legacy persistent id has a sixth item: a view of the storage, or None.
    body = state_dict_pickle([tensor]).replace(_int(12) + b"t" + b"Q", _int(12) + b"Nt" + b"Q")
    listed = pickle.dumps(["0"] if keys is None else keys, protocol=2)
    record = struct.pack("<q", storage_count) + bytes(48)
    whole = magic + version + system + body + listed + record
    return whole[: len(whole) - cut] if cut else whole


def torchscript_zip(
    data_pkl: bytes,
    storages: dict[str, bytes] | None = None,
    *,
    code: bytes = b"class M(Module):\n  __parameters__ = []\n  __buffers__ = []\n",
) -> bytes:
    """A TorchScript archive: torch's zip with `constants.pkl` and a `code/` folder."""
    members = {
        "data.pkl": data_pkl,
        "constants.pkl": b"\x80\x02).",
        "version": b"3\n",
        "byteorder": b"little",
        "code/__torch__.py": code,
    }
    members.update({f"data/{key}": raw for key, raw in (storages or {}).items()})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, raw in members.items():
            archive.writestr(f"{PREFIX}/{name}", raw)
    return buffer.getvalue()


def nested_script_modules(depth: int) -> bytes:
    """A TorchScript module holding a submodule `sub`, `depth` levels down, built opcode by
    opcode (GLOBAL, NEWOBJ, a dict of attributes, BUILD) as TorchScript's pickler writes them."""
    opening = _global("__torch__", "M") + b")\x81}(" + _text("sub")
    inner = _global("__torch__", "M") + b")\x81"
    return torchscript_zip(b"\x80\x02" + opening * depth + inner + b"ub" * depth + b".")


def reduce_pickle(module: str, name: str, argument: str) -> bytes:
    """{"fc.weight": <module.name(argument)>}: a call of any global, as a __reduce__ writes it."""
    call = _global(module, name) + _tuple([_text(argument)]) + b"R"
    return torch_zip(b"\x80\x02}(" + _text("fc.weight") + call + b"u.")


def stack_global_pickle() -> bytes:
    """The same call as protocol 4 writes it: STACK_GLOBAL of two strings."""
    call = _text("os") + _text("system") + b"\x93" + _tuple([_text("true")]) + b"R"
    return torch_zip(b"\x80\x04}(" + _text("fc.weight") + call + b"u.")


def cases() -> list[BadInput]:
    """This module's entries, in a stable order."""
    from tests.hostile.make_corpus import BadInput

    shared = r"its pickle shares objects so that they expand to more than 20000000"
    entries = [
        # 1. Exponential walks, deep nesting, and the deadline.
        ("pt_dict_dag_2_pow_40_paths.pt", lambda: dict_dag(40), shared),
        ("pt_tuple_dag_key_2_pow_40.pt", lambda: tuple_dag_key(40), shared),
        ("pt_list_dag_beside_weights.pt", lambda: tuple_dag_value(40), shared),
        ("pt_dict_holding_itself.pt", dict_cycle, r"holds no tensors to analyze"),
        (
            "pt_tuple_key_nested_100000_deep.pt",
            lambda: nested_tuple_key(100_000),
            r"its pickle nests objects more than 10000 deep",
        ),
        # 2. Small file, huge matrix.
        (
            "pt_view_stride_0_1_over_26k_floats.pt",
            lambda: strided_view((20000, 6000), (0, 1), 26000),
            r"tensor 'fc\.weight' is a 20000x6000 view with strides \(0, 1\) that uses "
            r"storage elements more than once",
        ),
        (
            "pt_view_stride_1_1_over_26k_floats.pt",
            lambda: strided_view((20000, 6000), (1, 1), 26000),
            r"view with strides \(1, 1\) that uses storage elements more than once",
        ),
        (
            "pt_view_rows_overlap.pt",
            lambda: strided_view((100, 100), (50, 1), 5050),
            r"view with strides \(50, 1\) that uses storage elements more than once",
        ),
        # 3. Zip members.
        (
            "pt_deflated_storage_2_5_gib.pt",
            lambda: deflated_member("data/0", 2560 << 20),
            r"tensor storage 'archive/data/0' is compressed in the zip",
        ),
        (
            "pt_deflated_storage_small.pt",
            deflated_small_storage,
            r"tensor storage 'archive/data/0' is compressed in the zip",
        ),
        (
            "pt_deflated_data_pkl_2_5_gib.pt",
            lambda: deflated_member("data.pkl", 2560 << 20),
            r"zip member 'archive/data\.pkl' would unpack from 2654722 to 2684354560 bytes "
            r"\(over 100 times\): refusing a likely decompression bomb",
        ),
        (
            "pt_deflated_data_pkl_lying_size.pt",
            lambda: deflated_member("data.pkl", 2560 << 20, declared=1 << 20),
            r"zip member 'archive/data\.pkl' unpacks past the 1048576 bytes its zip entry "
            r"declares",
        ),
        (
            "pt_zip64_size_2_pow_62.pt",
            lambda: zip64_claim(2**62),
            r"zip member 'archive/data/0' would unpack from 48 to 4611686018427387904 bytes: "
            r"refusing a likely decompression bomb",
        ),
        # 4. Names.
        (
            "pt_tensor_name_with_lone_surrogate.pt",
            surrogate_key,
            r"the tensor name 'fc\\udc80\.weight' is not valid text \(a lone surrogate\)",
        ),
        # 5. The own reader: storages and members.
        (
            "pt_storage_member_smaller_than_declared.pt",
            storage_smaller_than_declared,
            r"storage '0' declares 48 bytes, but its member 'archive/data/0' holds 12",
        ),
        (
            "pt_view_offset_past_its_storage.pt",
            view_offset_past_storage,
            r"tensor 'fc\.weight' reaches byte 208 of a storage of 192 bytes",
        ),
        (
            "pt_data_pkl_twice_in_the_zip.pt",
            lambda: member_twice("data.pkl"),
            r"zip member 'archive/data\.pkl' appears twice",
        ),
        (
            "pt_storage_twice_in_the_zip.pt",
            lambda: member_twice("data/0"),
            r"zip member 'archive/data/0' appears twice",
        ),
        (
            "pt_legacy_storage_record_lies.pt",
            lambda: legacy_file(1 << 40),
            r"storage '0' is recorded with 1099511627776 elements, its pickle declares 12",
        ),
        (
            "pt_legacy_storage_cut_short.pt",
            lambda: legacy_file(12, cut=20),
            r"the file ends inside storage '0' \(truncated\)",
        ),
        (
            "pt_legacy_lists_an_unused_storage.pt",
            lambda: legacy_file(12, keys=["0", "7"]),
            r"lists storage '7', which its pickle never uses",
        ),
        (
            "pt_torchscript_modules_nested_3000_deep.pt",
            lambda: nested_script_modules(3000),
            r"its TorchScript modules nest more than 1000 deep",
        ),
        # 6. Code by every route: a global call, protocol 4's STACK_GLOBAL, TorchScript.
        (
            "pt_reduce_builtins_eval.pt",
            lambda: reduce_pickle("__builtin__", "eval", "1"),
            r"holds Python objects \(builtins\.eval\) whose loading can run code.*--trust-pickle",
        ),
        (
            "pt_stack_global_os_system.pt",
            stack_global_pickle,
            r"holds Python objects \(os\.system\) whose loading can run code",
        ),
        (
            "pt_torchscript_with_os_system.pt",
            lambda: torchscript_zip(
                b"\x80\x02" + _global("posix", "system") + _tuple([_text("true")]) + b"R."
            ),
            r"a TorchScript archive whose data\.pkl holds Python objects \(posix\.system\)",
        ),
    ]
    result = [
        BadInput(
            name,
            problem,
            max_seconds=STARTUP_SECONDS,
            memory_limit_mib=MEMORY_LIMIT_MIB,
            write=_writer(make),
        )
        for name, make, problem in entries
    ]
    result.append(
        BadInput(
            "pt_4_million_opcodes_past_a_0_5_s_deadline.pt",
            r"reading its pickle took longer than 0\.9 s, the deadline .*WWCLI_TORCH_TIMEOUT",
            max_seconds=STARTUP_SECONDS,
            environment={"WWCLI_TORCH_TIMEOUT": "0.5"},
            write=_writer(lambda: many_opcodes(4_000_000)),
        )
    )
    return result
