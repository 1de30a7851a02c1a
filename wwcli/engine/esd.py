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

Backends: numpy (default: BLAS syrk for the Gram, LAPACK syevd through ``numpy.linalg.eigvalsh``,
or from order 1024 up LAPACK's faster two-stage ``dsyevd_2stage`` from numpy's own OpenBLAS, see
``_lapack``; scipy is not imported on this path) and torch (``backend="torch"``,
``device="cpu" | "cuda"``), imported only when asked for; ``check_backend`` says early whether a
backend can run. On a CUDA device each matrix is sent once as stored and the Gram is formed there,
and each thread works on a CUDA stream of its own. Precision: float64 (default) or float32.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from wwcli.engine._lapack import TWO_STAGE_MIN_ORDER, two_stage_eigvalsh
from wwcli.engine.options import Backend, Precision

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "CONV2D_NORM_FACTOR",
    "as_real_matrix",
    "check_backend",
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
    """tall^T tall accumulated in `dtype`, in blocks of the long side; each block is cast once
    and multiplied by its own transpose, which numpy sends to BLAS syrk (half the flops of a
    general product).

    The blocks follow the memory layout of the stored matrix: when `tall` is the transpose of a
    C-ordered wide matrix W (a (hidden, ffn) down projection, say), the Gram is accumulated as
    W[:, cols] W[:, cols]^T, so no block is ever transposed in memory (that copy cost about a
    tenth of the Gram).
    """
    wide = tall.T
    transposed = not tall.flags.c_contiguous and wide.flags.c_contiguous
    source = wide if transposed else tall
    first, *others = _row_blocks(tall)
    with np.errstate(over="ignore", invalid="ignore"):
        block = _cast_block(source, first, dtype, transposed)
        gram: NDArray[Any] = block @ block.T if transposed else block.T @ block
        for rows in others:
            block = _cast_block(source, rows, dtype, transposed)
            gram += block @ block.T if transposed else block.T @ block
    return gram


def _cast_block(
    source: NDArray[Any], rows: slice, dtype: type[np.floating[Any]], transposed: bool
) -> NDArray[Any]:
    """Rows `rows` of the tall matrix, cast to `dtype` in C order: source[rows] when `source` is
    the tall matrix, source[:, rows] when it is its C-ordered transpose."""
    part = source[:, rows] if transposed else source[rows]
    if part.dtype == dtype and part.flags.c_contiguous:
        return part
    block = np.empty(part.shape, dtype=dtype)
    block[...] = part  # one pass: cast and gather, no intermediate copy
    return block


def _import_torch(device: str) -> ModuleType:
    try:
        import torch
    except ImportError as error:
        raise ValueError(
            "backend 'torch' was asked for but torch is not installed (pip install torch)"
        ) from error
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} was asked for but torch.cuda.is_available() is False "
                f"(no CUDA device, or torch {torch.__version__} was built without CUDA)"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} was asked for but torch sees only "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return torch


def check_backend(*, backend: Backend = "numpy", device: str = "cpu") -> None:
    """ValueError with a clear message when `backend` on `device` cannot run here (torch not
    installed, no CUDA device, a device index out of range); imports torch only for it."""
    if backend not in ("numpy", "torch"):
        raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
    if backend == "numpy" and device != "cpu":
        raise ValueError(f"device {device!r} needs backend='torch'; numpy runs on 'cpu'")
    if backend == "torch":
        _import_torch(device)


def _torch_source(tall: NDArray[Any]) -> tuple[NDArray[Any], bool]:
    """(C-ordered array, transposed): the tall matrix itself, or its C-ordered transpose (a wide
    matrix as stored) with transposed=True; a dtype torch cannot take is cast on the CPU (an
    extension float such as bfloat16 exactly to float32, integers to float64)."""
    wide = tall.T
    transposed = not tall.flags.c_contiguous and wide.flags.c_contiguous
    source = wide if transposed else np.ascontiguousarray(tall)
    if source.dtype not in (np.float16, np.float32, np.float64):
        source = source.astype(np.float32 if source.dtype.kind == "V" else np.float64)
    return source, transposed


def _gram_torch(torch: ModuleType, tall: NDArray[Any], *, device: str, dtype: Any) -> Any:
    """tall^T tall as a torch tensor of `dtype` on `device`.

    The matrix goes to the device once, as stored (float32 for a BF16 checkpoint: half the
    bytes of float64, and no transposed copy on the host); each block of rows is cast to the
    working precision there and accumulated, so the device holds the matrix, one cast block and
    the Gram. On the CPU, torch.from_numpy shares the array's memory.
    """
    source, transposed = _torch_source(tall)
    on_device = torch.from_numpy(source).to(device)
    gram = None
    for rows in _row_blocks(tall):
        block = (on_device[:, rows] if transposed else on_device[rows]).to(dtype)
        product = block @ block.mT if transposed else block.mT @ block
        gram = product if gram is None else gram.add_(product)
    return gram


