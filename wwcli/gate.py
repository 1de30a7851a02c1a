"""The exit-code policy: which layers make `wwcli analyze` fail a CI job. Decided once per run
(`evaluate`); the command line prints the outcome's trips and returns its code.

The gate judges only layers it can judge: by default dense and convolutional layers with at
least GATE_MIN_EVALS eigenvalues, never embedding tables. Every other analyzed layer is still
reported, and the outcome says why it was not gated. A baseline (a previous JSON report) makes
the gate fail only on what got worse since.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from wwcli.engine.results import FitStatus
from wwcli.exit_codes import ExitCode
from wwcli.results import LayerResult

if TYPE_CHECKING:
    from wwcli.results import RunResult

__all__ = [
    "GATE_MIN_EVALS",
    "Baseline",
    "ExitCode",
    "GateOutcome",
    "GatePolicy",
    "Judgement",
    "Trip",
    "evaluate",
    "exit_code",
    "judge",
    "trip_reason",
]

GATE_MIN_EVALS = 64
"""Fewest eigenvalues a layer needs to be gated. Measured on pure noise (tests/test_gate.py,
`test_the_default_min_evals_keeps_noise_out_of_the_gate`, and the table in the README): a square
Gaussian matrix, which holds no learned structure at all, gets alpha < 2 in 58 % of draws at 16
eigenvalues, 5.8 % at 32, 2.0 % at 48, 0.5 % at 64 and 0 of 400 at 96 (4:1 rectangles: 0 from 20
up). 64 is the smallest size where noise alone trips the default line less than 1 % of the time;
weightwatcher's own small-sample fit branch starts below 20."""

GATED_TYPES: frozenset[str] = frozenset({"dense", "conv1d", "conv2d"})
"""Layer types the gate judges by default: not embedding tables, whose heavy tails say more
about the token distribution than about training."""


@dataclass(frozen=True)
class Baseline:
    """A previous report's alphas, to fail only on what got worse since."""

    source: str
    """Where it was read from (for messages)."""
    alphas: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)
    """checkpoint label -> layer name -> alpha (None: the fit failed then). A baseline of one
    checkpoint is matched by layer name alone, whatever the checkpoint's path is now."""

    def for_checkpoint(self, checkpoint: str) -> Mapping[str, float | None] | None:
        """The baseline's layers for this checkpoint, or None when it has none for it."""
        if len(self.alphas) == 1:
            return next(iter(self.alphas.values()))
        return self.alphas.get(checkpoint)


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
    fail_below_by_type: tuple[tuple[str, float], ...] = ()
    """Per-type lines that replace fail_below for layers of that type (("conv2d", 1.8), ...)."""
    gate_min_evals: int = GATE_MIN_EVALS
    """Layers with fewer eigenvalues are analyzed and shown, but not gated."""
    gated_types: tuple[str, ...] = tuple(sorted(GATED_TYPES))
    """Layer types the gate judges."""
    gate_ignore: tuple[str, ...] = ()
    """Globs of layer names the gate does not judge (the layers stay in the report)."""
    max_over_trained: int = 0
    """The gate fails only when more than this many layers trip."""
    allow_empty: bool = False
    """Whether a run in which the gate judged no layer may pass (otherwise: exit 2)."""
    baseline: Baseline | None = None
    """When set, only layers newly over the line (or whose alpha dropped by more than
    max_drop) trip."""
    max_drop: float | None = None
    """With a baseline: a layer whose alpha fell by more than this since trips too."""

    def __post_init__(self) -> None:
        lines = [("fail_below", self.fail_below), ("fail_above", self.fail_above)]
        lines += [(f"fail_below {kind}", value) for kind, value in self.fail_below_by_type]
        lines += [("max_drop", self.max_drop)]
        for name, value in lines:
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
        if self.gate_min_evals < 0:
            raise ValueError(f"gate_min_evals must be >= 0, got {self.gate_min_evals}")
        if self.max_over_trained < 0:
            raise ValueError(f"max_over_trained must be >= 0, got {self.max_over_trained}")
        if self.max_drop is not None and self.max_drop < 0:
            raise ValueError(f"max_drop must be >= 0, got {self.max_drop}")

    def line_for(self, layer_type: str) -> float | None:
        """The alpha below which a layer of this type trips."""
        for kind, value in self.fail_below_by_type:
            if kind == layer_type:
                return value
        return self.fail_below

    def not_gated(self, result: LayerResult) -> str:
        """Why the gate does not judge this layer, or "" when it does."""
        layer_type = result.spec.layer_type.value
        if layer_type not in self.gated_types:
            return f"{layer_type} layers are not gated"
        if result.metrics.num_evals < self.gate_min_evals:
            return f"{result.metrics.num_evals} eigenvalues < gate_min_evals {self.gate_min_evals}"
        for pattern in self.gate_ignore:
            if fnmatch.fnmatchcase(result.spec.name, pattern):
                return f"ignored by gate_ignore {pattern}"
        return ""

    def describe(self, layer_type: str) -> str:
        """The rule applied to a gated layer of this type, in one line."""
        parts = []
        line = self.line_for(layer_type)
        if line is not None:
            parts.append(f"alpha < {line:g}")
        if self.fail_above is not None:
            parts.append(f"alpha > {self.fail_above:g}")
        if self.fail_on_failed_fit:
            parts.append("failed fit")
        rule = " or ".join(parts) if parts else "nothing"
        if self.baseline is not None:
            rule += " (new since the baseline"
            rule += f", or alpha dropped by > {self.max_drop:g})" if self.max_drop else ")"
        return f"{rule} ({layer_type})"


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
class Judgement:
    """What the gate made of one analyzed layer."""

    checkpoint: str
    """The checkpoint's path as the user gave it."""
    layer_id: int
    """The layer's id."""
    name: str
    """The layer's full name in the file."""
    layer_type: str
    """The layer's type ("dense", ...)."""
    gated: bool
    """Whether the gate judged it."""
    why_not: str
    """Why it was not gated ("" when it was)."""
    tripped: bool
    """Whether it tripped the gate."""
    reason: str
    """Why it tripped ("" when it did not)."""
    policy: str
    """The rule applied to it, in one line ("" when not gated)."""


