"""The engine's options: size filter, fit threshold and kind, verdict thresholds and numerical
backend."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

Backend = Literal["numpy", "torch"]
Precision = Literal["float64", "float32"]
FixFingers = Literal["none", "clip_xmax"]
"""weightwatcher's `fix_fingers`: "none" (its default) or "clip_xmax" (refit with the top
eigenvalues removed, ``fingers.clip_xmax_fit``)."""
FitKind = Literal["power_law", "tpl"]
"""The law fitted to the tail: "power_law" (weightwatcher's default WWFit) or "tpl" (its
`fit='TPL'`: a truncated power law through the `powerlaw` package, ``tpl.tpl_fit``)."""
Conv1DMode = Literal["pooled", "weightwatcher"]
"""How a Conv1D kernel becomes a spectrum: "pooled" (wwcli's default: the k slices of
in x out pooled, M * k eigenvalues) or "weightwatcher" (0.7.7's: the kernel as stored cut along
its first axis, only the min(k, in, out) largest eigenvalues kept)."""

_DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


def _check_int(name: str, value: object, *, minimum: int) -> None:
    # bool is an int subclass; True as a count is always a caller's mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


@dataclass(frozen=True)
class EngineOptions:
    """How the engine filters, fits and labels a layer; the defaults are weightwatcher 0.7.7's."""

    min_evals: int = 8
    """Layers with fewer eigenvalues (M * rf) are skipped; 0 disables the lower bound."""
    max_evals: int | None = 15000
    """Layers with more eigenvalues (M * rf) are skipped; None means no upper bound."""
    max_N: int | None = 50000
    """Layers whose larger side N exceeds this are skipped; None means no limit."""
    eigenvalue_threshold: float = 1e-5
    """The power-law fit uses only eigenvalues strictly greater than this."""
    over_trained_below: float = 2.0
    """alpha below this is over-trained."""
    under_trained_above: float = 6.0
    """alpha above this is under-trained."""
    backend: Backend = "numpy"
    """Linear-algebra backend for the eigenvalues: "numpy" (default) or "torch" (if installed)."""
    device: str = "cpu"
    """Where the torch backend runs: "cpu", "cuda" or "cuda:<index>" (numpy: "cpu" only)."""
    precision: Precision = "float64"
    """Floating type of the Gram matrix and eigensolver: "float64" (default) or "float32"."""
    torch_eigh_min_order: int | None = None
    """numpy backend, float64: Grams of at least this order get their eigenvalues from torch's
    ``linalg.eigvalsh`` on the CPU (MKL; 1.7-2.5x syevd's speed from 1280 up) instead of
    LAPACK. None (default): never. Needs torch; `analysis` turns it on where it pays off."""
    conv1d: Conv1DMode = "pooled"
    """How Conv1D kernels are read (``Conv1DMode``). "weightwatcher" reproduces weightwatcher
    0.7.7's numbers for them (the analysis layer re-sizes the layer and hands the engine its
    matrices, see ``analyze_layer_spectrum(weightwatcher_conv1d=True)``); other layers are
    unaffected."""
    fix_fingers: FixFingers = "none"
    """"clip_xmax": weightwatcher 0.7.7's `fix_fingers='clip_xmax'`; alpha and every metric
    derived from it become the clipped fit's, and the layer gains num_fingers and raw_alpha."""
    fit: FitKind = "power_law"
    """"tpl": weightwatcher 0.7.7's `fit='TPL'` (with `pl_package='powerlaw'`); alpha is the
    truncated power law's and the layer gains Lambda. Needs `powerlaw` 1.5; slow."""
    tail_tests: bool = False
    """Likelihood-ratio tests (`powerlaw` 1.5) of the tail the fit chose: power law vs lognormal
    and vs exponential (``tpl.tail_tests``). Needs `powerlaw`."""

    def __post_init__(self) -> None:
        _check_int("min_evals", self.min_evals, minimum=0)
        if self.max_evals is not None:
            _check_int("max_evals", self.max_evals, minimum=1)
            if self.max_evals < self.min_evals:
                raise ValueError(
                    f"max_evals ({self.max_evals}) must be >= min_evals ({self.min_evals})"
                )
        if self.max_N is not None:
            _check_int("max_N", self.max_N, minimum=1)
        threshold = _check_real("eigenvalue_threshold", self.eigenvalue_threshold)
        if threshold < 0:
            raise ValueError(f"eigenvalue_threshold must be >= 0, got {threshold}")
        over = _check_real("over_trained_below", self.over_trained_below)
        under = _check_real("under_trained_above", self.under_trained_above)
        if over > under:
            raise ValueError(
                f"over_trained_below ({over}) must be <= under_trained_above ({under})"
            )
        if self.backend not in ("numpy", "torch"):
            raise ValueError(f"backend must be 'numpy' or 'torch', got {self.backend!r}")
        if not isinstance(self.device, str) or not _DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {self.device!r}")
        if self.backend == "numpy" and self.device != "cpu":
            raise ValueError(f"device {self.device!r} needs backend='torch'; numpy runs on 'cpu'")
        if self.precision not in ("float64", "float32"):
            raise ValueError(f"precision must be 'float64' or 'float32', got {self.precision!r}")
        if self.torch_eigh_min_order is not None:
            _check_int("torch_eigh_min_order", self.torch_eigh_min_order, minimum=1)
        if self.conv1d not in ("pooled", "weightwatcher"):
            raise ValueError(f"conv1d must be 'pooled' or 'weightwatcher', got {self.conv1d!r}")
        if self.fix_fingers not in ("none", "clip_xmax"):
            raise ValueError(f"fix_fingers must be 'none' or 'clip_xmax', got {self.fix_fingers!r}")
        if self.fit not in ("power_law", "tpl"):
            raise ValueError(f"fit must be 'power_law' or 'tpl', got {self.fit!r}")
        if not isinstance(self.tail_tests, bool):
            raise ValueError(f"tail_tests must be a bool, got {self.tail_tests!r}")
