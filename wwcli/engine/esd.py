"""Eigenvalues of weight matrices: the Gram matrix of the smaller side and a symmetric eigensolver.

weightwatcher 0.7.7 takes the singular values of each matrix with a full SVD
(``scipy.linalg.svd(W.astype(float64), compute_uv=False)``) and squares them. We form the M x M Gram
matrix (W^T W or W W^T, whichever is smaller) in float64 and call a symmetric eigensolver: the
same eigenvalues, several times faster. The price is absolute accuracy at the bottom of the
spectrum: every eigenvalue carries an error of about ``M * eps * lambda_max`` (see
``gram_noise_floor``), where the SVD route's error is about ``eps**2 * lambda_max``. The top of the
spectrum, which the power-law fit uses, agrees to round-off.

Conv kernels arrive as several matrices (one per kernel position). Their eigenvalues are pooled
into one spectrum (``pooled_eigenvalues``), with weightwatcher's ``conv2d_norm`` scaling of the
kernel by sqrt(1/2), i.e. every eigenvalue halved; ``per_matrix_eigenvalues`` keeps them apart.

Backends: numpy (default) and torch (``backend="torch"``, ``device="cpu" | "cuda"``), imported only
when asked for. Precision: float64 (default) or float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.linalg
from numpy.typing import NDArray

from wwcli.engine.options import Backend, Precision

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "CONV2D_NORM_FACTOR",
    "as_real_matrix",
    "eigenvalues",
    "gram_noise_floor",
    "per_matrix_eigenvalues",
    "pooled_eigenvalues",
    "svd_matrix_rank",
]

CONV2D_NORM_FACTOR = 0.5
"""weightwatcher's conv2d_norm multiplies a Conv2D kernel by sqrt(1/2): eigenvalues are halved."""

_BLOCK_ELEMENTS = 1 << 24
"""Rows of a tall matrix are cast and accumulated into the Gram in blocks of about this many
elements (128 MiB in float64), so a float16 matrix never needs a full float64 copy."""


def as_real_matrix(matrix: object, name: str) -> NDArray[Any]:
    """`matrix` as a 2-D array of real numbers (any float or int dtype, or an extension float
    type such as ml_dtypes.bfloat16); ValueError naming `name` otherwise."""
    array = np.asarray(matrix)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {array.shape}")
    if np.iscomplexobj(array):
        raise ValueError(f"{name} must be real, got dtype {array.dtype}")
    if array.dtype.kind not in "fiubV":
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.dtype.kind == "V":
        # Extension float types (ml_dtypes.bfloat16, ...) register as "V"; records do not cast.
        try:
            np.zeros(1, dtype=array.dtype).astype(np.float64)
        except (TypeError, ValueError) as error:
            message = f"{name} must hold real numbers, got dtype {array.dtype}"
            raise ValueError(message) from error
    return array


def _tall(matrix: NDArray[Any]) -> NDArray[Any]:
    """The matrix or its transpose, whichever has at least as many rows as columns (a view)."""
    return matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T


