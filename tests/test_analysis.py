"""analyze_checkpoint: results in id order and identical whatever `jobs` is, at most jobs + 1
layers' matrices read ahead of the results (one with jobs 1), and an unusable backend refused
before any read."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from wwcli.analysis import analyze_checkpoint
from wwcli.engine import EngineOptions
from wwcli.loaders.interface import Checkpoint, LayerSpec, LayerType


class CountingCheckpoint(Checkpoint):
    """Dense layers of seeded random matrices (every third one a norm scale, never read);
    counts the reads and the reads not yet reported back."""

    def __init__(self, count: int) -> None:
        self.format = "test"
        self._specs = []
        for layer_id in range(count):
            if layer_id % 3 == 2:
                spec = LayerSpec(
                    layer_id, f"norm{layer_id}", LayerType.NORM, (40,), skip_reason="norm"
                )
            else:
                rows = 60 + 10 * (layer_id % 4)
                spec = LayerSpec(
                    layer_id, f"dense{layer_id}", LayerType.DENSE, (rows, 30), "float32", rows, 30
                )
            self._specs.append(spec)
        self.reads = 0
        self.reported = 0
        self.most_ahead = 0
        self._lock = threading.Lock()

    def layers(self) -> list[LayerSpec]:
        return list(self._specs)

    def matrices(self, layer: LayerSpec) -> list[np.ndarray]:
        assert layer.analyzable
        with self._lock:
            self.reads += 1
            self.most_ahead = max(self.most_ahead, self.reads - self.reported)
        rng = np.random.default_rng(layer.layer_id)
        return [rng.standard_t(3.0, size=layer.shape).astype(np.float32)]

    def on_layer(self, spec: LayerSpec) -> None:
        if spec.analyzable:
            with self._lock:
                self.reported += 1


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_results_are_the_same_and_in_order_whatever_jobs(jobs: int) -> None:
    reference_checkpoint = CountingCheckpoint(14)
    reference = analyze_checkpoint(
        reference_checkpoint, reference_checkpoint.layers(), label="x", options=EngineOptions()
    )
    checkpoint = CountingCheckpoint(14)
    report = analyze_checkpoint(
        checkpoint,
        checkpoint.layers(),
        label="x",
        options=EngineOptions(),
        jobs=jobs,
        on_layer=checkpoint.on_layer,
    )
    assert report == reference
    assert [r.spec.layer_id for r in report.layers] == [i for i in range(14) if i % 3 != 2]
    assert [s.layer_id for s in report.skipped] == [i for i in range(14) if i % 3 == 2]
    # Each layer's tensor is read once, and never more than jobs + 1 ahead of the results.
    assert checkpoint.reads == len(report.layers)
    assert 1 <= checkpoint.most_ahead <= (1 if jobs == 1 else jobs + 1)


def test_one_layer_runs_without_a_pool() -> None:
    checkpoint = CountingCheckpoint(1)
    report = analyze_checkpoint(
        checkpoint, checkpoint.layers(), label="x", options=EngineOptions(), jobs=4
    )
    assert len(report.layers) == 1


def test_unusable_backend_is_refused_before_any_read() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    checkpoint = CountingCheckpoint(5)
    options = EngineOptions(backend="torch", device="cuda")
    with pytest.raises(ValueError, match=r"is_available\(\) is False"):
        analyze_checkpoint(checkpoint, checkpoint.layers(), label="x", options=options, jobs=2)
    assert checkpoint.reads == 0


def test_jobs_must_be_positive() -> None:
    checkpoint = CountingCheckpoint(2)
    with pytest.raises(ValueError, match="jobs"):
        analyze_checkpoint(checkpoint, [], label="x", options=EngineOptions(), jobs=0)
