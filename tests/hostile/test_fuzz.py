"""Property tests: valid safetensors headers, Keras configs, zip archives and HDF5 metadata,
mutated at random; whatever comes out, opening the file, listing its layers and reading every
analyzable layer's matrices either works or raises LoaderError with one line that names the
file. Nothing else may escape.

The default run is derandomized (the same ~2,300 examples each time, well under a minute); the
`slow` variants explore ten times as many, with fresh randomness each run.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.hostile.fuzzing import fuzz_settings, read_everything
from tests.hostile.make_corpus import safetensors_bytes, valid_safetensors
from wwcli.loaders import LoaderError, open_checkpoint

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
KERAS_FILES = [FIXTURES / "keras" / name for name in ("nested.keras", "functional_cnn.keras")]
LEGACY_H5 = FIXTURES / "keras" / "seed_mlp.h5"
WEIGHTS_H5 = FIXTURES / "keras" / "seed_mlp.weights.h5"
TORCH_ZIP = FIXTURES / "torch" / "cnn_state_dict.pt"


@pytest.fixture(scope="module", autouse=True)
def short_hdf5_deadline() -> Iterator[None]:
    """A mutated HDF5 file can hang the library (the helper process is then stopped): make
    that cost seconds, not the default minute."""
    patch = pytest.MonkeyPatch()
    patch.setenv("WWCLI_HDF5_TIMEOUT", "5")
    yield
    patch.undo()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --- Mutating JSON --------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 1])
    | st.floats()
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON document, the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


def _get(document: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        document = document[step]
    return document


def _tweak(data: st.DataObject, value: Any) -> Any:
    """A value near `value` (or of another kind) that a careless parser might mishandle."""
    if isinstance(value, bool) or value is None:
        return data.draw(json_scalars)
    if isinstance(value, int):
        return data.draw(
            st.sampled_from(
                [value + 1, value - 1, -value, value * 2, value // 2, float(value), str(value)]
            )
            | json_scalars
        )
    if isinstance(value, str):
        return data.draw(
            st.sampled_from([value + "x", value[:-1], value.upper(), value * 3, "", value[::-1]])
            | json_scalars
        )
    if isinstance(value, list):
        return data.draw(
            st.sampled_from([value[::-1], value + value, value[:1], [value], []]) | json_values
        )
    return data.draw(json_values)


def mutate_json(data: st.DataObject, document: Any, *, rounds: int = 3) -> Any:
    """`document` after 1 to `rounds` random edits: a place replaced, tweaked, deleted,
    duplicated, or given a new key or item."""
    document = json.loads(json.dumps(document))
    for _ in range(data.draw(st.integers(1, rounds), label="edits")):
        places = list(_paths(document))
        place = data.draw(st.sampled_from(places), label="place")
        edit = data.draw(st.sampled_from(["replace", "tweak", "delete", "insert", "duplicate"]))
        if not place:
            if edit in ("replace", "tweak"):
                document = _tweak(data, document) if edit == "tweak" else data.draw(json_values)
            continue
        parent, key = _get(document, place[:-1]), place[-1]
        if edit == "replace":
            parent[key] = data.draw(json_values)
        elif edit == "tweak":
            parent[key] = _tweak(data, parent[key])
        elif edit == "delete":
            del parent[key]
        elif edit == "duplicate" and isinstance(parent, list):
            parent.insert(key, json.loads(json.dumps(parent[key])))
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8))] = data.draw(json_values)
        elif isinstance(parent, list):
            parent.insert(key, data.draw(json_values))
    return document


def mutate_bytes(data: st.DataObject, raw: bytes, positions: list[int] | None = None) -> bytes:
    """`raw` with a few bytes changed, inserted or deleted (at `positions` when given)."""
    mutated = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4), label="byte edits")):
        if not mutated:
            break
        if positions:
            at = data.draw(st.sampled_from(positions)) % len(mutated)
        else:
            at = data.draw(st.integers(0, len(mutated) - 1))
        edit = data.draw(st.sampled_from(["set", "flip", "fill", "insert", "delete"]))
        if edit == "set":
            mutated[at] = data.draw(st.integers(0, 255))
        elif edit == "flip":
            mutated[at] ^= 1 << data.draw(st.integers(0, 7))
        elif edit == "fill":
            width = data.draw(st.sampled_from([2, 4, 8]))
            mutated[at : at + width] = bytes(
                [data.draw(st.sampled_from([0, 0x7F, 0x80, 0xFF]))]
            ) * (len(mutated[at : at + width]))
        elif edit == "insert" and not positions:
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete" and not positions:
            del mutated[at : at + data.draw(st.integers(1, 8))]
    return bytes(mutated)


# --- safetensors ----------------------------------------------------------------------------------


def _richer_safetensors() -> tuple[dict[str, Any], bytes]:
    """A valid header of several dtypes and ranks (1-D, conv, bf16, f16, f64, int, empty)."""
    header, data = valid_safetensors()
    extra = [
        ("bn.weight", "F32", [16], 64),
        ("conv.weight", "F16", [8, 4, 3, 3], 576),
        ("embed.weight", "BF16", [32, 8], 512),
        ("proj.weight", "F64", [4, 6], 192),
        ("steps", "I64", [], 8),
        ("empty.weight", "F32", [0, 5], 0),
    ]
    offset = len(data)
    rng = np.random.default_rng(3)
    for key, dtype, shape, size in extra:
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        data += rng.integers(0, 60, size, dtype=np.uint8).tobytes()
        offset += size
    return header, data


SAFETENSORS_HEADER, SAFETENSORS_DATA = _richer_safetensors()


def check_safetensors_header(workdir: Path, data: st.DataObject) -> None:
    header = mutate_json(data, SAFETENSORS_HEADER)
    content = data.draw(
        st.sampled_from(
            [SAFETENSORS_DATA, SAFETENSORS_DATA[:-7], SAFETENSORS_DATA + b"\0" * 8, b""]
        ),
        label="data section",
    )
    path = workdir / "mutated.safetensors"
    path.write_bytes(safetensors_bytes(header, content))
    read_everything(path)


def check_safetensors_bytes(workdir: Path, data: st.DataObject) -> None:
    valid = safetensors_bytes(SAFETENSORS_HEADER, SAFETENSORS_DATA)
    header_end = 8 + struct.unpack("<Q", valid[:8])[0]
    region = data.draw(st.sampled_from(["length", "header", "anywhere"]), label="region")
    if region == "length":
        raw = mutate_bytes(data, valid, positions=list(range(8)))
    elif region == "header":
        raw = mutate_bytes(data, valid[8:header_end])
        raw = struct.pack("<Q", len(raw)) + raw + valid[header_end:]
    else:
        raw = mutate_bytes(data, valid)
    path = workdir / "mutated_bytes.safetensors"
    path.write_bytes(raw)
    read_everything(path)


@given(data=st.data())
@fuzz_settings(700)
def test_mutated_safetensors_headers(workdir: Path, data: st.DataObject) -> None:
    check_safetensors_header(workdir, data)


@given(data=st.data())
@fuzz_settings(400)
def test_mutated_safetensors_bytes(workdir: Path, data: st.DataObject) -> None:
    check_safetensors_bytes(workdir, data)


@pytest.mark.slow
@given(data=st.data())
@fuzz_settings(700, slow=True)
def test_mutated_safetensors_headers_slow(workdir: Path, data: st.DataObject) -> None:
    check_safetensors_header(workdir, data)


@pytest.mark.slow
@given(data=st.data())
@fuzz_settings(400, slow=True)
def test_mutated_safetensors_bytes_slow(workdir: Path, data: st.DataObject) -> None:
    check_safetensors_bytes(workdir, data)


# --- Keras configs --------------------------------------------------------------------------------


def _zip_members(path: Path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(path) as archive:
        return [(info, archive.read(info)) for info in archive.infolist()]


KERAS_MEMBERS = {path.name: _zip_members(path) for path in KERAS_FILES}


def _keras_with_config(name: str, config: Any) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, content in KERAS_MEMBERS[name]:
            if info.filename == "config.json":
                content = json.dumps(config).encode()
            archive.writestr(info, content)
    return buffer.getvalue()


def check_keras_config(workdir: Path, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(KERAS_MEMBERS)), label="file")
    config = json.loads(dict((i.filename, c) for i, c in KERAS_MEMBERS[name])["config.json"])
    path = workdir / "mutated.keras"
    path.write_bytes(_keras_with_config(name, mutate_json(data, config, rounds=4)))
    read_everything(path)


with h5py.File(LEGACY_H5, "r") as _legacy:
    LEGACY_CONFIG = json.loads(_legacy.attrs["model_config"])


def check_legacy_config(workdir: Path, data: st.DataObject) -> None:
    path = workdir / "mutated.h5"
    path.write_bytes(LEGACY_H5.read_bytes())
    with h5py.File(path, "r+") as h5file:
        h5file.attrs["model_config"] = json.dumps(mutate_json(data, LEGACY_CONFIG, rounds=4))
    read_everything(path)


@given(data=st.data())
@fuzz_settings(500)
def test_mutated_keras_configs(workdir: Path, data: st.DataObject) -> None:
    check_keras_config(workdir, data)


@given(data=st.data())
@fuzz_settings(150)
def test_mutated_legacy_h5_configs(workdir: Path, data: st.DataObject) -> None:
    check_legacy_config(workdir, data)


@pytest.mark.slow
@given(data=st.data())
@fuzz_settings(500, slow=True)
def test_mutated_keras_configs_slow(workdir: Path, data: st.DataObject) -> None:
    check_keras_config(workdir, data)


@pytest.mark.slow
@given(data=st.data())
@fuzz_settings(150, slow=True)
def test_mutated_legacy_h5_configs_slow(workdir: Path, data: st.DataObject) -> None:
    check_legacy_config(workdir, data)


# --- zip and HDF5 bytes ---------------------------------------------------------------------------


def _structure_positions(raw: bytes) -> list[int]:
    """Offsets of a zip's structure: local headers and the central directory, not the data."""
    positions: list[int] = []
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        for info in archive.infolist():
            positions += range(info.header_offset, info.header_offset + 30 + len(info.filename))
        directory = max(info.header_offset for info in archive.infolist())
    positions += range(directory, len(raw))
    return positions


