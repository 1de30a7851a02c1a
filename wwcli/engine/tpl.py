"""The fits and tests that go through the `powerlaw` package (1.5, the API weightwatcher 0.7.7
needs): the truncated power law of weightwatcher's `fit='TPL'`, and likelihood-ratio tests of a
fitted tail.

`powerlaw` is imported only when one of these runs (``import_powerlaw``); without it, or with
another version, they raise ValueError with the install hint ``pip install 'wwcli[tpl]'``.

TPL (``tpl_fit``), as weightwatcher 0.7.7 computes it with ``fit='TPL', pl_package='powerlaw'``
(``WW_powerlaw.pl_fit``, then ``WeightWatcher.fit_powerlaw``):

- ``powerlaw.Fit(data, xmin=None, xmax=None, verbose=False,
  xmin_distribution='truncated_power_law')`` on the eigenvalues strictly above the threshold,
  sorted: for every distinct value but the largest, a numerical (Nelder-Mead) maximum-likelihood
  fit of p(x) ~ x^-alpha exp(-Lambda x) on the values >= it and its KS distance; xmin is the
  candidate with the smallest D among the fits in range (Lambda > 0, alpha > 1).
- Reported: alpha and Lambda of ``fit.truncated_power_law`` (the TPL refitted on the chosen
  tail), xmin, D of the search, num_pl_spikes = the layer's eigenvalues >= xmin. The power law's
  sigma has no TPL counterpart: weightwatcher reports NaN, and so do we. weightwatcher reports
  xmax as None (the package's given xmax); wwcli reports the largest eigenvalue, which is the
  value the fit ends at. The fit is often degenerate (alpha pinned near 1 with a large Lambda).
- Cost: the search is O(n^2) evaluations of an incomplete gamma function in mpmath plus a
  Nelder-Mead run per candidate: seconds for a few hundred eigenvalues, minutes for thousands
  (benchmarks/README.md).

With ``fix_fingers='clip_xmax'`` weightwatcher clips with the package's power-law fits and
reports the TPL fitted at the kept fit's xmin on the clipped data (``tpl_at_xmin``), with the
power law's D and sigma. wwcli clips with its own power-law fit, which selects the same xmin
where the layer has at least 20 eigenvalues above the threshold (below that, weightwatcher's
'ww' fit uses its small-N estimator and the package does not).

Tail tests (``tail_tests``): on the tail the engine's fit chose (the values >= its xmin, without
the eigenvalues clip_xmax left out), ``powerlaw.Fit(tail, xmin=xmin)`` and
``distribution_compare('power_law', 'lognormal' | 'exponential', normalized_ratio=True)``: R > 0
favours the power law, p the significance of R's sign (Vuong's test; the pairs are not nested).
The power law in the test is the package's maximum-likelihood fit at that xmin: the engine's
alpha in weightwatcher's standard branch, not its small-N bias-corrected one, nor the TPL.

`powerlaw` prints progress and warnings to stdout and stderr; those writes are dropped here,
for the calling thread only (other threads' output passes through), and numpy's floating-point
warnings are silenced with ``np.errstate`` (thread-local).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO, cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from wwcli.engine.results import FitStatus, PowerLawFit, TailTests

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "POWERLAW_VERSION",
    "TPLFit",
    "TailTests",
    "import_powerlaw",
    "tail_tests",
    "tpl_at_xmin",
    "tpl_fit",
]

POWERLAW_VERSION = "1.5"
"""The `powerlaw` release whose API and numbers weightwatcher 0.7.7 relies on."""

_INSTALL_HINT = "pip install 'wwcli[tpl]'"


def import_powerlaw() -> ModuleType:
    """The `powerlaw` module; ValueError with the install hint when it is missing or is not
    version 1.5."""
    try:
        import powerlaw
    except ImportError as error:
        raise ValueError(
            "fit='tpl' and the tail tests need the powerlaw package "
            f"{POWERLAW_VERSION}, which is not installed: {_INSTALL_HINT}"
        ) from error
    version = getattr(powerlaw, "__version__", "unknown")
    if version != POWERLAW_VERSION:
        raise ValueError(
            f"fit='tpl' and the tail tests need powerlaw {POWERLAW_VERSION} (the API "
            f"weightwatcher 0.7.7 uses), found {version}: {_INSTALL_HINT}"
        )
    return cast("ModuleType", powerlaw)


class _ThreadMute:
    """A text stream that drops the writes of the threads in `muted` and passes every other
    write, and every other attribute, to the stream it wraps."""

    def __init__(self, stream: TextIO, muted: set[int]) -> None:
        self._stream = stream
        self._muted = muted

    def write(self, text: str) -> int:
        if threading.get_ident() in self._muted:
            return len(text)
        return self._stream.write(text)

    def flush(self) -> None:
        if threading.get_ident() not in self._muted:
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


_MUTE_LOCK = threading.Lock()
_MUTED: set[int] = set()
_SAVED: list[tuple[Any, Any]] = []
"""The streams the mute replaced, while at least one thread is muted."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Drop this thread's writes to sys.stdout and sys.stderr and numpy's floating-point
    warnings for the duration (powerlaw prints progress and "No valid fits found.")."""
    ident = threading.get_ident()
    with _MUTE_LOCK:
        if not _MUTED:
            _SAVED.append((sys.stdout, sys.stderr))
            sys.stdout = _ThreadMute(sys.stdout, _MUTED)
            sys.stderr = _ThreadMute(sys.stderr, _MUTED)
        _MUTED.add(ident)
    try:
        with np.errstate(all="ignore"):
            yield
    finally:
        with _MUTE_LOCK:
            _MUTED.discard(ident)
            if not _MUTED:
                stdout, stderr = _SAVED.pop()
                # Put back only our own wrappers (a caller may have replaced them meanwhile).
                if isinstance(sys.stdout, _ThreadMute):
                    sys.stdout = stdout
                if isinstance(sys.stderr, _ThreadMute):
                    sys.stderr = stderr


@dataclass(frozen=True)
class TPLFit:
    """A truncated power-law fit: the fit fields (alpha is the TPL's) and its cutoff rate."""

    fit: PowerLawFit
    """alpha (TPL), xmin, xmax (the largest value), D, sigma (NaN), num_pl_spikes, status."""
    Lambda: float
    """The exponential cutoff rate of x^-alpha exp(-Lambda x) (NaN when failed)."""

    @classmethod
    def failed(cls, message: str) -> TPLFit:
        """A fit that could not be made: NaN numbers and why."""
        return cls(PowerLawFit.failed(message), math.nan)


def _tail_data(values: NDArray[np.float64], threshold: float) -> NDArray[np.float64] | str:
    """The sorted values above `threshold`, or why there are too few to fit."""
    if not np.isfinite(values).all():
        return "non-finite eigenvalues"
    data = np.sort(values[values > threshold])
    if data.size < 2 or data[0] == data[-1]:
        return f"{data.size} eigenvalues above the threshold {threshold:g}, not 2 distinct ones"
    return data


def tpl_fit(eigenvalues: ArrayLike, *, threshold: float = 1e-5) -> TPLFit:
    """weightwatcher 0.7.7's `fit='TPL'` of the eigenvalues above `threshold` (module doc).

    Never raises for bad numbers (a failed fit with a message, also when `powerlaw` itself
    raises); ValueError when `powerlaw` 1.5 is not installed. Slow: O(n^2) special-function
    evaluations (seconds for 384 eigenvalues).
    """
    powerlaw = import_powerlaw()
    values: NDArray[Any] = np.asarray(eigenvalues, dtype=np.float64)
    data = _tail_data(values, threshold)
    if isinstance(data, str):
        return TPLFit.failed(f"TPL: {data}")
    try:
        with _quiet():
            fit = powerlaw.Fit(
                data,
                xmin=None,
                xmax=None,
                verbose=False,
                xmin_distribution="truncated_power_law",
            )
            if fit.alpha is None or not math.isfinite(float(fit.alpha)):
                return TPLFit.failed("TPL: powerlaw found no xmin to fit from")
            law = fit.truncated_power_law
            alpha, Lambda = float(law.alpha), float(law.Lambda)
            xmin, D, sigma = float(fit.xmin), float(fit.D), float(fit.sigma)
    except Exception as error:  # powerlaw and mpmath raise many kinds on bad numbers
        return TPLFit.failed(f"TPL: powerlaw failed: {type(error).__name__}: {error}")
    if not (math.isfinite(alpha) and math.isfinite(Lambda)):
        return TPLFit.failed(f"TPL: the fit gave alpha {alpha}, Lambda {Lambda}")
    return TPLFit(
        PowerLawFit(
            status=FitStatus.SUCCESS,
            alpha=alpha,
            xmin=xmin,
            xmax=float(data[-1]),
            D=D,
            sigma=sigma,
            num_pl_spikes=int(np.count_nonzero(values >= xmin)),
        ),
        Lambda,
    )


def tpl_at_xmin(tail: ArrayLike, *, xmin: float) -> tuple[float, float]:
    """(alpha, Lambda) of the truncated power law fitted to the values of `tail` >= `xmin`
    (``powerlaw.Fit(tail, xmin=xmin).truncated_power_law``), as weightwatcher 0.7.7 reports it
    for `fit='TPL'` with `fix_fingers='clip_xmax'`; (NaN, NaN) when it cannot be fitted.
    ValueError when `powerlaw` 1.5 is not installed."""
    powerlaw = import_powerlaw()
    data = np.sort(np.asarray(tail, dtype=np.float64))
    try:
        with _quiet():
            law = powerlaw.Fit(data, xmin=xmin, xmax=None, verbose=False).truncated_power_law
            return float(law.alpha), float(law.Lambda)
    except Exception:  # powerlaw and mpmath raise many kinds on bad numbers
        return math.nan, math.nan


def tail_tests(
    eigenvalues: ArrayLike, *, xmin: float, threshold: float = 1e-5, clipped: int = 0
) -> TailTests:
    """Likelihood-ratio tests of power law vs lognormal and vs exponential on the values above
    `threshold`, without the `clipped` largest, that are >= `xmin` (module doc).

    Never raises for bad numbers (NaN results with a message); ValueError when `powerlaw` 1.5 is
    not installed. Cost: two numerical fits (lognormal, exponential) of the tail, milliseconds
    to tens of milliseconds.
    """
    powerlaw = import_powerlaw()
    if not (isinstance(xmin, int | float) and math.isfinite(xmin) and xmin > 0):
        return TailTests.failed(f"no tail to test: xmin is {xmin}")
    values: NDArray[Any] = np.asarray(eigenvalues, dtype=np.float64)
    data = _tail_data(values, threshold)
    if isinstance(data, str):
        return TailTests.failed(f"tail tests: {data}")
    if clipped:
        data = data[: data.size - clipped]
    tail_size = int(np.count_nonzero(data >= xmin))
    if tail_size < 2:
        return TailTests.failed(f"tail tests: {tail_size} value(s) >= xmin {xmin:.6g}, not 2")
    try:
        with _quiet():
            fit = powerlaw.Fit(data, xmin=float(xmin), xmax=None, verbose=False)
            R_lognormal, p_lognormal = fit.distribution_compare(
                "power_law", "lognormal", normalized_ratio=True
            )
            R_exponential, p_exponential = fit.distribution_compare(
                "power_law", "exponential", normalized_ratio=True
            )
    except Exception as error:  # powerlaw and scipy raise many kinds on bad numbers
        return TailTests.failed(f"tail tests: powerlaw failed: {type(error).__name__}: {error}")
    result = TailTests(
        R_lognormal=float(R_lognormal),
        p_lognormal=float(p_lognormal),
        R_exponential=float(R_exponential),
        p_exponential=float(p_exponential),
    )
    numbers = (result.R_lognormal, result.p_lognormal, result.R_exponential, result.p_exponential)
    if all(math.isfinite(x) for x in numbers):
        return result
    return dataclasses.replace(result, message="tail tests: a result is not finite")
