"""The PyTorch reader without torch: wwcli's own restricted unpickler over the memory-mapped
file gives what torch.load(weights_only=True) gives, tensor for tensor and bit for bit, on
every fixture and in both of torch's formats; TorchScript archives give what
torch.jit.load(f).state_dict() gives; the analysis is the same whichever reader read the file;
and reading a .pt never imports torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import wwcli.loaders.torch as torch_loader
from tests.loaders.layer_views import our_rows, ww_rows
from wwcli.analysis import analyze_path
from wwcli.cli import app
from wwcli.loaders._torchpickle import StoredTensor
from wwcli.loaders.interface import LayerType, LoaderError
from wwcli.loaders.torch import open_torch
from wwcli.results import CheckpointReport
from wwcli.settings import RunSettings

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures" / "torch"
STATE_DICT_FILES = [
    FIXTURES / "cnn_state_dict.pt",
    FIXTURES / "cnn_lightning.ckpt",
    FIXTURES / "hf_bin" / "pytorch_model.bin",
    FIXTURES / "cnn_legacy.pth",
    FIXTURES / "llama_bf16.pt",
]
SCRIPTED = FIXTURES / "text_scripted.pt"
TRACED = FIXTURES / "cnn_traced.pt"
TORCHSCRIPT_FILES = [SCRIPTED, TRACED]

pytestmark = [
    pytest.mark.filterwarnings("ignore:Passing a dict to DataFrame.from_records"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

runner = CliRunner()


# --- comparing the two readers -------------------------------------------------------------------


def stored_bytes(tensor: StoredTensor) -> bytes:
    """The tensor's elements as raw bytes in C order, read from the mapped file."""
    assert tensor.storage is not None
    root = tensor.storage.root or tensor.storage
    size = tensor.element_size
    view = np.ndarray(
        tensor.shape,
        dtype=np.dtype(f"V{size}"),
        buffer=root.buffer,
        offset=tensor.storage.begin + tensor.offset * size,
        strides=tuple(step * size for step in tensor.stride),
    )
    return np.ascontiguousarray(view).tobytes()


def torch_bytes(tensor: torch.Tensor) -> bytes:
    """The same for a torch tensor."""
    flat = tensor.detach().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes()) if flat.numel() else b""


def assert_same_tensor(ours: StoredTensor, theirs: torch.Tensor, where: str) -> None:
    assert isinstance(ours, StoredTensor), where
    assert ours.dtype == str(theirs.dtype).removeprefix("torch."), where
    assert ours.shape == tuple(theirs.shape), where
    assert ours.parameter == isinstance(theirs, nn.Parameter), where
    if ours.kind is not None:
        return
    assert ours.stride == tuple(theirs.stride()), where
    assert ours.offset == theirs.storage_offset(), where
    assert stored_bytes(ours) == torch_bytes(theirs), where
    entry = torch_loader.tensor_entry("x", ours)
    assert entry == torch_loader.tensor_entry("x", theirs), where
    if entry.unreadable is None:
        mine = torch_loader.tensor_to_numpy(ours)
        reference = torch_loader.tensor_to_numpy(theirs)
        assert mine.dtype == reference.dtype, where
        assert np.ascontiguousarray(mine).tobytes() == np.ascontiguousarray(reference).tobytes()


def assert_same_object(ours: Any, theirs: Any, where: str = "") -> int:
    """Walk both loaded objects together; returns how many tensors were compared."""
    if isinstance(theirs, torch.Tensor):
        assert_same_tensor(ours, theirs, where)
        return 1
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), where
        assert list(ours) == list(theirs), where
        return sum(assert_same_object(ours[k], theirs[k], f"{where}[{k!r}]") for k in theirs)
    if isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        return sum(
            assert_same_object(mine, other, f"{where}[{index}]")
            for index, (mine, other) in enumerate(zip(ours, theirs, strict=True))
        )
    assert ours == theirs, where
    return 0


def load_both(path: Path) -> tuple[Any, Any]:
    ours = torch_loader.load_checkpoint_object(path, trust_pickle=False)
    theirs = torch.load(path, weights_only=True, map_location="cpu")
    return ours, theirs


@pytest.mark.parametrize("path", STATE_DICT_FILES, ids=lambda path: path.name)
def test_every_fixture_equals_torch_load_weights_only(path: Path) -> None:
    ours, theirs = load_both(path)
    assert assert_same_object(ours, theirs) >= 6


