"""Bad-input corpus entries for HDF5 (.keras, .h5, .weights.h5): external storage, links, virtual
datasets, storage-size bombs, link DAGs, the helper's caps.

Each entry is a `BadInput` (tests/hostile/make_corpus.py); test_corpus.py runs every one. Every
file is written here by h5py and zipfile, from scratch: a one-layer Keras model (one Dense
kernel) in the three layouts wwcli reads, whose kernel dataset is made hostile by a `Kernel`
function. An entry that tries to read a local file writes that file beside itself
(`<entry>.secret`, holding `MARKER`); its `secret` is the marker, which must reach no output.
"""

from __future__ import annotations

import io
import itertools
import json
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.hostile.make_corpus import SEED_H5, BadInput

MARKER = b"WWCLI-MARKER-3f9c2a7e51d04b86"
"""What a secret file beside an entry holds (and the value of the secret environment
variable): bytes that must appear in no output."""

SECRET_VARIABLE = "AWS_SECRET_ACCESS_KEY"
"""The variable the environment entry sets to MARKER: the helper process must not have it."""

KERNEL = "layers/dense/vars/0"
"""Where a keras 3 weights file keeps the Dense layer's kernel."""
LEGACY_KERNEL = "model_weights/dense/sequential/dense/kernel"
"""Where a legacy .h5 keeps it."""
SIDE = 64
"""The kernel is SIDE x SIDE float32: 16 KiB, enough to hold a whole /proc/self/environ."""

Kernel = Callable[[Any, str, Path], None]
"""Writes the kernel dataset: (h5py group, its name in the group, the entry's path)."""

_CONFIG = {
    "module": "keras",
    "class_name": "Sequential",
    "config": {
        "name": "sequential",
        "layers": [
            {
                "module": "keras.layers",
                "class_name": "InputLayer",
                "config": {"batch_shape": [None, SIDE], "dtype": "float32", "name": "input_layer"},
            },
            {
                "module": "keras.layers",
                "class_name": "Dense",
                "config": {"name": "dense", "units": SIDE, "activation": "relu"},
            },
        ],
    },
}


def secret_path(entry: Path) -> Path:
    """The local file an entry tries to leak (a raw file, or an HDF5 file for links)."""
    return entry.with_name(entry.name + ".secret")