_THREAD_STREAMS = threading.local()
"""Each thread's CUDA stream per device (see ``_own_stream``)."""


@contextlib.contextmanager
def _own_stream(torch: ModuleType, device: str) -> Iterator[None]:
    """On a CUDA device, run the block on a stream of this thread's own (made once per thread
    and device), so that layers analyzed in parallel threads (--jobs) overlap on the GPU instead
    of queueing on the one default stream; one eigensolve of a 4096 x 4096 Gram leaves most of
    the GPU idle. Every tensor of a layer is made and used on its thread's stream, and the
    results are copied back to the host (which waits for that stream) before the block ends.
    Elsewhere: nothing."""
    if not device.startswith("cuda"):
        yield
        return
    streams: dict[str, Any] = getattr(_THREAD_STREAMS, "by_device", {})
    _THREAD_STREAMS.by_device = streams
    if device not in streams:
        streams[device] = torch.cuda.Stream(device=device)
    with torch.cuda.stream(streams[device]):
        yield


def _eigenvalues_torch(
    talls: Sequence[NDArray[Any]], *, device: str, precision: Precision
) -> list[NDArray[np.float64]]:
    torch = _import_torch(device)
    dtype = torch.float64 if precision == "float64" else torch.float32
    with torch.no_grad(), _own_stream(torch, device):
        grams = [_gram_torch(torch, tall, device=device, dtype=dtype) for tall in talls]
        if not all(bool(torch.isfinite(gram).all()) for gram in grams):
            return [np.full(gram.shape[0], np.nan) for gram in grams]
        if len({gram.shape for gram in grams}) == 1:
            values = torch.linalg.eigvalsh(torch.stack(grams))
            per_matrix = list(values.unbind(0))
        else:
            per_matrix = [torch.linalg.eigvalsh(gram) for gram in grams]
        # .cpu() waits for the device: the values are final when this returns.
        return [v.cpu().to(torch.float64).numpy() for v in per_matrix]


def _eigenvalues_numpy(
    talls: Sequence[NDArray[Any]], *, precision: Precision, torch_eigh_min_order: int | None
) -> list[NDArray[np.float64]]:
    dtype = np.float64 if precision == "float64" else np.float32
    grams = [_gram_numpy(tall, dtype) for tall in talls]
    if not all(np.isfinite(gram).all() for gram in grams):
        # Non-finite weights, or a Gram that overflowed: LAPACK would not converge.
        return [np.full(gram.shape[0], np.nan) for gram in grams]
    # Same-shape Grams (conv slices) go to syevd in one stacked call, unless they are large
    # enough for one of the faster solvers of _eigvalsh_numpy, which take one Gram at a time.
    faster_from = min(TWO_STAGE_MIN_ORDER, torch_eigh_min_order or TWO_STAGE_MIN_ORDER)
    same_shape = len({gram.shape for gram in grams}) == 1
    if same_shape and len(grams) > 1 and grams[0].shape[0] < faster_from:
        stacked = np.linalg.eigvalsh(np.stack(grams))
        return [row.astype(np.float64) for row in stacked]
    return [_eigvalsh_numpy(gram, torch_eigh_min_order) for gram in grams]


def _eigvalsh_numpy(
    gram: NDArray[Any], torch_eigh_min_order: int | None = None
) -> NDArray[np.float64]:
    """Eigenvalues of one Gram (which may be destroyed), by the fastest solver measured for its
    order and type (benchmarks/README.md, one thread):

    - float64 from ``torch_eigh_min_order`` up, when asked for: torch's ``linalg.eigvalsh``
      (MKL), 1.7x syevd's speed from 1280 to 2048, 2.2-2.5x at 3072 and 4096;
    - float64 from TWO_STAGE_MIN_ORDER up: LAPACK's two-stage solver where numpy's OpenBLAS has
      it (engine/_lapack.py), 1.15-1.6x syevd's speed;
    - otherwise numpy's syevd, as fast as scipy's syevr at 256 to 2048 (within 3 %), without
      the ~0.25 s import of scipy.linalg.
    """
    if gram.dtype == np.float64:
        order = gram.shape[0]
        if torch_eigh_min_order is not None and order >= torch_eigh_min_order:
            torch = _import_torch("cpu")
            with torch.no_grad():
                values: NDArray[np.float64] = torch.linalg.eigvalsh(torch.from_numpy(gram)).numpy()
            return values
        if order >= TWO_STAGE_MIN_ORDER:
            two_stage = two_stage_eigvalsh(gram)
            if two_stage is not None:
                return two_stage
    return np.linalg.eigvalsh(gram).astype(np.float64, copy=False)