def _row_blocks(tall: NDArray[Any]) -> list[slice]:
    rows, columns = tall.shape
    step = max(1, _BLOCK_ELEMENTS // max(columns, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _gram_numpy(tall: NDArray[Any], dtype: type[np.floating[Any]]) -> NDArray[Any]:
    """tall^T tall accumulated in `dtype`; the product of a contiguous block with its own
    transpose goes to BLAS syrk (half the flops of a general product)."""
    first, *others = _row_blocks(tall)
    with np.errstate(over="ignore", invalid="ignore"):
        block = np.ascontiguousarray(tall[first], dtype=dtype)
        gram: NDArray[Any] = block.T @ block
        for rows in others:
            block = np.ascontiguousarray(tall[rows], dtype=dtype)
            gram += block.T @ block
    return gram


def _import_torch(device: str) -> ModuleType:
    try:
        import torch
    except ImportError as error:
        raise ValueError(
            "backend 'torch' was asked for but torch is not installed (pip install torch)"
        ) from error
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch.cuda.is_available() is False")
    return torch


def _eigenvalues_torch(
    talls: Sequence[NDArray[Any]], *, device: str, precision: Precision
) -> list[NDArray[np.float64]]:
    torch = _import_torch(device)
    dtype = torch.float64 if precision == "float64" else torch.float32
    grams = []
    with torch.no_grad():
        for tall in talls:
            columns = tall.shape[1]
            gram = torch.zeros((columns, columns), dtype=dtype, device=device)
            for rows in _row_blocks(tall):
                block_np = tall[rows]
                if block_np.dtype not in (np.float16, np.float32, np.float64):
                    block_np = block_np.astype(np.float64)  # ints, bfloat16, ...
                # Cast to the working precision where the data is going (the GPU, say).
                block = torch.from_numpy(np.ascontiguousarray(block_np)).to(device).to(dtype)
                gram += block.mT @ block
            grams.append(gram)
        if not all(bool(torch.isfinite(gram).all()) for gram in grams):
            return [np.full(gram.shape[0], np.nan) for gram in grams]
        if len({gram.shape for gram in grams}) == 1:
            values = torch.linalg.eigvalsh(torch.stack(grams))
            per_matrix = list(values.unbind(0))
        else:
            per_matrix = [torch.linalg.eigvalsh(gram) for gram in grams]
        return [v.to("cpu").to(torch.float64).numpy() for v in per_matrix]


def _eigenvalues_numpy(
    talls: Sequence[NDArray[Any]], *, precision: Precision
) -> list[NDArray[np.float64]]:
    dtype = np.float64 if precision == "float64" else np.float32
    grams = [_gram_numpy(tall, dtype) for tall in talls]
    if not all(np.isfinite(gram).all() for gram in grams):
        # Non-finite weights, or a Gram that overflowed: LAPACK would not converge.
        return [np.full(gram.shape[0], np.nan) for gram in grams]
    if len({gram.shape for gram in grams}) == 1 and len(grams) > 1:
        stacked = np.linalg.eigvalsh(np.stack(grams))
        return [row.astype(np.float64) for row in stacked]
    # scipy's syevr with overwrite: ~10 % faster than numpy's syevd here, and no copy.
    return [
        scipy.linalg.eigh(
            gram, eigvals_only=True, driver="evr", overwrite_a=True, check_finite=False
        ).astype(np.float64)
        for gram in grams
    ]


def per_matrix_eigenvalues(
    matrices: Sequence[NDArray[Any]],
    *,
    conv2d_norm: bool = False,
    backend: Backend = "numpy",
    device: str = "cpu",
    precision: Precision = "float64",
) -> list[NDArray[np.float64]]:
    """The eigenvalues of each matrix's Gram, one sorted array per matrix (the unpooled ESD).

    Each array has min(shape) float64 values, sorted ascending, negatives from round-off clipped
    to 0; with ``conv2d_norm`` every value is halved. Orientation of a matrix does not matter.
    Non-finite weights, or a Gram that overflows, give all-NaN arrays (no exception).
    Cost: O(N M^2) per matrix for the Gram plus O(M^3) for the eigensolver; memory O(M^2) plus
    one block of rows cast to `precision`. Raises ValueError for a matrix that is not 2-D and
    real, or for an unavailable backend.
    """
    if backend not in ("numpy", "torch"):
        raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
    if precision not in ("float64", "float32"):
        raise ValueError(f"precision must be 'float64' or 'float32', got {precision!r}")
    if backend == "numpy" and device != "cpu":
        raise ValueError(f"device {device!r} needs backend='torch'; numpy runs on 'cpu'")
    talls = [_tall(as_real_matrix(m, f"matrices[{i}]")) for i, m in enumerate(matrices)]
    if any(0 in tall.shape for tall in talls):
        raise ValueError("matrices must not be empty (a side of length 0)")
    if backend == "torch":
        raw = _eigenvalues_torch(talls, device=device, precision=precision)
    else:
        raw = _eigenvalues_numpy(talls, precision=precision)
    result = []
    for values in raw:
        clipped = np.sort(np.maximum(values, 0.0))
        if conv2d_norm:
            clipped *= CONV2D_NORM_FACTOR
        result.append(clipped)
    return result


def pooled_eigenvalues(
    matrices: Sequence[NDArray[Any]],
    *,
    conv2d_norm: bool = False,
    backend: Backend = "numpy",
    device: str = "cpu",
    precision: Precision = "float64",
) -> NDArray[np.float64]:
    """The eigenvalues of all matrices concatenated into one sorted ESD (weightwatcher's pooled
    conv spectrum: M * rf values); see ``per_matrix_eigenvalues`` for the rest."""
    per_matrix = per_matrix_eigenvalues(
        matrices, conv2d_norm=conv2d_norm, backend=backend, device=device, precision=precision
    )
    return np.sort(np.concatenate(per_matrix))


def eigenvalues(
    matrix: NDArray[Any],
    *,
    backend: Backend = "numpy",
    device: str = "cpu",
    precision: Precision = "float64",
) -> NDArray[np.float64]:
    """The min(shape) eigenvalues of the Gram of one 2-D matrix (its squared singular values),
    float64, sorted ascending, round-off negatives clipped to 0. O(N M^2 + M^3) time."""
    return per_matrix_eigenvalues([matrix], backend=backend, device=device, precision=precision)[0]


def gram_noise_floor(lambda_max: float, *, M: int, precision: Precision = "float64") -> float:
    """Absolute round-off level of eigenvalues computed from an M x M Gram: M * eps * lambda_max.

    Eigenvalues below it cannot be told from zero (a Gram squares the condition number); the
    engine treats them as zero for the rank and leaves them out of the power-law fit.
    """
    eps = float(np.finfo(np.float64 if precision == "float64" else np.float32).eps)
    return float(lambda_max) * M * eps


def svd_matrix_rank(matrices: Sequence[NDArray[Any]], *, N: int) -> int:
    """weightwatcher's rank of a layer from full SVDs: the number of pooled singular values above
    max(sv) * N * eps(float64). The slow, exact path, O(N M^2) per matrix with a larger constant
    than the Gram: the engine uses it only when the Gram cannot resolve the bottom of the
    spectrum (some eigenvalue within twice ``gram_noise_floor``)."""
    import scipy.linalg

    singular_values = np.concatenate(
        [
            scipy.linalg.svd(
                as_real_matrix(m, f"matrices[{i}]").astype(np.float64),
                compute_uv=False,
                check_finite=False,
            )
            for i, m in enumerate(matrices)
        ]
    )
    tolerance = singular_values.max() * N * np.finfo(np.float64).eps
    return int(np.count_nonzero(singular_values > tolerance))
