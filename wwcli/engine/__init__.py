"""Pure numerics: weight matrices in, eigenvalues, power-law fits and layer metrics out.

The app calls two functions: ``check_size`` (before reading a layer's weights: is the layer in
the size range weightwatcher analyzes?) and ``analyze_layer_spectrum`` (its matrices ->
``LayerMetrics`` and the eigenvalues; ``analyze_layer`` without them).
Nothing here reads files, prints, logs or imports a framework at import time; bad numbers in the
weights give a failed result with a reason, never an exception.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wwcli.engine.esd import (
    CONV2D_NORM_FACTOR,
    as_real_matrix,
    check_backend,
    eigenvalues,
    gram_noise_floor,
    per_matrix_eigenvalues,
    pooled_eigenvalues,
    svd_matrix_rank,
)
from wwcli.engine.fingers import ClippedFit, clip_xmax_fit
from wwcli.engine.metrics import (
    layer_metrics,
    matrix_entropy,
    matrix_rank,
    verdict,
    warning_label,
)
from wwcli.engine.options import EngineOptions
from wwcli.engine.powerlaw import fit_power_law, ks_distances, tail_alphas
from wwcli.engine.results import FitStatus, LayerMetrics, PowerLawFit, TailTests, Verdict

__all__ = [
    "CONV2D_NORM_FACTOR",
    "DEFAULT_OPTIONS",
    "ClippedFit",
    "EngineOptions",
    "FitStatus",
    "LayerMetrics",
    "PowerLawFit",
    "TailTests",
    "Verdict",
    "analyze_layer",
    "analyze_layer_spectrum",
    "as_real_matrix",
    "check_backend",
    "check_size",
    "clip_xmax_fit",
    "eigenvalues",
    "fit_power_law",
    "gram_noise_floor",
    "ks_distances",
    "layer_metrics",
    "matrix_entropy",
    "matrix_rank",
    "per_matrix_eigenvalues",
    "pooled_eigenvalues",
    "svd_matrix_rank",
    "tail_alphas",
    "verdict",
    "warning_label",
]

DEFAULT_OPTIONS = EngineOptions()
"""weightwatcher 0.7.7's defaults, numpy backend, float64."""