def _hdf5_metadata_positions(path: Path) -> list[int]:
    """Offsets of an HDF5 file that are not the raw data of its larger datasets."""
    data_ranges: list[tuple[int, int]] = []

    def visit(_: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset) and item.nbytes > 256:
            offset = item.id.get_offset()
            if offset is not None:
                data_ranges.append((offset, offset + item.nbytes))

    with h5py.File(path, "r") as h5file:
        h5file.visititems(visit)
    size = path.stat().st_size
    return [i for i in range(size) if not any(start <= i < end for start, end in data_ranges)]


ZIP_SEEDS = {
    "nested.keras": (FIXTURES / "keras" / "nested.keras").read_bytes(),
    "cnn_state_dict.pt": TORCH_ZIP.read_bytes(),
}
ZIP_POSITIONS = {name: _structure_positions(raw) for name, raw in ZIP_SEEDS.items()}
WEIGHTS_H5_BYTES = WEIGHTS_H5.read_bytes()
WEIGHTS_H5_POSITIONS = _hdf5_metadata_positions(WEIGHTS_H5)


def check_zip_bytes(workdir: Path, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(ZIP_SEEDS)), label="file")
    anywhere = data.draw(st.booleans(), label="anywhere")
    raw = mutate_bytes(data, ZIP_SEEDS[name], None if anywhere else ZIP_POSITIONS[name])
    path = workdir / f"mutated_{name}"
    path.write_bytes(raw)
    read_everything(path)


