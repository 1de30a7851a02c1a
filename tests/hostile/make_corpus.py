"""Generates the bad-input corpus: malformed files and folders of every format wwcli reads, each
with the problem its error line must name. Nothing here is a hand-made binary: every file is
written by this script, from scratch or by damaging a copy of a shipped fixture.

    python tests/hostile/make_corpus.py OUTPUT_FOLDER

writes the corpus there and prints one line per entry: its name and the problem expected.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import shutil
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SEED_KERAS = FIXTURES / "keras" / "seed_mlp.keras"
SEED_H5 = FIXTURES / "keras" / "seed_mlp.h5"
TORCH_STATE_DICT = FIXTURES / "torch" / "cnn_state_dict.pt"
TORCH_LIGHTNING = FIXTURES / "torch" / "cnn_lightning.ckpt"


@dataclass(frozen=True)
class BadInput:
    """One entry of the corpus: a file or folder wwcli must refuse, and why."""

    name: str
    """File or folder name inside the corpus folder."""
    problem: str
    """A regular expression (searched, case-insensitive) the error line must match: the
    problem in the words the user is shown."""
    on_describe: bool = True
    """False when only `analyze` reads the damaged bytes (`describe` reads headers only)."""
    crashes_hdf5: bool = False
    """True when the file crashes, hangs or exhausts the HDF5 library: run it in a subprocess,
    so that a failure of the containment cannot take the test runner down with it."""
    slow: bool = False
    """True when refusing it takes seconds (and up to 1 GiB of memory): a slow test."""
    secret: bytes | None = None
    """Bytes that `write` puts in a file beside the entry (a marker of a local file or
    variable the entry tries to leak): they must appear in no output and no report."""
    memory_limit_mib: int | None = None
    """When set, wwcli runs in a subprocess under this address-space limit (RLIMIT_AS), so that a
    failed defence against a memory bomb fails the test instead of exhausting the machine."""
    max_seconds: float | None = None
    """When set, refusing the entry must take at most this long (wall clock, whole command)."""
    environment: dict[str, str] = field(default_factory=dict, compare=False)
    """Extra environment variables for the run (a secret the entry tries to read back)."""
    write: Callable[[Path], None] = field(default=lambda target: None, compare=False, repr=False)
    """Writes the file (or folder) at the path given."""


def _bytes_writer(content: bytes) -> Callable[[Path], None]:
    def write(target: Path) -> None:
        target.write_bytes(content)

    return write


# --- safetensors, written from scratch -----------------------------------------------------------


def safetensors_bytes(header: dict[str, Any] | bytes, data: bytes) -> bytes:
    """A safetensors file: 8-byte length, the header (a dict as JSON, or raw bytes), the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw + data


_CODES = {"float16": "F16", "float32": "F32", "float64": "F64", "uint16": "BF16"}


def tensors_to_safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    """A valid safetensors file of these arrays, in their order (uint16 arrays are stored as
    BF16: the bits of bfloat16 values)."""
    header: dict[str, Any] = {}
    chunks: list[bytes] = []
    offset = 0
    for key, array in tensors.items():
        raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        code = _CODES[array.dtype.name]
        header[key] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    return safetensors_bytes(header, b"".join(chunks))


def valid_safetensors(seed: int = 0) -> tuple[dict[str, Any], bytes]:
    """A header and data section of two float32 matrices that wwcli reads without complaint."""
    rng = np.random.default_rng(seed)
    first = rng.standard_normal((32, 16)).astype("<f4").tobytes()
    second = rng.standard_normal((16, 8)).astype("<f4").tobytes()
    header = {
        "__metadata__": {"format": "pt"},
        "fc1.weight": {"dtype": "F32", "shape": [32, 16], "data_offsets": [0, len(first)]},
        "fc2.weight": {
            "dtype": "F32",
            "shape": [16, 8],
            "data_offsets": [len(first), len(first) + len(second)],
        },
    }
    return header, first + second


def _with_entry(**changes: Any) -> tuple[dict[str, Any], bytes]:
    """The valid header with fields of `fc2.weight` replaced."""
    header, data = valid_safetensors()
    header["fc2.weight"] = {**header["fc2.weight"], **changes}
    return header, data


