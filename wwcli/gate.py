"""The exit-code policy: which layers make `wwcli analyze` fail a CI job. Decided once per run
(`evaluate`); the command line prints the outcome's trips and returns its code.

The gate judges only layers it can judge: by default dense and convolutional layers with at
least GATE_MIN_EVALS eigenvalues, never embedding tables. Every other analyzed layer is still
reported, and the outcome says why it was not gated. A baseline (a previous JSON report) makes
the gate fail only on what got worse since.

`--fail-on EXPR` rules (`FailOnRule`) trip a layer on any of its named metrics: the row keys of
the column registry, the optional groups' too (`alpha < 2 and num_spikes > 10`, `delta_alpha >
1`). The expression language is parsed here, never evaluated by Python: comparisons (< <= > >=
== !=) of metric names, numbers and quoted words, `and`, `or`, `not` and parentheses.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from wwcli.engine.results import FitStatus
from wwcli.exit_codes import ExitCode
from wwcli.results import LayerResult

if TYPE_CHECKING:
    from wwcli.results import RunResult

__all__ = [
    "GATE_MIN_EVALS",
    "Baseline",
    "ExitCode",
    "FailOnRule",
    "GateOutcome",
    "GatePolicy",
    "Judgement",
    "Trip",
    "evaluate",
    "exit_code",
    "judge",
    "metric_names",
    "parse_fail_on",
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
    fail_on: tuple[str, ...] = ()
    """--fail-on rules: a gated layer for which any of these expressions holds trips
    (`parse_fail_on`)."""

    def __post_init__(self) -> None:
        for text in self.fail_on:
            parse_fail_on(text)  # ValueError now, naming the unknown metric
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

    def rule(self) -> str:
        """The whole rule in one line, per-type lines included (what the gate prints when
        --fail-on rules are in it)."""
        parts = []
        if self.fail_below is not None:
            parts.append(f"alpha < {self.fail_below:g}")
        parts.extend(f"alpha < {value:g} ({kind})" for kind, value in self.fail_below_by_type)
        if self.fail_above is not None:
            parts.append(f"alpha > {self.fail_above:g}")
        if self.fail_on_failed_fit:
            parts.append("failed fit")
        parts.extend(f"({parse_fail_on(text).text})" for text in self.fail_on)
        return " or ".join(parts) if parts else "nothing"

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
        parts.extend(f"fail-on ({parse_fail_on(text).text})" for text in self.fail_on)
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
    rules: tuple[str, ...] = ()
    """The rule the gate applied, in one line, when --fail-on rules are part of it (printed
    before the trips); () otherwise."""


def trip_reason(
    result: LayerResult, policy: GatePolicy, groups: Collection[str] = ()
) -> str | None:
    """Why this layer trips the gate under `policy` on its own numbers (no baseline, whether or
    not it is gated), or None when it does not. `groups`: the optional groups of columns the
    run computed, which --fail-on rules may name."""
    return _line_reason(result, policy) or _rule_reason(result, policy, groups)


def _rule_reason(result: LayerResult, policy: GatePolicy, groups: Collection[str]) -> str | None:
    """The first --fail-on rule that holds for the layer, with the values it read."""
    if not policy.fail_on:
        return None
    values = _layer_values(result, groups)
    for text in policy.fail_on:
        rule = parse_fail_on(text)
        if rule.holds(values) is True:
            shown = ", ".join(f"{name} {_shown(values.get(name))}" for name in rule.names)
            return f"fail-on {rule.text}: {shown}"
    return None


def _shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "null" if value is None else str(value)


def _layer_values(result: LayerResult, groups: Collection[str]) -> Mapping[str, object]:
    """The layer's row values; without `groups` (exit_code, a bare LayerResult), every group's
    columns: a group the layer has no values for gives None, which never trips."""
    from wwcli.diagnostics import GROUP_OPTIONS
    from wwcli.report.columns import ANALYZE_REGISTRY, make_row

    return make_row(ANALYZE_REGISTRY, "", result, groups or tuple(GROUP_OPTIONS))


def _line_reason(result: LayerResult, policy: GatePolicy) -> str | None:
    """Why the layer trips the alpha lines or the failed-fit check, or None."""
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
    groups: Collection[str] = (),
) -> Judgement:
    """The gate's rule applied to one analyzed layer (against a baseline's alphas, if any;
    --fail-on rules are judged on the layer's own numbers: a baseline holds alphas only)."""
    why_not = policy.not_gated(result)
    reason = None if why_not else _line_reason(result, policy)
    if not why_not and before is not None:
        reason = _against_baseline(result, reason, before, policy)
    if not why_not and reason is None:
        reason = _rule_reason(result, policy, groups)
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
        judged.extend(
            judge(report.checkpoint, result, policy, before, report.groups)
            for result in report.layers
        )
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
    if policy.baseline is not None and policy.fail_on:
        notes.append("--fail-on rules are judged on this run's numbers (a baseline holds alphas)")
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
                f"{len(trips)} layers tripped, within --max-trips {policy.max_over_trained}"
            )
    rules = (policy.rule(),) if policy.fail_on else ()
    return GateOutcome(code, trips, tuple(judged), tuple(notes), empty, rules)


