"""The CI formats (wwcli/report/ci.py) on real runs of shipped fixtures and on hostile names:
GitHub workflow commands that one name cannot multiply, JUnit XML that parses, SARIF that the
OASIS schema accepts, Markdown tables whose columns a `|` cannot add to."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import jsonschema
import pytest

from tests.results_factory import report, result, spec
from wwcli.analysis import analyze_path, list_path
from wwcli.gate import GatePolicy, evaluate
from wwcli.report.ci import (
    GithubFormatter,
    JunitFormatter,
    MarkdownFormatter,
    SarifFormatter,
    _judgements,
    artifact_uri,
)
from wwcli.report.escape import printable
from wwcli.results import CheckpointReport, InputFailure, RunResult
from wwcli.settings import RunSettings

ROOT = Path(__file__).resolve().parents[2]
HEAVY = "fixtures/keras/heavy_tailed_mlp.keras"
CNN = "fixtures/safetensors/cnn.safetensors"
SCHEMA = json.loads((Path(__file__).parent / "data" / "sarif-schema-2.1.0.json").read_text())
ANNOTATION = re.compile(r"^::error file=[^,:]+(,title=[^:]*)?::.+$")

HOSTILE_NAMES = (
    "enc\n::set-output name=x::1",
    "a::error file=x.pt::boom",
    "100%,dense:1\r\n::warning::x",
    "\x1b]0;title\x07\x1b[2J",
    "a|b|c",
    "`code` <img src=x onerror=alert(1)> [link](http://x) *bold* $x$",
    "nul\x00 ff\uffff fe\ufffe sur\ud800 bidi\u202e",
    "]]><!-- & -->",
)
HOSTILE_PATH = "runs/a,b:c %d\nx.keras"


def _analyzed(*paths: str, settings: RunSettings | None = None) -> RunResult:
    settings = settings or RunSettings()
    reports = []
    for path in paths:
        outcome = analyze_path(path, settings)
        assert isinstance(outcome, CheckpointReport), outcome
        reports.append(outcome)
    return RunResult(settings, tuple(reports))


@pytest.fixture(scope="module", autouse=True)
def _in_repo(request: pytest.FixtureRequest) -> None:
    # Fixture paths are given relative, as a CI job would give them.
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(ROOT)
    request.addfinalizer(monkeypatch.undo)


@pytest.fixture(scope="module")
def heavy() -> RunResult:
    return _analyzed(HEAVY)


@pytest.fixture(scope="module")
def both() -> RunResult:
    return _analyzed(HEAVY, CNN)


@pytest.fixture(scope="module")
def cnn() -> RunResult:
    return _analyzed(CNN)


def _hostile_run() -> RunResult:
    results = [result(spec(i, name), 1.5) for i, name in enumerate(HOSTILE_NAMES)]
    results.append(result(spec(len(HOSTILE_NAMES), "fine|typical"), 3.0))
    return RunResult(RunSettings(), (report(results, checkpoint=HOSTILE_PATH),))


def _unescape_property(text: str) -> str:
    for escaped, raw in (("%3A", ":"), ("%2C", ","), ("%0D", "\r"), ("%0A", "\n"), ("%25", "%")):
        text = text.replace(escaped, raw)
    return text


# --- GitHub -------------------------------------------------------------------------------------


def test_github_has_one_error_annotation_per_trip_with_alpha_and_policy(heavy: RunResult) -> None:
    trips = evaluate(heavy).trips
    assert [(t.layer_id, t.name) for t in trips] == [(1, "dense_1")]
    lines = GithubFormatter().render(heavy).splitlines()
    assert len(lines) == len(trips)
    assert all(ANNOTATION.match(line) for line in lines)
    line = lines[0]
    assert line.startswith(
        f"::error file={HEAVY},title=wwcli%3A layer 1 dense_1 (alpha 1.503 < 2)::"
    )
    message = line.split("::", 2)[2]
    assert "alpha 1.503 < 2" in message
    assert "policy: alpha < 2 (dense)" in message


def test_github_gives_a_notice_when_nothing_tripped(cnn: RunResult) -> None:
    assert not evaluate(cnn).trips
    lines = GithubFormatter().render(cnn).splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("::notice title=wwcli::1 checkpoint, 4 layers analyzed, ")
    assert "0 tripped the gate" in lines[0]


def test_github_exit_zero_fails_nothing() -> None:
    settings = RunSettings(gate=GatePolicy(exit_zero=True))
    run = _analyzed(HEAVY, settings=settings)
    text = GithubFormatter().render(run)
    assert "::error" not in text
    assert text.startswith("::notice ")


def test_github_hostile_names_stay_inside_their_one_line() -> None:
    run = _hostile_run()
    trips = evaluate(run).trips
    assert len(trips) == len(HOSTILE_NAMES)
    text = GithubFormatter().render(run)
    lines = text.splitlines()
    assert text.count("\n") == len(lines) == len(trips)
    assert sum(line.startswith("::") for line in lines) == len(trips)
    assert "\r" not in text and "\x1b" not in text and "\x07" not in text
    for line, name in zip(lines, HOSTILE_NAMES, strict=True):
        assert ANNOTATION.match(line), line
        properties = line[len("::error ") : line.index("::", 2)]
        file_value, title_value = properties.split(",")
        assert _unescape_property(file_value.removeprefix("file=")) == printable(HOSTILE_PATH)
        title = _unescape_property(title_value.removeprefix("title="))
        assert title.startswith(f"wwcli: layer {HOSTILE_NAMES.index(name)} {printable(name)} (")


def test_github_annotates_an_unreadable_input(heavy: RunResult) -> None:
    failure = InputFailure("bad,name:1.pt", "bad,name:1.pt: not a checkpoint\n::error::x")
    run = RunResult(heavy.settings, heavy.reports, (failure,))
    lines = GithubFormatter().render(run).splitlines()
    assert lines[0] == (
        "::error file=bad%2Cname%3A1.pt,title=wwcli%3A cannot read the checkpoint"
        "::bad,name:1.pt: not a checkpoint\\n::error::x"
    )
    assert len(lines) == 2 and all(ANNOTATION.match(line) for line in lines)


# --- JUnit --------------------------------------------------------------------------------------


def test_junit_counts_gated_layers_and_trips(both: RunResult) -> None:
    outcome = evaluate(both)
    judged = _judgements(outcome)
    root = ET.fromstring(JunitFormatter().render(both).encode("utf-8"))
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert [suite.get("name") for suite in suites] == [HEAVY, CNN]
    cases = root.iter("testcase")
    judged_cases = [case for case in cases if case.find("properties") is not None]
    gated = [case for case in judged_cases if case.find("skipped") is None]
    assert len(judged_cases) == len(judged) == 7
    assert len(gated) == sum(j.gated for j in judged)
    failures = list(root.iter("failure"))
    assert len(failures) == int(root.get("failures", "")) == len(outcome.trips) == 1
    assert failures[0].get("type") == "alpha-below-threshold"
    message = failures[0].get("message", "")
    assert "alpha 1.503" in message and "policy: alpha < 2 (dense)" in message
    skipped_total = sum(1 for _ in root.iter("skipped"))
    assert int(root.get("skipped", "")) == skipped_total
    assert int(root.get("tests", "")) == 7 + 2  # analyzed + cnn's two normalization layers
    for suite in suites:
        assert int(suite.get("tests", "")) == len(suite.findall("testcase"))
    case = next(c for c in judged_cases if c.get("name") == "layer 1 dense_1")
    assert case.get("classname") == HEAVY
    values = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert values["alpha"] == "1.503" and values["policy"] == "alpha < 2 (dense)"


def test_junit_is_valid_xml_whatever_the_names() -> None:
    run = _hostile_run()
    text = JunitFormatter().render(run)
    root = ET.fromstring(text.encode("utf-8"))  # expat refuses what XML 1.0 does not allow
    names = [case.get("name") for case in root.iter("testcase")]
    expected = [
        f"layer {i} {printable(n)}".replace("\uffff", "\\uffff").replace("\ufffe", "\\ufffe")
        for i, n in enumerate((*HOSTILE_NAMES, "fine|typical"))
    ]
    assert names == expected
    assert root.find("testsuite").get("name") == printable(HOSTILE_PATH)  # type: ignore[union-attr]
    assert len(list(root.iter("failure"))) == len(HOSTILE_NAMES)


# --- SARIF --------------------------------------------------------------------------------------


def _validate(text: str) -> Any:
    log = json.loads(text)
    validator = jsonschema.validators.validator_for(SCHEMA)
    assert validator is jsonschema.Draft4Validator  # the schema's own "$schema"
    validator(SCHEMA).validate(log)
    return log


def test_the_shipped_schema_is_the_oasis_one_and_refuses_what_it_should() -> None:
    assert SCHEMA["id"].startswith("https://docs.oasis-open.org/sarif/sarif/v2.1.0/")
    validator = jsonschema.Draft4Validator(SCHEMA)
    assert not validator.is_valid({"version": "2.1.0", "runs": [{"results": []}]})  # no tool
    assert not validator.is_valid({"version": "2.0.0", "runs": []})


def test_sarif_validates_and_has_one_result_per_trip(both: RunResult) -> None:
    log = _validate(SarifFormatter().render(both))
    (run,) = log["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "wwcli"
    results = run["results"]
    assert len(results) == len(evaluate(both).trips) == 1
    (found,) = results
    assert found["level"] == "error"
    assert driver["rules"][found["ruleIndex"]]["id"] == found["ruleId"] == "alpha-below-threshold"
    location = found["locations"][0]
    assert location["physicalLocation"]["artifactLocation"]["uri"] == HEAVY
    assert location["logicalLocations"][0]["name"] == "dense_1"
    assert "alpha 1.503 < 2" in found["message"]["text"]
    assert found["properties"]["policy"] == "alpha < 2 (dense)"
    assert math.isclose(found["properties"]["alpha"], 1.503, abs_tol=5e-4)


_URI_REFERENCE = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?#]|%[0-9A-F]{2})*$")
"""The characters RFC 3986 allows in a URI reference, percent-escapes included."""


@pytest.mark.parametrize(
    "path",
    ["model.keras", "a b/c%d#e?.keras", "x:y/z.pt", "caf\udce9.pt", "up/../\u00e9t\u00e9.pt"],
)
def test_artifact_uris_are_percent_encoded_relative_references(path: str) -> None:
    uri = artifact_uri(path)
    assert _URI_REFERENCE.match(uri), uri
    assert ":" not in uri.split("/")[0]  # a colon there would read as a scheme
    assert unquote_to_bytes(uri) == path.encode("utf-8", "surrogateescape")


def test_an_absolute_path_is_a_file_uri() -> None:
    assert artifact_uri("/data/my model.pt") == "file:///data/my%20model.pt"


def test_sarif_validates_with_hostile_names_and_failures() -> None:
    run = _hostile_run()
    failure = InputFailure("gone.pt", "gone.pt: no such file")
    run = RunResult(run.settings, run.reports, (failure,))
    log = _validate(SarifFormatter().render(run))
    (sarif_run,) = log["runs"]
    assert len(sarif_run["results"]) == len(HOSTILE_NAMES)
    uri = sarif_run["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert _URI_REFERENCE.match(uri)
    assert unquote_to_bytes(uri).decode() == HOSTILE_PATH
    invocation = sarif_run["invocations"][0]
    assert invocation["executionSuccessful"] is False
    assert invocation["toolExecutionNotifications"][0]["message"]["text"] == failure.message


# --- Markdown -----------------------------------------------------------------------------------


def _cells(row: str) -> list[str]:
    """A GFM table row's cells: split on every `|` that no backslash escapes."""
    cells, cell, chars = [], "", iter(row.strip().removeprefix("|").removesuffix("|"))
    for char in chars:
        if char == "\\":
            cell += char + next(chars, "")
        elif char == "|":
            cells.append(cell)
            cell = ""
        else:
            cell += char
    return [*cells, cell]