def _write_secret(entry: Path, *, hdf5: bool) -> Path:
    import h5py

    secret = secret_path(entry)
    raw = (MARKER * (SIDE * SIDE * 4 // len(MARKER) + 1))[: SIDE * SIDE * 4]
    if hdf5:
        with h5py.File(secret, "w") as h5file:
            h5file["data"] = np.frombuffer(raw, dtype="<f4").reshape(SIDE, SIDE)
            h5file["data"].attrs["note"] = np.bytes_(MARKER)
    else:
        secret.write_bytes(raw)
    return secret


def _plain_kernel(group: Any, name: str, entry: Path) -> None:
    rng = np.random.default_rng(0)
    group.create_dataset(name, data=rng.standard_normal((SIDE, SIDE)).astype("<f4"))


def _weights_layout(h5file: Any, kernel: Kernel, entry: Path) -> None:
    """keras 3's model.weights.h5 layout for one Dense layer."""
    variables = h5file.create_group("layers/dense/vars")
    kernel(variables, "0", entry)
    variables["1"] = np.zeros(SIDE, dtype="<f4")
    h5file.create_group("vars")


def _write_weights_h5(kernel: Kernel) -> Callable[[Path], None]:
    def write(target: Path) -> None:
        import h5py

        with h5py.File(target, "w") as h5file:
            _weights_layout(h5file, kernel, target)

    return write


def _write_legacy_h5(kernel: Kernel) -> Callable[[Path], None]:
    def write(target: Path) -> None:
        import h5py

        with h5py.File(target, "w") as h5file:
            h5file.attrs["model_config"] = json.dumps(_CONFIG)
            weights = h5file.create_group("model_weights")
            weights.attrs["layer_names"] = [b"dense"]
            layer = weights.create_group("dense")
            layer.attrs["weight_names"] = [b"sequential/dense/kernel", b"sequential/dense/bias"]
            inner = layer.create_group("sequential/dense")
            kernel(inner, "kernel", target)
            inner["bias"] = np.zeros(SIDE, dtype="<f4")

    return write


def _weights_bytes(kernel: Kernel, entry: Path) -> bytes:
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5file:
        _weights_layout(h5file, kernel, entry)
    return buffer.getvalue()


def _write_keras(kernel: Kernel, config: Any = None) -> Callable[[Path], None]:
    def write(target: Path) -> None:
        with zipfile.ZipFile(target, "w") as archive:
            archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
            archive.writestr("config.json", json.dumps(_CONFIG if config is None else config))
            archive.writestr("model.weights.h5", _weights_bytes(kernel, target))

    return write


# --- Kernels that take their numbers from outside the file ---------------------------------------


def _external_storage(group: Any, name: str, entry: Path) -> None:
    # HDF5 "external raw storage": the dataset's bytes are those of another file.
    secret = _write_secret(entry, hdf5=False)
    group.create_dataset(name, (SIDE, SIDE), "<f4", external=[(str(secret), 0, SIDE * SIDE * 4)])


def _environ_storage(group: Any, name: str, entry: Path) -> None:
    # The reading process's own environment, whatever file it is opened from.
    group.create_dataset(
        name, (SIDE, SIDE), "<f4", external=[("/proc/self/environ", 0, SIDE * SIDE * 4)]
    )


def _relative_external_storage(group: Any, name: str, entry: Path) -> None:
    # A name relative to the folder the file is read from (HDF5's prefix rules apply).
    _write_secret(entry, hdf5=False)
    group.create_dataset(
        name, (SIDE, SIDE), "<f4", external=[(secret_path(entry).name, 0, SIDE * SIDE * 4)]
    )


def _external_link(group: Any, name: str, entry: Path) -> None:
    import h5py

    secret = _write_secret(entry, hdf5=True)
    group[name] = h5py.ExternalLink(str(secret), "/data")


def _virtual_dataset(group: Any, name: str, entry: Path) -> None:
    import h5py

    secret = _write_secret(entry, hdf5=True)
    layout = h5py.VirtualLayout(shape=(SIDE, SIDE), dtype="<f4")
    layout[:] = h5py.VirtualSource(str(secret), "data", shape=(SIDE, SIDE))
    group.create_virtual_dataset(name, layout)


def _soft_link_through_external(group: Any, name: str, entry: Path) -> None:
    # A soft link inside the file, whose path goes through an external link elsewhere.
    import h5py

    secret = _write_secret(entry, hdf5=True)
    root = group.file
    root["stash"] = h5py.ExternalLink(str(secret), "/")
    group[name] = h5py.SoftLink("/stash/data")


def _external_link_elsewhere(group: Any, name: str, entry: Path) -> None:
    # The kernel is the file's own; an external link sits in a group no layer reads.
    import h5py

    _plain_kernel(group, name, entry)
    secret = _write_secret(entry, hdf5=True)
    group.file["optimizer/vars/0"] = h5py.ExternalLink(str(secret), "/data")


# --- Kernels whose logical size is far above the bytes stored ------------------------------------

BOMB_SIDE = 8192
"""A BOMB_SIDE x BOMB_SIDE float32 kernel is 256 MiB: its eigenvalues take minutes, and
--max-evals (15000) lets it through."""
BOMB_CHUNK = 1024


def _never_written(group: Any, name: str, entry: Path) -> None:
    # Chunked and never written: no chunk is stored, every value is the fill value.
    group.create_dataset(
        name, (BOMB_SIDE, BOMB_SIDE), "<f4", chunks=(BOMB_CHUNK, BOMB_CHUNK), fillvalue=0.5
    )


def _gzip_bomb(group: Any, name: str, entry: Path) -> None:
    # Every chunk is the same 4 MiB of 1.0 deflated to about 4 KiB (written as is, so
    # making the file takes milliseconds).
    dataset = group.create_dataset(
        name, (BOMB_SIDE, BOMB_SIDE), "<f4", chunks=(BOMB_CHUNK, BOMB_CHUNK), compression="gzip"
    )
    chunk = zlib.compress(np.ones((BOMB_CHUNK, BOMB_CHUNK), dtype="<f4").tobytes(), 9)
    for row in range(0, BOMB_SIDE, BOMB_CHUNK):
        for column in range(0, BOMB_SIDE, BOMB_CHUNK):
            dataset.id.write_direct_chunk((row, column), chunk)


# --- Walks that never end: hard-link DAGs, cycles, a million layers ------------------------------

DAG_DEPTH = 40
"""Levels of a group DAG whose every level is linked twice: 2^40 paths to the last level."""


def _write_link_dag(target: Path) -> None:
    import h5py

    with h5py.File(target, "w") as h5file:
        levels = [h5file.create_group(f"pool/level_{depth}") for depth in range(DAG_DEPTH)]
        for upper, lower in itertools.pairwise(levels):
            upper["a"] = lower
            upper["b"] = lower
        h5file["layers/list"] = levels[0]
        h5file.create_group("vars")


def _write_link_cycle(target: Path) -> None:
    import h5py

    with h5py.File(target, "w") as h5file:
        layers = h5file.create_group("layers")
        inner = layers.create_group("block")
        inner["again"] = layers  # a group that contains itself, two levels down
        h5file.create_group("vars")


def _many_layers_config(count: int) -> dict[str, Any]:
    config = json.loads(json.dumps(_CONFIG))
    config["config"]["layers"] += [
        {"class_name": "Dropout", "config": {"name": f"d{index}"}} for index in range(count)
    ]
    return config


def _write_many_layers_keras(count: int) -> Callable[[Path], None]:
    def write(target: Path) -> None:
        config = json.dumps(_many_layers_config(count)).encode()
        with zipfile.ZipFile(target, "w") as archive:
            archive.writestr("config.json", config, compress_type=zipfile.ZIP_DEFLATED)
            archive.writestr("model.weights.h5", _weights_bytes(_plain_kernel, target))

    return write


# --- zip directories that lie about sizes --------------------------------------------------------


def _zip_lying_about(members: list[tuple[str, bytes, int, bool]]) -> bytes:
    """A zip whose central directory declares each member's size as given (ZIP64 where it is
    2^32 or more): (name, data, declared size, deflated). Local headers say the same."""
    out = io.BytesIO()
    directory = io.BytesIO()
    for name, data, declared, deflated in members:
        packed = data
        if deflated:
            compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
            packed = compressor.compress(data) + compressor.flush()
        method = zipfile.ZIP_DEFLATED if deflated else zipfile.ZIP_STORED
        crc = zlib.crc32(data)
        encoded = name.encode()
        zip64 = declared >= 0xFFFFFFFF
        size_field = 0xFFFFFFFF if zip64 else declared
        packed_field = 0xFFFFFFFF if zip64 else len(packed)
        extra = struct.pack("<HHQQ", 1, 16, declared, len(packed)) if zip64 else b""
        version = 45 if zip64 else 20
        offset = out.tell()
        out.write(
            struct.pack(
                "<4sHHHHHIIIHH",
                b"PK\x03\x04",
                version,
                0,
                method,
                0,
                0x21,
                crc,
                packed_field,
                size_field,
                len(encoded),
                len(extra),
            )
            + encoded
            + extra
            + packed
        )
        directory.write(
            struct.pack(
                "<4sHHHHHHIIIHHHHHII",
                b"PK\x01\x02",
                version,
                version,
                0,
                method,
                0,
                0x21,
                crc,
                packed_field,
                size_field,
                len(encoded),
                len(extra),
                0,
                0,
                0,
                0,
                offset,
            )
            + encoded
            + extra
        )
    start = out.tell()
    listing = directory.getvalue()
    out.write(listing)
    out.write(
        struct.pack(
            "<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members), len(listing), start, 0
        )
    )
    return out.getvalue()


def _write_zip_lying(
    members: Callable[[Path], list[tuple[str, bytes, int, bool]]],
) -> Callable[[Path], None]:
    def write(target: Path) -> None:
        target.write_bytes(_zip_lying_about(members(target)))

    return write


def _config_claims_2_pow_62(target: Path) -> list[tuple[str, bytes, int, bool]]:
    config = json.dumps(_CONFIG).encode()
    return [
        ("config.json", config, 2**62, True),
        ("model.weights.h5", _weights_bytes(_plain_kernel, target), -1, False),
    ]


def _metadata_claims_1_tib(target: Path) -> list[tuple[str, bytes, int, bool]]:
    """A hostile weights member (HDF5 allocates without end on it) beside a member that claims
    1 TiB: a cap computed from declared sizes would let the helper take the machine."""
    from tests.hostile.make_corpus import _loop_local_heap_free_list

    broken = bytearray(SEED_H5.read_bytes())
    _loop_local_heap_free_list(broken)
    seed_config = _seed_h5_config()
    return [
        ("metadata.json", b"{}", 2**40, False),
        ("config.json", json.dumps(seed_config).encode(), -1, False),
        ("model.weights.h5", bytes(broken), -1, False),
    ]


def _seed_h5_config() -> Any:
    import h5py

    with h5py.File(SEED_H5, "r") as h5file:
        return json.loads(h5file.attrs["model_config"])


def _weights_inflate_past_declared(target: Path) -> list[tuple[str, bytes, int, bool]]:
    weights = _weights_bytes(_plain_kernel, target)
    return [
        ("config.json", json.dumps(_CONFIG).encode(), -1, False),
        ("model.weights.h5", weights, len(weights) // 2, True),
    ]


def _fill_declared(
    members: Callable[[Path], list[tuple[str, bytes, int, bool]]],
) -> Callable[[Path], list[tuple[str, bytes, int, bool]]]:
    """-1 as a declared size means the true one."""

    def fill(target: Path) -> list[tuple[str, bytes, int, bool]]:
        return [
            (name, data, len(data) if declared < 0 else declared, deflated)
            for name, data, declared, deflated in members(target)
        ]

    return fill


# --- The entries ---------------------------------------------------------------------------------

_OUTSIDE = r"takes its data from outside the file"
_EXTERNAL_STORAGE = rf"dataset /?{{}} {_OUTSIDE} \(external raw storage\)"
_MEMORY_LIMIT_MIB = 3000
"""Address space for the bomb entries: what wwcli (numpy, scipy, rich) and its helper (numpy,
h5py) need with room to spare, far below what reading the bombs takes."""


def cases() -> list[BadInput]:
    """This module's entries, in a stable order."""
    kernel = KERNEL
    leaking: list[tuple[str, Callable[[Path], None], str]] = [
        (
            "hdf5_external_storage.keras",
            _write_keras(_external_storage),
            _EXTERNAL_STORAGE.format(kernel),
        ),
        (
            "hdf5_external_storage.h5",
            _write_legacy_h5(_external_storage),
            _EXTERNAL_STORAGE.format(LEGACY_KERNEL),
        ),
        (
            "hdf5_external_storage.weights.h5",
            _write_weights_h5(_external_storage),
            _EXTERNAL_STORAGE.format(kernel),
        ),
        (
            "hdf5_relative_external_storage.weights.h5",
            _write_weights_h5(_relative_external_storage),
            _EXTERNAL_STORAGE.format(kernel),
        ),
        (
            "hdf5_external_link.weights.h5",
            _write_weights_h5(_external_link),
            rf"/{kernel} is an external link \(to another file\)",
        ),
        (
            "hdf5_external_link.keras",
            _write_keras(_external_link),
            rf"/{kernel} is an external link \(to another file\)",
        ),
        (
            "hdf5_external_link_elsewhere.h5",
            _write_weights_h5(_external_link_elsewhere),
            r"/optimizer/vars/0 is an external link \(to another file\)",
        ),
        (
            "hdf5_soft_link_through_external_link.weights.h5",
            _write_weights_h5(_soft_link_through_external),
            r"/stash is an external link \(to another file\)",
        ),
        (
            "hdf5_virtual_dataset.weights.h5",
            _write_weights_h5(_virtual_dataset),
            rf"dataset /?{kernel} {_OUTSIDE} \(a virtual dataset\)",
        ),
        (
            "hdf5_virtual_dataset.h5",
            _write_legacy_h5(_virtual_dataset),
            rf"dataset /?{LEGACY_KERNEL} {_OUTSIDE} \(a virtual dataset\)",
        ),
    ]
    entries = [
        BadInput(name, problem, secret=MARKER, max_seconds=30, write=write)
        for name, write, problem in leaking
    ]
    entries.append(
        BadInput(
            "hdf5_environ_as_weights.weights.h5",
            _EXTERNAL_STORAGE.format(kernel),
            secret=MARKER,
            environment={SECRET_VARIABLE: MARKER.decode()},
            max_seconds=30,
            write=_write_weights_h5(_environ_storage),
        )
    )
    entries += [
        BadInput(
            "hdf5_never_written_kernel.weights.h5",
            rf"dataset /?{kernel} was never written: its {BOMB_SIDE**2 * 4} bytes would all be "
            "its fill value",
            memory_limit_mib=_MEMORY_LIMIT_MIB,
            max_seconds=30,
            write=_write_weights_h5(_never_written),
        ),
        BadInput(
            "hdf5_never_written_kernel.keras",
            rf"dataset /?{kernel} was never written",
            memory_limit_mib=_MEMORY_LIMIT_MIB,
            max_seconds=30,
            write=_write_keras(_never_written),
        ),
        BadInput(
            "hdf5_gzip_bomb_kernel.h5",
            rf"dataset /?{LEGACY_KERNEL} expands from \d+ stored bytes to {BOMB_SIDE**2 * 4}",
            memory_limit_mib=_MEMORY_LIMIT_MIB,
            max_seconds=30,
            write=_write_legacy_h5(_gzip_bomb),
        ),
        BadInput(
            "hdf5_hard_link_dag.weights.h5",
            r"group /pool/level_0/(a/)+b is also linked as /pool/level_0/(a/)+a: a link cycle or a "
            "shared group",
            max_seconds=30,
            write=_write_link_dag,
        ),
        BadInput(
            "hdf5_hard_link_cycle.weights.h5",
            r"group /layers/block/again is also linked as /layers: a link cycle",
            max_seconds=30,
            write=_write_link_cycle,
        ),
        BadInput(
            "hdf5_config_lists_250000_layers.keras",
            r"lists 250002 layers, more than the 200000 wwcli reads",
            max_seconds=30,
            write=_write_many_layers_keras(250_000),
        ),
        BadInput(
            "hdf5_zip64_config_claims_2_pow_62.keras",
            r"config\.json would unpack from \d+ to 4611686018427387904 bytes: refusing a likely "
            "decompression bomb",
            max_seconds=30,
            write=_write_zip_lying(_fill_declared(_config_claims_2_pow_62)),
        ),
        BadInput(
            "hdf5_weights_inflate_past_declared_size.keras",
            r"model\.weights\.h5 unpacks to more than the \d+ bytes its zip entry declares",
            on_describe=True,
            max_seconds=30,
            write=_write_zip_lying(_fill_declared(_weights_inflate_past_declared)),
        ),
        BadInput(
            "hdf5_member_claims_1_tib_beside_endless_heap.keras",
            r"memory|HDF5 library (crashed|hung)|cannot read",
            crashes_hdf5=True,
            slow=True,
            memory_limit_mib=6000,
            write=_write_zip_lying(_fill_declared(_metadata_claims_1_tib)),
        ),
    ]
    return entries