# --- --fail-on: a small expression language over a layer's metrics -------------------------------

TEXT_METRICS = frozenset(
    {"checkpoint", "name", "layer_type", "status", "warning", "verdict", "message", "delta_base"}
)
"""Row keys whose values are words (compared with == and != only); every *_message is too."""


def _is_text(name: str) -> bool:
    return name in TEXT_METRICS or name.endswith("_message")


def metric_names() -> dict[str, tuple[str, ...]]:
    """Every name a --fail-on rule may use: the row keys of every group of the registry, each
    with the optional groups a run must compute for it to have a value (() for built-in ones)."""
    from wwcli.report.columns import ANALYZE_REGISTRY

    return {column.key: column.groups for column in ANALYZE_REGISTRY if column.key is not None}


_TOKEN = (  # compiled on the first --fail-on rule (re caches it), not at import
    r"\s*(?:(?P<number>-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<text>\"[^\"]*\"|'[^']*')"
    r"|(?P<op><=|>=|==|!=|<|>)"
    r"|(?P<paren>[()]))"
)
_KEYWORDS = ("and", "or", "not")
_COMPARE: dict[str, Callable[[object, object], bool]] = {
    "<": lambda a, b: a < b,  # type: ignore[operator]
    "<=": lambda a, b: a <= b,  # type: ignore[operator]
    ">": lambda a, b: a > b,  # type: ignore[operator]
    ">=": lambda a, b: a >= b,  # type: ignore[operator]
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


@dataclass(frozen=True)
class _Operand:
    kind: str  # "number", "text" or "name"
    value: float | str

    def read(self, values: Mapping[str, object]) -> object:
        if self.kind != "name":
            return self.value
        found = values.get(str(self.value))
        if isinstance(found, bool):
            return float(found)
        if isinstance(found, int | float):
            return float(found) if math.isfinite(found) else None
        return found

    def __str__(self) -> str:
        if self.kind == "number":
            return f"{self.value:g}"
        return repr(self.value) if self.kind == "text" else str(self.value)


@dataclass(frozen=True)
class _Compare:
    left: _Operand
    op: str
    right: _Operand

    def holds(self, values: Mapping[str, object]) -> bool | None:
        left, right = self.left.read(values), self.right.read(values)
        if left is None or right is None:
            return None  # a missing value (a failed fit, a group not computed) is unknown
        if isinstance(left, str) != isinstance(right, str):
            return None
        return _COMPARE[self.op](left, right)

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right}"


@dataclass(frozen=True)
class _Not:
    operand: _Node

    def holds(self, values: Mapping[str, object]) -> bool | None:
        inner = self.operand.holds(values)
        return None if inner is None else not inner

    def __str__(self) -> str:
        return f"not {_wrapped(self.operand)}"


@dataclass(frozen=True)
class _Join:
    op: str  # "and" or "or"
    operands: tuple[_Node, ...]

    def holds(self, values: Mapping[str, object]) -> bool | None:
        # Kleene's three-valued logic: unknown and false is false, unknown or true is true.
        results = [operand.holds(values) for operand in self.operands]
        if self.op == "and":
            return False if False in results else (None if None in results else True)
        return True if True in results else (None if None in results else False)

    def __str__(self) -> str:
        return f" {self.op} ".join(
            _wrapped(operand) if isinstance(operand, _Join) else str(operand)
            for operand in self.operands
        )


_Node = Union[_Compare, _Not, _Join]  # noqa: UP007 - a runtime alias of classes defined above


def _wrapped(node: _Node) -> str:
    return str(node) if isinstance(node, _Compare) else f"({node})"


