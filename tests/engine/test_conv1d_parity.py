"""`--conv1d weightwatcher`: weightwatcher 0.7.7's Conv1D numbers, exactly.

A Keras model and a PyTorch model with Conv1D layers of kernel sizes 3, 8, 9 and 12 (the last
with fewer input channels than its kernel) go through ``WeightWatcher(model).analyze()`` live;
the saved files go through wwcli's reader, ``weightwatcher_conv1d_spec`` for the size filter,
``weightwatcher_conv1d_matrices`` and ``analyze_layer_spectrum(weightwatcher_conv1d=True)``: the
plumbing `analysis.py` does under ``EngineOptions(conv1d="weightwatcher")``. Compared per
layer: which layers are analyzed (ids and names), N, M, rf, num_evals, alpha, D, xmin,
lambda_max. The default (pooled) treatment is checked to differ, so that the test can fail.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wwcli.engine import EngineOptions, LayerMetrics, analyze_layer_spectrum, check_size
from wwcli.loaders import open_checkpoint
from wwcli.loaders.interface import (
    Checkpoint,
    LayerSpec,
    LayerType,
    weightwatcher_conv1d,
    weightwatcher_conv1d_matrices,
    weightwatcher_conv1d_spec,
)

pytestmark = pytest.mark.filterwarnings("ignore::Warning")

weightwatcher = pytest.importorskip("weightwatcher")
torch = pytest.importorskip("torch")

KERNELS = ((16, 24, 3), (24, 20, 8), (20, 12, 9), (6, 10, 12))
"""(in channels, out channels, kernel size) of each Conv1D: a kernel under 8 (skipped by
weightwatcher), 8 (the smallest analyzed), 9, and 12 over 6 channels (M = 6: skipped)."""

OPTIONS = EngineOptions(conv1d="weightwatcher")


def _quietly(function: Any, *args: Any, **kwargs: Any) -> Any:
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


def _heavy(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    return (rng.standard_t(3, size=shape) / np.sqrt(shape[-1])).astype(np.float32)


def _ours(checkpoint: Checkpoint) -> dict[str, tuple[LayerSpec, LayerMetrics]]:
    """name -> (weightwatcher-sized spec, metrics) for every layer analyzed in weightwatcher
    mode, as analysis.py runs it."""
    analyzed = {}
    for listed in checkpoint.layers():
        spec = weightwatcher_conv1d_spec(listed)
        if spec.skip_reason is not None:
            continue
        if check_size(N=spec.N, M=spec.M, rf=spec.rf, options=OPTIONS) is not None:
            continue
        matrices = weightwatcher_conv1d_matrices(listed, checkpoint.matrices(listed))
        metrics, _ = analyze_layer_spectrum(
            matrices,
            conv2d_norm=listed.layer_type is LayerType.CONV2D,
            options=OPTIONS,
            weightwatcher_conv1d=weightwatcher_conv1d(listed),
        )
        analyzed[spec.name] = (spec, metrics)
    return analyzed


def _compare(rows: list[dict[str, Any]], ours: dict[str, tuple[LayerSpec, LayerMetrics]]) -> int:
    """Assert the same layers and numbers; returns the number of Conv1D layers compared."""
    assert sorted(ours) == sorted(row["name"] for row in rows)
    conv1d = 0
    for row in rows:
        spec, metrics = ours[row["name"]]
        assert (metrics.N, metrics.M, metrics.rf) == (row["N"], row["M"], row["rf"]), row["name"]
        assert (spec.N, spec.M, spec.rf) == (row["N"], row["M"], row["rf"]), row["name"]
        assert metrics.num_evals == row["num_evals"]
        assert metrics.lambda_max == pytest.approx(row["lambda_max"], rel=1e-12)
        assert metrics.fit.xmin == pytest.approx(row["xmin"], rel=1e-12)
        assert metrics.alpha == pytest.approx(row["alpha"], rel=1e-10)
        assert pytest.approx(row["D"], rel=1e-10, abs=1e-12) == metrics.fit.D
        assert metrics.fit.num_pl_spikes == row["num_pl_spikes"]
        assert metrics.matrix_rank == row["matrix_rank"]
        conv1d += spec.layer_type is LayerType.CONV1D
    return conv1d


def _keras_model() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keras = pytest.importorskip("keras")
    keras.utils.clear_session()
    keras.utils.set_random_seed(3)
    layers = [keras.Input((64, KERNELS[0][0]))]
    layers += [
        keras.layers.Conv1D(out, kernel, padding="same", name=f"conv{kernel}")
        for _, out, kernel in KERNELS[:3]
    ]
    layers += [keras.layers.Dense(KERNELS[3][0], name="narrow")]
    layers += [keras.layers.Conv1D(KERNELS[3][1], KERNELS[3][2], padding="same", name="conv12")]
    layers += [keras.layers.Flatten(), keras.layers.Dense(10, name="head")]
    model = keras.Sequential(layers)
    rng = np.random.default_rng(11)
    for layer in model.layers:
        weights = layer.get_weights()
        if weights:
            layer.set_weights([_heavy(rng, weights[0].shape), *weights[1:]])
    return model


def test_keras_conv1d_matches_weightwatcher(tmp_path: Path) -> None:
    model = _keras_model()
    path = tmp_path / "conv1d.keras"
    model.save(path)
    rows = _quietly(weightwatcher.WeightWatcher(model=model).analyze).to_dict("records")
    with open_checkpoint(path) as checkpoint:
        ours = _ours(checkpoint)
        ids = {spec.name: spec.layer_id for spec in checkpoint.layers()}
        pooled = {spec.name: spec.num_evals for spec in checkpoint.layers()}
    assert {row["name"]: row["layer_id"] for row in rows} == {name: ids[name] for name in ours}
    assert _compare(rows, ours) == 2  # conv8 and conv9; conv3 and conv12 (M = 6) skipped
    assert "conv3" not in ours and "conv12" not in ours
    assert pooled["conv3"] == 3 * 16  # pooled mode would analyze it
    assert pooled["conv9"] != ours["conv9"][1].num_evals


def _torch_model() -> Any:
    torch.manual_seed(5)
    rng = np.random.default_rng(12)
    layers = [torch.nn.Conv1d(fan_in, out, kernel) for fan_in, out, kernel in KERNELS]
    layers.append(torch.nn.Linear(40, 30))
    for layer in layers:
        layer.weight.data = torch.tensor(_heavy(rng, tuple(layer.weight.shape)))
    return torch.nn.Sequential(*layers)


def test_torch_conv1d_matches_weightwatcher(tmp_path: Path) -> None:
    model = _torch_model()
    rows = _quietly(weightwatcher.WeightWatcher(model=model).analyze).to_dict("records")
    for row in rows:
        row["name"] = row["longname"]
    state_dict = tmp_path / "conv1d.pt"
    torch.save(model.state_dict(), state_dict)
    with open_checkpoint(state_dict) as checkpoint:
        ours = _ours(checkpoint)
    assert _compare(rows, ours) == 2  # "1" (kernel 8) and "2" (kernel 9)
    assert sorted(ours) == ["1", "2", "4"]
    # torch's (out, in, k) kernel is cut along `out`: not the pooled slices' spectrum.
    spec, metrics = ours["2"]
    assert (spec.shape, metrics.num_evals) == ((12, 20, 9), 9)

    # A whole pickled module is numbered as weightwatcher numbers the live one.
    whole = tmp_path / "conv1d_module.pt"
    torch.save(model, whole)
    with open_checkpoint(whole, trust_pickle=True) as checkpoint:
        ours = _ours(checkpoint)
        ids = {spec.name: spec.layer_id for spec in checkpoint.layers()}
    assert _compare(rows, ours) == 2
    assert {row["name"]: row["layer_id"] for row in rows} == {name: ids[name] for name in ours}


def test_pooled_mode_is_unchanged_and_differs() -> None:
    """Without the flag a Conv1D is pooled (M * k eigenvalues); with it, top-M of the kernel
    cut along its first axis: the two disagree on the same kernel."""
    rng = np.random.default_rng(0)
    kernel = _heavy(rng, (12, 20, 9))  # torch layout (out, in, k)
    slices = [kernel[:, :, i] for i in range(9)]
    pooled, _ = analyze_layer_spectrum(slices)
    assert (pooled.N, pooled.M, pooled.rf, pooled.num_evals) == (20, 12, 9, 108)
    spec = LayerSpec(0, "c", LayerType.CONV1D, kernel.shape, N=20, M=12, rf=9, kernel_axis=2)
    matrices = weightwatcher_conv1d_matrices(spec, slices)
    assert len(matrices) == 12 and matrices[0].shape == (20, 9)
    ww, values = analyze_layer_spectrum(matrices, weightwatcher_conv1d=True)
    assert (ww.N, ww.M, ww.rf, ww.num_evals) == (20, 9, 1, 9)
    assert values is not None and values.size == 9
    everything = np.sort(
        np.concatenate([np.linalg.svd(m.astype(float), compute_uv=False) ** 2 for m in matrices])
    )
    np.testing.assert_allclose(values, everything[-9:], rtol=1e-12)
    assert ww.alpha != pooled.alpha
    sized = weightwatcher_conv1d_spec(spec)
    assert (sized.N, sized.M, sized.rf, sized.num_evals) == (20, 9, 1, 9)
    # A 2-D Conv1D (HF GPT-2's) and other layers are left alone.
    dense = LayerSpec(1, "d", LayerType.CONV1D, (30, 40), N=40, M=30)
    assert weightwatcher_conv1d_spec(dense) is dense
    assert not weightwatcher_conv1d(dense)


def test_the_command_line_gives_weightwatchers_conv1d_numbers(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wwcli.cli import app

    model = _keras_model()
    path = tmp_path / "conv1d.keras"
    model.save(path)
    rows = _quietly(weightwatcher.WeightWatcher(model=model).analyze).to_dict("records")
    result = CliRunner().invoke(
        app,
        ["analyze", str(path), "--conv1d", "weightwatcher", "-f", "json", "--exit-zero", "-q"],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["options"]["conv1d"] == "weightwatcher"
    ours = {layer["name"]: layer for layer in document["layers"]}
    assert sorted(ours) == sorted(row["name"] for row in rows)
    for row in rows:
        layer = ours[row["name"]]
        assert (layer["N"], layer["M"], layer["rf"], layer["num_evals"]) == (
            row["N"],
            row["M"],
            row["rf"],
            row["num_evals"],
        )
        assert layer["alpha"] == pytest.approx(row["alpha"], rel=1e-10)
        assert layer["lambda_max"] == pytest.approx(row["lambda_max"], rel=1e-12)
    described = CliRunner().invoke(
        app, ["describe", str(path), "--conv1d", "weightwatcher", "-f", "json"]
    )
    listed = {layer["name"]: layer for layer in json.loads(described.stdout)["layers"]}
    assert listed["conv3"]["analyzable"] is False  # a kernel under 8, as weightwatcher skips it
    assert listed["conv9"]["num_evals"] == ours["conv9"]["num_evals"]
