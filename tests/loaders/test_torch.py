"""The PyTorch reader: state dicts and their wrappers numbered as weightwatcher 0.7.7 numbers a
state dict read from a model folder, whole modules (--trust-pickle only) as it numbers a live
module, matrices byte-equal to what torch loads, and no pickle ever run without the flag."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import wwcli.loaders.torch as torch_loader
from tests.loaders.layer_views import our_rows, ww_rows
from wwcli.loaders.folder import open_folder
from wwcli.loaders.interface import Checkpoint, LayerSpec, LayerType, LoaderError
from wwcli.loaders.torch import open_torch

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures" / "torch"
STATE_DICT = FIXTURES / "cnn_state_dict.pt"
LIGHTNING = FIXTURES / "cnn_lightning.ckpt"
HF_BIN = FIXTURES / "hf_bin"

# weightwatcher 0.7.7 builds its DataFrame in a way pandas now deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Passing a dict to DataFrame.from_records")


# --- helpers ---------------------------------------------------------------------------------


def as_bin_folder(tmp_path: Path, checkpoint_file: Path) -> Path:
    """A model folder holding the file as pytorch_model.bin, as weightwatcher reads state dicts."""
    folder = tmp_path / "bin_folder"
    folder.mkdir()
    shutil.copy(checkpoint_file, folder / "pytorch_model.bin")
    return folder


def expected_matrices(weight: torch.Tensor) -> list[np.ndarray]:
    """What torch itself gives for a weight, cut as weightwatcher cuts it."""
    weight = weight.detach()
    array = weight.float().numpy() if weight.dtype == torch.bfloat16 else weight.numpy()
    if array.ndim == 2:
        return [array]
    if array.ndim == 3:
        return [array[:, :, k] for k in range(array.shape[2])]
    return [array[:, :, i, j] for i in range(array.shape[2]) for j in range(array.shape[3])]


def assert_matrices_equal(checkpoint: Checkpoint, weights: dict[str, torch.Tensor]) -> None:
    checked = 0
    for spec in checkpoint.layers():
        if not spec.analyzable:
            continue
        ours = checkpoint.matrices(spec)
        theirs = expected_matrices(weights[spec.name])
        assert len(ours) == len(theirs) == spec.rf
        for mine, reference in zip(ours, theirs, strict=True):
            assert mine.dtype == reference.dtype
            assert mine.tobytes() == np.ascontiguousarray(reference).tobytes()
        checked += 1
    assert checked > 0


def small_state_dict() -> OrderedDict[str, torch.Tensor]:
    """Keys deliberately out of sorted order, with a 1-D scale between two matrices."""
    generator = torch.Generator().manual_seed(11)
    return OrderedDict(
        [
            ("zeta.weight", torch.randn(20, 12, generator=generator)),
            ("zeta.bias", torch.randn(20, generator=generator)),
            ("norm.weight", torch.ones(20)),
            ("alpha.weight", torch.randn(16, 20, generator=generator)),
        ]
    )


# --- state dicts ----------------------------------------------------------------------------


def test_state_dict_layers_equal_weightwatcher(tmp_path: Path) -> None:
    checkpoint = open_torch(STATE_DICT)
    assert our_rows(checkpoint) == ww_rows(str(as_bin_folder(tmp_path, STATE_DICT)))
    assert checkpoint.format == "torch"
    assert [(s.layer_id, s.name, s.layer_type) for s in checkpoint.layers()] == [
        (0, "conv1", LayerType.CONV2D),
        (1, "bn1", LayerType.NORM),
        (2, "conv2", LayerType.CONV2D),
        (3, "bn2", LayerType.NORM),
        (4, "fc1", LayerType.DENSE),
        (5, "fc2", LayerType.DENSE),
    ]


def test_state_dict_shapes_and_matrices_equal_torch() -> None:
    checkpoint = open_torch(STATE_DICT)
    state = torch.load(STATE_DICT, weights_only=True)
    for spec in checkpoint.layers():
        assert spec.shape == tuple(state[spec.name + ".weight"].shape)
        assert spec.dtype == "float32"
    assert_matrices_equal(
        checkpoint, {key.removesuffix(".weight"): value for key, value in state.items()}
    )


def test_ids_follow_stored_order_and_count_one_dimensional_weights(tmp_path: Path) -> None:
    path = tmp_path / "unsorted.pt"
    torch.save(small_state_dict(), path)
    checkpoint = open_torch(path)
    assert [(s.layer_id, s.name) for s in checkpoint.layers()] == [
        (0, "zeta"),
        (1, "norm"),
        (2, "alpha"),
    ]
    assert not checkpoint.layers()[1].analyzable
    assert our_rows(checkpoint) == ww_rows(str(as_bin_folder(tmp_path, path)))


def test_lightning_checkpoint_is_unwrapped() -> None:
    checkpoint = open_torch(LIGHTNING)
    bare = open_torch(STATE_DICT)
    assert [(s.layer_id, s.name) for s in checkpoint.layers()] == [
        (s.layer_id, f"model.{s.name}") for s in bare.layers()
    ]
    note = getattr(checkpoint, "source_note", None) or ""
    assert "['state_dict']" in note and "epoch" in note
    state = torch.load(LIGHTNING, weights_only=True)["state_dict"]
    assert_matrices_equal(
        checkpoint, {key.removesuffix(".weight"): value for key, value in state.items()}
    )


def optimizer_state() -> dict[str, Any]:
    """A real optimizer state: int keys and more tensors than the small model has."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 8)).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