NEW_DTYPES = (
    torch.float8_e4m3fn,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
    torch.uint16,
    torch.uint32,
    torch.uint64,
)
"""Dtypes without a legacy storage class: torch writes them in the zip format only (its legacy
reader cannot load them back)."""


def every_dtype_and_view(*, legacy: bool = False) -> OrderedDict[str, Any]:
    """One tensor of each dtype torch writes, and the views a state dict can hold."""
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(6, 8, generator=generator)
    values: OrderedDict[str, Any] = OrderedDict()
    for dtype in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.float8_e4m3fn,
        torch.float8_e4m3fnuz,
        torch.float8_e5m2,
        torch.float8_e5m2fnuz,
        torch.float8_e8m0fnu,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.bool,
        torch.complex64,
        torch.complex128,
    ):
        if legacy and dtype in NEW_DTYPES:
            continue
        name = str(dtype).removeprefix("torch.")
        values[f"{name}.weight"] = (base * 4).to(dtype)
    values["t.weight"] = base.t()
    values["slice.weight"] = base[2:5, 1:7]
    values["permuted.weight"] = base.reshape(2, 3, 8).permute(2, 0, 1)
    values["param.weight"] = nn.Parameter(base.clone())
    values["bias"] = torch.zeros(8)
    values["scalar"] = torch.tensor(3.5)
    values["empty.weight"] = torch.zeros(0, 4)
    values["tied.weight"] = base
    values["numbers"] = {"step": 3, "lr": 0.1, "name": "run", "betas": (0.9, 0.99), "flag": True}
    values["nested"] = [torch.ones(2), {"inner": torch.arange(4)}]
    return values


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_dtype_and_view_equals_torch(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "dtypes.pt"
    torch.save(every_dtype_and_view(legacy=legacy), path, _use_new_zipfile_serialization=not legacy)
    ours, theirs = load_both(path)
    assert assert_same_object(ours, theirs) >= (19 if legacy else 27)
    checkpoint = open_torch(path)
    tied = {layer.name: layer.tied_to for layer in checkpoint.layers()}
    assert tied["tied"] == "t" or tied["float32"] is None  # t, slice, tied share a storage
    analyzable = {layer.name for layer in checkpoint.layers() if layer.analyzable}
    assert {"float16", "bfloat16", "t", "slice", "permuted", "param"} <= analyzable
    assert legacy or "float8_e5m2" in analyzable


def test_a_legacy_storage_view_is_read_as_torch_reads_it(tmp_path: Path) -> None:
    # torch < 1.6 kept views of one storage as storage views (view_metadata); a tied pair and a
    # slice of one tensor are the closest torch.save still writes in that format.
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    path = tmp_path / "legacy.pth"
    torch.save({"a.weight": base, "b.weight": base, "c.weight": base[1:]}, path,
               _use_new_zipfile_serialization=False)  # fmt: skip
    ours, theirs = load_both(path)
    assert assert_same_object(ours, theirs) == 3
    assert [layer.tied_to for layer in open_torch(path).layers()] == ["b", "a", None]


def test_the_own_reader_imports_no_torch_and_reads_no_pickle_twice() -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from wwcli.loaders.torch import open_torch\n"
        "for name in sys.argv[1:]:\n"
        "    with open_torch(Path(name)) as checkpoint:\n"
        "        for layer in checkpoint.layers():\n"
        "            if layer.analyzable:\n"
        "                checkpoint.matrices(layer)\n"
        "print('torch' in sys.modules)\n"
    )
    files = [str(path) for path in STATE_DICT_FILES + TORCHSCRIPT_FILES]
    completed = subprocess.run(
        [sys.executable, "-c", script, *files], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"


@pytest.mark.parametrize(
    "arguments",
    [["--help"], ["analyze", str(STATE_DICT_FILES[0]), "--format", "json", "--exit-zero"]],
    ids=["help", "analyze"],
)
def test_the_command_line_imports_no_torch(arguments: list[str]) -> None:
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "wwcli", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    imported = {
        line.split("|")[-1].strip() for line in completed.stderr.splitlines() if "|" in line
    }
    assert "wwcli" in imported
    assert not any(name == "torch" or name.startswith("torch.") for name in imported)


# --- the analysis is the same whichever reader read the file --------------------------------------


def analyze_json(path: Path, monkeypatch: pytest.MonkeyPatch, *, torch_reader: bool) -> Any:
    if torch_reader:
        monkeypatch.setenv(torch_loader.READER_ENV, "torch")
    else:
        monkeypatch.delenv(torch_loader.READER_ENV, raising=False)
    result = runner.invoke(app, ["analyze", str(path), "--format", "json", "--exit-zero", "-q"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("path", STATE_DICT_FILES, ids=lambda path: path.name)
def test_analyze_json_is_the_same_as_through_torch(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = analyze_json(path, monkeypatch, torch_reader=False)
    theirs = analyze_json(path, monkeypatch, torch_reader=True)
    assert ours == theirs
    assert len(ours["layers"]) >= 4


def test_the_torch_reader_switch_uses_torch_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    for path in STATE_DICT_FILES[:1] + STATE_DICT_FILES[3:4]:
        open_torch(path).layers()
    assert calls == []
    monkeypatch.setenv(torch_loader.READER_ENV, "torch")
    for path in STATE_DICT_FILES[:1] + STATE_DICT_FILES[3:4]:
        open_torch(path).layers()
    assert [(call["mmap"], call["weights_only"]) for call in calls] == [(True, True), (False, True)]


# --- TorchScript ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", TORCHSCRIPT_FILES, ids=lambda path: path.name)
def test_torchscript_weights_equal_jit_load_state_dict(path: Path) -> None:
    script = torch_loader.torchscript_state_dict(path)
    reference = torch.jit.load(path, map_location="cpu").state_dict()
    assert list(script.tensors) == list(reference)
    for key, tensor in reference.items():
        ours = script.tensors[key]
        assert ours.dtype == str(tensor.dtype).removeprefix("torch."), key
        assert ours.shape == tuple(tensor.shape), key
        assert stored_bytes(ours) == torch_bytes(tensor), key


def test_torchscript_layers_are_named_and_typed_by_module() -> None:
    checkpoint = open_torch(SCRIPTED)
    assert checkpoint.format == "torchscript"
    assert [(s.layer_id, s.name, s.layer_type, s.analyzable) for s in checkpoint.layers()] == [
        (0, "embed", LayerType.EMBEDDING, True),
        (1, "conv", LayerType.CONV1D, True),
        (2, "norm", LayerType.NORM, False),
        (3, "head.0", LayerType.DENSE, True),
        (4, "head.2", LayerType.DENSE, True),
    ]
    traced = open_torch(TRACED)
    assert [(s.name, s.layer_type) for s in traced.layers()] == [
        ("conv1", LayerType.CONV2D),
        ("bn1", LayerType.NORM),
        ("conv2", LayerType.CONV2D),
        ("bn2", LayerType.NORM),
        ("fc1", LayerType.DENSE),
        ("fc2", LayerType.DENSE),
    ]
    assert "never run" in (traced.source_note or "")


def test_a_batch_norm_in_a_sequential_is_a_norm_by_its_module(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)).eval()
    path = tmp_path / "seq.pt"
    torch.jit.save(torch.jit.script(model), path)
    layers = open_torch(path).layers()
    assert [(s.name, s.layer_type) for s in layers] == [
        ("0", LayerType.DENSE),
        ("1", LayerType.NORM),
        ("2", LayerType.DENSE),
    ]


def test_torchscript_is_read_the_same_with_trust_pickle() -> None:
    # With --trust-pickle torch.load used to hand back a ScriptModule: "0 layers analyzed".
    trusted = open_torch(SCRIPTED, trust_pickle=True)
    assert [s.name for s in trusted.layers()] == [s.name for s in open_torch(SCRIPTED).layers()]
    result = runner.invoke(
        app, ["analyze", str(TRACED), "--trust-pickle", "--format", "json", "--exit-zero", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["layers"]) == 4


@pytest.mark.parametrize("path", [SCRIPTED, TRACED, FIXTURES / "cnn_legacy.pth"], ids=str)
def test_ids_and_alphas_equal_weightwatcher_on_the_same_weights(path: Path, tmp_path: Path) -> None:
    """weightwatcher reads the same weights from a folder holding them as pytorch_model.bin
    (the TorchScript module's state_dict(), the legacy file's state dict)."""
    weightwatcher = pytest.importorskip("weightwatcher")
    folder = tmp_path / "bin"
    folder.mkdir()
    if path in TORCHSCRIPT_FILES:
        torch.save(torch.jit.load(path).state_dict(), folder / "pytorch_model.bin")
    else:
        shutil.copy(path, folder / "pytorch_model.bin")
    ours = our_rows(open_torch(path))
    # weightwatcher leaves a state dict's 3-D tensors unanalyzed; wwcli reads them as conv1d.
    conv1d = {key for key, row in ours.items() if row[1] == "conv1d"}
    assert conv1d == ({1} if path == SCRIPTED else set())
    assert {key: row for key, row in ours.items() if key not in conv1d} == ww_rows(str(folder))
    details = weightwatcher.WeightWatcher(model=str(folder)).analyze(min_evals=1)
    theirs = {int(row["layer_id"]): row["alpha"] for row in details.to_dict("records")}
    report = analyze_path(path, RunSettings())
    assert isinstance(report, CheckpointReport)
    compared = 0
    for result in report.layers:
        if result.metrics.alpha is not None and result.spec.layer_id in theirs:
            assert result.metrics.alpha == pytest.approx(theirs[result.spec.layer_id], rel=1e-10)
            compared += 1
    assert compared >= 2


# --- what the own reader leaves to torch, and where torch is still needed ------------------------


def test_a_wrapper_subclass_falls_back_to_torchs_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tensor only torch rebuilds: its weights_only reader reads the file, as before.
    path = tmp_path / "untyped.pt"
    torch.save({"w.weight": torch.ones(4, 4)}, path)
    from wwcli.loaders import _torchpickle

    monkeypatch.setitem(
        _torchpickle.ALLOWED_GLOBALS,
        "torch._utils._rebuild_tensor_v2",
        _torchpickle._Global("needs_torch", "torch._utils._rebuild_tensor_v2"),
    )
    (layer,) = open_torch(path).layers()
    assert layer.analyzable and layer.shape == (4, 4)


def test_missing_torch_only_matters_for_trust_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    assert len(open_torch(STATE_DICT_FILES[0]).layers()) == 6
    assert len(open_torch(SCRIPTED).layers()) == 5
    with pytest.raises(LoaderError, match=r"pip install 'wwcli\[torch\]'"):
        open_torch(STATE_DICT_FILES[0], trust_pickle=True)


def test_a_protocol_4_pickle_is_read(tmp_path: Path) -> None:
    # torch's weights_only reader refuses protocol 4's opcodes (MEMOIZE, STACK_GLOBAL, ...);
    # the own reader takes them, through the same allow-list.
    state = every_dtype_and_view()
    path = tmp_path / "protocol4.pt"
    torch.save(state, path, pickle_protocol=4)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    ours = torch_loader.load_checkpoint_object(path, trust_pickle=False)
    assert assert_same_object(ours, torch.load(path, weights_only=False)) >= 27


def test_a_big_endian_archive_is_read_in_its_byte_order(tmp_path: Path) -> None:
    from tests.hostile.corpus_torch import StoredTensor as Stored
    from tests.hostile.corpus_torch import state_dict_pickle

    values = np.arange(12, dtype=np.float32) / 7
    tensors = [
        Stored("f.weight", "0", 12, (3, 4), (4, 1)),
        Stored("b.weight", "1", 12, (4, 3), (3, 1), storage_class="BFloat16Storage"),
    ]
    bf16 = (values.view(np.uint32) >> 16).astype(">u2").tobytes()
    members = {
        "archive/data.pkl": state_dict_pickle(tensors),
        "archive/byteorder": b"big",
        "archive/data/0": values.astype(">f4").tobytes(),
        "archive/data/1": bf16,
    }
    path = tmp_path / "big.pt"
    with zipfile.ZipFile(path, "w") as archive:
        for name, raw in members.items():
            archive.writestr(name, raw)
    checkpoint = open_torch(path)
    f, b = checkpoint.layers()
    assert checkpoint.matrices(f)[0].tolist() == values.reshape(3, 4).tolist()
    widened = ((values.view(np.uint32) >> 16) << 16).view(np.float32)
    assert checkpoint.matrices(b)[0].tobytes() == widened.reshape(4, 3).tobytes()