def _table_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [_cells(row) for row in rows if not row.startswith(("| id ", "| ---"))]


def test_markdown_has_a_row_per_analyzed_layer_and_marks_the_trip(both: RunResult) -> None:
    text = MarkdownFormatter().render(both)
    assert text.startswith("## wwcli: gate failed\n")
    rows = _table_rows(text)
    assert len(rows) == sum(len(r.layers) for r in both.reports) == 7
    assert all(len(row) == 6 for row in rows)
    tripped = [row for row in rows if "**tripped**" in row[5]]
    assert [row[1].strip() for row in tripped] == ["dense\\_1"]
    assert "**very heavy-tailed**" in tripped[0][4]  # wwcli's words, never "over-trained"
    assert "over-trained" not in text
    assert f"### {CNN}\n" in text.replace("\\_", "_")
    assert "**Gate: tripped** by 1 of" in text
    assert "Gate: passed" in text


def test_markdown_hostile_names_add_no_column_and_no_html() -> None:
    text = MarkdownFormatter().render(_hostile_run())
    rows = _table_rows(text)
    assert len(rows) == len(HOSTILE_NAMES) + 1
    assert all(len(row) == 6 for row in rows), rows
    for line in text.splitlines():
        assert re.search(r"(?<!\\)[<`]", line) is None, line
    assert "\x1b" not in text and "\r" not in text