@dataclass(frozen=True)
class GateOutcome:
    """The gate's decision on a run: the exit code, the layers that tripped, and why."""

    code: ExitCode
    """ERROR when an input could not be read or (without allow_empty) no layer was gated; else
    GATE when more than max_over_trained layers tripped (and not exit_zero); else OK."""
    trips: tuple[Trip, ...]
    """Every layer that tripped, in input and id order (empty under exit_zero)."""
    judged: tuple[Judgement, ...] = ()
    """One judgement per analyzed layer, in input and id order."""
    notes: tuple[str, ...] = ()
    """Lines for people: layers that appeared or vanished since the baseline, why nothing was
    gated, how many trips the policy tolerates."""
    empty: str = ""
    """Set when the gate judged no layer: why (the run then exits 2 unless allow_empty)."""


def trip_reason(result: LayerResult, policy: GatePolicy) -> str | None:
    """Why this layer trips the gate under `policy` on its own numbers (no baseline, whether or
    not it is gated), or None when it does not."""
    fit = result.metrics.fit
    if fit.status is not FitStatus.SUCCESS:
        if not policy.fail_on_failed_fit:
            return None
        return f"power-law fit failed: {fit.message}" if fit.message else "power-law fit failed"
    line = policy.line_for(result.spec.layer_type.value)
    if line is not None and fit.alpha < line:
        return f"alpha {fit.alpha:.3f} < {line:g}"
    if policy.fail_above is not None and fit.alpha > policy.fail_above:
        return f"alpha {fit.alpha:.3f} > {policy.fail_above:g}"
    return None


