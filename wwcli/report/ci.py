"""Outputs for CI systems: GitHub Actions workflow commands, JUnit XML, a Markdown job summary
and SARIF 2.1.0. Each renders the gate's decision (`gate.evaluate`) on a run, so what a CI page
shows is what decided the exit code.

Names, paths and messages come from files, that is from whoever made them. Every format escapes
them by its own rules on top of `escape.printable` (no control character reaches a log, an XML
document or a rendered page): a layer name can never start a second workflow command, add a
table column, or make a document invalid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from wwcli import __version__
from wwcli.engine.results import FitStatus, Verdict
from wwcli.exit_codes import ExitCode
from wwcli.gate import GateOutcome, Judgement, evaluate
from wwcli.report.columns import VERDICT_VALUES, VERDICT_WORDS
from wwcli.report.escape import printable
from wwcli.results import CheckpointListing, CheckpointReport, LayerResult, RunResult

__all__ = ["GithubFormatter", "JunitFormatter", "MarkdownFormatter", "SarifFormatter"]


# --- What the gate made of each layer -----------------------------------------------------------


def _judgements(outcome: GateOutcome) -> tuple[Judgement, ...]:
    """One judgement per analyzed layer, in input and id order: the gate's own, so that what a
    CI page shows is what decided the exit code."""
    return outcome.judged


@dataclass(frozen=True)
class _Row:
    """An analyzed layer with the gate's judgement of it."""

    result: LayerResult
    """The layer and its numbers."""
    judgement: Judgement
    """What the gate made of it."""
    failing: bool
    """Whether it is one of the outcome's trips (what fails the job, unless the policy
    tolerates that many)."""


@dataclass(frozen=True)
class _Judged:
    """A run as the CI formats see it: the gate's outcome and each report's judged rows."""

    outcome: GateOutcome
    """The gate's decision."""
    checkpoints: tuple[tuple[CheckpointReport, tuple[_Row, ...]], ...]
    """Each report with its rows, in input order."""

    @property
    def level(self) -> str:
        """How grave a trip is: "error" when the run fails, "warning" when it passes anyway
        (the policy tolerates that many trips)."""
        return "warning" if self.outcome.code is ExitCode.OK else "error"

    @property
    def rows(self) -> tuple[_Row, ...]:
        """Every row of the run."""
        return tuple(row for _, rows in self.checkpoints for row in rows)


def _judge(run: RunResult) -> _Judged:
    outcome = evaluate(run)
    by_layer = {(j.checkpoint, j.layer_id): j for j in _judgements(outcome)}
    trips = {(trip.checkpoint, trip.layer_id) for trip in outcome.trips}
    checkpoints = []
    for report in run.reports:
        rows = []
        for result in report.layers:
            key = (report.checkpoint, result.spec.layer_id)
            judgement = by_layer.get(key) or Judgement(
                report.checkpoint,
                result.spec.layer_id,
                result.spec.name,
                result.spec.layer_type.value,
                gated=False,
                why_not="not judged by the gate",
                tripped=False,
                reason="",
                policy="",
            )
            rows.append(_Row(result, judgement, key in trips))
        checkpoints.append((report, tuple(rows)))
    return _Judged(outcome, tuple(checkpoints))


def _one_report(report: CheckpointReport) -> RunResult:
    """A run of one report, judged under the default settings (a report alone carries none)."""
    from wwcli.settings import RunSettings

    return RunResult(RunSettings(), (report,))


def _alpha(result: LayerResult) -> str:
    alpha = result.metrics.fit.alpha
    if result.metrics.fit.status is not FitStatus.SUCCESS or not math.isfinite(alpha):
        return "n/a (fit failed)"
    return f"{alpha:.3f}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _run_summary(judged: _Judged, failures: int) -> str:
    """One line on the whole run."""
    rows = judged.rows
    gated = sum(row.judgement.gated for row in rows)
    trips = len(judged.outcome.trips)
    text = (
        f"{_count(len(judged.checkpoints), 'checkpoint')}, {_count(len(rows), 'layer')} "
        f"analyzed, {gated} gated, {trips} tripped the gate"
    )
    if failures:
        text += f"; {_count(failures, 'input')} could not be read"
    return text


# --- Rules (kinds of trip) ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """A kind of trip: the SARIF rule and the JUnit failure type."""

    id: str
    """Stable identifier ("alpha-below-threshold")."""
    name: str
    """PascalCase name, as SARIF viewers show it."""
    description: str
    """One sentence for people."""