# --- The judgements the formats read ------------------------------------------------------------


def test_the_judgements_agree_with_the_gates_trips(both: RunResult) -> None:
    outcome = evaluate(both)
    trips = {(t.checkpoint, t.layer_id) for t in outcome.trips}
    judged = _judgements(outcome)
    assert len(judged) == 7
    assert {(j.checkpoint, j.layer_id) for j in judged if j.tripped} == trips
    assert all(j.policy.startswith("alpha < 2") for j in judged if j.gated)


def test_tolerated_trips_are_warnings_not_errors() -> None:
    run = _analyzed(HEAVY, settings=RunSettings(gate=GatePolicy(max_over_trained=1)))
    assert evaluate(run).code == 0
    lines = GithubFormatter().render(run).splitlines()
    assert lines[0].startswith(f"::warning file={HEAVY},title=wwcli%3A layer 1 dense_1 ")
    assert not any(line.startswith("::error") for line in lines)
    (sarif_run,) = _validate(SarifFormatter().render(run))["runs"]
    assert [r["level"] for r in sarif_run["results"]] == ["warning"]
    assert "## wwcli: gate passed" in MarkdownFormatter().render(run)


def test_a_run_with_no_gated_layer_says_so() -> None:
    run = _analyzed(HEAVY, settings=RunSettings(gate=GatePolicy(gated_types=("conv2d",))))
    outcome = evaluate(run)
    assert outcome.empty and outcome.code == 2
    text = GithubFormatter().render(run)
    assert "::error title=wwcli::the gate judged no layer: none of the 3 analyzed" in text
    assert "## wwcli: gate error (the gate judged no layer" in MarkdownFormatter().render(run)
    junit = ET.fromstring(JunitFormatter().render(run))
    assert junit.get("skipped") == junit.get("tests") == "3"