def check_hdf5_bytes(workdir: Path, data: st.DataObject) -> None:
    path = workdir / "mutated.weights.h5"
    path.write_bytes(mutate_bytes(data, WEIGHTS_H5_BYTES, WEIGHTS_H5_POSITIONS))
    read_everything(path)


@given(data=st.data())
@fuzz_settings(300)
def test_mutated_zip_bytes(workdir: Path, data: st.DataObject) -> None:
    check_zip_bytes(workdir, data)


@given(data=st.data())
@fuzz_settings(250)
def test_mutated_hdf5_metadata(workdir: Path, data: st.DataObject) -> None:
    check_hdf5_bytes(workdir, data)


@pytest.mark.slow
@given(data=st.data())
@fuzz_settings(300, slow=True)
def test_mutated_zip_bytes_slow(workdir: Path, data: st.DataObject) -> None:
    check_zip_bytes(workdir, data)


@pytest.mark.slow
@given(data=st.data())
@fuzz_settings(250, slow=True)
def test_mutated_hdf5_metadata_slow(workdir: Path, data: st.DataObject) -> None:
    check_hdf5_bytes(workdir, data)


# --- HDF5 dataset creation properties and links ---------------------------------------------------

OUTSIDE_VALUE = np.float32(4321.125)
"""Every value of the files outside the checkpoint: no matrix read may hold it."""