@pytest.mark.parametrize(
    ("wrap", "trail"),
    [
        (lambda sd: {"model_state_dict": sd, "optimizer_state_dict": optimizer_state()}, "model_"),
        (lambda sd: {"epoch": 1, "model": sd}, "['model']"),
        (lambda sd: {"module": sd, "lr": 0.1}, "['module']"),
        (lambda sd: {"model": {"module": sd}, "args": {"seed": 1}}, "['model']['module']"),
        (lambda sd: {"optimizer": optimizer_state(), "ema": {"weights": sd}}, "['ema']['weights']"),
    ],
    ids=["model_state_dict", "model", "module", "nested", "most-weights-wins"],
)
def test_wrappers_are_unwrapped(tmp_path: Path, wrap: Any, trail: str) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save(wrap(small_state_dict()), path)
    checkpoint = open_torch(path)
    assert [s.name for s in checkpoint.layers()] == ["zeta", "norm", "alpha"]
    assert trail in (getattr(checkpoint, "source_note", None) or "")
    assert_matrices_equal(
        checkpoint, {k.removesuffix(".weight"): v for k, v in small_state_dict().items()}
    )


def test_bare_state_dict_has_no_source_note() -> None:
    assert getattr(open_torch(STATE_DICT), "source_note", "x") is None


