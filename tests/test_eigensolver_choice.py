"""Which CPU eigensolver a run uses: torch's (MKL) for large Grams when torch is installed and
worth its import, LAPACK otherwise; the same numbers either way, byte-identical whatever --jobs,
and torch's thread count restored after the run."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import wwcli.analysis as analysis
from wwcli.analysis import (
    TORCH_EIGH_ENV,
    TORCH_EIGH_MIN_ORDER,
    analyze_checkpoint,
    eigensolver_options,
)
from wwcli.engine import EngineOptions
from wwcli.loaders.interface import Checkpoint, LayerSpec, LayerType

REPO = Path(__file__).resolve().parents[1]
ORDER = TORCH_EIGH_MIN_ORDER + 20


def _dense(layer_id: int, rows: int, columns: int, rf: int = 1) -> LayerSpec:
    shape = (rows, columns)
    return LayerSpec(
        layer_id, f"dense{layer_id}", LayerType.DENSE, shape, "float32", rows, columns, rf
    )


class LargeCheckpoint(Checkpoint):
    """Dense layers of seeded heavy-tailed matrices whose Grams are of order ORDER."""

    def __init__(self, count: int) -> None:
        self.format = "test"
        self._specs = [_dense(i, ORDER + 30 * i, ORDER) for i in range(count)]

    def layers(self) -> list[LayerSpec]:
        return list(self._specs)

    def matrices(self, layer: LayerSpec) -> list[np.ndarray[Any, Any]]:
        rng = np.random.default_rng(layer.layer_id)
        return [rng.standard_t(2.5, size=layer.shape).astype(np.float32)]


def _torch() -> Any:
    return pytest.importorskip("torch")


def test_small_models_never_use_torch() -> None:
    specs = [_dense(i, 4096, TORCH_EIGH_MIN_ORDER - 1) for i in range(50)]
    assert eigensolver_options(specs, EngineOptions()) == EngineOptions()


def test_large_grams_use_torch_when_it_is_loaded() -> None:
    _torch()  # loaded: no import cost, so even one large Gram uses it
    options = eigensolver_options([_dense(0, ORDER, ORDER)], EngineOptions())
    assert options == dataclasses.replace(
        EngineOptions(), torch_eigh_min_order=TORCH_EIGH_MIN_ORDER
    )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"precision": "float32"}, "float32 stays with LAPACK"),
        ({"torch_eigh_min_order": 4096}, "the caller's choice is kept"),
    ],
)
def test_options_that_keep_lapack(change: dict[str, Any], reason: str) -> None:
    _torch()
    options = EngineOptions(**change)
    assert eigensolver_options([_dense(0, ORDER, ORDER)], options) == options, reason


def test_environment_variable_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    _torch()
    monkeypatch.setenv(TORCH_EIGH_ENV, "0")
    assert eigensolver_options([_dense(0, ORDER, ORDER)], EngineOptions()) == EngineOptions()


def test_torch_not_installed_or_blocked_keeps_lapack(monkeypatch: pytest.MonkeyPatch) -> None:
    huge = [_dense(i, 4096, 4096) for i in range(8)]  # far above TORCH_WORTH_CUBES
    monkeypatch.setitem(sys.modules, "torch", None)  # blocked: `import torch` would fail
    assert eigensolver_options(huge, EngineOptions()) == EngineOptions()
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(analysis.importlib.util, "find_spec", lambda name: None)
    assert eigensolver_options(huge, EngineOptions()) == EngineOptions()


def test_the_import_is_paid_only_when_worth_it() -> None:
    # In a fresh process (torch not loaded): conv slices count one by one, so the same kernel
    # shape is not worth the import with 3 positions and is with 4.
    code = (
        "import sys;"
        "from wwcli.analysis import eigensolver_options, TORCH_WORTH_CUBES;"
        "from wwcli.engine import EngineOptions;"
        "from wwcli.loaders.interface import LayerSpec, LayerType;"
        "n = int((TORCH_WORTH_CUBES / 4) ** (1 / 3)) + 1;"
        "assert 4 * n**3 >= TORCH_WORTH_CUBES > 3 * n**3;"
        "conv = lambda rf: [LayerSpec(0, 'c', LayerType.CONV2D, (n, n, 1, rf), 'float32', n, n,"
        " rf)];"
        "three = eigensolver_options(conv(3), EngineOptions());"
        "print(three.torch_eigh_min_order, 'torch' in sys.modules);"
        "four = eigensolver_options(conv(4), EngineOptions());"
        "print(four.torch_eigh_min_order, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert out.split() == ["None", "False", str(TORCH_EIGH_MIN_ORDER), "True"]


def test_same_numbers_as_lapack_and_the_same_bytes_whatever_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch = _torch()
    threads_before = torch.get_num_threads()
    runs = {}
    for jobs in (1, 2):
        runs[jobs] = analyze_checkpoint(
            LargeCheckpoint(3),
            LargeCheckpoint(3).layers(),
            label="x",
            options=EngineOptions(),
            jobs=jobs,
        )
        assert torch.get_num_threads() == threads_before
    assert runs[1] == runs[2]
    monkeypatch.setenv(TORCH_EIGH_ENV, "0")
    lapack = analyze_checkpoint(
        LargeCheckpoint(3), LargeCheckpoint(3).layers(), label="x", options=EngineOptions()
    )
    for with_torch, without in zip(runs[1].layers, lapack.layers, strict=True):
        ours, theirs = with_torch.metrics, without.metrics
        assert ours.M == theirs.M == with_torch.spec.M
        assert ours.fit.num_pl_spikes == theirs.fit.num_pl_spikes
        assert ours.fit.xmin == pytest.approx(theirs.fit.xmin, rel=1e-12)
        assert ours.alpha == pytest.approx(theirs.alpha, rel=1e-10)
        assert ours.lambda_max == pytest.approx(theirs.lambda_max, rel=1e-12)


def test_torch_solver_is_the_one_called(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = _torch()
    calls: list[int] = []
    real = torch.linalg.eigvalsh

    def counting(matrix: Any) -> Any:
        calls.append(int(matrix.shape[-1]))
        return real(matrix)

    monkeypatch.setattr(torch.linalg, "eigvalsh", counting)
    analyze_checkpoint(
        LargeCheckpoint(2), LargeCheckpoint(2).layers(), label="x", options=EngineOptions()
    )
    assert calls == [ORDER, ORDER]