@dataclass(frozen=True)
class FailOnRule:
    """A parsed --fail-on expression."""

    text: str
    """The expression as the gate prints it (normalized spacing and parentheses)."""
    names: tuple[str, ...]
    """The metrics it reads, in order of first use."""
    groups: tuple[str, ...]
    """The optional groups those metrics need the run to compute."""
    tree: _Node = field(repr=False)
    """The parsed expression."""

    def holds(self, values: Mapping[str, object]) -> bool | None:
        """Whether the rule holds for a layer's row values: True, False, or None when a value
        it needs is missing and the rest does not decide (a missing value never trips)."""
        return self.tree.holds(values)


class _Parser:
    """Recursive descent over the tokens: or > and > not > comparison, parentheses."""

    def __init__(self, text: str, known: Collection[str]) -> None:
        self.text = text
        self.known = known
        self.tokens: list[tuple[str, str, int]] = []
        position = 0
        while position < len(text):
            if text[position:].strip() == "":
                break
            match = re.compile(_TOKEN).match(text, position)
            if match is None or match.end() == position:
                start = len(text) - len(text[position:].lstrip())
                raise ValueError(f"unexpected {text[start]!r} at column {start + 1}")
            kind = match.lastgroup or ""
            value = match.group(kind)
            start = match.start(kind)
            if kind == "name" and value.lower() in _KEYWORDS:
                kind, value = "keyword", value.lower()
            self.tokens.append((kind, value, start))
            position = match.end()
        self.index = 0
        self.names: list[str] = []

    def _peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def _where(self) -> str:
        token = self._peek()
        return f"at column {token[2] + 1} ({token[1]!r})" if token else "at the end"

    def _take(self, kind: str, value: str | None = None) -> bool:
        token = self._peek()
        if token is not None and token[0] == kind and (value is None or token[1] == value):
            self.index += 1
            return True
        return False

    def parse(self) -> _Node:
        if not self.tokens:
            raise ValueError("the rule is empty")
        node = self._or()
        if self._peek() is not None:
            raise ValueError(f"expected 'and', 'or' or the end {self._where()}")
        return node

    def _or(self) -> _Node:
        operands = [self._and()]
        while self._take("keyword", "or"):
            operands.append(self._and())
        return operands[0] if len(operands) == 1 else _Join("or", tuple(operands))

    def _and(self) -> _Node:
        operands = [self._not()]
        while self._take("keyword", "and"):
            operands.append(self._not())
        return operands[0] if len(operands) == 1 else _Join("and", tuple(operands))

    def _not(self) -> _Node:
        if self._take("keyword", "not"):
            return _Not(self._not())
        if self._take("paren", "("):
            node = self._or()
            if not self._take("paren", ")"):
                raise ValueError(f"expected ')' {self._where()}")
            return node
        return self._comparison()

    def _operand(self) -> _Operand:
        token = self._peek()
        if token is None or token[0] not in ("number", "name", "text"):
            raise ValueError(f"expected a metric name, a number or a quoted word {self._where()}")
        self.index += 1
        kind, value, _ = token
        if kind == "number":
            return _Operand("number", float(value))
        if kind == "text":
            return _Operand("text", value[1:-1])
        if value not in self.known:
            near = difflib.get_close_matches(value, list(self.known), n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            raise ValueError(f"unknown metric {value!r}{hint}; metrics are the CSV/JSON row keys")
        if value not in self.names:
            self.names.append(value)
        return _Operand("name", value)

    def _comparison(self) -> _Compare:
        left = self._operand()
        token = self._peek()
        if token is None or token[0] != "op":
            raise ValueError(
                f"expected a comparison (< <= > >= == !=) after {left} {self._where()}"
            )
        self.index += 1
        right = self._operand()
        compare = _Compare(left, token[1], right)
        texts = [
            _is_text(str(o.value)) if o.kind == "name" else o.kind == "text" for o in (left, right)
        ]
        if any(texts) and compare.op not in ("==", "!="):
            raise ValueError(f"{compare}: words compare with == and != only")
        if texts[0] != texts[1]:
            raise ValueError(f"{compare}: compares a word with a number")
        return compare


@functools.lru_cache(maxsize=256)
def parse_fail_on(text: str) -> FailOnRule:
    """A --fail-on expression as a rule; ValueError naming what is wrong (an unknown metric
    with the nearest names, a syntax error with its column)."""
    if not isinstance(text, str):
        raise ValueError(f"fail_on rules must be strings, got {text!r}")
    known = metric_names()
    parser = _Parser(text, known)
    tree = parser.parse()
    groups: dict[str, None] = {}
    for name in parser.names:
        groups.update(dict.fromkeys(known[name]))
    return FailOnRule(str(tree), tuple(parser.names), tuple(groups), tree)