_RULES = (
    _Rule(
        "alpha-below-threshold",
        "AlphaBelowThreshold",
        "The layer's power-law exponent alpha is below the gate's line: its spectrum is very "
        "heavy-tailed (a description, not a finding of over-training).",
    ),
    _Rule(
        "alpha-above-threshold",
        "AlphaAboveThreshold",
        "The layer's power-law exponent alpha is above the gate's line: its spectrum has a "
        "light tail.",
    ),
    _Rule(
        "alpha-dropped-since-baseline",
        "AlphaDroppedSinceBaseline",
        "The layer's alpha fell by more than the allowed amount since the baseline report.",
    ),
    _Rule("failed-fit", "FailedFit", "No power-law exponent could be fitted to the layer's ESD."),
    _Rule(
        "fail-on-rule",
        "FailOnRule",
        "The layer's metrics satisfy a --fail-on rule of the gate (the rule is in the message).",
    ),
    _Rule("gate-tripped", "GateTripped", "The layer tripped the gate."),
)


def _rule_for(row: _Row) -> _Rule:
    """The kind of a trip, from the layer's fit and the gate's reason."""
    reason = row.judgement.reason
    if reason.startswith("fail-on "):
        rule_id = "fail-on-rule"
    elif row.result.metrics.fit.status is not FitStatus.SUCCESS:
        rule_id = "failed-fit"
    elif "dropped by" in reason:
        rule_id = "alpha-dropped-since-baseline"
    elif " < " in reason:
        rule_id = "alpha-below-threshold"
    elif " > " in reason:
        rule_id = "alpha-above-threshold"
    else:
        rule_id = "gate-tripped"
    return next(rule for rule in _RULES if rule.id == rule_id)


def _trip_message(row: _Row) -> str:
    """What a tripped layer's annotation, failure or result says: the layer, the reason, alpha
    (when the reason does not already say it) and the policy."""
    judgement = row.judgement
    alpha = "" if judgement.reason.startswith("alpha") else f"; alpha {_alpha(row.result)}"
    return (
        f"layer {judgement.layer_id} {judgement.name} ({judgement.layer_type}) tripped the gate: "
        f"{judgement.reason}{alpha}; policy: {judgement.policy or 'n/a'}"
    )


# --- GitHub Actions workflow commands -----------------------------------------------------------


def _command_data(text: str) -> str:
    """`text` as the data of a workflow command (after the second `::`): GitHub's escapes for
    `%`, CR and LF, after `printable`, so nothing in it can end the line or style the log."""
    return printable(text).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _command_property(text: str) -> str:
    """`text` as a workflow command property value: the data escapes plus `:` and `,`."""
    return _command_data(text).replace(":", "%3A").replace(",", "%2C")


def _command(command: str, message: str, **properties: str) -> str:
    props = ",".join(f"{key}={_command_property(value)}" for key, value in properties.items())
    return f"::{command}{' ' + props if props else ''}::{_command_data(message)}\n"


@dataclass(frozen=True)
class GithubFormatter:
    """GitHub Actions workflow commands: an `::error` annotation on the checkpoint for each
    layer that fails the job (`::warning` when the policy tolerates it), one for each input
    that could not be read, and a `::notice` summary when nothing tripped."""

    @property
    def streams(self) -> bool:
        """Never: the annotations follow the gate's decision on the whole run."""
        return False

    def render_report(self, report: CheckpointReport) -> str:
        """The annotations of a one-report run under the default gate."""
        return self.render(_one_report(report))

    def render(self, run: RunResult) -> str:
        """One line per tripped layer, per unreadable input, per note of the gate; a notice
        when no layer tripped."""
        judged = _judge(run)
        lines = [
            _command(
                "error",
                failure.message,
                file=failure.path,
                title="wwcli: cannot read the checkpoint",
            )
            for failure in run.failures
        ]
        level = judged.level
        for row in judged.rows:
            if row.failing:
                title = (
                    f"wwcli: layer {row.judgement.layer_id} {row.judgement.name} "
                    f"({row.judgement.reason})"
                )
                lines.append(
                    _command(level, _trip_message(row), file=row.judgement.checkpoint, title=title)
                )
        empty = judged.outcome.empty
        if empty:
            lines.append(_command("error", f"the gate judged no layer: {empty}", title="wwcli"))
        for note in judged.outcome.notes:
            lines.append(_command("notice", note, title="wwcli"))
        if not judged.outcome.trips and not run.failures:
            lines.append(_command("notice", _run_summary(judged, len(run.failures)), title="wwcli"))
        return "".join(lines)

    def render_listings(self, listings: Sequence[CheckpointListing]) -> str:
        """Nothing: describe judges no layer, so there is nothing to annotate."""
        return ""