def _safetensors_cases() -> dict[str, tuple[bytes, str]]:
    header, data = valid_safetensors()
    valid = safetensors_bytes(header, data)
    header_end = 8 + struct.unpack("<Q", valid[:8])[0]
    first_size = 32 * 16 * 4
    duplicate_key = json.dumps(header)[:-1] + ', "fc1.weight": ' + json.dumps(header["fc1.weight"])
    cases: dict[str, tuple[bytes, str]] = {
        "st_header_length_0.safetensors": (
            struct.pack("<Q", 0) + data,
            r"header length 0 is too small for a JSON object",
        ),
        "st_header_length_past_the_end.safetensors": (
            struct.pack("<Q", len(valid)) + valid[8:],
            r"header length \d+ runs past the end",
        ),
        "st_header_length_2_pow_62.safetensors": (
            struct.pack("<Q", 2**62) + valid[8:],
            r"header length 4611686018427387904 exceeds the 100000000-byte limit",
        ),
        "st_header_length_just_over_100_mb.safetensors": (
            struct.pack("<Q", 100_000_001) + valid[8:],
            r"exceeds the 100000000-byte limit",
        ),
        "st_header_not_utf8.safetensors": (
            safetensors_bytes(b'{"fc1.weight\xff\xfe": {}}', data),
            r"header is not valid UTF-8",
        ),
        "st_header_not_json.safetensors": (
            safetensors_bytes(b'{"fc1.weight": {"dtype": "F32", "shape": [32, 16]', data),
            r"header is not valid JSON",
        ),
        "st_header_json_array.safetensors": (
            safetensors_bytes(b"[1, 2, 3]", data),
            r"header is a JSON array, not an object",
        ),
        "st_header_duplicate_key.safetensors": (
            safetensors_bytes(duplicate_key.encode() + b"}", data),
            r"has the key 'fc1\.weight' twice",
        ),
        "st_duplicate_data_offsets.safetensors": (
            safetensors_bytes(_with_entry(data_offsets=[0, first_size])[0], data[:first_size]),
            r"overlaps the tensor before it",
        ),
        "st_overlapping_data_offsets.safetensors": (
            safetensors_bytes(
                _with_entry(data_offsets=[first_size - 256, first_size - 256 + 512])[0],
                data[: first_size - 256 + 512],
            ),
            r"overlaps the tensor before it",
        ),
        "st_data_offsets_out_of_range.safetensors": (
            safetensors_bytes(_with_entry(data_offsets=[first_size, first_size + 10**6])[0], data),
            r"offsets run past the end of the \d+-byte data section",
        ),
        "st_data_offsets_reversed.safetensors": (
            safetensors_bytes(_with_entry(data_offsets=[len(data), first_size])[0], data),
            r"offsets end before they begin",
        ),
        "st_data_offsets_negative.safetensors": (
            safetensors_bytes(_with_entry(data_offsets=[-512, 0])[0], data),
            r"data_offsets \[-512, 0\] are not two non-negative integers",
        ),
        "st_data_offsets_leave_a_gap.safetensors": (
            safetensors_bytes(
                _with_entry(data_offsets=[first_size + 64, len(data) + 64])[0], data + bytes(64)
            ),
            r"leaves a gap",
        ),
        "st_shape_does_not_match_bytes.safetensors": (
            safetensors_bytes(_with_entry(shape=[16, 9])[0], data),
            r"shape \[16, 9\] of dtype F32 needs 576 bytes but the offsets hold 512",
        ),
        "st_shape_not_integers.safetensors": (
            safetensors_bytes(_with_entry(shape=[16, 8.5])[0], data),
            r"shape \[16, 8\.5\] is not a list of non-negative integers",
        ),
        "st_unknown_dtype.safetensors": (
            safetensors_bytes(_with_entry(dtype="F128")[0], data),
            r"unknown dtype 'F128'",
        ),
        "st_entry_without_dtype.safetensors": (
            safetensors_bytes(
                {**header, "fc2.weight": {"shape": [16, 8], "data_offsets": [first_size, 2560]}},
                data,
            ),
            r"header entry has no 'dtype'",
        ),
        "st_metadata_not_strings.safetensors": (
            safetensors_bytes({**header, "__metadata__": {"epoch": 3}}, data),
            r"__metadata__ must map strings to strings",
        ),
        "st_header_nested_too_deeply.safetensors": (
            safetensors_bytes(b"[" * 100_000 + b"]" * 100_000, data),
            r"safetensors header is JSON nested too deeply",
        ),
        "st_bytes_after_the_last_tensor.safetensors": (
            valid + b"\0" * 100,
            r"100 bytes after the last tensor",
        ),
        "st_truncated_in_length.safetensors": (valid[:5], r"too small for a safetensors header"),
        "st_truncated_in_header.safetensors": (
            valid[: header_end // 2],
            r"runs past the end of the \d+-byte file",
        ),
        "st_truncated_in_data.safetensors": (
            valid[: header_end + first_size + 100],
            r"offsets run past the end of the \d+-byte data section",
        ),
    }
    return cases


# --- Other files written from scratch ------------------------------------------------------------


def _zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _generic_cases() -> dict[str, tuple[bytes, str]]:
    random_bytes = random.Random(7).randbytes(4096)
    _, data = valid_safetensors()
    unrelated_zip = _zip_bytes({"README.md": b"# notes\n", "data.csv": b"a,b\n1,2\n"})
    return {
        "empty.safetensors": (b"", r"empty file"),
        "empty.pt": (b"", r"empty file"),
        "empty.keras": (b"", r"empty file"),
        "empty.h5": (b"", r"empty file"),
        "random.bin": (random_bytes, r"not a PyTorch checkpoint"),
        "random.safetensors": (random_bytes, r"exceeds the 100000000-byte limit|not valid"),
        "random_without_suffix": (random_bytes, r"unrecognized file format"),
        "markdown_named.pt": (b"# A README, not a checkpoint\n" * 20, r"not a PyTorch checkpoint"),
        "png_named.keras": (
            b"\x89PNG\r\n\x1a\n" + random_bytes[:512],
            r"not a Keras checkpoint",
        ),
        "zip_of_text_named.safetensors": (
            unrelated_zip,
            r"a zip archive that is neither a Keras model nor a PyTorch checkpoint",
        ),
        "pickle_named.h5": (b"\x80\x04\x95" + random_bytes[:64], r"not a Keras checkpoint"),
        "safetensors_header_named.keras": (
            safetensors_bytes(b'{"a": ', data),
            r"header is not valid JSON",
        ),
    }


# --- Keras: damaged copies of the seed fixture ---------------------------------------------------


def _rewrite_zip(source: Path, replace: dict[str, bytes | None]) -> bytes:
    """A copy of a zip with some members replaced (bytes) or dropped (None), stored as keras
    stores them."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(buffer, "w") as out:
        for info in archive.infolist():
            data = replace.get(info.filename, archive.read(info.filename))
            if data is not None:
                out.writestr(info, data)
    return buffer.getvalue()


def _member_span(archive_bytes: bytes, name: str) -> tuple[int, int]:
    """Where a stored member's bytes are in a zip: (start, size)."""
    with zipfile.ZipFile(io.BytesIO(archive_bytes)) as archive:
        info = archive.getinfo(name)
    assert info.compress_type == zipfile.ZIP_STORED, name
    name_length, extra_length = struct.unpack_from("<HH", archive_bytes, info.header_offset + 26)
    return info.header_offset + 30 + name_length + extra_length, info.compress_size


def _flip(data: bytes, start: int, count: int) -> bytes:
    damaged = bytearray(data)
    for offset in range(start, start + count):
        damaged[offset] ^= 0xFF
    return bytes(damaged)


def _patch_central_directory(data: bytes, offset: int, value: int, only: str = "") -> bytes:
    """A zip whose central-directory entries (those whose name ends with `only`) carry `value` in
    the 2-byte field at `offset`: 6 is "version needed to extract", 10 the compression method."""
    patched = bytearray(data)
    position = 0
    while (position := patched.find(b"PK\x01\x02", position)) >= 0:
        (name_length,) = struct.unpack_from("<H", patched, position + 28)
        name = bytes(patched[position + 46 : position + 46 + name_length]).decode()
        if name.endswith(only):
            struct.pack_into("<H", patched, position + offset, value)
        position += 4
    return bytes(patched)


def _keras_cases() -> dict[str, tuple[bytes, str, bool]]:
    """name -> (bytes, problem, fails on describe)."""
    seed = SEED_KERAS.read_bytes()
    with zipfile.ZipFile(SEED_KERAS) as archive:
        config = json.loads(archive.read("config.json"))
    extra = json.loads(json.dumps(config))
    dense = next(layer for layer in extra["config"]["layers"] if layer["class_name"] == "Dense")
    ghost = json.loads(json.dumps(dense))
    ghost["config"]["name"] = "ghost"
    extra["config"]["layers"].append(ghost)
    config_start, config_size = _member_span(seed, "config.json")
    weights_start, weights_size = _member_span(seed, "model.weights.h5")
    return {
        "keras_without_weights.keras": (
            _rewrite_zip(SEED_KERAS, {"model.weights.h5": None}),
            r"zip archive without model\.weights\.h5",
            True,
        ),
        "keras_without_config.keras": (
            _rewrite_zip(SEED_KERAS, {"config.json": None}),
            r"zip archive without config\.json",
            True,
        ),
        "keras_config_names_missing_weights.keras": (
            _rewrite_zip(SEED_KERAS, {"config.json": json.dumps(extra).encode()}),
            r"names layer 'ghost' \(Dense\) but model\.weights\.h5 has no weights for it",
            True,
        ),
        "keras_config_not_json.keras": (
            _rewrite_zip(SEED_KERAS, {"config.json": b'{"class_name": "Sequential", '}),
            r"config\.json is not valid JSON",
            True,
        ),
        "keras_config_not_a_model.keras": (
            _rewrite_zip(SEED_KERAS, {"config.json": b"[1, 2, 3]"}),
            r"config\.json does not describe a Keras model",
            True,
        ),
        "keras_corrupted_config_member.keras": (
            _flip(seed, config_start + config_size // 2, 8),
            r"Bad CRC-32 for file 'config\.json'",
            True,
        ),
        "keras_corrupted_weights_header.keras": (
            _flip(seed, weights_start, 8),
            r"model\.weights\.h5 is not a readable HDF5 file",
            True,
        ),
        "keras_corrupted_weight_values.keras": (
            # Bytes deep in the first kernel: only reading the weights finds them.
            _flip(seed, weights_start + weights_size // 2, 16),
            r"model\.weights\.h5 is corrupted \(CRC-32 mismatch\)",
            False,
        ),
        "keras_zip_needs_version_6_4.keras": (
            # zipfile raises NotImplementedError here, not BadZipFile (found by the fuzzer).
            _patch_central_directory(seed, 6, 64),
            r"damaged zip archive \(truncated\?\): zip file version 6\.4",
            True,
        ),
        "keras_config_unknown_compression.keras": (
            _patch_central_directory(seed, 10, 99, only="config.json"),
            r"cannot read config\.json: That compression method is not supported",
            True,
        ),
        "keras_truncated_at_25_percent.keras": (
            seed[: len(seed) // 4],
            r"damaged zip archive \(truncated\?\)",
            True,
        ),
        "keras_truncated_at_99_percent.keras": (
            seed[: len(seed) * 99 // 100],
            r"damaged zip archive \(truncated\?\)",
            True,
        ),
        "keras_truncated_before_the_directory.keras": (
            seed[: weights_start + weights_size],
            r"damaged zip archive \(truncated\?\)",
            True,
        ),
    }


def _h5_copy(edit: Callable[[Any], None]) -> Callable[[Path], None]:
    """Writes a copy of the seed legacy .h5, changed by `edit(h5py.File)`."""

    def write(target: Path) -> None:
        import h5py

        shutil.copyfile(SEED_H5, target)
        with h5py.File(target, "r+") as h5file:
            edit(h5file)

    return write


def _h5_patch(patch: Callable[[bytearray], None]) -> Callable[[Path], None]:
    """Writes a copy of the seed legacy .h5 with some bytes changed by `patch`."""

    def write(target: Path) -> None:
        data = bytearray(SEED_H5.read_bytes())
        patch(data)
        target.write_bytes(bytes(data))

    return write


def _unique(data: bytes | bytearray, needle: bytes) -> int:
    at = data.find(needle)
    if at < 0 or data.find(needle, at + 1) >= 0:
        raise RuntimeError(f"the seed .h5 does not hold {needle!r} exactly once")
    return at


def _model_config_datatype(data: bytes | bytearray) -> int:
    """Offset of the datatype of the root attribute `model_config` of a legacy .h5.

    h5py writes it as a version-1 attribute message: the name, NUL-padded to a multiple of 8
    bytes, then the datatype, padded likewise, the dataspace, then the value (HDF5 file format
    spec, IV.A.2.m). keras stores the config as a variable-length UTF-8 string: datatype class
    9, version 1 (byte 0x19), of type string (low nibble of the next byte is 1).
    """
    name = b"model_config\0"
    datatype = _unique(data, name) + (len(name) + 7) // 8 * 8
    if data[datatype] != 0x19 or data[datatype + 1] & 0x0F != 1:
        raise RuntimeError("model_config is not stored as a variable-length string")
    return datatype


def _break_string_type(data: bytearray) -> None:
    # Type 9 in the low nibble is neither a string (1) nor a sequence (0): HDF5 1.14.6 (h5py
    # 3.14) segfaults converting the attribute that every legacy .h5 reader reads first.
    data[_model_config_datatype(data) + 1] = 0x09


def _claim_4_gib(data: bytearray) -> None:
    # The value of a variable-length attribute starts with its length (4 bytes), after the
    # 24-byte datatype and the 8-byte scalar dataspace. HDF5 allocates what it claims.
    datatype = _model_config_datatype(data)
    if data[datatype + 4 : datatype + 8] != struct.pack("<I", 16):
        raise RuntimeError("model_config's datatype is not the 16-byte variable-length kind")
    data[datatype + 24 + 8 + 3] = 0xFF


def _shrink_heap_object(data: bytearray) -> None:
    # Global heap objects (HDF5 spec III.E) are: index (2 bytes), reference count (2), reserved
    # (4), size (8), then the bytes. The optimizer's weight name "adam/iteration" shares the
    # collection of every variable-length string the reader needs; told that it is 1 byte
    # long, HDF5 1.14.6 loops forever (at constant memory) parsing that collection.
    text = b"adam/iteration"
    at = _unique(data, text)
    if data[at - 8 : at] != struct.pack("<Q", len(text)):
        raise RuntimeError("'adam/iteration' is not a global heap object of the expected size")
    data[at - 8] = 1


def _loop_local_heap_free_list(data: bytearray) -> None:
    # The root group's local heap (HDF5 spec III.D): "HEAP", version, 3 reserved bytes, data
    # segment size, offset of the first free block, address of the data segment. A free block
    # starts with the offset of the next one: pointing the first at itself makes HDF5 1.14.6
    # build an endless free list, one allocation per turn.
    heap = data.find(b"HEAP")
    size, _, segment = struct.unpack_from("<QQQ", data, heap + 8)
    free = size - 16
    struct.pack_into("<Q", data, heap + 16, free)
    struct.pack_into("<QQ", data, segment + free, free, 16)


def _h5_cases() -> list[BadInput]:
    def drop_model_weights(h5file: Any) -> None:
        del h5file["model_weights"]

    def config_not_json(h5file: Any) -> None:
        h5file.attrs["model_config"] = '{"class_name": "Sequential", "config": '

    def kernel_missing(h5file: Any) -> None:
        del h5file["model_weights/dense_1/sequential/dense_1/kernel"]

    def unrelated(target: Path) -> None:
        import h5py

        with h5py.File(target, "w") as h5file:
            h5file["measurements"] = np.arange(12.0).reshape(3, 4)

    seed_size = SEED_H5.stat().st_size
    contained = r"HDF5 library (crashed|hung)|memory allocation failed|ran out of memory"
    return [
        BadInput(
            "h5_without_model_weights.h5",
            r"HDF5 file with a model_config but no model_weights",
            write=_h5_copy(drop_model_weights),
        ),
        BadInput(
            "h5_model_config_not_json.h5",
            r"model_config is not valid JSON",
            write=_h5_copy(config_not_json),
        ),
        BadInput(
            "h5_listed_kernel_missing.h5",
            r"model_weights lists model_weights/dense_1/sequential/dense_1/kernel for layer "
            r"'dense_1' but it is missing",
            write=_h5_copy(kernel_missing),
        ),
        BadInput(
            "h5_unrelated.h5",
            r"HDF5 file without Keras weights \(no model_weights",
            write=unrelated,
        ),
        BadInput(
            "h5_truncated_at_half.h5",
            r"truncated file",
            write=_bytes_writer(SEED_H5.read_bytes()[: seed_size // 2]),
        ),
        BadInput(
            "h5_crashes_hdf5.h5",
            r"HDF5 library crashed \(SIG\w+\) while reading its layer list",
            crashes_hdf5=True,
            write=_h5_patch(_break_string_type),
        ),
        BadInput(
            "h5_hangs_hdf5.h5",
            r"HDF5 library hung while reading its layer list",
            crashes_hdf5=True,
            write=_h5_patch(_shrink_heap_object),
        ),
        BadInput(
            "h5_attribute_claims_4_gib.h5",
            contained,
            crashes_hdf5=True,
            write=_h5_patch(_claim_4_gib),
        ),
        BadInput(
            "h5_endless_heap_free_list.h5",
            contained,
            crashes_hdf5=True,
            slow=True,
            write=_h5_patch(_loop_local_heap_free_list),
        ),
    ]


# --- PyTorch: damaged copies of the fixtures -----------------------------------------------------


def _torch_cases() -> dict[str, tuple[bytes, str]]:
    with zipfile.ZipFile(TORCH_STATE_DICT) as archive:
        data_pkl = archive.read("cnn_state_dict/data.pkl")
    seed = TORCH_STATE_DICT.read_bytes()
    return {
        "pt_broken_data_pkl.pt": (
            _rewrite_zip(TORCH_STATE_DICT, {"cnn_state_dict/data.pkl": b"\x80\x02" + b"\xfe" * 64}),
            r"not a readable PyTorch checkpoint",
        ),
        "pt_data_pkl_cut_short.pt": (
            _rewrite_zip(TORCH_STATE_DICT, {"cnn_state_dict/data.pkl": data_pkl[:200]}),
            r"not a readable PyTorch checkpoint",
        ),
        "pt_missing_storage.pt": (
            _rewrite_zip(TORCH_STATE_DICT, {"cnn_state_dict/data/0": None}),
            r"not a readable PyTorch checkpoint",
        ),
        "pt_truncated_zip.pt": (seed[: len(seed) * 6 // 10], r"damaged zip archive"),
        "pt_zip_needs_version_6_4.pt": (
            _patch_central_directory(seed, 6, 64),
            r"damaged zip archive \(truncated\?\): zip file version 6\.4",
        ),
        "pt_data_pkl_unknown_compression.pt": (
            _patch_central_directory(seed, 10, 99, only="data.pkl"),
            r"not a readable PyTorch checkpoint \(RuntimeError: .*unsupported method",
        ),
        "pt_without_tensors.pt": (
            _zip_bytes(
                {
                    "archive/data.pkl": pickle.dumps({"epoch": 3, "lr": 0.1}, protocol=2),
                    "archive/byteorder": b"little",
                    "archive/version": b"3\n",
                }
            ),
            r"holds no tensors to analyze \(a dict with keys: epoch, lr\)",
        ),
        "pt_plain_pickle_without_torch_header.pt": (
            pickle.dumps({"epoch": 3}, protocol=2),
            r"not a readable PyTorch checkpoint \(RuntimeError: Invalid magic number",
        ),
        "pt_legacy_pickle_cut_short.pt": (
            b"\x80\x02}q\x00(X\x05\x00\x00\x00epochq\x01K\x03X\x0a\x00",
            r"not a readable PyTorch checkpoint",
        ),
        "ckpt_zip_without_data_pkl.ckpt": (
            _zip_bytes({"checkpoint/version": b"3"}),
            r"a zip archive without data\.pkl, not a PyTorch checkpoint",
        ),
        "ckpt_lightning_cut_short.ckpt": (
            TORCH_LIGHTNING.read_bytes()[:5000],
            r"damaged zip archive",
        ),
        "pt_dicts_nested_5000_deep.pt": (
            # {"k": {"k": ... {} ...}}: EMPTY_DICT, then (key, EMPTY_DICT) 5000 times, SETITEMs.
            _zip_bytes(
                {
                    "archive/data.pkl": b"\x80\x02}"
                    + b"X\x01\x00\x00\x00k}" * 5000
                    + b"s" * 5000
                    + b".",
                    "archive/byteorder": b"little",
                    "archive/version": b"3\n",
                }
            ),
            r"holds no tensors to analyze \(a dict with keys: k\)",
        ),
    }


# --- Model folders -------------------------------------------------------------------------------


def _folder_cases() -> list[BadInput]:
    header, data = valid_safetensors()
    valid = safetensors_bytes(header, data)
    index = {
        "metadata": {"total_size": len(data)},
        "weight_map": {
            "fc1.weight": "model-00001-of-00002.safetensors",
            "fc2.weight": "model-00002-of-00002.safetensors",
        },
    }
    cases: list[BadInput] = []

    def make(name: str, files: dict[str, bytes], problem: str) -> None:
        def write(root: Path) -> None:
            root.mkdir()
            for file_name, content in files.items():
                (root / file_name).write_bytes(content)

        cases.append(BadInput(name, problem, write=write))

    make(
        "folder_index_names_a_missing_shard",
        {
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-00001-of-00002.safetensors": valid,
        },
        r"names shard 'model-00002-of-00002\.safetensors', which is missing",
    )
    make(
        "folder_index_names_a_missing_tensor",
        {
            "model.safetensors.index.json": json.dumps(
                {
                    "weight_map": {
                        "fc1.weight": "model.safetensors",
                        "fc9.weight": "model.safetensors",
                    }
                },
                indent=1,
            ).encode(),
            "model.safetensors": valid,
        },
        r"says tensor 'fc9\.weight' is in model\.safetensors, which has no such tensor",
    )
    make(
        "folder_index_not_json",
        {"model.safetensors.index.json": b'{"weight_map": ', "model.safetensors": valid},
        r"model\.safetensors\.index\.json: not valid JSON",
    )
    make(
        "folder_index_shard_outside",
        {
            "model.safetensors.index.json": json.dumps(
                {"weight_map": {"fc1.weight": "../outside.safetensors"}}
            ).encode(),
        },
        r"names shard '\.\./outside\.safetensors', which is outside",
    )
    make(
        "folder_of_unrelated_files",
        {"README.md": b"# A model card\n", "notes.txt": b"nothing here\n", "image.png": b"\x89PNG"},
        r"no weights in this folder",
    )
    make(
        "folder_with_a_damaged_shard",
        {
            "model-00001-of-00002.safetensors": valid,
            "model-00002-of-00002.safetensors": valid[: len(valid) - 10],
        },
        r"model-00002-of-00002\.safetensors: tensor 'fc2\.weight'.*offsets run past the end",
    )
    make(
        "folder_index_nested_too_deeply",
        {
            "model.safetensors.index.json": b'{"weight_map": ' + b"[" * 100_000 + b"]" * 100_000,
            "model.safetensors": valid,
        },
        r"model\.safetensors\.index\.json: JSON nested too deeply",
    )
    make(
        "folder_bin_broken_pickle",
        {"pytorch_model.bin": b"\x80\x02" + b"\xfe" * 64},
        r"pytorch_model\.bin: not a readable PyTorch checkpoint",
    )
    return cases


# --- The corpus -----------------------------------------------------------------------------------


def corpus() -> list[BadInput]:
    """Every corpus entry, in a stable order; nothing is written yet."""
    cases: list[BadInput] = []
    for name, (content, problem) in {
        **_generic_cases(),
        **_safetensors_cases(),
        **_torch_cases(),
    }.items():
        cases.append(BadInput(name, problem, write=_bytes_writer(content)))
    for name, (content, problem, on_describe) in _keras_cases().items():
        cases.append(BadInput(name, problem, on_describe=on_describe, write=_bytes_writer(content)))
    # Classes added later live in modules of their own, one per reader family.
    from tests.hostile import corpus_hdf5, corpus_inputs, corpus_torch

    return (
        cases
        + _h5_cases()
        + _folder_cases()
        + corpus_hdf5.cases()
        + corpus_torch.cases()
        + corpus_inputs.cases()
    )


def make_corpus(folder: Path) -> list[BadInput]:
    """Write every corpus entry into `folder` (created if needed; the entries must not exist
    yet) and return them, in a stable order."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = corpus()
    for case in cases:
        case.write(folder / case.name)
    return cases


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for `tests.hostile.*`
    if len(argv) != 1:
        print("usage: python tests/hostile/make_corpus.py OUTPUT_FOLDER", file=sys.stderr)
        return 2
    for case in make_corpus(Path(argv[0])):
        print(f"{case.name}\t{case.problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