def judge(
    checkpoint: str,
    result: LayerResult,
    policy: GatePolicy,
    before: Mapping[str, float | None] | None = None,
) -> Judgement:
    """The gate's rule applied to one analyzed layer (against a baseline's alphas, if any)."""
    why_not = policy.not_gated(result)
    reason = None if why_not else trip_reason(result, policy)
    if not why_not and before is not None:
        reason = _against_baseline(result, reason, before, policy)
    layer_type = result.spec.layer_type.value
    return Judgement(
        checkpoint,
        result.spec.layer_id,
        result.spec.name,
        layer_type,
        gated=not why_not,
        why_not=why_not,
        tripped=reason is not None,
        reason=reason or "",
        policy="" if why_not else policy.describe(layer_type),
    )


def exit_code(results: Iterable[LayerResult], policy: GatePolicy) -> ExitCode:
    """The gate's layer rule alone (no baseline, no run-level checks: an empty list is OK):
    ExitCode.GATE when more than max_over_trained gated layers trip, else ExitCode.OK."""
    if policy.exit_zero:
        return ExitCode.OK
    tripped = sum(judge("", result, policy).tripped for result in results)
    return ExitCode.GATE if tripped > policy.max_over_trained else ExitCode.OK


def _against_baseline(
    result: LayerResult, reason: str | None, before: Mapping[str, float | None], policy: GatePolicy
) -> str | None:
    """With a baseline, a layer trips only when it is newly over the line, or its alpha dropped
    by more than max_drop; a layer the baseline does not have is judged on its own."""
    name = result.spec.name
    if name not in before:
        return reason
    earlier = before[name]
    alpha = result.metrics.fit.alpha
    dropped = earlier is not None and math.isfinite(alpha) and earlier - alpha
    if policy.max_drop is not None and dropped and dropped > policy.max_drop:
        return f"alpha {alpha:.3f} dropped by {dropped:.3f} since the baseline"
    if reason is None:
        return None
    was_over = earlier is None and policy.fail_on_failed_fit
    if earlier is not None:
        line = policy.line_for(result.spec.layer_type.value)
        was_over = (line is not None and earlier < line) or (
            policy.fail_above is not None and earlier > policy.fail_above
        )
    return None if was_over else f"{reason} (new since the baseline)"


def evaluate(run: RunResult, policy: GatePolicy | None = None) -> GateOutcome:
    """The gate's decision on `run` under `policy` (the run's own by default)."""
    policy = policy or run.settings.gate
    judged: list[Judgement] = []
    notes: list[str] = []
    for report in run.reports:
        before = policy.baseline.for_checkpoint(report.checkpoint) if policy.baseline else None
        if policy.baseline is not None and before is None:
            notes.append(
                f"baseline {policy.baseline.source} has no checkpoint {report.checkpoint}: "
                "its layers are judged on their own"
            )
        judged.extend(judge(report.checkpoint, result, policy, before) for result in report.layers)
        if before is not None:
            now = {result.spec.name for result in report.layers}
            vanished = sorted(set(before) - now)
            appeared = sorted(now - set(before))
            if vanished:
                notes.append(
                    f"{report.checkpoint}: {len(vanished)} layers of the baseline are gone: "
                    + ", ".join(vanished[:10])
                    + (", ..." if len(vanished) > 10 else "")
                )
            if appeared:
                notes.append(
                    f"{report.checkpoint}: {len(appeared)} layers are new since the baseline "
                    "(judged on their own): "
                    + ", ".join(appeared[:10])
                    + (", ..." if len(appeared) > 10 else "")
                )
    empty = ""
    if run.reports and not any(judgement.gated for judgement in judged):
        empty = (
            "no layer was analyzed"
            if not judged
            else f"none of the {len(judged)} analyzed layers is gated"
        )
    trips = tuple(Trip(j.checkpoint, j.layer_id, j.name, j.reason) for j in judged if j.tripped)
    if policy.exit_zero:
        trips = ()
    if run.failures or (empty and not policy.allow_empty and not policy.exit_zero):
        code = ExitCode.ERROR
    elif len(trips) > policy.max_over_trained:
        code = ExitCode.GATE
    else:
        code = ExitCode.OK
        if trips:
            notes.append(
                f"{len(trips)} layers tripped, within --max-over-trained {policy.max_over_trained}"
            )
    return GateOutcome(code, trips, tuple(judged), tuple(notes), empty)