# --- JUnit XML ----------------------------------------------------------------------------------

_NOT_XML = re.compile("[\ufffe\uffff]")
"""The two characters XML 1.0 refuses that `printable` leaves alone."""


def _xml_text(text: str) -> str:
    """`text` as XML 1.0 allows it: controls and lone surrogates escaped by `printable`, and
    U+FFFE, U+FFFF as `\\ufffe`, `\\uffff`."""
    return _NOT_XML.sub(lambda match: f"\\u{ord(match.group()):04x}", printable(text))


def _element(
    parent: ET.Element, tag: str, text: str | None = None, **attributes: str
) -> ET.Element:
    element = ET.SubElement(
        parent, tag, {key: _xml_text(value) for key, value in attributes.items()}
    )
    if text is not None:
        element.text = _xml_text(text)
    return element


def _properties(parent: ET.Element, values: dict[str, str]) -> None:
    properties = _element(parent, "properties")
    for name, value in values.items():
        _element(properties, "property", name=name, value=value)


def _junit_document(root: ET.Element) -> str:
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"


@dataclass(frozen=True)
class JunitFormatter:
    """JUnit XML: a test suite per checkpoint, a test case per analyzed layer (failed when it
    tripped the gate, skipped when the gate does not judge it), skipped test cases for the layers
    not analyzed, and an error test case for an input that could not be read."""

    @property
    def streams(self) -> bool:
        """Never: one document for the whole run."""
        return False

    def render_report(self, report: CheckpointReport) -> str:
        """The document of a one-report run under the default gate."""
        return self.render(_one_report(report))

    def render(self, run: RunResult) -> str:
        """The run's `<testsuites>` document."""
        judged = _judge(run)
        root = ET.Element("testsuites", {"name": "wwcli"})
        totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for report, rows in judged.checkpoints:
            counts = self._suite(root, report, rows)
            for key, value in counts.items():
                totals[key] += value
        for failure in run.failures:
            suite = _element(
                root, "testsuite", name=failure.path, tests="1", failures="0", errors="1"
            )
            suite.set("skipped", "0")
            case = _element(suite, "testcase", classname=failure.path, name="read checkpoint")
            _element(case, "error", failure.message, message=failure.message, type="input-error")
            totals["tests"] += 1
            totals["errors"] += 1
        for key, value in totals.items():
            root.set(key, str(value))
        return _junit_document(root)

    @staticmethod
    def _suite(
        root: ET.Element, report: CheckpointReport, rows: tuple[_Row, ...]
    ) -> dict[str, int]:
        suite = _element(root, "testsuite", name=report.checkpoint)
        _properties(suite, {"wwcli_version": __version__, "format": report.format})
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for row in rows:
            judgement = row.judgement
            case = _element(
                suite,
                "testcase",
                classname=report.checkpoint,
                name=f"layer {judgement.layer_id} {judgement.name}",
            )
            _properties(
                case,
                {
                    "alpha": _alpha(row.result),
                    "layer_type": judgement.layer_type,
                    "verdict": VERDICT_VALUES[row.result.metrics.verdict],
                    "policy": judgement.policy or "not gated",
                },
            )
            counts["tests"] += 1
            if row.failing:
                rule = _rule_for(row)
                _element(
                    case,
                    "failure",
                    _trip_message(row),
                    message=(
                        f"alpha {_alpha(row.result)}: {judgement.reason}; "
                        f"policy: {judgement.policy or 'n/a'}"
                    ),
                    type=rule.id,
                )
                counts["failures"] += 1
            elif not judgement.gated:
                _element(case, "skipped", message=f"not gated: {judgement.why_not}")
                counts["skipped"] += 1
        for skipped in report.skipped:
            case = _element(
                suite,
                "testcase",
                classname=report.checkpoint,
                name=f"layer {skipped.layer_id} {skipped.name}",
            )
            _element(case, "skipped", message=f"not analyzed: {skipped.reason}")
            counts["tests"] += 1
            counts["skipped"] += 1
        for key, value in counts.items():
            suite.set(key, str(value))
        return counts

    def render_listings(self, listings: Sequence[CheckpointListing]) -> str:
        """An empty `<testsuites>` document: describe runs no check."""
        root = ET.Element(
            "testsuites", {"name": "wwcli", "tests": "0", "failures": "0", "errors": "0"}
        )
        root.set("skipped", "0")
        return _junit_document(root)