# --- describe, one report -----------------------------------------------------------------------


def test_describe_listings() -> None:
    listing = list_path(CNN, RunSettings())
    assert not isinstance(listing, InputFailure)
    assert GithubFormatter().render_listings([listing]) == ""
    assert ET.fromstring(JunitFormatter().render_listings([listing])).get("tests") == "0"
    log = _validate(SarifFormatter().render_listings([listing]))
    assert log["runs"][0]["results"] == []
    assert len(_table_rows(MarkdownFormatter().render_listings([listing]))) == len(listing.layers)


def test_render_report_is_the_one_report_run(heavy: RunResult) -> None:
    (one,) = heavy.reports
    for formatter in (GithubFormatter(), JunitFormatter(), MarkdownFormatter(), SarifFormatter()):
        assert not formatter.streams
        assert formatter.render_report(one) == formatter.render(heavy)


# --- pre-commit ---------------------------------------------------------------------------------


def _hook() -> dict[str, str]:
    """The one hook of .pre-commit-hooks.yaml, read as the flat mapping it is (PyYAML is not a
    dependency): a list of one mapping of scalars and flow lists."""
    lines = [
        line
        for line in (ROOT / ".pre-commit-hooks.yaml").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0].startswith("- ") and all(line.startswith("  ") for line in lines[1:])
    hook = {}
    for line in [lines[0][2:], *(line[2:] for line in lines[1:])]:
        key, _, value = line.partition(": ")
        assert key.isidentifier() and key not in hook, line
        value = value.strip()
        if value[:1] in "'\"":
            assert value[-1] == value[0]
            value = value[1:-1]
        hook[key] = value
    return hook


def test_pre_commit_hook_is_well_formed() -> None:
    hook = _hook()
    assert hook["id"] == hook["name"] == "wwcli"
    assert hook["entry"] == "wwcli analyze"
    assert hook["language"] == "python"
    assert hook["pass_filenames"] == "true"
    files = re.compile(hook["files"])
    for name in (
        "m.keras",
        "a/b.h5",
        "c.hdf5",
        "x.pt",
        "x.pth",
        "pytorch_model.bin",
        "e.ckpt",
        "s.safetensors",
    ):
        assert files.search(name), name
    for name in ("train.py", "model.safetensors.json", "notes.keras.txt", "README.md"):
        assert not files.search(name), name
    assert set(hook) <= {
        "id", "name", "description", "entry", "language", "files", "types", "pass_filenames",
        "require_serial", "args",
    }  # fmt: skip


def test_pre_commit_hook_command_runs(tmp_path: Path) -> None:
    hook = _hook()
    args = [arg.strip() for arg in hook["args"].strip("[]").split(",") if arg.strip()]
    script = Path(sys.executable).with_name(hook["entry"].split()[0])
    command = [str(script), *hook["entry"].split()[1:], *args, HEAVY, CNN]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr  # the heavy-tailed layer trips the gate
    assert "gate: fixtures/keras/heavy_tailed_mlp.keras: layer 1 dense_1" in done.stderr
