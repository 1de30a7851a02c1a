"""Weight matrices wwcli did not list before: recurrent weights (PyTorch `weight_ih_l0`,
`weight_hh_l0`, `_reverse`, `weight_hr_l0`; Keras LSTM/GRU `kernel` and `recurrent_kernel`,
Bidirectional) read one matrix per gate block, and the pointwise kernel of SeparableConv2D.

weightwatcher 0.7.7 analyzes none of the recurrent weights (a state dict's keys must end in
`.weight`; a Keras LSTM is an UNKNOWN layer), so the extra layers get ids after every id
weightwatcher gives, and every layer it does analyze keeps its id, name, sizes and alpha.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from wwcli.analysis import analyze_path
from wwcli.loaders._statedict import StateDictCheckpoint, TensorEntry, recurrent_gates
from wwcli.loaders.interface import LayerType
from wwcli.loaders.keras import open_keras
from wwcli.loaders.safetensors import open_safetensors
from wwcli.results import CheckpointReport
from wwcli.settings import RunSettings

REPO = Path(__file__).resolve().parents[2]
STATE_DICT = REPO / "fixtures" / "formats" / "cnn_lstm.safetensors"
KERAS = REPO / "fixtures" / "keras" / "recurrent_separable.keras"

pytestmark = pytest.mark.filterwarnings("ignore::Warning")


def test_gate_blocks_from_the_shapes() -> None:
    shapes = {
        "lstm.weight_ih_l0": (4 * 32, 16),
        "lstm.weight_hh_l0": (4 * 32, 32),
        "lstm.weight_ih_l1": (4 * 32, 32),
        "lstm.weight_hh_l1": (4 * 32, 32),
        "gru.weight_ih_l0_reverse": (3 * 24, 32),
        "gru.weight_hh_l0_reverse": (3 * 24, 24),
        "rnn.weight_ih_l0": (20, 7),
        "rnn.weight_hh_l0": (20, 20),
        # An LSTM with proj_size=4: weight_hh is (4H, P), weight_hr (P, H).
        "proj.weight_ih_l0": (4 * 16, 8),
        "proj.weight_hh_l0": (4 * 16, 4),
        "proj.weight_hr_l0": (4, 16),
        # Shapes that fit no recurrent layer are left alone.
        "odd.weight_ih_l0": (10, 3),
        "odd.weight_hh_l0": (10, 5),
        "orphan.weight_ih_l0": (8, 8),
        "fc.weight": (4, 4),
    }
    assert recurrent_gates(shapes) == {
        "lstm.weight_ih_l0": 4,
        "lstm.weight_hh_l0": 4,
        "lstm.weight_ih_l1": 4,
        "lstm.weight_hh_l1": 4,
        "gru.weight_ih_l0_reverse": 3,
        "gru.weight_hh_l0_reverse": 3,
        "rnn.weight_ih_l0": 1,
        "rnn.weight_hh_l0": 1,
        "proj.weight_ih_l0": 4,
        "proj.weight_hh_l0": 4,
        "proj.weight_hr_l0": 1,
    }


def _checkpoint(tensors: dict[str, np.ndarray]) -> StateDictCheckpoint:
    entries = [
        (TensorEntry(key, value.shape, "float32"), lambda key, t=tensors: t[key])
        for key, value in tensors.items()
    ]
    return StateDictCheckpoint(Path("model.safetensors"), "safetensors", entries)


def test_state_dict_ids_of_weight_tensors_do_not_move() -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "lstm.weight_ih_l0": rng.standard_normal((128, 16)),
        "lstm.weight_hh_l0": rng.standard_normal((128, 32)),
        "lstm.bias_ih_l0": rng.standard_normal(128),
        "fc.weight": rng.standard_normal((10, 32)),
        "fc.bias": rng.standard_normal(10),
        "head.weight": rng.standard_normal((3, 10)),
    }
    checkpoint = _checkpoint(tensors)
    layers = checkpoint.layers()
    assert [(layer.layer_id, layer.name) for layer in layers] == [
        (0, "fc"),
        (1, "head"),
        (2, "lstm.weight_ih_l0"),
        (3, "lstm.weight_hh_l0"),
    ]
    assert checkpoint.ids_note is not None and "recurrent weights" in checkpoint.ids_note
    ih = layers[2]
    assert (ih.layer_type, ih.N, ih.M, ih.rf) == (LayerType.DENSE, 32, 16, 4)
    blocks = checkpoint.matrices(ih)
    for block, expected in zip(
        blocks, np.split(tensors["lstm.weight_ih_l0"], 4, axis=0), strict=True
    ):
        np.testing.assert_array_equal(block, expected)


def test_state_dict_of_recurrent_weights_only() -> None:
    """No key ends in `.weight`: every tensor is numbered in file order, as before, and the
    recurrent ones are read per gate."""
    rng = np.random.default_rng(1)
    checkpoint = _checkpoint(
        {
            "weight_ih_l0": rng.standard_normal((72, 8)),
            "weight_hh_l0": rng.standard_normal((72, 24)),
        }
    )
    assert [(layer.name, layer.rf, layer.N, layer.M) for layer in checkpoint.layers()] == [
        ("weight_ih_l0", 3, 24, 8),
        ("weight_hh_l0", 3, 24, 24),
    ]


def test_torch_lstm_with_projection(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(8, 16, proj_size=4, bidirectional=True)
    path = tmp_path / "lstm.safetensors"
    state = {f"lstm.{key}": value.contiguous() for key, value in lstm.state_dict().items()}
    save_file(state, str(path))
    with open_safetensors(path) as checkpoint:
        layers = {layer.name: layer for layer in checkpoint.layers()}
        assert (layers["lstm.weight_ih_l0"].rf, layers["lstm.weight_ih_l0"].M) == (4, 8)
        assert (layers["lstm.weight_hh_l0_reverse"].rf, layers["lstm.weight_hh_l0_reverse"].M) == (
            4,
            4,
        )
        assert layers["lstm.weight_hr_l0"].rf == 1
        blocks = checkpoint.matrices(layers["lstm.weight_ih_l0"])
        for block, gate in zip(blocks, state["lstm.weight_ih_l0"].chunk(4, 0), strict=True):
            np.testing.assert_array_equal(block, gate.numpy())


def test_safetensors_fixture_lists_every_recurrent_weight() -> None:
    with open_safetensors(STATE_DICT) as checkpoint:
        layers = checkpoint.layers()
    assert [layer.name for layer in layers[:5]] == ["conv", "conv1", "emb", "fc", "fc2"]
    recurrent = {layer.name: (layer.rf, layer.N, layer.M) for layer in layers[5:]}
    assert recurrent == {
        "lstm.weight_ih_l0": (4, 32, 16),
        "lstm.weight_hh_l0": (4, 32, 32),
        "gru.weight_ih_l0": (3, 32, 24),
        "gru.weight_hh_l0": (3, 24, 24),
        "gru.weight_ih_l0_reverse": (3, 32, 24),
        "gru.weight_hh_l0_reverse": (3, 24, 24),
    }


# --- Keras ---------------------------------------------------------------------------------------

KERAS_LAYERS = [
    # (id, name, type, N, M, rf)
    (2, "embedding", LayerType.EMBEDDING, 40, 16, 1),
    (3, "separable_conv2d", LayerType.CONV2D, 4, 3, 9),
    (4, "lstm", LayerType.DENSE, 24, 16, 4),
    (5, "depthwise_conv2d", LayerType.CONV2D, 16, 1, 9),
    (6, "gru", LayerType.DENSE, 24, 20, 3),
    (8, "bidirectional", LayerType.DENSE, 20, 12, 4),
    (10, "dense", LayerType.DENSE, 40, 10, 1),
    (11, "separable_conv2d/pointwise_kernel", LayerType.CONV2D, 16, 12, 1),
    (12, "lstm/recurrent_kernel", LayerType.DENSE, 24, 24, 4),
    (13, "gru/recurrent_kernel", LayerType.DENSE, 20, 20, 3),
    (14, "bidirectional/forward/recurrent_kernel", LayerType.DENSE, 12, 12, 4),
    (15, "bidirectional/backward/kernel", LayerType.DENSE, 20, 12, 4),
    (16, "bidirectional/backward/recurrent_kernel", LayerType.DENSE, 12, 12, 4),
]


def test_keras_lists_every_kernel() -> None:
    with open_keras(KERAS) as checkpoint:
        layers = checkpoint.layers()
    assert len(layers) == 17
    listed = [
        (layer.layer_id, layer.name, layer.layer_type, layer.N, layer.M, layer.rf)
        for layer in layers
        if layer.layer_type is not LayerType.OTHER
    ]
    assert listed == KERAS_LAYERS


def test_keras_recurrent_matrices_are_the_gate_blocks() -> None:
    with zipfile.ZipFile(KERAS) as archive:
        weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")))
        kernels = {
            "lstm": weights["layers/lstm/cell/vars/0"][()],
            "lstm/recurrent_kernel": weights["layers/lstm/cell/vars/1"][()],
            "gru": weights["layers/gru/cell/vars/0"][()],
            "bidirectional/backward/kernel": weights[
                "layers/bidirectional/backward_layer/cell/vars/0"
            ][()],
            "separable_conv2d/pointwise_kernel": weights["layers/separable_conv2d/vars/1"][()],
        }
    with open_keras(KERAS) as checkpoint:
        layers = {layer.name: layer for layer in checkpoint.layers()}
        for name in ("lstm", "lstm/recurrent_kernel", "gru", "bidirectional/backward/kernel"):
            layer = layers[name]
            expected = np.split(kernels[name], layer.rf, axis=1)
            for ours, theirs in zip(checkpoint.matrices(layer), expected, strict=True):
                np.testing.assert_array_equal(ours, theirs)
        (pointwise,) = checkpoint.matrices(layers["separable_conv2d/pointwise_kernel"])
        np.testing.assert_array_equal(pointwise, kernels["separable_conv2d/pointwise_kernel"][0, 0])


def _quietly(function: Any, *args: Any, **kwargs: Any) -> Any:
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


def _report(path: Path) -> CheckpointReport:
    report = analyze_path(path, RunSettings())
    assert isinstance(report, CheckpointReport)
    return report


def test_keras_layers_weightwatcher_analyzes_keep_its_ids_and_alphas(tmp_path: Path) -> None:
    """weightwatcher 0.7.7 on keras.models.load_model of the fixture: the layers it analyzes
    (Embedding, SeparableConv2D's depthwise kernel, DepthwiseConv2D, Dense) have its ids, sizes
    and alphas; its LSTM, GRU and Bidirectional layers are UNKNOWN there. The same model saved
    as a legacy .h5 lists the same layers."""
    weightwatcher = pytest.importorskip("weightwatcher")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keras = pytest.importorskip("keras")
    model = keras.models.load_model(KERAS)
    details = _quietly(weightwatcher.WeightWatcher(model=model).analyze, min_evals=1)
    theirs = {
        int(row["layer_id"]): (row["name"], int(row["N"]), int(row["M"]), row["alpha"])
        for row in details.to_dict("records")
    }
    report = _report(KERAS)
    ours = {result.spec.layer_id: result for result in report.layers}
    assert set(theirs) == {2, 3, 5, 10}
    for layer_id, (name, _, _, alpha) in theirs.items():
        result = ours[layer_id]
        assert result.spec.name == name
        assert result.metrics.alpha == pytest.approx(alpha, rel=1e-10), name
    legacy = tmp_path / "recurrent_separable.h5"
    model.save(legacy)
    with open_keras(KERAS) as new, open_keras(legacy) as old:
        assert [(s.layer_id, s.name, s.shape, s.rf) for s in new.layers()] == [
            (s.layer_id, s.name, s.shape, s.rf) for s in old.layers()
        ]
