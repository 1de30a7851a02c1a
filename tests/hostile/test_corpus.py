"""Every file of the bad-input corpus through the command line: exit 2, one line on stderr that
names the file and the problem, no traceback, and report files that existed before are left
byte for byte as they were."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.hostile.make_corpus import (
    BadInput,
    corpus,
    make_corpus,
    safetensors_bytes,
    valid_safetensors,
)
from wwcli.cli import app

CASES = corpus()
HDF5_TIMEOUT_S = 3
"""The helper's deadline in these tests (WWCLI_HDF5_TIMEOUT), so a hang costs seconds."""
SUBPROCESS_TIMEOUT_S = 120
"""Past this, wwcli itself hung: the containment failed."""

runner = CliRunner()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    make_corpus(folder)
    return folder


@dataclass(frozen=True)
class Outcome:
    """What one run of wwcli left behind."""

    exit_code: int
    stdout: str
    stderr: str


def _address_space_limit(mib: int) -> Callable[[], None]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (mib * 2**20, mib * 2**20))

    return limit


def _run(
    args: list[str],
    *,
    contained: bool,
    memory_limit_mib: int | None = None,
    environment: dict[str, str] | None = None,
) -> Outcome:
    """wwcli in this process (CliRunner), or in a subprocess when the input may take the
    process down (a crash or hang of the HDF5 library, should the containment fail), when it
    must run under an address-space limit, or with extra environment variables."""
    if not contained and memory_limit_mib is None and not environment:
        result = runner.invoke(app, args)
        return Outcome(result.exit_code, result.stdout, result.stderr)
    full_environment = {
        **os.environ,
        "WWCLI_HDF5_TIMEOUT": str(HDF5_TIMEOUT_S),
        **(environment or {}),
    }
    completed = subprocess.run(
        [sys.executable, "-m", "wwcli", *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        env=full_environment,
        preexec_fn=None if memory_limit_mib is None else _address_space_limit(memory_limit_mib),
    )
    return Outcome(completed.returncode, completed.stdout, completed.stderr)


def _run_case(case: BadInput, args: list[str]) -> Outcome:
    """Run wwcli on a corpus entry as the entry asks (contained, memory-limited, timed)."""
    started = time.monotonic()
    outcome = _run(
        args,
        contained=case.crashes_hdf5,
        memory_limit_mib=case.memory_limit_mib,
        environment=case.environment,
    )
    elapsed = time.monotonic() - started
    if case.max_seconds is not None:
        assert elapsed <= case.max_seconds, f"took {elapsed:.1f} s, allowed {case.max_seconds} s"
    return outcome


def _assert_no_secret(case: BadInput, *texts: str | bytes) -> None:
    if case.secret is None:
        return
    for text in texts:
        data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
        assert case.secret not in data, "the secret marker reached an output"


def _assert_refused(outcome: Outcome, case: BadInput, path: Path) -> None:
    assert outcome.exit_code == 2, (outcome.exit_code, outcome.stderr)
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, outcome.stderr
    line = lines[0]
    assert line.startswith("wwcli: error: "), line
    assert str(path) in line, line
    assert re.search(case.problem, line, re.IGNORECASE), line
    assert "Traceback" not in outcome.stderr + outcome.stdout
    assert "internal error" not in line
    assert outcome.stdout == ""


def _params(cases: list[BadInput]) -> list[object]:
    return [
        pytest.param(case, id=case.name, marks=[pytest.mark.slow] if case.slow else [])
        for case in cases
    ]


def test_the_corpus_is_big_and_covers_every_format() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))
    assert len(CASES) >= 25
    for prefix in ("st_", "keras_", "h5_", "pt_", "ckpt_", "folder_", "empty", "random"):
        assert sum(name.startswith(prefix) for name in names) >= 1, prefix


@pytest.mark.parametrize("case", _params(CASES))
def test_analyze_refuses_it_and_leaves_report_files_alone(
    case: BadInput, corpus_dir: Path, tmp_path: Path
) -> None:
    path = corpus_dir / case.name
    csv_file = tmp_path / "report.csv"
    json_file = tmp_path / "report.json"
    csv_file.write_bytes(b"layer_id,alpha\r\n0,3.5\r\n")
    json_file.write_bytes(b'{"earlier": "run"}\n')
    before = {file.name: file.read_bytes() for file in tmp_path.iterdir()}

    outcome = _run_case(
        case, ["analyze", str(path), "--csv", str(csv_file), "--json", str(json_file)]
    )

    _assert_refused(outcome, case, path)
    _assert_no_secret(case, outcome.stdout, outcome.stderr)
    after = {file.name: file.read_bytes() for file in tmp_path.iterdir()}
    assert after == before  # byte-identical, and no temporary or partial file left beside them