def _outside_files(workdir: Path) -> tuple[Path, Path]:
    """A raw file and an HDF5 file (dataset `data`) beside the checkpoint, full of OUTSIDE_VALUE."""
    raw = workdir / "outside.bin"
    hdf5 = workdir / "outside.h5"
    if not raw.exists():
        values = np.full((64, 64), OUTSIDE_VALUE, dtype="<f4")
        raw.write_bytes(values.tobytes())
        with h5py.File(hdf5, "w") as h5file:
            h5file["data"] = values
    return raw, hdf5


hdf5_dtypes = st.sampled_from(["<f2", "<f4", "<f8", ">f4"])


def _kernel_dataset(data: st.DataObject, group: Any, name: str, workdir: Path, stash: Any) -> bool:
    """A kernel made with random creation properties, or a link to one; True when it (or what
    it links to) takes its data from outside the file."""
    raw, hdf5 = _outside_files(workdir)
    rows = data.draw(st.integers(1, 40), label="rows")
    columns = data.draw(st.integers(1, 40), label="columns")
    dtype = data.draw(hdf5_dtypes, label="dtype")
    kind = data.draw(
        st.sampled_from(
            ["plain", "external storage", "virtual", "external link", "soft link", "dangling"]
        ),
        label="kernel",
    )
    values = np.random.default_rng(rows * 41 + columns).standard_normal((rows, columns))
    private = group.name.strip("/").replace("/", "_")  # this kernel's name in the stash
    if kind == "external storage":
        size = rows * columns * np.dtype(dtype).itemsize
        group.create_dataset(name, (rows, columns), dtype, external=[(str(raw), 0, size)])
        return True
    if kind == "virtual":
        source = data.draw(st.sampled_from([str(hdf5), "."]), label="virtual source")
        layout = h5py.VirtualLayout(shape=(rows, columns), dtype=dtype)
        if source == ".":
            stash.create_dataset(private, data=values.astype(dtype))
            layout[:] = h5py.VirtualSource(".", f"{stash.name}/{private}", shape=(rows, columns))
        else:
            side = min(rows, 64), min(columns, 64)
            layout[: side[0], : side[1]] = h5py.VirtualSource(source, "data", shape=(64, 64))[
                : side[0], : side[1]
            ]
        group.create_virtual_dataset(name, layout, fillvalue=0)
        return True
    if kind == "external link":
        group[name] = h5py.ExternalLink(str(hdf5), "/data")
        return True
    if kind == "dangling":
        group[name] = h5py.SoftLink("/nowhere/at/all")
        return False
    options: dict[str, Any] = {}
    chunked = data.draw(st.booleans(), label="chunked")
    if chunked:
        options["chunks"] = (
            data.draw(st.integers(1, rows), label="chunk rows"),
            data.draw(st.integers(1, columns), label="chunk columns"),
        )
        compression = data.draw(st.sampled_from([None, "gzip", "lzf"]), label="compression")
        if compression is not None:
            options["compression"] = compression
        options["shuffle"] = data.draw(st.booleans(), label="shuffle")
        options["fletcher32"] = data.draw(st.booleans(), label="fletcher32")
    elif rows * columns * np.dtype(dtype).itemsize < 60_000 and data.draw(st.booleans()):
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        options["dcpl"] = dcpl
    options["fillvalue"] = data.draw(st.sampled_from([0.0, 1.5, -2.0, float("nan")]))
    target, stored_as = (stash, private) if kind == "soft link" else (group, name)
    dataset = target.create_dataset(stored_as, (rows, columns), dtype, **options)
    written = data.draw(st.sampled_from(["all", "part", "none"]), label="written")
    if written == "all":
        dataset[...] = values
    elif written == "part":
        dataset[: rows // 2 + 1] = values[: rows // 2 + 1]
    if kind == "soft link":
        group[name] = h5py.SoftLink(dataset.name)
    return False


def _extra_links(data: st.DataObject, h5file: Any, workdir: Path) -> bool:
    """Links beside the layers; True when one leads outside the file."""
    _, hdf5 = _outside_files(workdir)
    outside = False
    for index in range(data.draw(st.integers(0, 3), label="extra links")):
        kind = data.draw(st.sampled_from(["hard", "soft", "external", "group twice"]))
        name = f"extra/link_{index}"
        if kind == "hard":
            h5file[name] = h5file["layers"]
        elif kind == "soft":
            h5file[name] = h5py.SoftLink("/layers")
        elif kind == "external":
            h5file[name] = h5py.ExternalLink(str(hdf5), "/data")
            outside = True
        else:  # a layer list linked twice (a DAG keras never writes)
            h5file[f"layers/again_{index}"] = h5file["layers"]
    return outside


def check_hdf5_creation_properties(workdir: Path, data: st.DataObject) -> None:
    suffix = data.draw(st.sampled_from([".weights.h5", ".keras"]), label="container")
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5file:
        stash = h5file.create_group("stash")
        outside = False
        for index in range(data.draw(st.integers(1, 3), label="layers")):
            group = h5file.create_group(
                f"layers/dense_{index}/vars" if index else "layers/dense/vars"
            )
            outside |= _kernel_dataset(data, group, "0", workdir, stash)
        h5file.create_group("vars")
        outside |= _extra_links(data, h5file, workdir)
    path = workdir / f"properties{suffix}"
    if suffix == ".keras":
        with zipfile.ZipFile(path, "w") as archive:
            # No config.json layer list: a subclassed model, so the weights file is walked.
            archive.writestr("config.json", json.dumps({"class_name": "Custom", "config": {}}))
            archive.writestr("model.weights.h5", buffer.getvalue())
    else:
        path.write_bytes(buffer.getvalue())
    try:
        with open_checkpoint(path) as checkpoint:
            for spec in checkpoint.layers():
                if spec.analyzable:
                    for matrix in checkpoint.matrices(spec):
                        assert matrix.ndim == 2
                        assert not np.any(matrix == OUTSIDE_VALUE), "data from outside the file"
    except LoaderError as error:
        message = str(error)
        assert message and "\n" not in message, message
        assert str(path) in message, message
        return
    assert not outside, "a file reaching outside itself was read"


@given(data=st.data())
@fuzz_settings(200)
def test_hdf5_creation_properties_and_links(workdir: Path, data: st.DataObject) -> None:
    check_hdf5_creation_properties(workdir, data)


@pytest.mark.slow
@given(data=st.data())
@fuzz_settings(200, slow=True)
def test_hdf5_creation_properties_and_links_slow(workdir: Path, data: st.DataObject) -> None:
    check_hdf5_creation_properties(workdir, data)
