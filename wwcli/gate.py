"""The exit-code policy: which layers make `wwcli analyze` fail a CI job. Decided once per run
(`evaluate`); the command line prints the outcome's trips and returns its code."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wwcli.engine.results import FitStatus
from wwcli.exit_codes import ExitCode
from wwcli.results import LayerResult

if TYPE_CHECKING:
    from wwcli.results import RunResult

__all__ = ["ExitCode", "GateOutcome", "GatePolicy", "Trip", "evaluate", "exit_code", "trip_reason"]


@dataclass(frozen=True)
class GatePolicy:
    """What trips the gate."""

    fail_below: float | None = 2.0
    """A layer with alpha < fail_below trips the gate; None turns the check off."""
    fail_above: float | None = None
    """A layer with alpha > fail_above trips the gate; None (the default) turns it off."""
    fail_on_failed_fit: bool = False
    """Whether a layer whose power-law fit failed trips the gate."""
    exit_zero: bool = False
    """Report, never fail: the exit code is 0 whatever the layers say."""

    def __post_init__(self) -> None:
        for name in ("fail_below", "fail_above"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if (
            self.fail_below is not None
            and self.fail_above is not None
            and self.fail_below > self.fail_above
        ):
            raise ValueError(
                f"fail_below ({self.fail_below}) must not exceed fail_above ({self.fail_above})"
            )


@dataclass(frozen=True)
class Trip:
    """A layer that tripped the gate, and why."""

    checkpoint: str
    """The checkpoint's path as the user gave it."""
    layer_id: int
    """The layer's id."""
    name: str
    """The layer's full name in the file."""
    reason: str
    """Why it tripped, for people ("alpha 1.750 < 2")."""


@dataclass(frozen=True)
class GateOutcome:
    """The gate's decision on a run: the exit code and the layers that tripped."""

    code: ExitCode
    """ERROR when an input could not be read; else GATE when a layer tripped (and the policy
    does not say exit_zero); else OK."""
    trips: tuple[Trip, ...]
    """Every layer that tripped, in input and id order (empty under exit_zero)."""


def trip_reason(result: LayerResult, policy: GatePolicy) -> str | None:
    """Why this layer trips the gate under `policy`, or None when it does not."""
    fit = result.metrics.fit
    if fit.status is not FitStatus.SUCCESS:
        if not policy.fail_on_failed_fit:
            return None
        return f"power-law fit failed: {fit.message}" if fit.message else "power-law fit failed"
    if policy.fail_below is not None and fit.alpha < policy.fail_below:
        return f"alpha {fit.alpha:.3f} < {policy.fail_below:g}"
    if policy.fail_above is not None and fit.alpha > policy.fail_above:
        return f"alpha {fit.alpha:.3f} > {policy.fail_above:g}"
    return None


def exit_code(results: Iterable[LayerResult], policy: GatePolicy) -> ExitCode:
    """ExitCode.GATE when any analyzed layer trips the gate, else ExitCode.OK."""
    if policy.exit_zero:
        return ExitCode.OK
    tripped = any(trip_reason(result, policy) is not None for result in results)
    return ExitCode.GATE if tripped else ExitCode.OK


def evaluate(run: RunResult, policy: GatePolicy | None = None) -> GateOutcome:
    """The gate's decision on `run` under `policy` (the run's own by default)."""
    policy = policy or run.settings.gate
    trips: list[Trip] = []
    if not policy.exit_zero:
        for report in run.reports:
            for result in report.layers:
                reason = trip_reason(result, policy)
                if reason is not None:
                    trips.append(
                        Trip(report.checkpoint, result.spec.layer_id, result.spec.name, reason)
                    )
    code = ExitCode.ERROR if run.failures else ExitCode.GATE if trips else ExitCode.OK
    return GateOutcome(code, tuple(trips))
