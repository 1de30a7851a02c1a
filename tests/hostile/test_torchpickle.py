"""wwcli's own unpickler for PyTorch files (`wwcli/loaders/_torchpickle.py`) under attack:
code-running globals by every route are refused and never run, storages and views past their
bytes are refused, memo and nesting abuse is bounded, and property-based fuzzing (mutated real
pickles and generated opcode streams, 2,000 examples in the default run, ten times as many in
the slow variants) lets nothing but
the loader's own errors out, and never creates the marker file a payload would create.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.hostile.corpus_torch import (
    StoredTensor,
    _global,
    _int,
    _text,
    _tuple,
    nested_script_modules,
    state_dict_pickle,
    torch_zip,
    torchscript_zip,
)
from tests.hostile.fuzzing import Reduces, fuzz_settings, read_everything
from wwcli.loaders import LoaderError, open_checkpoint
from wwcli.loaders import _torchpickle as unpickler
from wwcli.loaders.torch import open_torch

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "torch"
MARKER_NAME = "payload-ran"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("torchpickle")


def _payloads(marker: Path) -> dict[str, object]:
    shell = f"touch '{marker}'"
    return {
        "os_system": Reduces((os.system, (shell,))),
        "builtins_eval": Reduces((builtins.eval, (f"open({str(marker)!r}, 'w').close()",))),
        "builtins_exec": Reduces((builtins.exec, (f"open({str(marker)!r}, 'w').close()",))),
        "open": Reduces((open, (str(marker), "w"))),
    }


def _refused_names() -> dict[str, str]:
    return {
        "os_system": r"(os|posix)\.system",
        "builtins_eval": r"builtins\.eval",
        "builtins_exec": r"builtins\.exec",
        "open": r"(io|builtins)\.open",
    }


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("kind", list(_refused_names()))
def test_a_code_running_global_is_refused_and_not_run(
    tmp_path: Path, kind: str, protocol: int
) -> None:
    marker = tmp_path / MARKER_NAME
    body = pickle.dumps({"fc.weight": _payloads(marker)[kind]}, protocol=protocol)
    path = tmp_path / "evil.pt"
    path.write_bytes(torch_zip(body, {}))
    with pytest.raises(LoaderError) as raised:
        open_torch(path)
    message = str(raised.value)
    assert "whose loading can run code" in message and "--trust-pickle" in message
    assert re.search(_refused_names()[kind], message), message
    assert not marker.exists()
    # The pickle is live: plain pickle.loads runs it.
    pickle.loads(body)
    assert marker.exists()


def test_the_unpickler_refuses_every_object_building_opcode() -> None:
    for opcode in (b"i", b"o", b"\x82", b"\x83", b"\x84", b"\x92", b"P", b"I", b"L", b"c"):
        with pytest.raises((unpickler.RefusedPickleError, unpickler.DamagedPickleError)):
            unpickler.load_pickle(b"\x80\x02" + opcode + b"os\nsystem\n(S'true'\ntR.")
    with pytest.raises(unpickler.RefusedPickleError, match=r"builtins\.getattr"):
        unpickler.load_pickle(b"\x80\x02cbuiltins\ngetattr\n.")


def test_allowed_globals_are_never_callables_the_file_can_use() -> None:
    # What a GLOBAL gives is a description, never the object: REDUCE of a dtype or a storage
    # class (callables in torch) is refused, and BUILD can set state on nothing but inert holders.
    with pytest.raises(unpickler.RefusedPickleError):
        unpickler.load_pickle(b"\x80\x02ctorch\nFloatStorage\n)R.")
    with pytest.raises(unpickler.RefusedPickleError):
        unpickler.load_pickle(b"\x80\x02ctorch\nfloat32\n)R.")
    with pytest.raises(unpickler.RefusedPickleError, match="setting the state"):
        unpickler.load_pickle(b"\x80\x02]}b.")
    with pytest.raises(unpickler.RefusedPickleError):  # no __torch__ objects outside TorchScript
        unpickler.load_pickle(b"\x80\x02c__torch__\nM\n)\x81.")


def test_storage_bytes_past_their_member_or_file_are_refused(tmp_path: Path) -> None:
    tensor = StoredTensor("fc.weight", "0", 12, (3, 4), (4, 1))
    path = tmp_path / "short.pt"
    path.write_bytes(torch_zip(state_dict_pickle([tensor]), {"0": bytes(47)}))
    with pytest.raises(LoaderError, match=r"declares 48 bytes, but its member .* holds 47"):
        open_torch(path)
    for size, stride, offset, problem in (
        ((3, 4), (4, 1), 1, r"reaches byte 52 of a storage of 48 bytes"),
        ((4, 4), (4, 1), 0, r"reaches byte 64 of a storage of 48 bytes"),
        ((3, 4), (1, 3), 3, r"reaches byte 60"),
    ):
        view = StoredTensor("fc.weight", "0", 12, size, stride, offset=offset)
        path.write_bytes(torch_zip(state_dict_pickle([view]), {"0": bytes(48)}))
        with pytest.raises(LoaderError, match=problem):
            open_torch(path)
    # A storage key that names no member, or one outside the archive's folder.
    for key in ("9", "../data/0"):
        other = StoredTensor("fc.weight", key, 12, (3, 4), (4, 1))
        path.write_bytes(torch_zip(state_dict_pickle([other]), {"0": bytes(48)}))
        with pytest.raises(LoaderError, match=r"has no member"):
            open_torch(path)


def test_memo_and_nesting_abuse_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # MARKs nested past the bound.
    with pytest.raises(unpickler.DamagedPickleError, match="MARKs nested more than"):
        unpickler.load_pickle(b"\x80\x02" + b"(" * (unpickler.MAX_MARKS + 1) + b"t.")
    # Memo entries past the bound (the bound made small here: each entry costs an object).
    monkeypatch.setattr(unpickler, "MAX_MEMO", 100)
    body = b"\x80\x02]" + b"".join(b"r" + struct.pack("<I", i) for i in range(101)) + b"."
    with pytest.raises(unpickler.DamagedPickleError, match="more than 100 memo entries"):
        unpickler.load_pickle(body)
    # A memo entry never put, a huge sparse index put and got back: refused / fine.
    with pytest.raises(unpickler.DamagedPickleError):
        unpickler.load_pickle(b"\x80\x02h\x05.")
    memo_ends = b"\x80\x02K\x01r\xff\xff\xff\xffj\xff\xff\xff\xff\x86."
    assert unpickler.load_pickle(memo_ends)[0] == (1, 1)
    # A list holding itself: built (a cycle is data), and harmless to what reads it next.
    loop, _ = unpickler.load_pickle(b"\x80\x02]q\x00h\x00a.")
    assert loop[0] is loop


def test_torchscript_cycles_and_depth_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "deep.pt"
    path.write_bytes(nested_script_modules(1500))
    with pytest.raises(LoaderError, match="nest more than 1000 deep"):
        open_torch(path)
    path.write_bytes(nested_script_modules(200))  # deep but within bounds: no tensors
    with pytest.raises(LoaderError, match="holds no parameters or buffers"):
        open_torch(path)
    # A module that holds itself and a tensor: the cycle is not walked again.
    tensor = StoredTensor("w", "0", 12, (3, 4), (4, 1))
    from tests.hostile.corpus_torch import tensor_pickle

    body = (
        b"\x80\x02"
        + _global("__torch__", "M")
        + b")\x81q\x00}("
        + _text("w")
        + tensor_pickle(tensor)
        + _text("me")
        + b"h\x00u"
        + b"b."
    )
    code = b'class M(Module):\n  __parameters__ = ["w", ]\n  __buffers__ = []\n'
    path.write_bytes(torchscript_zip(body, {"0": bytes(48)}, code=code))
    with open_torch(path) as checkpoint:
        assert [layer.name for layer in checkpoint.layers()] == ["w"]


# --- Fuzzing -----------------------------------------------------------------------------------


def _seed_pickles() -> dict[str, tuple[str, bytes, bytes]]:
    """name -> (container, the file's bytes, its pickle's bytes)."""
    seeds: dict[str, tuple[str, bytes, bytes]] = {}
    for name in ("cnn_state_dict.pt", "cnn_lightning.ckpt", "text_scripted.pt", "llama_bf16.pt"):
        raw = (FIXTURES / name).read_bytes()
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            member = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            seeds[name] = ("zip", raw, archive.read(member))
    legacy = (FIXTURES / "cnn_legacy.pth").read_bytes()
    seeds["cnn_legacy.pth"] = ("legacy", legacy, legacy)
    return seeds


SEEDS = _seed_pickles()


def _replace_data_pkl(raw: bytes, data: bytes) -> bytes:
    """The archive with its data.pkl replaced (stored), every other member as it was."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            content = data if info.filename.endswith("/data.pkl") else source.read(info)
            target.writestr(info, content)
    return out.getvalue()