def check_size(*, N: int, M: int, rf: int, options: EngineOptions = DEFAULT_OPTIONS) -> str | None:
    """Why a layer of rf matrices of N x M (N >= M) is skipped, or None when it is analyzed.

    weightwatcher's ``layer_supported`` for pooled layers, in its order: M * rf < min_evals,
    M * rf > max_evals, then N > max_N (N of one matrix, not N * rf). O(1); reads no weights.
    """
    for name, value in (("N", N), ("M", M), ("rf", rf)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    num_evals = M * rf
    if options.min_evals and num_evals < options.min_evals:
        return f"{num_evals} eigenvalues < min_evals {options.min_evals}"
    if options.max_evals is not None and num_evals > options.max_evals:
        return f"{num_evals} eigenvalues > max_evals {options.max_evals}"
    if options.max_N is not None and options.max_N < N:
        return f"N = {N} > max_N {options.max_N}"
    return None


def _failed_layer(*, N: int, M: int, rf: int, message: str) -> LayerMetrics:
    """A layer whose eigenvalues could not be computed: every metric NaN, rank -1."""
    nan = math.nan
    return LayerMetrics(
        N=N,
        M=M,
        rf=rf,
        num_evals=M * rf,
        fit=PowerLawFit.failed(message),
        lambda_max=nan,
        norm=nan,
        log_norm=nan,
        log_spectral_norm=nan,
        alpha_weighted=nan,
        log_alpha_norm=nan,
        stable_rank=nan,
        entropy=nan,
        matrix_rank=-1,
        verdict=Verdict.FAILED,
        warning="",
    )


def _layer_matrices(matrices: Sequence[NDArray[Any]]) -> tuple[list[NDArray[Any]], int, int]:
    """The matrices as arrays, with N and M; ValueError for anything but 2-D arrays of one shape
    (up to transposition)."""
    if isinstance(matrices, np.ndarray):
        raise ValueError("matrices must be a sequence of 2-D arrays; wrap one matrix in a list")
    arrays = [as_real_matrix(matrix, f"matrices[{i}]") for i, matrix in enumerate(matrices)]
    if not arrays:
        raise ValueError("matrices must hold at least one matrix")
    sides = {tuple(sorted(array.shape)) for array in arrays}
    if len(sides) != 1:
        raise ValueError(f"matrices must all have one shape (up to transposition), got {sides}")
    M, N = sides.pop()
    return arrays, N, M


def analyze_layer(
    matrices: Sequence[NDArray[Any]],
    *,
    conv2d_norm: bool = False,
    options: EngineOptions = DEFAULT_OPTIONS,
    weightwatcher_conv1d: bool = False,
) -> LayerMetrics:
    """The metrics of one layer (``analyze_layer_spectrum`` without the eigenvalues)."""
    return analyze_layer_spectrum(
        matrices,
        conv2d_norm=conv2d_norm,
        options=options,
        weightwatcher_conv1d=weightwatcher_conv1d,
    )[0]


def analyze_layer_spectrum(
    matrices: Sequence[NDArray[Any]],
    *,
    conv2d_norm: bool = False,
    options: EngineOptions = DEFAULT_OPTIONS,
    weightwatcher_conv1d: bool = False,
) -> tuple[LayerMetrics, NDArray[np.float64] | None]:
    """The metrics of one layer, and the pooled eigenvalues they were computed from (ascending;
    None when none could be computed: non-finite weights, an empty matrix, an overflow).

    The metrics of one layer: the pooled eigenvalues of its matrices, their power-law fit
    and the verdict.

    `matrices` are the layer's 2-D arrays (one for a dense layer, one per kernel position for a
    conv), any real dtype, each (out, in) or (in, out). `conv2d_norm` halves the eigenvalues
    (weightwatcher does so for Conv2D layers only). Does not apply the size filter
    (``check_size``). Non-finite weights, an empty or degenerate matrix (all zero, rank 1,
    constant, all eigenvalues equal) give a result with ``verdict == Verdict.FAILED`` and the
    reason in ``fit.message``; ValueError only for arguments that are not 2-D real arrays of one
    shape, or an unavailable backend. Cost: O(rf (N M^2 + M^3)) for the eigenvalues, then the
    fit (see ``fit_power_law``), plus a full SVD for the rank of a near-singular layer (one with
    an eigenvalue within twice ``gram_noise_floor``: singular values below ~sqrt(2 M eps) sv_max).

    `weightwatcher_conv1d`: `matrices` are a Conv1D kernel cut along its first stored axis
    (``loaders.interface.weightwatcher_conv1d_matrices``), and the layer is measured as
    weightwatcher 0.7.7 measures it: the kernel's sides are the count c and the sides a, b of
    each matrix; N = max(c, a, b), M = min(c, a, b), rf = 1, and only the M largest pooled
    eigenvalues are kept (its `n_comp`; no scaling). The rank is counted from those M.

    `options.fix_fingers`, `options.fit` and `options.tail_tests` change the fit as
    weightwatcher 0.7.7's options of those names do (``fingers``, ``tpl``); the metrics derived
    from alpha and the verdict follow the alpha they give. With all three at their defaults the
    path and the numbers are those of the plain fit, and the extra fields are None. fit='tpl'
    and the tail tests raise ValueError when `powerlaw` 1.5 is not installed.
    """
    arrays, N, M = _layer_matrices(matrices)
    rf = len(arrays)
    keep = None
    gram_order = M  # the order of each Gram, whatever sizes the layer is reported with
    if weightwatcher_conv1d:
        sides = (rf, M, N)
        N, M, rf, keep = max(sides), min(sides), 1, min(sides)
    if M == 0:
        return _failed_layer(N=N, M=M, rf=rf, message="empty matrix (a side of length 0)"), None
    for array in arrays:
        if not np.isfinite(array).all():
            return _failed_layer(N=N, M=M, rf=rf, message="non-finite weights"), None
    values = pooled_eigenvalues(
        arrays,
        conv2d_norm=conv2d_norm,
        backend=options.backend,
        device=options.device,
        precision=options.precision,
        torch_eigh_min_order=options.torch_eigh_min_order,
    )
    if not np.isfinite(values).all():
        message = f"non-finite eigenvalues: the Gram matrix overflowed {options.precision}"
        return _failed_layer(N=N, M=M, rf=rf, message=message), None
    if keep is not None:
        values = values[values.size - keep :]
    noise_floor = gram_noise_floor(float(values[-1]), M=gram_order, precision=options.precision)
    threshold = max(options.eigenvalue_threshold, noise_floor)
    above = values[values > threshold]
    if above.size >= 2 and above[-1] - above[0] <= noise_floor:
        fit = PowerLawFit.failed(
            f"all {above.size} eigenvalues above the threshold are equal to within round-off "
            f"({noise_floor:.3g}): no tail to fit"
        )
    else:
        fit = fit_power_law(values, threshold=threshold)
    extras: dict[str, Any] | None = None
    if options.fix_fingers != "none" or options.fit != "power_law" or options.tail_tests:
        fit, extras = _fit_options(values, fit, threshold=threshold, options=options)
    # The Gram cannot tell its smallest eigenvalues from zero; weightwatcher's rank can (it
    # counts singular values down to sv_max * N * eps). Near-singular layers only pay an SVD.
    rank = None
    if keep is None and values[-1] > 0 and values[0] <= 2 * noise_floor:
        rank = svd_matrix_rank(arrays, N=N, backend=options.backend, device=options.device)
    metrics = layer_metrics(
        values,
        N=N,
        M=M,
        rf=rf,
        fit=fit,
        rank=rank,
        noise_floor=noise_floor,
        over_trained_below=options.over_trained_below,
        under_trained_above=options.under_trained_above,
    )
    if extras:
        metrics = dataclasses.replace(metrics, **extras)
    return metrics, values


def _fit_options(
    values: NDArray[np.float64], fit: PowerLawFit, *, threshold: float, options: EngineOptions
) -> tuple[PowerLawFit, dict[str, Any]]:
    """The fit that `options` ask for in place of the plain power law `fit` of `values`, and the
    LayerMetrics fields it adds (num_fingers and raw_alpha, Lambda, tail_tests).

    weightwatcher 0.7.7's combinations: clip_xmax refits without the top eigenvalues
    (``fingers``); fit='tpl' alone is ``tpl.tpl_fit``; both together keep the clipped power
    law's xmin, D and sigma, with the TPL's alpha and Lambda fitted at that xmin on the clipped
    data (its ``fit_powerlaw`` with pl_package='powerlaw'). The tail tests run on the final
    fit's tail.
    """
    from wwcli.engine import tpl  # powerlaw is imported only from here, only when needed

    extras: dict[str, Any] = {}
    clipped = 0
    if options.fix_fingers == "clip_xmax":
        result = clip_xmax_fit(values, threshold=threshold, raw_fit=fit)
        fit, clipped = result.fit, result.clipped
        extras["num_fingers"] = result.num_fingers
        extras["raw_alpha"] = result.raw_fit.alpha
    if options.fit == "tpl":
        tpl.import_powerlaw()  # the same error without powerlaw, whatever the layer
        Lambda = math.nan
        if fit.status is not FitStatus.SUCCESS:
            pass  # no tail (too few or equal eigenvalues): the TPL cannot have one either
        elif options.fix_fingers == "none":
            tpl_result = tpl.tpl_fit(values, threshold=threshold)
            fit, Lambda = tpl_result.fit, tpl_result.Lambda
        else:
            data = np.sort(values[values > threshold])
            alpha, Lambda = tpl.tpl_at_xmin(data[: data.size - clipped], xmin=fit.xmin)
            if math.isfinite(alpha) and math.isfinite(Lambda):
                fit = dataclasses.replace(fit, alpha=alpha)
            else:
                fit = PowerLawFit.failed("TPL: no fit at the clipped tail's xmin")
        extras["Lambda"] = Lambda
    if options.tail_tests:
        if fit.status is FitStatus.SUCCESS:
            tests = tpl.tail_tests(values, xmin=fit.xmin, threshold=threshold, clipped=clipped)
        else:
            tpl.import_powerlaw()  # the same error without powerlaw, whatever the layer
            tests = TailTests.failed(f"no tail to test: {fit.message}")
        extras["tail_tests"] = tests
    return fit, extras
