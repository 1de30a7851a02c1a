"""Bad-input corpus entries for safetensors headers, model folders, symlinks and hostile names.

Each entry is a `BadInput` (tests/hostile/make_corpus.py); test_corpus.py runs every one.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.hostile.make_corpus import BadInput

SECRET = b"wwcli-corpus-secret-7f3a9c"
"""Put in files outside an entry's folder that its links point to: if wwcli read them, the
secret (a tensor name there) would reach the output."""

CONTAINED = {"WWCLI_CORPUS_CONTAINED": "1"}
"""An environment for an entry that would hang wwcli if its defence failed (a FIFO): with it,
test_corpus runs the entry in a subprocess with a deadline, so a regression fails the test
instead of hanging the run."""


def _header_text(**fc2: Any) -> str:
    """The valid corpus header as JSON text, with fields of `fc2.weight` replaced."""
    from tests.hostile.make_corpus import valid_safetensors

    header, _ = valid_safetensors()
    header["fc2.weight"] = {**header["fc2.weight"], **fc2}
    return json.dumps(header)


def _file(text: str) -> Callable[[Path], None]:
    """Writes a safetensors file of this header text (edited by hand) and the valid data."""
    from tests.hostile.make_corpus import safetensors_bytes, valid_safetensors

    _, data = valid_safetensors()

    def write(target: Path) -> None:
        target.write_bytes(safetensors_bytes(text.encode("utf-8"), data))

    return write


def _header_cases() -> list[BadInput]:
    from tests.hostile.make_corpus import BadInput

    base = _header_text()
    shape = '"shape": [16, 8]'
    cases = [
        BadInput(
            "st_integer_of_5000_digits.safetensors",
            r"safetensors header holds an integer of more than 4300 digits, out of range",
            write=_file(base.replace(shape, '"shape": [16, ' + "9" * 5000 + "]")),
        ),
        BadInput(
            "st_shape_dimension_of_4000_digits.safetensors",
            r"tensor 'fc2\.weight': shape \[16, 9+\.\.\.9+\] is out of range \(above 2\*\*63 - 1\)",
            write=_file(base.replace(shape, '"shape": [16, ' + "9" * 4000 + "]")),
        ),
        BadInput(
            "st_data_offset_of_4000_digits.safetensors",
            r"tensor 'fc2\.weight': data_offsets \[2048, 9+\.\.\.9+\] are out of range",
            write=_file(_header_text(data_offsets=[2048, int("9" * 4000)])),
        ),
        BadInput(
            "st_shape_dimension_2_pow_64.safetensors",
            r"shape \[18446744073709551616, 8\] is out of range \(above 2\*\*63 - 1\)",
            write=_file(_header_text(shape=[2**64, 8])),
        ),
        BadInput(
            # Its byte count, 2**374, overflowed a float in the error message.
            "st_shape_product_beyond_a_float.safetensors",
            r"shape \[4611686018427387904, 4611686018427387904, .*\] has more than 2\*\*63 - 1 "
            "elements",
            write=_file(_header_text(shape=[2**62] * 6)),
        ),
        BadInput(
            "st_shape_product_2_pow_124.safetensors",
            r"shape \[4611686018427387904, 4611686018427387904\] has more than 2\*\*63 - 1",
            write=_file(_header_text(shape=[2**62, 2**62])),
        ),
        BadInput(
            "st_shape_huge_with_a_zero.safetensors",
            r"shape \[0, 4611686018427387904, 4611686018427387904\] has more than 2\*\*63 - 1",
            write=_file(_header_text(shape=[0, 2**62, 2**62])),
        ),
        BadInput(
            "st_name_with_lone_surrogate.safetensors",
            r"safetensors header has a key that is not valid Unicode: 'fc2\\ud800\.weight' "
            r"holds a lone surrogate \(\\ud800 escape\)",
            write=_file(base.replace('"fc2.weight"', '"fc2\\ud800.weight"')),
        ),
        BadInput(
            "st_metadata_with_lone_surrogate.safetensors",
            r"safetensors header has a string that is not valid Unicode: 'p\\udfff'",
            write=_file(base.replace('"pt"', '"p\\udfff"')),
        ),
        BadInput(
            "st_metadata_nested_too_deeply.safetensors",
            r"safetensors header is JSON nested too deeply",
            write=_file(base.replace('"pt"', "[" * 100_000 + "]" * 100_000)),
        ),
        BadInput(
            "st_metadata_nested_900_deep.safetensors",
            r"safetensors __metadata__ must map strings to strings",
            write=_file(base.replace('"pt"', '{"a": ' * 900 + "1" + "}" * 900)),
        ),
        BadInput(
            "st_shape_nested_900_deep.safetensors",
            r"tensor 'fc2\.weight': shape \[\[\[\[\.\.\.\]\]\]\] is not a list of non-negative",
            write=_file(base.replace(shape, '"shape": ' + "[" * 900 + "]" * 900)),
        ),
        BadInput(
            "st_metadata_a_list.safetensors",
            r"safetensors __metadata__ must map strings to strings",
            write=_file(base.replace('{"format": "pt"}', '["format", "pt"]')),
        ),
        BadInput(
            "st_metadata_value_null.safetensors",
            r"safetensors __metadata__ must map strings to strings",
            write=_file(base.replace('"pt"', "null")),
        ),
        BadInput(
            "st_shape_nan.safetensors",
            r"safetensors header is not valid JSON \(NaN is not JSON\)",
            write=_file(base.replace(shape, '"shape": [16, NaN]')),
        ),
        BadInput(
            "st_shape_of_a_million_dimensions.safetensors",
            r"shape \[1, 1, 1, 1, 1, 1, 1, 1, \.\.\.\] of dtype F32 needs 4 bytes",
            max_seconds=10,
            write=_file(_header_text(shape=[1] * 1_000_000)),
        ),
        BadInput(
            "st_a_million_tensors.safetensors",
            r"lists 1000000 tensors \('data_offsets' entries\), more than the 200000 wwcli reads",
            max_seconds=10,
            memory_limit_mib=2048,
            write=_many_tensors(1_000_000, escaped=False),
        ),
        BadInput(
            "st_250000_tensors_hidden_by_escapes.safetensors",
            r"safetensors header lists more than the 200000 tensors wwcli reads",
            max_seconds=20,
            memory_limit_mib=2048,
            write=_many_tensors(250_000, escaped=True),
        ),
    ]
    return cases


def _many_tensors(count: int, *, escaped: bool) -> Callable[[Path], None]:
    """A valid-looking header of `count` one-element tensors (90 MB for a million): a file
    that took 57 s and 4 GB to describe before the count was checked first."""
    offsets_key = "data\\u005foffsets" if escaped else "data_offsets"

    def write(target: Path) -> None:
        entries = ",".join(
            f'"l{i}.weight":{{"dtype":"F32","shape":[1,1],"{offsets_key}":[{4 * i},{4 * i + 4}]}}'
            for i in range(count)
        )
        header = ("{" + entries + "}").encode()
        target.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4 * count))

    return write


def _valid_bytes() -> bytes:
    from tests.hostile.make_corpus import safetensors_bytes, valid_safetensors

    header, data = valid_safetensors()
    return safetensors_bytes(header, data)


def _secret_safetensors() -> bytes:
    """A valid safetensors file whose tensor name is the secret: read, it would be listed."""
    from tests.hostile.make_corpus import safetensors_bytes

    name = SECRET.decode() + ".weight"
    return safetensors_bytes(
        {name: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16)
    )


def _folder(
    files: dict[str, bytes], links: dict[str, str], fifos: tuple[str, ...] = ()
) -> Callable[[Path], None]:
    """Writes a folder of these files, links (name -> target; a target starting with
    "../outside" is a file beside the folder holding the secret) and FIFOs."""

    def write(root: Path) -> None:
        root.mkdir()
        outside = root.parent / f"{root.name}.outside.safetensors"
        outside.write_bytes(_secret_safetensors())
        for name, content in files.items():
            (root / name).write_bytes(content)
        for name, target in links.items():
            target = target.replace("../outside", f"../{outside.name}")
            (root / name).symlink_to(target)
        for name in fifos:
            os.mkfifo(root / name)

    return write


def _folder_cases() -> list[BadInput]:
    from tests.hostile.make_corpus import BadInput

    valid = _valid_bytes()
    index = json.dumps({"weight_map": {"fc1.weight": "model.safetensors"}}).encode()
    outside = r"is a link to /.*outside\.safetensors, outside .*; wwcli reads only files inside"
    return [
        BadInput(
            "folder_shard_links_outside",
            r"model\.safetensors: " + outside,
            secret=SECRET,
            write=_folder({}, {"model.safetensors": "../outside"}),
        ),
        BadInput(
            "folder_index_shard_links_outside",
            r"model-00001-of-00001\.safetensors: " + outside,
            secret=SECRET,
            write=_folder(
                {
                    "model.safetensors.index.json": json.dumps(
                        {"weight_map": {"x.weight": "model-00001-of-00001.safetensors"}}
                    ).encode()
                },
                {"model-00001-of-00001.safetensors": "../outside"},
            ),
        ),
        BadInput(
            "folder_shard_links_to_etc_hostname",
            r"model\.safetensors: is a link to /etc/hostname, outside",
            write=_folder({}, {"model.safetensors": "/etc/hostname"}),
        ),
        BadInput(
            "folder_index_names_a_shard_through_a_linked_folder",
            r"sub/model\.safetensors: is a link to /.*\.outside/model\.safetensors, outside",
            secret=SECRET,
            write=_linked_subfolder(),
        ),
        BadInput(
            "folder_config_links_outside",
            r"config\.json: " + outside,
            secret=SECRET,
            write=_folder({"model.safetensors": valid}, {"config.json": "../outside"}),
        ),
        BadInput(
            "folder_index_links_outside",
            r"model\.safetensors\.index\.json: " + outside,
            secret=SECRET,
            write=_folder(
                {"model.safetensors": valid}, {"model.safetensors.index.json": "../outside"}
            ),
        ),
        BadInput(
            "folder_shard_is_a_broken_link",
            r"model\.safetensors: is a link to /.*, which does not exist",
            write=_folder({}, {"model.safetensors": "no-such-blob"}),
        ),
        BadInput(
            "folder_shard_is_a_fifo",
            r"model\.safetensors: not a regular file \(a FIFO\)",
            max_seconds=20,
            environment=CONTAINED,
            write=_folder({}, {}, fifos=("model.safetensors",)),
        ),
        BadInput(
            "folder_index_names_a_fifo",
            r"model\.safetensors: not a regular file \(a FIFO\)",
            max_seconds=20,
            environment=CONTAINED,
            write=_folder({"model.safetensors.index.json": index}, {}, ("model.safetensors",)),
        ),
        BadInput(
            "folder_index_is_a_fifo",
            r"model\.safetensors\.index\.json: not a regular file \(a FIFO\)",
            max_seconds=20,
            environment=CONTAINED,
            write=_folder({"model.safetensors": valid}, {}, ("model.safetensors.index.json",)),
        ),
        BadInput(
            "folder_config_is_a_fifo",
            r"config\.json: not a regular file \(a FIFO\)",
            max_seconds=20,
            environment=CONTAINED,
            write=_folder({"model.safetensors": valid}, {}, ("config.json",)),
        ),
        BadInput(
            "folder_index_of_250000_tensors",
            r"model\.safetensors\.index\.json: lists 250000 tensors, more than the 200000 wwcli",
            max_seconds=20,
            write=_folder(
                {
                    "model.safetensors.index.json": json.dumps(
                        {
                            "weight_map": {
                                f"l{i}.weight": "model.safetensors" for i in range(250_000)
                            }
                        }
                    ).encode(),
                    "model.safetensors": valid,
                },
                {},
            ),
        ),
        BadInput(
            "folder_index_names_a_shard_with_a_lone_surrogate",
            r"names shard '\\ud800\.safetensors', which is not a file name",
            write=_folder(
                {
                    "model.safetensors.index.json": b'{"weight_map": {"fc1.weight": '
                    b'"\\ud800.safetensors"}}',
                },
                {},
            ),
        ),
        BadInput(
            "folder_shards_of_more_tensors_than_read_in_all",
            r"folder_shards_of_more_tensors_than_read_in_all: lists 2\d{5} tensors, more than "
            r"the 200000 wwcli reads",
            max_seconds=30,
            slow=True,
            write=_shards_over_the_limit(),
        ),
    ]


def _linked_subfolder() -> Callable[[Path], None]:
    """An index naming `sub/model.safetensors`, where `sub` links to a folder outside."""

    def write(root: Path) -> None:
        root.mkdir()
        outside = root.parent / f"{root.name}.outside"
        outside.mkdir()
        (outside / "model.safetensors").write_bytes(_secret_safetensors())
        (root / "sub").symlink_to(f"../{outside.name}")
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"fc1.weight": "sub/model.safetensors"}})
        )

    return write


def _shards_over_the_limit() -> Callable[[Path], None]:
    """Two shards of 120,000 tensors each: each under the limit, their sum over it."""

    def write(root: Path) -> None:
        root.mkdir()
        for shard in (1, 2):
            _many_tensors(120_000, escaped=False)(root / f"model-0000{shard}-of-00002.safetensors")

    return write


def _onnx_with_external(location: str, *, offset: str = "0", length: str = "256") -> bytes:
    """A small ONNX model (x @ W, W 8x8 float32) whose W is external data at `location`."""
    from onnx import TensorProto, helper

    weight = TensorProto()
    weight.name = "W"
    weight.data_type = TensorProto.FLOAT
    weight.dims.extend([8, 8])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


def _onnx_case(
    location: str, *, link: bool = False, absolute: bool = False
) -> Callable[[Path], None]:
    """Writes the model; its data, the secret as 256 bytes, lies beside the corpus folder
    (reached by `location` "../...", an absolute path, or a link in the corpus folder)."""

    def write(target: Path) -> None:
        outside = target.parent.parent / f"{target.name}.outside.data"
        outside.write_bytes((SECRET * 16)[:256])
        where = location
        if absolute:
            where = str(outside)
        elif link:
            (target.parent / location).symlink_to(outside)
        else:
            where = location.replace("OUTSIDE", outside.name)
        target.write_bytes(_onnx_with_external(where))

    return write


def _gguf_header(dims: list[int], data: bytes = b"") -> bytes:
    """A GGUF v3 file of one F32 tensor `w.weight` of these dims, then `data`."""
    name = b"w.weight"
    out = b"GGUF" + struct.pack("<IQQ", 3, 1, 0)
    out += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
    out += b"".join(struct.pack("<Q", side) for side in dims) + struct.pack("<IQ", 0, 0)
    return out + b"\0" * (-len(out) % 32) + data


def _npz_with_object_array(target: Path) -> None:
    import io
    import zipfile

    import numpy as np

    member = io.BytesIO()
    np.save(member, np.array([{"payload": SECRET.decode()}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("fc.weight.npy", member.getvalue())


def _checkpoint_folder(target: Path) -> None:
    target.mkdir()
    for epoch in (1, 2, 3):
        (target / f"epoch_{epoch}.pt").write_bytes(_valid_bytes())


def _saved_model(target: Path) -> None:
    target.mkdir()
    (target / "saved_model.pb").write_bytes(b"\x08\x01")
    (target / "variables").mkdir()


def _format_cases() -> list[BadInput]:
    """ONNX external data escaping the model's folder, GGUF headers claiming more than the
    file, pickled NumPy arrays, and formats wwcli does not read (said by name)."""
    from tests.hostile.make_corpus import BadInput, _bytes_writer

    outside = r"outside the model's folder; wwcli reads external data only from files beside"
    return [
        BadInput(
            "onnx_external_data_dot_dot.onnx",
            r"initializer 'W' takes its data from '\.\./.*outside\.data', " + outside,
            secret=SECRET,
            write=_onnx_case("../OUTSIDE"),
        ),
        BadInput(
            "onnx_external_data_absolute.onnx",
            r"initializer 'W' takes its data from '/.*outside\.data', " + outside,
            secret=SECRET,
            write=_onnx_case("", absolute=True),
        ),
        BadInput(
            "onnx_external_data_link_outside.onnx",
            r"external data file 'onnx_external_data_link_outside\.data' is a link to /.*, "
            r"outside the model's folder",
            secret=SECRET,
            write=_onnx_case("onnx_external_data_link_outside.data", link=True),
        ),
        BadInput(
            "onnx_damaged_protobuf.onnx",
            r"not a readable ONNX model",
            write=_bytes_writer(b"\x08\x07\x12\xff\xff\xff\xff\x0f"),
        ),
        BadInput(
            "gguf_2_pow_40_elements.gguf",
            r"GGUF tensor 'w\.weight' declares 1099511627776 elements \(4398046511104 bytes",
            memory_limit_mib=1024,
            max_seconds=20,
            write=_bytes_writer(_gguf_header([2**20, 2**20], bytes(64))),
        ),
        BadInput(
            "gguf_tensor_beyond_the_file.gguf",
            r"declares 4096 elements \(16384 bytes at byte \d+\), beyond the file's",
            write=_bytes_writer(_gguf_header([64, 64], bytes(1024))),
        ),
        BadInput(
            "gguf_2_pow_40_tensors.gguf",
            r"lists 1099511627776 tensors, more than the 200000",
            max_seconds=20,
            write=_bytes_writer(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0) + bytes(64)),
        ),
        BadInput(
            "npz_pickled_object_array.npz",
            r"array 'fc\.weight' holds Python objects \(a pickle\), which wwcli never loads",
            secret=SECRET,
            write=_npz_with_object_array,
        ),
        BadInput(
            "tflite_flatbuffer.tflite",
            r"a TensorFlow Lite model: not supported",
            write=_bytes_writer(b"\x1c\x00\x00\x00TFL3" + bytes(64)),
        ),
        BadInput(
            "python_pickle.pkl",
            r"a Python pickle: wwcli reads pickles only as PyTorch checkpoints",
            write=_bytes_writer(b"\x80\x04K\x01."),
        ),
        BadInput(
            "savedmodel_folder",
            r"a TensorFlow SavedModel folder: not supported",
            write=_saved_model,
        ),
        BadInput(
            "folder_of_checkpoints",
            r"a folder of 3 checkpoint files, not one model: epoch_1\.pt, epoch_2\.pt, "
            r"epoch_3\.pt; analyze them with `wwcli analyze .*folder_of_checkpoints/\*\.pt` or "
            r"`wwcli sweep .*folder_of_checkpoints`",
            write=_checkpoint_folder,
        ),
    ]


def cases() -> list[BadInput]:
    """This module's entries, in a stable order."""
    return _header_cases() + _folder_cases() + _format_cases()


def _names(count: int) -> list[str]:
    return [f"l{i}.weight" for i in range(count)]