def _mutate(data: st.DataObject, raw: bytes) -> bytes:
    mutated = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4), label="rounds")):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "copy"]), label="kind")
        position = data.draw(st.integers(0, max(len(mutated) - 1, 0)), label="position")
        if kind == "flip" and mutated:
            mutated[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif kind == "set" and mutated:
            mutated[position] = data.draw(st.integers(0, 255), label="byte")
        elif kind == "cut":
            del mutated[position : position + data.draw(st.integers(1, 64), label="length")]
        elif kind == "insert":
            mutated[position:position] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            start = data.draw(st.integers(0, max(len(mutated) - 1, 0)), label="start")
            mutated[position:position] = mutated[start : start + 32]
    return bytes(mutated)


def check_mutated_pickle(workdir: Path, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(SEEDS)), label="seed")
    container, raw, pickled = SEEDS[name]
    mutated = _mutate(data, pickled)
    path = workdir / f"fuzzed_{name}"
    path.write_bytes(mutated if container == "legacy" else _replace_data_pkl(raw, mutated))
    read_everything(path)
    assert not (workdir / MARKER_NAME).exists()


# Opcode streams: pieces a pickle is made of, including the dangerous ones, in any order.
def _pieces(marker: Path) -> list[bytes]:
    shell = _text(f"touch {marker}")
    return [
        b"(",
        b")",
        b"]",
        b"}",
        b"t",
        b"\x85",
        b"\x86",
        b"\x87",
        b"a",
        b"e",
        b"s",
        b"u",
        b"b",
        b"R",
        b"\x81",
        b"Q",
        b"0",
        b"1",
        b"2",
        b"N",
        b"\x88",
        b"\x89",
        b"K\x07",
        b"J\xff\xff\xff\x7f",
        _int(2**70),
        b"G" + struct.pack(">d", 1.5),
        _text("storage"),
        _text("0"),
        _text("cpu"),
        b"q\x01",
        b"h\x01",
        b"\x94",
        b"r\x00\x00\x00\x10",
        _global("os", "system") + _tuple([shell]) + b"R",
        _global("builtins", "eval"),
        _global("posix", "system"),
        _global("torch._utils", "_rebuild_tensor_v2"),
        _global("torch._utils", "_rebuild_parameter"),
        _global("torch._utils", "_rebuild_qtensor"),
        _global("torch._utils", "_rebuild_sparse_tensor"),
        _global("torch._tensor", "_rebuild_from_type_v2"),
        _global("torch", "FloatStorage"),
        _global("torch", "BFloat16Storage"),
        _global("torch", "float32"),
        _global("torch", "Size"),
        _global("torch.nn.parameter", "Parameter"),
        _global("collections", "OrderedDict"),
        _global("_codecs", "encode"),
        _global("__torch__", "M"),
        _tuple(
            [_text("storage"), _global("torch", "FloatStorage"), _text("0"), _text("cpu"), _int(12)]
        )
        + b"Q",
        _text("os") + _text("system") + b"\x93",
    ]