def per_matrix_eigenvalues(
    matrices: Sequence[NDArray[Any]],
    *,
    conv2d_norm: bool = False,
    backend: Backend = "numpy",
    device: str = "cpu",
    precision: Precision = "float64",
    torch_eigh_min_order: int | None = None,
) -> list[NDArray[np.float64]]:
    """The eigenvalues of each matrix's Gram, one sorted array per matrix (the unpooled ESD).

    Each array has min(shape) float64 values, sorted ascending, negatives from round-off clipped
    to 0; with ``conv2d_norm`` every value is halved. Orientation of a matrix does not matter.
    Non-finite weights, or a Gram that overflows, give all-NaN arrays (no exception).
    Cost: O(N M^2) per matrix for the Gram plus O(M^3) for the eigensolver; memory O(M^2) plus
    one block of rows cast to `precision`. Raises ValueError for a matrix that is not 2-D and
    real, or for an unavailable backend. On the numpy backend in float64, Grams of order
    `torch_eigh_min_order` or more are solved by torch on the CPU (ValueError without torch; its
    thread count is the caller's to set).
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
        raw = _eigenvalues_numpy(
            talls, precision=precision, torch_eigh_min_order=torch_eigh_min_order
        )
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
    torch_eigh_min_order: int | None = None,
) -> NDArray[np.float64]:
    """The eigenvalues of all matrices concatenated into one sorted ESD (weightwatcher's pooled
    conv spectrum: M * rf values); see ``per_matrix_eigenvalues`` for the rest."""
    per_matrix = per_matrix_eigenvalues(
        matrices,
        conv2d_norm=conv2d_norm,
        backend=backend,
        device=device,
        precision=precision,
        torch_eigh_min_order=torch_eigh_min_order,
    )
    return np.sort(np.concatenate(per_matrix))


def eigenvalues(
    matrix: NDArray[Any],
    *,
    backend: Backend = "numpy",
    device: str = "cpu",
    precision: Precision = "float64",
    torch_eigh_min_order: int | None = None,
) -> NDArray[np.float64]:
    """The min(shape) eigenvalues of the Gram of one 2-D matrix (its squared singular values),
    float64, sorted ascending, round-off negatives clipped to 0. O(N M^2 + M^3) time."""
    return per_matrix_eigenvalues(
        [matrix],
        backend=backend,
        device=device,
        precision=precision,
        torch_eigh_min_order=torch_eigh_min_order,
    )[0]


def gram_noise_floor(lambda_max: float, *, M: int, precision: Precision = "float64") -> float:
    """Absolute round-off level of eigenvalues computed from an M x M Gram: M * eps * lambda_max.

    Eigenvalues below it cannot be told from zero (a Gram squares the condition number); the
    engine treats them as zero for the rank and leaves them out of the power-law fit.
    """
    eps = float(np.finfo(np.float64 if precision == "float64" else np.float32).eps)
    return float(lambda_max) * M * eps


def svd_matrix_rank(
    matrices: Sequence[NDArray[Any]], *, N: int, backend: Backend = "numpy", device: str = "cpu"
) -> int:
    """weightwatcher's rank of a layer from full SVDs: the number of pooled singular values above
    max(sv) * N * eps(float64). The slow, exact path, O(N M^2) per matrix with a larger constant
    than the Gram: the engine uses it only when the Gram cannot resolve the bottom of the
    spectrum (some eigenvalue within twice ``gram_noise_floor``). Always float64; the torch
    backend computes it on `device` (torch.linalg.svdvals), so a GPU run does not fall back to
    a CPU SVD."""
    arrays = [as_real_matrix(m, f"matrices[{i}]") for i, m in enumerate(matrices)]
    if backend == "torch":
        torch = _import_torch(device)
        with torch.no_grad(), _own_stream(torch, device):
            parts = [
                torch.linalg.svdvals(
                    torch.from_numpy(_torch_source(array)[0]).to(device).to(torch.float64)
                )
                .cpu()
                .numpy()
                for array in arrays
            ]
        singular_values = np.concatenate(parts)
    else:
        import scipy.linalg  # only here: a plain run never needs scipy

        singular_values = np.concatenate(
            [
                scipy.linalg.svd(array.astype(np.float64), compute_uv=False, check_finite=False)
                for array in arrays
            ]
        )
    tolerance = singular_values.max() * N * np.finfo(np.float64).eps
    return int(np.count_nonzero(singular_values > tolerance))
