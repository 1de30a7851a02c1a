"""The optional diagnostics of a run beyond the power-law fit, and the per-layer runner that calls
their engine modules: the Marchenko-Pastur bulk fit (`--mp-fit`), randomized spectra and
correlation traps (`--randomize`), ERG / detX (`--detx`) and the update matrix W - W_base
(`--base CKPT`). Every one is off by default and costs nothing when off.

Fingers (`--fix-fingers clip_xmax`), the truncated power law (`--fit tpl`) and the tail tests
(`--tail-tests`) change or extend the fit itself, so they are EngineOptions and run inside the
engine; this module only names their groups of columns.

A group is a set of registry columns (wwcli/report/columns.py, `Column.group`) that appears in
rows, CSV and JSON only when the run computed it (`run_groups`). Adding a diagnostic: an engine
module returning a frozen dataclass, a field of LayerDiagnostics filled in `layer_diagnostics`,
a setting in Diagnostics, the group's columns, and an option in cli.py (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from wwcli.engine.detx import DetX
    from wwcli.engine.mpfit import MPFit
    from wwcli.engine.options import EngineOptions
    from wwcli.engine.randomize import RandomizedESD
    from wwcli.engine.results import LayerMetrics

__all__ = [
    "ALL_DIAGNOSTICS",
    "GROUP_OPTIONS",
    "DeltaResult",
    "Diagnostics",
    "LayerDiagnostics",
    "delta_result",
    "layer_diagnostics",
    "layer_rng",
    "run_groups",
    "unmatched_delta",
]

GROUP_OPTIONS: dict[str, str] = {
    "mp": "--mp-fit",
    "random": "--randomize",
    "detx": "--detx",
    "delta": "--base CKPT",
    "fingers": "--fix-fingers clip_xmax",
    "tpl": "--fit tpl",
    "tail_tests": "--tail-tests",
}
"""Each group of optional columns, and the option that computes it (for messages)."""

ALL_DIAGNOSTICS = ("mp", "random", "detx", "tail_tests")
"""The groups --all-diagnostics turns on: every diagnostic that is not slow and leaves alpha as it
is. Measured on one thread (a 1536x384 layer whose plain analysis takes 0.06 s): the MP fit
0.016 s, the randomized ESD 0.21 s, detX 0.1 ms, the tail tests about 0.1 s a layer after
powerlaw's one-off import (~1.2 s). Not the TPL fit (powerlaw's numerical fit: up to minutes a
layer),
not --fix-fingers (it changes alpha itself, and with it the gate), not --base (it needs a
checkpoint)."""


@dataclass(frozen=True)
class Diagnostics:
    """Which diagnostics beyond the power-law fit a run computes (all off by default)."""

    mp_fit: bool = False
    """Fit the Marchenko-Pastur bulk (weightwatcher's mp_fit=True): num_spikes, sigma_mp, ..."""
    randomize: bool = False
    """Permute each layer's elements and compare spectra (weightwatcher's randomize=True):
    rand_distance, num_traps, ..."""
    seed: int = 0
    """Seed of the permutations; each layer's generator comes from (seed, layer name), so the
    numbers do not depend on --jobs or on which layers are selected."""
    detx: bool = False
    """ERG / detX (weightwatcher's detX=True): detX_num, detX_val, ERG_gap."""
    base: str | None = None
    """A base checkpoint (initial or pretrained weights): the update W - W_base is analyzed for
    every layer matched by name and shape."""

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

    @property
    def any(self) -> bool:
        """Whether any diagnostic of this module runs (the engine's own ones aside)."""
        return self.mp_fit or self.randomize or self.detx or self.base is not None


@dataclass(frozen=True)
class DeltaResult:
    """The metrics of a layer's update W - W_base (weightwatcher's base_model= numbers)."""

    base_name: str | None
    """The base layer matched (same name and shape); None when the base has no such layer."""
    alpha: float
    """alpha of the power-law fit of the update's ESD (NaN when unmatched or failed)."""
    D: float
    """The fit's KS distance."""
    num_pl_spikes: int | None
    """Eigenvalues in the power-law tail of the update (None when unmatched or failed)."""
    num_spikes: int | None
    """MP spikes of the update (with --mp-fit; None otherwise)."""
    norm: float
    """Sum of the update's eigenvalues: its squared Frobenius norm (weightwatcher's `norm`)."""
    spectral_norm: float
    """Largest eigenvalue of the update: its squared largest singular value."""
    message: str = ""
    """Why a number is missing ("" when none is)."""


@dataclass(frozen=True)
class LayerDiagnostics:
    """The optional groups computed for one layer (None: not asked for, or no eigenvalues)."""

    mp: MPFit | None = None
    """The Marchenko-Pastur bulk fit (--mp-fit)."""
    random: RandomizedESD | None = None
    """The randomized spectrum and its correlation traps (--randomize)."""
    detx: DetX | None = None
    """ERG / detX (--detx)."""
    delta: DeltaResult | None = None
    """The update W - W_base (--base)."""


def run_groups(diagnostics: Diagnostics, engine: EngineOptions) -> tuple[str, ...]:
    """The groups of optional columns a run with these settings computes."""
    groups = []
    if diagnostics.mp_fit:
        groups.append("mp")
    if diagnostics.randomize:
        groups.append("random")
    if diagnostics.detx:
        groups.append("detx")
    if diagnostics.base is not None:
        groups.append("delta")
    if getattr(engine, "fix_fingers", "none") != "none":
        groups.append("fingers")
    if getattr(engine, "fit", "power_law") != "power_law":
        groups.append("tpl")
    if getattr(engine, "tail_tests", False):
        groups.append("tail_tests")
    return tuple(groups)


def layer_rng(seed: int, name: str) -> np.random.Generator:
    """The permutation generator of one layer: from the run's seed and the layer's name alone
    (a stable digest, not Python's salted hash), so it is the same in any process and order."""
    import numpy as np

    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([seed, *words]))


