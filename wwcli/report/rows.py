"""Flat rows for CSV and JSON: weightwatcher's column names, one row per layer."""

from __future__ import annotations

import math
from typing import Any

from wwcli.analysis import CheckpointReport, LayerResult, skip_reason
from wwcli.engine import EngineOptions
from wwcli.loaders.interface import LayerSpec

Value = str | int | float | bool | None
Row = dict[str, Value]

ANALYZE_COLUMNS: tuple[str, ...] = (
    "checkpoint",
    "layer_id",
    "name",
    "layer_type",
    "N",
    "M",
    "rf",
    "num_evals",
    "alpha",
    "D",
    "sigma",
    "xmin",
    "xmax",
    "num_pl_spikes",
    "lambda_max",
    "spectral_norm",
    "norm",
    "log_norm",
    "log_spectral_norm",
    "alpha_weighted",
    "log_alpha_norm",
    "stable_rank",
    "entropy",
    "matrix_rank",
    "status",
    "warning",
    "verdict",
    "message",
)
"""Columns of an analyze row, in order. Keys are only ever added, never renamed."""

DESCRIBE_COLUMNS: tuple[str, ...] = (
    "checkpoint",
    "layer_id",
    "name",
    "layer_type",
    "shape",
    "dtype",
    "N",
    "M",
    "rf",
    "num_evals",
    "analyzable",
    "reason",
)
"""Columns of a describe row, in order."""


def finite_or_none(value: float) -> float | None:
    """The float itself, or None for NaN and infinities (JSON null, empty CSV cell)."""
    return value if math.isfinite(value) else None


def shape_text(shape: tuple[int, ...]) -> str:
    """A tensor shape as people write it: 784x300, or "-" for none."""
    return "x".join(str(size) for size in shape) if shape else "-"


def layer_row(checkpoint: str, result: LayerResult) -> Row:
    """One analyzed layer as a row of ANALYZE_COLUMNS."""
    spec, metrics = result.spec, result.metrics
    fit = metrics.fit
    values: dict[str, Any] = {
        "checkpoint": checkpoint,
        "layer_id": spec.layer_id,
        "name": spec.name,
        "layer_type": spec.layer_type.value,
        "N": metrics.N,
        "M": metrics.M,
        "rf": metrics.rf,
        "num_evals": metrics.num_evals,
        "alpha": fit.alpha,
        "D": fit.D,
        "sigma": fit.sigma,
        "xmin": fit.xmin,
        "xmax": fit.xmax,
        "num_pl_spikes": fit.num_pl_spikes if fit.num_pl_spikes >= 0 else None,
        "lambda_max": metrics.lambda_max,
        "spectral_norm": metrics.spectral_norm,
        "norm": metrics.norm,
        "log_norm": metrics.log_norm,
        "log_spectral_norm": metrics.log_spectral_norm,
        "alpha_weighted": metrics.alpha_weighted,
        "log_alpha_norm": metrics.log_alpha_norm,
        "stable_rank": metrics.stable_rank,
        "entropy": metrics.entropy,
        "matrix_rank": metrics.matrix_rank,
        "status": fit.status.value,
        "warning": metrics.warning,
        "verdict": metrics.verdict.value,
        "message": fit.message,
    }
    return {
        column: finite_or_none(float(values[column]))
        if isinstance(values[column], float)
        else values[column]
        for column in ANALYZE_COLUMNS
    }


def analyze_rows(report: CheckpointReport) -> list[Row]:
    """Every analyzed layer of a report, as rows."""
    return [layer_row(report.checkpoint, result) for result in report.layers]


def describe_row(checkpoint: str, spec: LayerSpec, options: EngineOptions) -> Row:
    """One listed layer as a row of DESCRIBE_COLUMNS; `reason` says why analyze would skip it."""
    reason = skip_reason(spec, options)
    return {
        "checkpoint": checkpoint,
        "layer_id": spec.layer_id,
        "name": spec.name,
        "layer_type": spec.layer_type.value,
        "shape": shape_text(spec.shape),
        "dtype": spec.dtype,
        "N": spec.N,
        "M": spec.M,
        "rf": spec.rf,
        "num_evals": spec.num_evals,
        "analyzable": reason is None,
        "reason": reason or "",
    }
