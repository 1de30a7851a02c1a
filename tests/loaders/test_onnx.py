"""Tests of the ONNX reader (`wwcli.loaders.onnx`), in this process and in the helper process.

The fixtures are `torch.onnx.export` of a small CNN + LSTM + GRU
(`fixtures/make_format_fixtures.py`), embedded and with external data. Initializers must equal
`onnx.numpy_helper.to_array`; ids are weightwatcher's (the initializer's index); the matrices of
the layers weightwatcher analyzes on the torch model behind the export give its alphas.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from wwcli.analysis import analyze_path
from wwcli.loaders import isolated
from wwcli.loaders.detect import open_checkpoint
from wwcli.loaders.interface import LayerType, LoaderError
from wwcli.loaders.onnx import open_onnx
from wwcli.results import CheckpointReport
from wwcli.settings import RunSettings

onnx = pytest.importorskip("onnx")

REPO = Path(__file__).resolve().parents[2]
FORMATS = REPO / "fixtures" / "formats"
EMBEDDED = FORMATS / "cnn_lstm.onnx"
EXTERNAL = FORMATS / "external" / "cnn_lstm.onnx"
STATE_DICT = FORMATS / "cnn_lstm.safetensors"

pytestmark = pytest.mark.filterwarnings("ignore::Warning")


def _fixture_maker() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_format_fixtures", REPO / "fixtures" / "make_format_fixtures.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _state_dict() -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(STATE_DICT)))


EXPECTED = {
    # name: (id, type, N, M, rf)
    "conv": (0, LayerType.CONV2D, 8, 1, 9),
    "conv1": (2, LayerType.CONV1D, 16, 8, 3),
    "emb": (4, LayerType.EMBEDDING, 50, 16, 1),
    "fc": (5, LayerType.DENSE, 48, 20, 1),
    "lstm.W": (7, LayerType.DENSE, 32, 16, 4),
    "lstm.R": (8, LayerType.DENSE, 32, 32, 4),
    "gru.W": (11, LayerType.DENSE, 32, 24, 6),
    "gru.R": (12, LayerType.DENSE, 24, 24, 6),
    "fc2": (13, LayerType.DENSE, 20, 10, 1),
}


@pytest.mark.parametrize("path", [EMBEDDED, EXTERNAL], ids=["embedded", "external"])
def test_layers_are_typed_by_the_consuming_op(path: Path) -> None:
    with open_onnx(path) as checkpoint:
        layers = checkpoint.layers()
    proto = onnx.load(str(path), load_external_data=False)
    assert [layer.layer_id for layer in layers] == list(range(len(proto.graph.initializer)))
    analyzable = {layer.name: layer for layer in layers if layer.analyzable}
    assert set(analyzable) == set(EXPECTED)
    for name, (layer_id, layer_type, N, M, rf) in EXPECTED.items():
        layer = analyzable[name]
        assert (layer.layer_id, layer.layer_type, layer.N, layer.M, layer.rf) == (
            layer_id,
            layer_type,
            N,
            M,
            rf,
        ), name
        assert layer.dtype == "float32"
    biases = [layer for layer in layers if not layer.analyzable]
    assert all(layer.skip_reason and "bias" in layer.skip_reason for layer in biases)
    assert {layer.name for layer in biases} == {
        "conv.bias",
        "conv1.bias",
        "fc.bias",
        "lstm.B",
        "gru.B",
    }


@pytest.mark.parametrize("path", [EMBEDDED, EXTERNAL], ids=["embedded", "external"])
def test_initializers_equal_numpy_helper(path: Path) -> None:
    from onnx import numpy_helper

    proto = onnx.load(str(path))  # onnx's own loader, external data included
    with open_onnx(path) as checkpoint:
        for layer in checkpoint.layers():
            ours = checkpoint.tensor(layer.layer_id)  # type: ignore[attr-defined]
            theirs = numpy_helper.to_array(proto.graph.initializer[layer.layer_id])
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            assert np.array_equal(ours, theirs), layer.name


def test_matrices_are_oriented_as_the_torch_weights() -> None:
    state = _state_dict()
    with open_onnx(EMBEDDED) as checkpoint:
        layers = {layer.name: layer for layer in checkpoint.layers()}
        # Gemm with transB=1 stores fc as (out, in); MatMul stores fc2 as (in, out).
        assert checkpoint.layers()[13].shape == (20, 10)
        for name in ("fc", "fc2", "emb"):
            (matrix,) = checkpoint.matrices(layers[name])
            np.testing.assert_array_equal(matrix, state[f"{name}.weight"])
        conv = checkpoint.matrices(layers["conv"])
        weight = state["conv.weight"]
        expected = [weight[:, :, i, j] for i in range(3) for j in range(3)]
        assert all(np.array_equal(a, b) for a, b in zip(conv, expected, strict=True))
        # LSTM W: ONNX gate order i, o, f, c; torch's i, f, g, o: the same four blocks.
        blocks = checkpoint.matrices(layers["lstm.W"])
        torch_blocks = np.split(state["lstm.weight_ih_l0"], 4, axis=0)
        assert sorted(block.tobytes() for block in blocks) == sorted(
            block.tobytes() for block in torch_blocks
        )
        # A bidirectional GRU: both directions' 3 gate blocks, forward first.
        gru = checkpoint.matrices(layers["gru.W"])
        assert len(gru) == 6
        for direction, key in enumerate(("gru.weight_ih_l0", "gru.weight_ih_l0_reverse")):
            ours = sorted(block.tobytes() for block in gru[3 * direction : 3 * direction + 3])
            theirs = sorted(block.tobytes() for block in np.split(state[key], 3, axis=0))
            assert ours == theirs


def test_helper_process_reads_the_same() -> None:
    if isolated.in_process():
        pytest.skip("ONNX is read in this process here")
    with open_onnx(EXTERNAL) as local, open_checkpoint(EXTERNAL) as remote:
        assert isinstance(remote, isolated.IsolatedCheckpoint)
        assert isolated.helper_pid() is not None
        assert remote.format == "onnx"
        assert remote.layers() == local.layers()
        for layer in local.layers():
            if layer.analyzable:
                for ours, theirs in zip(remote.matrices(layer), local.matrices(layer), strict=True):
                    np.testing.assert_array_equal(ours, theirs)


def _quietly(function: Any, *args: Any, **kwargs: Any) -> Any:
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


def _alphas(path: Path) -> dict[str, float]:
    report = analyze_path(path, RunSettings())
    assert isinstance(report, CheckpointReport)
    return {result.spec.name: result.metrics.alpha for result in report.layers}


def test_alphas_equal_weightwatcher_on_the_exported_torch_model() -> None:
    weightwatcher = pytest.importorskip("weightwatcher")
    torch = pytest.importorskip("torch")
    model = _fixture_maker().cnn_lstm()
    model.load_state_dict({key: torch.tensor(value) for key, value in _state_dict().items()})
    details = _quietly(weightwatcher.WeightWatcher(model=model).analyze)
    theirs = {row["longname"]: row["alpha"] for row in details.to_dict("records")}
    ours = _alphas(EXTERNAL)
    # conv1 is a Conv1d: wwcli pools its kernel positions (REFERENCE.md), weightwatcher does not.
    compared = {"conv", "emb", "fc", "fc2"}
    assert compared <= set(theirs) and compared <= set(ours)
    for name in compared:
        assert ours[name] == pytest.approx(theirs[name], rel=1e-10), name


def test_ids_sizes_and_alphas_equal_weightwatcher_on_the_onnx_model() -> None:
    """weightwatcher 0.7.7 reads an ONNX ModelProto itself (ONNXLayer: initializer index, rank
    2 dense, rank 4 conv2d): where both analyze a layer, the id, N, M, rf and alpha agree. It
    also takes the LSTM's and GRU's 2-D biases for dense layers (1 and 2 eigenvalues, never
    analyzed); wwcli lists them as biases."""
    weightwatcher = pytest.importorskip("weightwatcher")
    model = onnx.load(str(EMBEDDED))
    details = _quietly(weightwatcher.WeightWatcher(model=model).analyze)
    theirs = {int(row["layer_id"]): row for row in details.to_dict("records")}
    report = analyze_path(EMBEDDED, RunSettings())
    assert isinstance(report, CheckpointReport)
    ours = {result.spec.layer_id: result for result in report.layers}
    shared = set(theirs) & set(ours)
    assert shared == {0, 4, 5, 13}
    for layer_id in shared:
        row, result = theirs[layer_id], ours[layer_id]
        assert (int(row["N"]), int(row["M"]), int(row["rf"])) == (
            result.spec.N,
            result.spec.M,
            result.spec.rf,
        )
        assert result.metrics.alpha == pytest.approx(row["alpha"], rel=1e-10), layer_id


def test_recurrent_alphas_equal_the_state_dict_ones() -> None:
    """One matrix per gate block: the same pooled spectrum from ONNX's W and torch's weight_ih
    (gates in another order), for the unidirectional LSTM."""
    ours = _alphas(EMBEDDED)
    state_dict = _alphas(STATE_DICT)
    assert ours["lstm.W"] == pytest.approx(state_dict["lstm.weight_ih_l0"], rel=1e-10)
    assert ours["lstm.R"] == pytest.approx(state_dict["lstm.weight_hh_l0"], rel=1e-10)


# --- External data that is not where it may be --------------------------------------------------


def _with_location(
    target: Path, edit: dict[str, str], *, copy_data: bool = True, initializer: int = 0
) -> Path:
    """The external fixture copied into `target`, one initializer's external_data entries
    changed."""
    target.mkdir(parents=True, exist_ok=True)
    if copy_data:
        shutil.copy(EXTERNAL.with_name("cnn_lstm.onnx.data"), target / "cnn_lstm.onnx.data")
    proto = onnx.load(str(EXTERNAL), load_external_data=False)
    entries = proto.graph.initializer[initializer].external_data
    for key, value in edit.items():
        for entry in entries:
            if entry.key == key:
                entry.value = value
                break
        else:
            entries.add(key=key, value=value)
    model = target / "model.onnx"
    model.write_bytes(proto.SerializeToString())
    return model


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        ({"location": "/etc/passwd"}, r"'/etc/passwd', outside the model's folder"),
        ({"location": "../secret.data"}, r"'\.\./secret\.data', outside the model's folder"),
        ({"location": "sub/../../secret.data"}, r"outside the model's folder"),
        ({"location": "missing.data"}, r"external data file 'missing\.data' is missing"),
        ({"offset": "999999999"}, r"beyond its \d+ bytes"),
        ({"length": "4"}, r"external length 4 but its shape \[8, 1, 3, 3\] needs 288 bytes"),
        ({"offset": "-1"}, r"external offset '-1', not a byte count"),
        ({"offset": "9" * 30}, r"not a byte count"),
    ],
)
def test_external_data_outside_bounds_is_refused(
    tmp_path: Path, edit: dict[str, str], problem: str
) -> None:
    (tmp_path / "secret.data").write_bytes(b"\0" * 4096)
    model = _with_location(tmp_path / "model", edit)
    with pytest.raises(LoaderError, match=problem):
        open_onnx(model)


def test_external_data_through_a_link_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.data"
    shutil.copy(EXTERNAL.with_name("cnn_lstm.onnx.data"), outside)
    model = _with_location(tmp_path / "model", {}, copy_data=False)
    os.symlink(outside, tmp_path / "model" / "cnn_lstm.onnx.data")
    with pytest.raises(LoaderError, match=r"is a link to .*outside.data, outside the model's"):
        open_onnx(model)


def test_external_data_through_a_link_inside_the_folder_is_read(tmp_path: Path) -> None:
    model = _with_location(tmp_path / "model", {"location": "weights.data"})
    os.symlink("cnn_lstm.onnx.data", tmp_path / "model" / "weights.data")
    with open_onnx(model) as checkpoint:
        np.testing.assert_array_equal(
            checkpoint.matrices(checkpoint.layers()[0])[0], _state_dict()["conv.weight"][:, :, 0, 0]
        )


def test_damaged_protobuf_is_one_loader_error(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(EMBEDDED.read_bytes()[:5000])
    with pytest.raises(LoaderError, match=r"not a readable ONNX model"):
        open_onnx(damaged)
    with pytest.raises(LoaderError, match=r"damaged\.onnx"):
        open_checkpoint(damaged).layers()


def test_without_onnx_the_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(LoaderError, match=r"an ONNX model: install wwcli\[onnx\]"):
        open_onnx(EMBEDDED)


def test_a_dead_helper_is_an_onnx_parser_crash_not_an_hdf5_one() -> None:
    """The helper killed under the reader: the error names the ONNX parser, and the next file
    gets a fresh helper."""
    import signal

    if isolated.in_process():
        pytest.skip("ONNX is read in this process here")
    checkpoint = open_checkpoint(EMBEDDED)
    pid = isolated.helper_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(LoaderError, match=r"ONNX parser crashed \(SIGKILL\) while reading layer 0"):
        checkpoint.matrices(checkpoint.layers()[0])
    checkpoint.close()
    with open_checkpoint(EMBEDDED) as again:
        assert again.matrices(again.layers()[0])
        assert isolated.helper_pid() not in (None, pid)