def check_opcode_stream(workdir: Path, data: st.DataObject) -> None:
    pieces = _pieces(workdir / MARKER_NAME)
    chosen = data.draw(st.lists(st.sampled_from(pieces), max_size=40), label="pieces")
    body = b"\x80\x02" + b"".join(chosen) + b"."
    script = data.draw(st.booleans(), label="script")

    def persistent_load(pid: tuple[Any, ...]) -> unpickler.Storage:
        storage, _ = unpickler.storage_from_id(pid, legacy=False)
        return storage

    expected = (
        unpickler.RefusedPickleError,
        unpickler.DamagedPickleError,
        unpickler.NeedsTorchError,
    )
    with contextlib.suppress(*expected):
        unpickler.load_pickle(body, 0, persistent_load, script=script)
    if data.draw(st.integers(0, 19), label="as a file") == 0:
        path = workdir / ("fuzzed_stream_script.pt" if script else "fuzzed_stream.pt")
        tensor_bytes = {"0": bytes(48)}
        writer = torchscript_zip if script else torch_zip
        path.write_bytes(writer(body, tensor_bytes))
        read_everything(path)
    assert not (workdir / MARKER_NAME).exists()


@given(data=st.data())
@fuzz_settings(700)
def test_mutated_pickles(workdir: Path, data: st.DataObject) -> None:
    check_mutated_pickle(workdir, data)