def test_legacy_format_is_read_without_mmap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    legacy = tmp_path / "legacy.pth"
    torch.save(small_state_dict(), legacy, _use_new_zipfile_serialization=False)
    modern = tmp_path / "modern.pth"
    torch.save(small_state_dict(), modern)
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    for path in (legacy, modern):
        checkpoint = open_torch(path)
        assert_matrices_equal(
            checkpoint, {k.removesuffix(".weight"): v for k, v in small_state_dict().items()}
        )
    assert calls == []  # wwcli's own reader, in both formats
    monkeypatch.setenv(torch_loader.READER_ENV, "torch")  # torch's weights_only reader
    for path in (legacy, modern):
        checkpoint = open_torch(path)
        assert_matrices_equal(
            checkpoint, {k.removesuffix(".weight"): v for k, v in small_state_dict().items()}
        )
    assert [(call["mmap"], call["weights_only"]) for call in calls] == [(False, True), (True, True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_float_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    weight = torch.randn(24, 10, generator=torch.Generator().manual_seed(2)).to(dtype)
    path = tmp_path / "w.pt"
    torch.save({"w.weight": weight}, path)
    checkpoint = open_torch(path)
    spec = checkpoint.layers()[0]
    assert spec.dtype == str(dtype).removeprefix("torch.")
    (matrix,) = checkpoint.matrices(spec)
    reference = weight.float().numpy() if dtype == torch.bfloat16 else weight.numpy()
    assert matrix.dtype == reference.dtype
    assert matrix.tobytes() == reference.tobytes()


def test_integer_and_odd_values_are_listed_not_analyzed(tmp_path: Path) -> None:
    path = tmp_path / "odd.pt"
    torch.save(
        OrderedDict(
            [
                ("q.weight", torch.ones(16, 16, dtype=torch.int8)),
                ("conv.weight", torch.randn(32, 16, 3)),
                ("extra.weight", 3),
                ("bn.num_batches_tracked", torch.tensor(5)),
            ]
        ),
        path,
    )
    q, conv, extra = open_torch(path).layers()
    assert (q.layer_type, q.skip_reason) == (LayerType.DENSE, "integer tensor (int8), not analyzed")
    assert (conv.layer_type, conv.N, conv.M, conv.rf, conv.analyzable) == (
        LayerType.CONV1D,
        32,
        16,
        3,
        True,
    )
    assert extra.skip_reason == "not a tensor (int)"


# --- nothing in a pickle runs without --trust-pickle ----------------------------------------


class CreatesMarker:
    """Unpickling this opens (so creates) the marker file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def write_payload(kind: str, path: Path, marker: Path) -> None:
    payload = CreatesMarker(marker)
    if kind == "plain-pickle":
        path.write_bytes(pickle.dumps({"conv.weight": payload}))
    elif kind == "zip":
        torch.save({"conv.weight": torch.ones(3, 3), "hook": payload}, path)
    elif kind == "legacy":
        torch.save({"hook": payload}, path, _use_new_zipfile_serialization=False)
    elif kind == "lightning":
        torch.save(
            {"state_dict": {"model.fc.weight": torch.ones(4, 4)}, "hyper_parameters": payload},
            path,
        )


PAYLOADS = [
    ("plain-pickle", "evil.pt"),
    ("zip", "evil.pt"),
    ("legacy", "evil.pth"),
    ("lightning", "evil.ckpt"),
]


@pytest.mark.parametrize(("kind", "filename"), PAYLOADS, ids=[kind for kind, _ in PAYLOADS])
def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(
    tmp_path: Path, kind: str, filename: str
) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / filename
    write_payload(kind, path, marker)
    assert not marker.exists()
    with pytest.raises(LoaderError) as raised:
        open_torch(path)
    message = str(raised.value)
    assert message.startswith(str(path))
    assert "holds Python objects" in message and "can run code" in message
    assert "--trust-pickle" in message and "state dict" in message and "safetensors" in message
    assert "\n" not in message
    assert not marker.exists()


def test_the_payload_is_live_so_the_refusal_test_can_fail(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    write_payload("zip", path, marker)
    with open_torch(path, trust_pickle=True) as checkpoint:
        assert marker.exists()  # the trusted load ran the payload
        assert [spec.name for spec in checkpoint.layers()] == ["conv"]


def test_refusal_names_the_refused_global(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    write_payload("zip", path, tmp_path / "marker")
    with pytest.raises(LoaderError, match=r"holds Python objects \((io|builtins)\.open\)"):
        open_torch(path)


def test_a_bin_folder_refuses_pickles_too(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    marker = tmp_path / "marker"
    write_payload("zip", folder / "pytorch_model.bin", marker)
    with pytest.raises(LoaderError, match="can run code"):
        open_folder(folder)
    assert not marker.exists()


# --- whole modules: refused, then numbered as weightwatcher numbers a live module -------------


def small_network() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(
        OrderedDict(
            [
                ("embed", nn.Embedding(50, 16)),
                (
                    "features",
                    nn.Sequential(
                        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3)
                    ),
                ),
                ("temporal", nn.Conv1d(16, 32, 3)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(64, 32)),
                ("norm", nn.LayerNorm(32)),
                ("fc2", nn.Linear(32, 10)),
            ]
        )
    )


def test_a_pickled_module_is_refused_without_trust(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(small_network(), path)
    with pytest.raises(LoaderError, match=r"torch\.nn\.modules.*can run code.*--trust-pickle"):
        open_torch(path)


def test_a_trusted_module_is_numbered_as_weightwatcher_numbers_a_live_module(
    tmp_path: Path,
) -> None:
    path = tmp_path / "model.pt"
    torch.save(small_network(), path)
    checkpoint = open_torch(path, trust_pickle=True)
    assert checkpoint.format == "torch-module"
    module = torch.load(path, weights_only=False)
    names = [name or type(module).__name__ for name, _ in module.named_modules()]
    specs = checkpoint.layers()
    assert [s.name for s in specs] == names
    assert [s.layer_id for s in specs] == list(range(len(names)))

    expected = ww_rows(module)
    ours = our_rows(checkpoint)
    conv1d_id = names.index("temporal")
    # weightwatcher takes a live Conv1d's 3-D weight as one "matrix" with N, M = max, min of all
    # three sizes (32, 3); wwcli splits it into k = 3 slices of (out, in) as for conv2d.
    assert expected.pop(conv1d_id) == ("temporal", "conv1d", 32, 3, 1)
    assert ours.pop(conv1d_id) == ("temporal", "conv1d", 32, 16, 3)
    assert ours == expected
    by_name = {s.name: s for s in specs}
    assert by_name["features.1"].layer_type is LayerType.NORM
    assert by_name["features.2"].skip_reason == "no weights"
    assert by_name["Sequential"].layer_id == 0
    weights = {name: sub.weight for name, sub in module.named_modules() if hasattr(sub, "weight")}
    assert_matrices_equal(checkpoint, {k: v for k, v in weights.items() if k != "features.1"})


def test_a_trusted_dict_holding_a_module(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    torch.save({"epoch": 2, "model": small_network()}, path)
    checkpoint = open_torch(path, trust_pickle=True)
    assert checkpoint.format == "torch-module"
    assert "['model']" in (getattr(checkpoint, "source_note", None) or "")


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_is_read_as_its_state_dict_without_running_it(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4))), path)
    checkpoint = open_torch(path)
    assert checkpoint.format == "torchscript"
    assert [(s.layer_id, s.name, s.layer_type) for s in checkpoint.layers()] == [
        (0, "0", LayerType.DENSE),
        (1, "1", LayerType.DENSE),
    ]
    state = torch.jit.load(path).state_dict()
    assert_matrices_equal(checkpoint, {k.removesuffix(".weight"): v for k, v in state.items()})


# --- .bin folders -------------------------------------------------------------------------


def test_hf_bin_folder_equals_weightwatcher(tmp_path: Path) -> None:
    checkpoint = open_folder(HF_BIN)
    assert checkpoint.format == "torch-folder"
    assert our_rows(checkpoint) == ww_rows(str(HF_BIN))
    state = torch.load(HF_BIN / "pytorch_model.bin", weights_only=True)
    assert [s.name + ".weight" for s in checkpoint.layers()] == [
        key for key in state if key.endswith(".weight")
    ]
    assert_matrices_equal(
        checkpoint, {key.removesuffix(".weight"): value for key, value in state.items()}
    )
    assert "GPT2LMHeadModel" in (getattr(checkpoint, "source_note", None) or "")


def three_bins(folder: Path) -> None:
    generator = torch.Generator().manual_seed(9)
    folder.mkdir()
    shards = [
        {"b.weight": torch.randn(30, 12, generator=generator), "b.bias": torch.zeros(30)},
        {"a.weight": torch.randn(40, 10, generator=generator), "n.weight": torch.ones(40)},
        {"c.weight": torch.randn(25, 9, generator=generator)},
    ]
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = f"pytorch_model-0000{number}-of-00003.bin"
        torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_bin_shards_count_on_without_weightwatchers_gaps(tmp_path: Path) -> None:
    folder = tmp_path / "bins"
    three_bins(folder)
    checkpoint = open_folder(folder)
    assert [(s.layer_id, s.name) for s in checkpoint.layers()] == [
        (0, "b"),
        (1, "a"),
        (2, "n"),
        (3, "c"),
    ]
    assert checkpoint.ids_note is not None and "#268" in checkpoint.ids_note
    expected = ww_rows(str(folder))
    ours = our_rows(checkpoint)
    assert [expected[i] for i in sorted(expected)] == [ours[i] for i in sorted(ours)]
    assert sorted(expected)[:2] == sorted(ours)[:2]  # same ids in the first two files ...
    assert max(expected) > max(ours)  # ... then weightwatcher jumps (its issue #268)


def test_bin_index_naming_a_missing_shard(tmp_path: Path) -> None:
    folder = tmp_path / "bins"
    three_bins(folder)
    (folder / "pytorch_model-00003-of-00003.bin").unlink()
    with pytest.raises(LoaderError, match=r"names shard 'pytorch_model-00003-of-00003\.bin'"):
        open_folder(folder)


# --- bad input ------------------------------------------------------------------------------


def test_bad_files(tmp_path: Path) -> None:
    good = STATE_DICT.read_bytes()
    legacy = tmp_path / "legacy.pt"
    torch.save(small_state_dict(), legacy, _use_new_zipfile_serialization=False)
    not_torch_zip = tmp_path / "other.pt"
    with zipfile.ZipFile(not_torch_zip, "w") as archive:
        archive.writestr("hello.txt", "hi")
    no_tensors = tmp_path / "no_tensors.pt"
    torch.save({"epoch": 3, "lr": 0.1}, no_tensors)
    cases = {
        "empty.pt": (b"", "empty file"),
        "random.pt": (np.random.default_rng(0).bytes(4096), "not a PyTorch checkpoint"),
        "truncated.pt": (good[: len(good) // 2], "damaged zip archive"),
        "truncated_legacy.pt": (legacy.read_bytes()[:300], "not a readable PyTorch checkpoint"),
        "pickle_garbage.pt": (b"\x80\x02" + np.random.default_rng(1).bytes(64), "PyTorch"),
    }
    for name, (content, pattern) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(LoaderError, match=pattern) as raised:
            open_torch(path)
        assert str(raised.value).startswith(str(path)), name
        assert "\n" not in str(raised.value)
    with pytest.raises(LoaderError, match=r"without data\.pkl"):
        open_torch(not_torch_zip)
    with pytest.raises(LoaderError, match=r"holds no tensors .*epoch"):
        open_torch(no_tensors)
    with pytest.raises(LoaderError, match="no such file"):
        open_torch(tmp_path / "absent.pt")
    with pytest.raises(LoaderError, match="is a directory, not a checkpoint file"):
        open_torch(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "locked.pt"
    shutil.copy(STATE_DICT, path)
    path.chmod(0)
    with pytest.raises(LoaderError, match="cannot read"):
        open_torch(path)


def test_missing_torch_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    assert len(torch_loader.open_torch(STATE_DICT).layers()) == 6  # read without torch
    with pytest.raises(LoaderError, match=r"pip install 'wwcli\[torch\]'"):
        torch_loader.open_torch(STATE_DICT, trust_pickle=True)


def test_matrices_of_a_skipped_or_foreign_layer_fail_cleanly() -> None:
    checkpoint = open_torch(STATE_DICT)
    with pytest.raises(LoaderError, match="not analyzable"):
        checkpoint.matrices(checkpoint.layers()[1])
    with pytest.raises(LoaderError, match="no layer with id 7"):
        checkpoint.matrices(LayerSpec(7, "x", LayerType.DENSE, (2, 2)))


# --- hostile files: exotic tensors are listed, not converted; crafted shapes are refused ------


def test_exotic_dtypes_and_tensor_types_are_listed_with_a_reason(tmp_path: Path) -> None:
    raw = torch.zeros(4, 4, dtype=torch.uint8)
    stored = OrderedDict(
        [
            ("f4.weight", raw.view(torch.float4_e2m1fn_x2)),
            ("bits.weight", raw.view(torch.bits8)),
            ("complex.weight", torch.ones(4, 4, dtype=torch.complex64)),
            ("q.weight", torch.quantize_per_tensor(torch.ones(4, 4), 0.1, 0, torch.qint8)),
            ("sparse.weight", torch.ones(4, 4).to_sparse()),
            ("csr.weight", torch.ones(4, 4).to_sparse_csr()),
            ("meta.weight", torch.empty(4, 4, device="meta")),
            ("u16.weight", torch.ones(4, 4, dtype=torch.uint16)),
            ("nested.weight", torch.nested.nested_tensor([torch.ones(2, 4), torch.ones(3, 4)])),
            ("f8.weight", torch.full((4, 4), 0.5).to(torch.float8_e4m3fn)),
            ("param.weight", nn.Parameter(torch.full((4, 4), 2.0))),
        ]
    )
    path = tmp_path / "exotic.pt"
    torch.save(stored, path)
    checkpoint = open_torch(path)
    reasons = {layer.name: layer.skip_reason for layer in checkpoint.layers()}
    assert reasons == {
        "f4": "unsupported dtype float4_e2m1fn_x2, not analyzed",
        "bits": "unsupported dtype bits8, not analyzed",
        "complex": "complex tensor (complex64), not analyzed",
        "q": "quantized tensor (qint8), not analyzed",
        "sparse": "sparse_coo tensor, not analyzed",
        "csr": "sparse_csr tensor, not analyzed",
        "meta": "tensor holds no data (meta device)",
        "u16": "integer tensor (uint16), not analyzed",
        "nested": "nested tensor, not analyzed",
        "f8": None,
        "param": None,
    }
    f8, param = checkpoint.layers()[-2:]
    assert checkpoint.matrices(f8)[0].tolist() == [[0.5] * 4] * 4
    assert checkpoint.matrices(param)[0].tolist() == [[2.0] * 4] * 4
    with pytest.raises(LoaderError, match="not analyzable: unsupported dtype float4"):
        checkpoint.matrices(checkpoint.layers()[0])


def test_a_tensor_subclass_is_listed_not_converted(tmp_path: Path) -> None:
    nested = torch.nested.nested_tensor([torch.ones(2, 4), torch.ones(3, 4)], layout=torch.jagged)
    path = tmp_path / "jagged.pt"
    torch.save({"jagged.weight": nested}, path)
    (layer,) = open_torch(path, trust_pickle=True).layers()
    assert layer.skip_reason == "tensor subclass NestedTensor, not analyzed"


def test_transposes_and_slices_of_a_storage_are_read(tmp_path: Path) -> None:
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    weights = {
        "t.weight": base.t(),  # strides (1, 8)
        "s.weight": base[2:5, 1:7],  # offset 17, strides (8, 1)
        "p.weight": base.reshape(2, 3, 8).permute(2, 0, 1),
    }
    path = tmp_path / "views.pt"
    torch.save(weights, path)
    checkpoint = open_torch(path)
    assert_matrices_equal(
        checkpoint, {key.removesuffix(".weight"): w for key, w in weights.items()}
    )
    assert [layer.shape for layer in checkpoint.layers()] == [(8, 6), (3, 6), (8, 2, 3)]


@pytest.mark.parametrize(
    ("size", "stride", "problem"),
    [
        ((6, 8), (0, 1), r"'w\.weight' is a 6x8 view with strides \(0, 1\) that uses storage"),
        ((6, 8), (4, 1), r"strides \(4, 1\) that uses storage elements more than once"),
        ((2, 3, 4), (12, 1, 2), r"strides \(12, 1, 2\) that uses storage elements"),
    ],
)
def test_a_view_that_reuses_storage_elements_is_refused(
    tmp_path: Path, size: tuple[int, ...], stride: tuple[int, ...], problem: str
) -> None:
    path = tmp_path / "view.pt"
    torch.save({"w.weight": torch.zeros(48).as_strided(size, stride)}, path)
    with pytest.raises(LoaderError, match=problem):
        open_torch(path)
    folder = as_bin_folder(tmp_path, path)  # a .bin folder is checked the same way
    with pytest.raises(LoaderError, match=problem):
        open_folder(folder)


def test_a_view_past_its_storage_is_refused() -> None:
    # torch refuses to build one on load; check_view does not count on that.
    tensor = torch.zeros(48).as_strided((6, 8), (8, 1))
    torch_loader.check_view(Path("f.pt"), "w", tensor)
    tensor.untyped_storage().resize_(160)  # 40 floats left under a view of 48
    with pytest.raises(LoaderError, match=r"'w' reaches byte 192 of a storage of 160 bytes"):
        torch_loader.check_view(Path("f.pt"), "w", tensor)


def test_names_that_are_not_text_or_collide_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "surrogate.pt"
    torch.save({"fc\udc80.weight": torch.ones(3, 3)}, path)
    with pytest.raises(LoaderError, match=r"tensor name 'fc\\udc80\.weight' is not valid text"):
        open_torch(path)
    path = tmp_path / "collide.pt"
    torch.save({1: torch.ones(3, 3), "1": torch.ones(3, 3), "a.weight": torch.ones(3, 3)}, path)
    with pytest.raises(LoaderError, match=r"two keys of the state dict both read as '1'"):
        open_torch(path)


def test_the_search_visits_each_dict_once_and_has_a_budget(tmp_path: Path) -> None:
    level: dict[str, Any] = {"leaf": 1}
    for _ in range(60):  # 2**60 paths, 61 distinct dicts
        level = {"a": level, "b": level}
    loop: dict[str, Any] = {}
    loop["self"] = loop
    weights = {"fc.weight": torch.ones(3, 3)}
    found = torch_loader.find_weights(tmp_path, {"history": level, "loop": loop, "w": weights})
    assert found.weights is weights
    wide = {str(index): index for index in range(torch_loader.MAX_SEARCH_ENTRIES + 1)}
    with pytest.raises(LoaderError, match=r"more than 1000000 dict entries to search"):
        torch_loader.find_weights(tmp_path, {"w": weights, "vocabulary": {"big": wide}})


def test_the_pickle_shape_is_bounded_before_torch_runs(tmp_path: Path) -> None:
    key: object = ("leaf",)
    for _ in range(30):
        key = (key, key)
    path = tmp_path / "dag.pt"
    body = b"\x80\x02}" + pickle.dumps(key, protocol=2)[2:-1] + b"K\x01s."
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", body)
        archive.writestr("archive/byteorder", b"little")
    with pytest.raises(LoaderError, match=r"expand to more than 20000000"):
        open_torch(path)
    # The shape of a real checkpoint is far inside the bounds, in both of torch's formats.
    legacy = tmp_path / "legacy.pt"
    torch.save(small_state_dict(), legacy, _use_new_zipfile_serialization=False)
    for good in (STATE_DICT, LIGHTNING, legacy):
        stream = open(good, "rb")  # noqa: SIM115 - closed below
        with stream:
            if good != legacy:
                with zipfile.ZipFile(stream) as archive:
                    name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
                    shape = torch_loader._pickle_shape(archive.open(name))  # type: ignore[arg-type]
            else:
                for _ in range(3):
                    torch_loader._pickle_shape(stream)
                shape = torch_loader._pickle_shape(stream)
        assert shape is not None
        assert shape[0] < 10_000 and shape[1] < 20, (good, shape)


def test_the_deadline_stops_torchs_unpickler_and_restores_the_timer(tmp_path: Path) -> None:
    import signal
    import time

    path = tmp_path / "long.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02](" + b"K\x01" * 3_000_000 + b"e.")
        archive.writestr("archive/byteorder", b"little")
        archive.writestr("archive/version", b"3\n")
    fired: list[int] = []

    def earlier(signum: int, frame: object) -> None:
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, earlier)
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        started = time.monotonic()
        with (
            pytest.raises(LoaderError, match=r"longer than 0.5 s, the deadline"),
            torch_loader.deadline(path, 0.5),
        ):
            torch.load(path, weights_only=True, mmap=True)  # several seconds without one
        assert time.monotonic() - started < 3
        assert signal.getsignal(signal.SIGALRM) is earlier
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 20 < left < 30
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert fired == []


def test_unexpected_exceptions_become_loader_errors() -> None:
    path = Path("x.pt")
    with (
        pytest.raises(LoaderError, match=r"^x\.pt: not enough memory to read"),
        torch_loader.reading_boundary(path),
    ):
        raise MemoryError
    with (
        pytest.raises(LoaderError, match=r"^x\.pt: holds objects nested too deeply"),
        torch_loader.reading_boundary(path),
    ):
        raise RecursionError
    with (
        pytest.raises(LoaderError, match=r"^x\.pt: not a readable PyTorch checkpoint \(KeyError"),
        torch_loader.reading_boundary(path),
    ):
        raise KeyError("storage")