def layer_diagnostics(
    diagnostics: Diagnostics,
    *,
    name: str,
    matrices: Sequence[NDArray[Any]],
    eigenvalues: NDArray[np.float64] | None,
    metrics: LayerMetrics,
    conv2d_norm: bool,
    options: EngineOptions,
    weightwatcher_conv1d: bool = False,
    delta: DeltaResult | None = None,
) -> LayerDiagnostics | None:
    """The diagnostics asked for, for one analyzed layer: `matrices` as the engine took them,
    `eigenvalues` as it returned them (None when it could not compute them: the groups are then
    None, their columns null). None when no diagnostic of this module is on."""
    if not diagnostics.any:
        return None
    N, M, rf = metrics.N, metrics.M, metrics.rf
    mp = random = detx_result = None
    if eigenvalues is not None:
        if diagnostics.mp_fit:
            from wwcli.engine.mpfit import mp_fit

            mp = mp_fit(eigenvalues, N=N, M=M, rf=rf)
        if diagnostics.randomize:
            from wwcli.engine.randomize import randomized_esd

            random = randomized_esd(
                matrices,
                eigenvalues,
                N=N,
                M=M,
                rf=rf,
                conv2d_norm=conv2d_norm,
                rng=layer_rng(diagnostics.seed, name),
                weightwatcher_conv1d=weightwatcher_conv1d,
                backend=options.backend,
                device=options.device,
                precision=options.precision,
                torch_eigh_min_order=options.torch_eigh_min_order,
            )
        if diagnostics.detx:
            from wwcli.engine.detx import detx

            detx_result = detx(eigenvalues, num_pl_spikes=metrics.fit.num_pl_spikes)
    return LayerDiagnostics(mp=mp, random=random, detx=detx_result, delta=delta)


def unmatched_delta(reason: str) -> DeltaResult:
    """The update of a layer the base checkpoint has no match for."""
    nan = math.nan
    return DeltaResult(None, nan, nan, None, None, nan, nan, reason)


def delta_result(
    base_name: str,
    matrices: Sequence[NDArray[Any]],
    base_matrices: Sequence[NDArray[Any]],
    *,
    options: EngineOptions,
    conv2d_norm: bool,
    weightwatcher_conv1d: bool,
    mp_fit: bool,
) -> DeltaResult:
    """The update W - W_base of one matched layer, analyzed as the layer itself is (same engine
    options: fingers and TPL apply), as weightwatcher 0.7.7's WWDeltaLayerIterator does. The
    difference is taken in the weights' precision (float32 for float32 or half-precision
    weights, float64 for float64), as weightwatcher takes it; biases are not used."""
    import numpy as np

    from wwcli.engine import FitStatus, analyze_layer_spectrum

    updates = []
    for index, (now, before) in enumerate(zip(matrices, base_matrices, strict=True)):
        now_array, before_array = np.asarray(now), np.asarray(before)
        if now_array.shape != before_array.shape:
            return unmatched_delta(
                f"matrix {index} is {now_array.shape} here, {before_array.shape} in the base"
            )
        # In the weights' own precision, at least float32: weightwatcher subtracts the float32
        # arrays (its numbers to round-off); half-precision weights differ exactly in float32.
        dtype = np.result_type(now_array.dtype, before_array.dtype, np.float32)
        updates.append(now_array.astype(dtype) - before_array.astype(dtype))
    metrics, eigenvalues = analyze_layer_spectrum(
        updates,
        conv2d_norm=conv2d_norm,
        options=options,
        weightwatcher_conv1d=weightwatcher_conv1d,
    )
    fit = metrics.fit
    spikes = None
    message = fit.message
    if mp_fit and eigenvalues is not None:
        from wwcli.engine.mpfit import mp_fit as fit_mp

        mp = fit_mp(eigenvalues, N=metrics.N, M=metrics.M, rf=metrics.rf)
        spikes = int(mp.num_spikes) if mp.num_spikes >= 0 else None
        if mp.message:
            message = "; ".join(part for part in (message, f"mp fit: {mp.message}") if part)
    return DeltaResult(
        base_name=base_name,
        alpha=fit.alpha,
        D=fit.D,
        num_pl_spikes=fit.num_pl_spikes if fit.status is FitStatus.SUCCESS else None,
        num_spikes=spikes,
        norm=metrics.norm,
        spectral_norm=metrics.lambda_max,
        message=message,
    )