@given(data=st.data())
@fuzz_settings(1300)
def test_generated_opcode_streams(workdir: Path, data: st.DataObject) -> None:
    check_opcode_stream(workdir, data)


@pytest.mark.slow
@given(data=st.data())
@fuzz_settings(900, slow=True)
def test_mutated_pickles_slow(workdir: Path, data: st.DataObject) -> None:
    check_mutated_pickle(workdir, data)


@pytest.mark.slow
@given(data=st.data())
@fuzz_settings(1200, slow=True)
def test_generated_opcode_streams_slow(workdir: Path, data: st.DataObject) -> None:
    check_opcode_stream(workdir, data)


# --- Both readers refuse the corpus ---------------------------------------------------------------


def _torch_corpus() -> list[tuple[str, Callable[[Path], None]]]:
    from tests.hostile import corpus_torch
    from tests.hostile.make_corpus import _torch_cases

    entries = [(case.name, case.write) for case in corpus_torch.cases() if not case.environment]

    def writer(content: bytes) -> Callable[[Path], None]:
        return lambda target: target.write_bytes(content)

    entries += [(name, writer(content)) for name, (content, _) in _torch_cases().items()]
    return entries


TORCH_READS_THEM = {
    "pt_storage_member_smaller_than_declared.pt",
    "pt_data_pkl_twice_in_the_zip.pt",
    "pt_storage_twice_in_the_zip.pt",
}
"""Crafted archives torch's own reader loads without a word: a storage member of 12 bytes
declared as 48 (its memory-mapped storage then runs on into the bytes after the member), and a
member held twice (torch reads the first data.pkl, Python's zipfile the last). wwcli's reader
refuses all three."""


@pytest.mark.parametrize("reader", ["own", "torch"])
def test_both_readers_refuse_the_torch_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    """The hostile corpus's PyTorch entries are refused by wwcli's reader and, with
    WWCLI_TORCH_READER=torch, by torch's weights_only reader too (the same pre-checks run
    first), but for the three above; the corpus test runs each through the command line."""
    if reader == "torch":
        pytest.importorskip("torch")
        monkeypatch.setenv("WWCLI_TORCH_READER", "torch")
    read: set[str] = set()
    entries = _torch_corpus()
    for name, write in entries:
        path = tmp_path / name
        write(path)
        try:
            with open_checkpoint(path) as checkpoint:
                for spec in checkpoint.layers():
                    if spec.analyzable:
                        checkpoint.matrices(spec)
            read.add(name)
        except LoaderError as error:
            assert str(path) in str(error) and "\n" not in str(error), name
        path.unlink()
    assert len(entries) >= 35
    assert read == (TORCH_READS_THEM if reader == "torch" else set())
