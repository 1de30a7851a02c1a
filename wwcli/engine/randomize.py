"""Randomized spectra and correlation traps: weightwatcher 0.7.7's ``randomize=True``.

The elements of each weight matrix are permuted at random (which destroys every correlation the
training put into W and keeps its distribution of values), and the ESD of the shuffled matrix is
compared with the layer's own. What weightwatcher computes (``apply_random_esd``,
``random_eigenvalues``, ``apply_mp_fit(random=True)``, ``RMT_Util.jensen_shannon_distance``), in
its order of draws, which this module follows so that a test can feed it weightwatcher's own
draw (the global ``np.random`` state):

1. Each matrix W (a Conv2D layer: its rf slices, in order) is flattened in C order, shuffled with
   ``shuffle``, reshaped, and its eigenvalues kept (the top n_comp = M * rf of each); this is done
   5 times over, pooled, when the layer has fewer than 100 eigenvalues (n_comp < 100), else once.
   -> ``max_rand_eval``, and the Marchenko-Pastur fit of these eigenvalues (``mp_fit``) ->
   ``rand_num_spikes`` = ``num_traps`` (eigenvalues of the shuffled matrix above its MP edge:
   correlation traps), ``rand_sigma_mp``, ``rand_mp_softrank``, ``rand_W_scale``,
   ``rand_bulk_max``, ``rand_bulk_min``.
2. A second, separate shuffle of every matrix (one replica) -> ``rand_distance``: the
   Jensen-Shannon "distance" of the layer's sorted eigenvalues and these, each vector treated as
   a probability vector (not a distance between densities); ``ww_softrank`` = max of these /
   lambda_max; ``ww_maxdist`` = lambda_max - max of these.

Conv2D kernels are scaled by sqrt(1/2) before weightwatcher shuffles them (its ``conv2d_norm``),
so the shuffled eigenvalues are halved here too. Eigenvalues come from the engine's own routine
(``esd.per_matrix_eigenvalues``: the Gram of the smaller side and a symmetric eigensolver) rather
than weightwatcher's full SVD: the same values to round-off, several times faster.

The permutation a shuffle applies depends only on the number of elements and the generator, but
which matrix it makes depends on the order the elements are flattened in: W and W^T shuffled by
the same draw give different matrices. weightwatcher flattens its own ``Wmats``: a Dense or
Embedding matrix as the framework stores it (PyTorch (out, in), Keras (in, out)), a PyTorch
Conv2D slice W[:, :, i, j] turned tall (rows >= columns), a Keras Conv2D slice W[i, j] turned
wide. ``orient`` says which; it matters only to reproduce weightwatcher's draw exactly (the
distribution of the results is the same either way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from wwcli.engine.esd import as_real_matrix, per_matrix_eigenvalues
from wwcli.engine.mpfit import mp_fit
from wwcli.engine.options import Backend, Precision

__all__ = [
    "REPLICAS_BELOW",
    "SMALL_LAYER_REPLICAS",
    "RandomizedESD",
    "Shuffler",
    "jensen_shannon_distance",
    "randomized_esd",
    "shuffled_eigenvalues",
]

REPLICAS_BELOW = 100
"""A layer with fewer eigenvalues than this is shuffled several times for its random MP fit."""
SMALL_LAYER_REPLICAS = 5
"""How many shuffles are pooled for such a layer (weightwatcher's ``num_replicas``)."""

Orientation = Literal["as_given", "tall", "wide"]


class Shuffler(Protocol):
    """Anything with numpy's ``shuffle``: np.random.Generator, np.random.RandomState, or the
    np.random module itself (weightwatcher's global draw)."""

    def shuffle(self, x: Any, /) -> None:
        """Permute the 1-D array `x` in place."""


@dataclass(frozen=True)
class RandomizedESD:
    """The randomized-spectrum columns of a layer (weightwatcher's ``randomize=True``)."""

    max_rand_eval: float
    """Largest eigenvalue of the shuffled layer (first draw, replicas pooled)."""
    rand_distance: float
    """Jensen-Shannon distance of the sorted eigenvalues and those of a second shuffle."""
    ww_softrank: float
    """max eigenvalue of the second shuffle / lambda_max."""
    ww_maxdist: float
    """lambda_max - max eigenvalue of the second shuffle."""
    rand_num_spikes: int
    """Eigenvalues of the shuffled layer above its fitted MP edge (-1 when the fit failed)."""
    num_traps: int
    """Correlation traps: the same count as rand_num_spikes (weightwatcher reports both)."""
    rand_sigma_mp: float
    """sigma of the MP fit of the shuffled layer (rescaled to mean eigenvalue 1)."""
    rand_mp_softrank: float
    """rand_bulk_max / max_rand_eval."""
    rand_W_scale: float
    """The rescaling of the shuffled layer's MP fit."""
    rand_bulk_max: float
    """Upper MP edge of the shuffled layer, on the scale of its eigenvalues."""
    rand_bulk_min: float
    """Lower MP edge of the shuffled layer."""
    message: str = ""
    """Why some numbers are NaN (-1 for the counts); "" when all were computed."""
    rand_eigenvalues: NDArray[np.float64] | None = field(default=None, compare=False)
    """The pooled eigenvalues of the first draw, ascending (for plots)."""


def _oriented(matrix: NDArray[Any], orient: Orientation) -> NDArray[Any]:
    rows, columns = matrix.shape
    if (orient == "tall" and rows < columns) or (orient == "wide" and rows > columns):
        return matrix.T
    return matrix


def _shuffled(matrix: NDArray[Any], rng: Shuffler) -> NDArray[Any]:
    """A copy of `matrix` with its elements permuted: flattened in C order, shuffled, reshaped
    (weightwatcher's ``W.flatten(); np.random.shuffle``). Kept in its stored dtype: the values
    are the same, and the eigensolver casts them block by block."""
    flat = matrix.flatten()
    rng.shuffle(flat)
    return flat.reshape(matrix.shape)


def shuffled_eigenvalues(
    matrices: Sequence[NDArray[Any]],
    *,
    rng: Shuffler,
    n_comp: int,
    replicas: int = 1,
    conv2d_norm: bool = False,
    stacked: bool = False,
    backend: Backend = "numpy",
    device: str = "cpu",
    precision: Precision = "float64",
    torch_eigh_min_order: int | None = None,
) -> NDArray[np.float64]:
    """weightwatcher's ``random_eigenvalues``: for each replica, each matrix shuffled in turn and
    the top `n_comp` of its eigenvalues kept; all pooled and sorted ascending.

    `stacked`: the matrices are the slices of one 3-D kernel (weightwatcher's Conv1D treatment,
    ``loaders.interface.weightwatcher_conv1d_matrices``), which weightwatcher shuffles as one
    array and keeps the top `n_comp` of all its slices' eigenvalues. Cost per replica: one
    permutation of every element, plus the eigenvalues (``esd.per_matrix_eigenvalues``).
    """
    groups: list[NDArray[Any]] = [np.stack(matrices)] if stacked else list(matrices)
    # Every shuffle first, in weightwatcher's order; then all the spectra in one call, so that
    # same-shape matrices (conv slices, replicas) share one stacked eigensolver call.
    shuffled = [_shuffled(group, rng) for _ in range(replicas) for group in groups]
    slices = [piece for group in shuffled for piece in (list(group) if stacked else [group])]
    values = per_matrix_eigenvalues(
        slices,
        conv2d_norm=conv2d_norm,
        backend=backend,
        device=device,
        precision=precision,
        torch_eigh_min_order=torch_eigh_min_order,
    )
    per_group = len(values) // len(shuffled)
    pooled = [
        np.sort(np.concatenate(values[start : start + per_group]))[-n_comp:]
        for start in range(0, len(values), per_group)
    ]
    return np.sort(np.concatenate(pooled))


def _relative_entropy(p: NDArray[np.float64], q: NDArray[np.float64]) -> float:
    """``scipy.stats.entropy(p, q)``: both normalized to sum 1, then sum of rel_entr terms
    (p log(p / q); 0 where p == 0 and q >= 0; +inf where p > 0 and q == 0, or either < 0)."""
    p = p / np.sum(p)
    q = q / np.sum(q)
    with np.errstate(all="ignore"):
        terms = np.where((p > 0) & (q > 0), p * np.log(p / q), np.inf)
        terms = np.where((p == 0) & (q >= 0), 0.0, terms)
        terms = np.where(np.isnan(p) | np.isnan(q), np.nan, terms)
    return float(np.sum(terms))


def jensen_shannon_distance(p: NDArray[np.float64], q: NDArray[np.float64]) -> float:
    """weightwatcher's ``jensen_shannon_distance``: sqrt((KL(p || m) + KL(q || m)) / 2) with
    m = (p + q) / 2, the vectors taken as (unnormalized) probability vectors. O(n)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    m = (p + q) / 2
    divergence = (_relative_entropy(p, m) + _relative_entropy(q, m)) / 2
    return float(np.sqrt(divergence))


def _failed(message: str, rand_eigenvalues: NDArray[np.float64] | None = None) -> RandomizedESD:
    nan = math.nan
    return RandomizedESD(nan, nan, nan, nan, -1, -1, nan, nan, nan, nan, nan, message,
                         rand_eigenvalues)  # fmt: skip


def randomized_esd(
    matrices: Sequence[NDArray[Any]],
    eigenvalues: NDArray[np.float64],
    *,
    N: int,
    M: int,
    rf: int,
    conv2d_norm: bool,
    rng: Shuffler,
    orient: Orientation = "as_given",
    weightwatcher_conv1d: bool = False,
    backend: Backend = "numpy",
    device: str = "cpu",
    precision: Precision = "float64",
    torch_eigh_min_order: int | None = None,
) -> RandomizedESD:
    """The randomized-spectrum columns of one layer, as weightwatcher 0.7.7's
    ``analyze(randomize=True)`` reports them (module docstring for the steps and the draws).

    `matrices`: the layer's 2-D arrays (rf of them for a conv, weightwatcher's slice order),
    shuffled as oriented by `orient` ("as_given"; "tall" or "wide" turn each matrix so, as
    weightwatcher's PyTorch and Keras Conv2D slices are). `eigenvalues`: the layer's own pooled
    eigenvalues, ascending. N >= M, rf: weightwatcher's sizes of the layer (n_comp = M * rf).
    `conv2d_norm` halves the shuffled eigenvalues, as the layer's. `rng.shuffle` draws every
    permutation: 5 + 1 shuffles of each matrix when M * rf < 100, else 1 + 1.
    `weightwatcher_conv1d`: `matrices` are a Conv1D kernel cut along its first axis, shuffled as
    one array (weightwatcher's treatment; then rf is 1). The eigenvalue options are the engine's.

    Non-finite weights or eigenvalues give NaN numbers with a message (the shuffles are still
    drawn, so the draws of later layers do not depend on it); ValueError for matrices that are
    not 2-D real arrays. Cost: (replicas + 1) times the layer's eigenvalues, plus two
    permutations of its elements and one MP fit (``mp_fit``).
    """
    for name, value in (("N", N), ("M", M), ("rf", rf)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if orient not in ("as_given", "tall", "wide"):
        raise ValueError(f"orient must be 'as_given', 'tall' or 'wide', got {orient!r}")
    arrays = [
        _oriented(as_real_matrix(matrix, f"matrices[{i}]"), orient)
        for i, matrix in enumerate(matrices)
    ]
    if not arrays:
        raise ValueError("matrices must hold at least one matrix")
    n_comp = M * rf
    replicas = SMALL_LAYER_REPLICAS if n_comp < REPLICAS_BELOW else 1
    options: dict[str, Any] = {
        "rng": rng,
        "n_comp": n_comp,
        "conv2d_norm": conv2d_norm,
        "stacked": weightwatcher_conv1d,
        "backend": backend,
        "device": device,
        "precision": precision,
        "torch_eigh_min_order": torch_eigh_min_order,
    }
    first = shuffled_eigenvalues(arrays, replicas=replicas, **options)
    layer = np.asarray(eigenvalues, dtype=np.float64).ravel()
    second = shuffled_eigenvalues(arrays, replicas=1, **options) if layer.size else None
    if not np.isfinite(first).all():
        return _failed("non-finite eigenvalues of the shuffled weights")
    fit = mp_fit(first, N=N, M=M, rf=rf)
    messages = [f"MP fit of the shuffled weights: {fit.message}"] if fit.message else []
    distance = softrank = maxdist = math.nan
    if second is None:
        messages.append("no eigenvalues of the layer to compare with")
    elif not np.isfinite(layer).all() or not np.isfinite(second).all():
        messages.append("non-finite eigenvalues: no distance")
    elif layer.size != second.size:
        messages.append(f"{layer.size} eigenvalues of the layer but {second.size} shuffled")
    else:
        distance = jensen_shannon_distance(np.sort(layer), second)
        lambda_max = float(np.max(layer))
        softrank = float(np.max(second) / lambda_max) if lambda_max > 0 else math.nan
        maxdist = float(lambda_max - np.max(second))
    return RandomizedESD(
        max_rand_eval=float(np.max(first)),
        rand_distance=distance,
        ww_softrank=softrank,
        ww_maxdist=maxdist,
        rand_num_spikes=fit.num_spikes,
        num_traps=fit.num_spikes,
        rand_sigma_mp=fit.sigma_mp,
        rand_mp_softrank=fit.mp_softrank,
        rand_W_scale=fit.W_scale,
        rand_bulk_max=fit.bulk_max,
        rand_bulk_min=fit.bulk_min,
        message="; ".join(messages),
        rand_eigenvalues=first,
    )