@pytest.mark.parametrize("case", _params([case for case in CASES if case.secret is not None]))
def test_a_leaking_entry_leaks_nothing_even_as_json(case: BadInput, corpus_dir: Path) -> None:
    path = corpus_dir / case.name
    outcome = _run_case(case, ["analyze", str(path), "--format", "json", "--exit-zero"])
    _assert_refused(outcome, case, path)
    _assert_no_secret(case, outcome.stdout, outcome.stderr)


@pytest.mark.parametrize("case", _params([case for case in CASES if case.on_describe]))
def test_describe_refuses_it(case: BadInput, corpus_dir: Path) -> None:
    path = corpus_dir / case.name
    outcome = _run_case(case, ["describe", str(path), "--format", "json"])
    _assert_refused(outcome, case, path)
    _assert_no_secret(case, outcome.stdout, outcome.stderr)


def test_one_bad_file_among_good_ones_is_named_and_no_report_is_written(
    corpus_dir: Path, tmp_path: Path
) -> None:
    good = Path(__file__).resolve().parents[2] / "fixtures" / "safetensors" / "cnn.safetensors"
    bad = corpus_dir / "st_shape_does_not_match_bytes.safetensors"
    json_file = tmp_path / "report.json"
    json_file.write_bytes(b"{}\n")
    result = runner.invoke(
        app, ["analyze", str(good), str(bad), "--json", str(json_file), "--exit-zero", "-q"]
    )
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("wwcli: error:")]
    assert len(errors) == 2, result.stderr
    assert str(bad) in errors[0] and "needs 576 bytes" in errors[0]
    assert "no report files were written" in errors[1]
    assert json_file.read_bytes() == b"{}\n"
    assert sorted(file.name for file in tmp_path.iterdir()) == ["report.json"]


def test_an_unreadable_config_json_beside_good_weights_is_ignored(tmp_path: Path) -> None:
    header, data = valid_safetensors()
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(header, data))
    (tmp_path / "config.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    result = runner.invoke(app, ["describe", str(tmp_path), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [layer["name"] for layer in json.loads(result.stdout)["layers"]] == ["fc1", "fc2"]


# --- The HDF5 files really are hostile: without the helper process they take wwcli down ---------


def _read_in_process(path: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Read `path` with the Keras reader in a throwaway process, HDF5 in that process."""
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from wwcli.loaders import LoaderError
        from wwcli.loaders.keras import open_keras
        try:
            with open_keras(Path(sys.argv[1])) as checkpoint:
                checkpoint.layers()
        except LoaderError as error:
            print(error)
        """
    )
    return subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_crashing_file_segfaults_hdf5_in_process(corpus_dir: Path) -> None:
    completed = _read_in_process(corpus_dir / "h5_crashes_hdf5.h5", timeout=60)
    assert completed.returncode == -signal.SIGSEGV, completed


def test_the_hanging_file_hangs_hdf5_in_process(corpus_dir: Path) -> None:
    # The intact seed file is read in well under a second; this one is not done after 4 s.
    assert _read_in_process(Path(corpus_dir / "h5_truncated_at_half.h5"), 60).returncode == 0
    with pytest.raises(subprocess.TimeoutExpired):
        _read_in_process(corpus_dir / "h5_hangs_hdf5.h5", timeout=4)


def test_after_a_crash_the_next_file_is_read_by_a_fresh_helper(corpus_dir: Path) -> None:
    seed = Path(__file__).resolve().parents[2] / "fixtures" / "keras" / "seed_mlp.h5"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "wwcli",
            "describe",
            str(corpus_dir / "h5_crashes_hdf5.h5"),
            str(seed),
            "--format",
            "csv",
        ],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    # describe stops at the first unreadable input; analyze goes on. Both must survive.
    assert completed.returncode == 2
    assert "HDF5 library crashed" in completed.stderr
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "wwcli",
            "analyze",
            str(corpus_dir / "h5_crashes_hdf5.h5"),
            str(seed),
            "--format",
            "csv",
            "--exit-zero",
        ],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert completed.returncode == 2
    assert "HDF5 library crashed" in completed.stderr
    assert "dense_1" in completed.stdout  # the good file after it was analyzed