# --- Markdown job summary -----------------------------------------------------------------------

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&$])")
"""Characters that would format, link, embed HTML or math, or split a table cell."""


def _md(text: str) -> str:
    """`text` as literal Markdown inline text (GitHub-flavoured, in a table cell too)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", printable(text))


@dataclass(frozen=True)
class MarkdownFormatter:
    """A Markdown summary for a CI page (GitHub's $GITHUB_STEP_SUMMARY): the gate's verdict,
    then per checkpoint a heading, its verdict and a table of its analyzed layers."""

    @property
    def streams(self) -> bool:
        """Never: the verdict heads the summary."""
        return False

    def render_report(self, report: CheckpointReport) -> str:
        """The summary of a one-report run under the default gate."""
        return self.render(_one_report(report))

    def render(self, run: RunResult) -> str:
        """The run's summary."""
        judged = _judge(run)
        outcome = judged.outcome
        if run.failures:
            verdict = "error (an input could not be read)"
        elif outcome.empty and outcome.code is not ExitCode.OK:
            verdict = f"error (the gate judged no layer: {outcome.empty})"
        elif outcome.trips and outcome.code is ExitCode.GATE:
            verdict = "failed"
        else:
            verdict = "passed"
        lines = [
            f"## wwcli: gate {_md(verdict)}",
            "",
            _md(_run_summary(judged, len(run.failures))) + ".",
            "",
        ]
        for note in outcome.notes:
            lines += [f"> {_md(note)}", ""]
        for failure in run.failures:
            lines += [
                f"### {_md(failure.path)}",
                "",
                f"**Could not be read:** {_md(failure.message)}",
                "",
            ]
        for report, rows in judged.checkpoints:
            lines += self._checkpoint(report, rows)
        return "\n".join(lines)

    @staticmethod
    def _checkpoint(report: CheckpointReport, rows: tuple[_Row, ...]) -> list[str]:
        gated = sum(row.judgement.gated for row in rows)
        failing = sum(row.failing for row in rows)
        if failing:
            verdict = f"**Gate: tripped** by {failing} of {_count(gated, 'gated layer')}."
        elif gated:
            verdict = f"Gate: passed, {_count(gated, 'gated layer')}, none tripped."
        else:
            verdict = "Gate: no layer gated."
        lines = [
            f"### {_md(report.checkpoint)}",
            "",
            f"{_md(report.format)} checkpoint. {verdict}",
            "",
        ]
        if rows:
            lines += [
                "| id | name | type | alpha | verdict | gate |",
                "| ---: | --- | --- | ---: | --- | --- |",
            ]
            for row in rows:
                lines.append(
                    f"| {row.judgement.layer_id} | {_md(row.judgement.name)} "
                    f"| {_md(row.judgement.layer_type)} | {_md(_alpha(row.result))} "
                    f"| {MarkdownFormatter._verdict(row)} | {MarkdownFormatter._gate(row)} |"
                )
            lines.append("")
        if report.skipped:
            skipped = ", ".join(
                f"{layer.layer_id} {layer.name} ({layer.reason})" for layer in report.skipped
            )
            lines += [f"Not analyzed: {_md(skipped)}", ""]
        return lines

    @staticmethod
    def _verdict(row: _Row) -> str:
        verdict = row.result.metrics.verdict
        text = _md(VERDICT_WORDS[verdict])
        return f"**{text}**" if verdict is Verdict.OVER_TRAINED else text

    @staticmethod
    def _gate(row: _Row) -> str:
        judgement = row.judgement
        if row.failing:
            return f"**tripped**: {_md(judgement.reason)} (policy: {_md(judgement.policy)})"
        if not judgement.gated:
            return f"not gated: {_md(judgement.why_not)}"
        if judgement.tripped:
            return f"over the line, not failing: {_md(judgement.reason)}"
        return f"pass ({_md(judgement.policy)})"

    def render_listings(self, listings: Sequence[CheckpointListing]) -> str:
        """describe's layers as one table per checkpoint."""
        lines = ["## wwcli: layers", ""]
        for listing in listings:
            lines += [
                f"### {_md(listing.checkpoint)}",
                "",
                "| id | name | type | shape | evals | analyzed |",
                "| ---: | --- | --- | --- | ---: | --- |",
            ]
            for layer in listing.layers:
                spec = layer.spec
                shape = "x".join(str(size) for size in spec.shape) or "-"
                analyzed = "yes" if layer.skip_reason is None else f"no: {_md(layer.skip_reason)}"
                lines.append(
                    f"| {spec.layer_id} | {_md(spec.name)} | {_md(spec.layer_type.value)} "
                    f"| {shape} | {spec.num_evals} | {analyzed} |"
                )
            lines.append("")
        return "\n".join(lines)


# --- SARIF 2.1.0 --------------------------------------------------------------------------------

SARIF_SCHEMA_URI = (
    "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
)
"""The OASIS standard's schema (tests/report/data/ holds a copy the tests validate against)."""


def artifact_uri(path: str) -> str:
    """The checkpoint path as a SARIF artifact URI: a relative path stays a relative reference
    (percent-encoded, `/`-separated, as given), an absolute one becomes a `file:` URI. Bytes
    that are not UTF-8 (a path decoded with surrogateescape) are encoded as the bytes they were."""
    text = path.replace(os.sep, "/") if os.sep != "/" else path
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    if not os.path.isabs(path):
        return quote(raw, safe="/")
    encoded = quote(raw, safe="/:")
    return "file://" + (encoded if encoded.startswith("/") else "/" + encoded)


def _sarif_result(row: _Row, level: str) -> dict[str, Any]:
    judgement = row.judgement
    rule = _rule_for(row)
    fingerprint = hashlib.sha256(
        "\0".join([judgement.checkpoint, judgement.name, rule.id]).encode("utf-8", "surrogatepass")
    ).hexdigest()
    alpha = row.result.metrics.fit.alpha
    return {
        "ruleId": rule.id,
        "ruleIndex": _RULES.index(rule),
        "level": level,
        "message": {"text": printable(f"{judgement.checkpoint}: {_trip_message(row)}")},
        "locations": [
            {
                "physicalLocation": {
                    "artifactLocation": {"uri": artifact_uri(judgement.checkpoint)}
                },
                "logicalLocations": [
                    {
                        "name": printable(judgement.name),
                        "fullyQualifiedName": printable(
                            f"layer {judgement.layer_id} {judgement.name}"
                        ),
                        "kind": "member",
                    }
                ],
            }
        ],
        "partialFingerprints": {"wwcliLayer/v1": fingerprint},
        "properties": {
            "layer_id": judgement.layer_id,
            "layer_type": judgement.layer_type,
            "alpha": alpha if math.isfinite(alpha) else None,
            "reason": printable(judgement.reason),
            "policy": printable(judgement.policy),
        },
    }


def _sarif_log(results: list[dict[str, Any]], failures: list[str], code: int) -> str:
    run: dict[str, Any] = {
        "tool": {
            "driver": {
                "name": "wwcli",
                "version": __version__,
                "semanticVersion": __version__,
                "rules": [
                    {
                        "id": rule.id,
                        "name": rule.name,
                        "shortDescription": {"text": rule.description},
                        "defaultConfiguration": {"level": "error"},
                    }
                    for rule in _RULES
                ],
            }
        },
        "invocations": [
            {
                "executionSuccessful": not failures,
                "exitCode": code,
                "toolExecutionNotifications": [
                    {"level": "error", "message": {"text": message}} for message in failures
                ],
            }
        ],
        "results": results,
    }
    log = {"$schema": SARIF_SCHEMA_URI, "version": "2.1.0", "runs": [run]}
    return json.dumps(log, indent=2, allow_nan=False) + "\n"


@dataclass(frozen=True)
class SarifFormatter:
    """SARIF 2.1.0 (code scanning): one run of the tool "wwcli", a rule per kind of trip, a
    result per layer that tripped the gate, located in its checkpoint and named as a logical
    location."""

    @property
    def streams(self) -> bool:
        """Never: one log for the whole run."""
        return False

    def render_report(self, report: CheckpointReport) -> str:
        """The log of a one-report run under the default gate."""
        return self.render(_one_report(report))

    def render(self, run: RunResult) -> str:
        """The run's log."""
        judged = _judge(run)
        results = [_sarif_result(row, judged.level) for row in judged.rows if row.failing]
        failures = [printable(failure.message) for failure in run.failures]
        return _sarif_log(results, failures, int(judged.outcome.code))

    def render_listings(self, listings: Sequence[CheckpointListing]) -> str:
        """A log with no result: describe runs no check."""
        return _sarif_log([], [], 0)
