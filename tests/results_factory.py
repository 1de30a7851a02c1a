"""In-memory layers and results for tests that need no checkpoint and no engine run."""

from __future__ import annotations

import math

from wwcli.engine.results import FitStatus, LayerMetrics, PowerLawFit, Verdict
from wwcli.loaders.interface import LayerSpec, LayerType
from wwcli.results import CheckpointReport, LayerResult, SkippedLayer


def spec(
    layer_id: int,
    name: str,
    layer_type: LayerType = LayerType.DENSE,
    shape: tuple[int, ...] = (300, 100),
    skip_reason: str | None = None,
) -> LayerSpec:
    """A LayerSpec with N, M, rf derived from a dense or Keras-conv shape."""
    if layer_type is LayerType.CONV2D:
        kh, kw, fan_in, fan_out = shape
        n, m, rf = max(fan_in, fan_out), min(fan_in, fan_out), kh * kw
    elif len(shape) == 2:
        n, m, rf = max(shape), min(shape), 1
    else:
        n, m, rf = 0, 0, 1
    return LayerSpec(layer_id, name, layer_type, shape, "float32", n, m, rf, skip_reason)


def result(layer: LayerSpec, alpha: float, *, message: str = "") -> LayerResult:
    """A LayerResult with the given alpha (NaN: a failed fit) and fixed other numbers."""
    failed = math.isnan(alpha)
    fit = PowerLawFit(
        status=FitStatus.FAILED if failed else FitStatus.SUCCESS,
        alpha=alpha,
        xmin=math.nan if failed else 0.5,
        xmax=math.nan if failed else 4.0,
        D=math.nan if failed else 0.0625,
        sigma=math.nan if failed else 0.25,
        num_pl_spikes=-1 if failed else 12,
        message=message,
    )
    if failed:
        verdict, warning = Verdict.FAILED, ""
    elif alpha < 2:
        verdict, warning = Verdict.OVER_TRAINED, "over-trained"
    elif alpha > 6:
        verdict, warning = Verdict.UNDER_TRAINED, "under-trained"
    else:
        verdict, warning = Verdict.TYPICAL, ""
    metrics = LayerMetrics(
        N=layer.N,
        M=layer.M,
        rf=layer.rf,
        num_evals=layer.num_evals,
        fit=fit,
        lambda_max=4.0,
        norm=10.0,
        log_norm=1.0,
        log_spectral_norm=math.log10(4.0),
        alpha_weighted=math.nan if failed else alpha * math.log10(4.0),
        log_alpha_norm=math.nan if failed else 2.5,
        stable_rank=2.5,
        entropy=0.75,
        matrix_rank=layer.M,
        verdict=verdict,
        warning=warning,
    )
    return LayerResult(layer, metrics)


def report(
    results: list[LayerResult],
    skipped: list[SkippedLayer] | None = None,
    checkpoint: str = "model.keras",
) -> CheckpointReport:
    """A CheckpointReport of the given results."""
    return CheckpointReport(checkpoint, "keras", None, None, tuple(results), tuple(skipped or []))
