"""The exit-code policy: which layers make `wwcli analyze` fail a CI job."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from wwcli.analysis import LayerResult
from wwcli.engine.results import FitStatus


class ExitCode(enum.IntEnum):
    """What `wwcli` returns to the shell."""

    OK = 0
    """No layer tripped the gate (or --exit-zero was given)."""
    GATE = 1
    """Some analyzed layer tripped the gate: alpha below --fail-below, above --fail-above, or a
    failed fit with --fail-on-failed-fit."""
    ERROR = 2
    """Usage error, or an input that is missing, unreadable, unsupported or unsafe; also any
    internal error (a crash is never reported as 1)."""


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
