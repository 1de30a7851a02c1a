"""Checkpoints in worker processes: the same bytes of output for any --workers and --jobs, and
never more threads than cores."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.run_factory import make_run
from wwcli.analysis import analyze_paths
from wwcli.cli import app
from wwcli.report.interface import formatter_for
from wwcli.results import CheckpointReport, InputFailure, RunResult
from wwcli.runners import LocalRunner, ProcessRunner, plan_execution
from wwcli.settings import RunSettings

runner = CliRunner()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("workers") / "run"
    make_run(folder, count=6, hf_folders=(2,))
    return folder


def test_sweep_output_is_the_same_bytes_for_any_workers_and_jobs(run_folder: Path) -> None:
    outputs = {}
    for workers in (1, 2):
        for jobs in (1, 2):
            for kind in ("json", "csv"):
                result = runner.invoke(
                    app,
                    [
                        "sweep",
                        str(run_folder),
                        "--no-cache",
                        "--workers",
                        str(workers),
                        "--jobs",
                        str(jobs),
                        "-f",
                        kind,
                        "--exit-zero",
                        "--isolated",
                    ],
                )
                assert result.exit_code == 0, result.output
                outputs[(workers, jobs, kind)] = result.stdout
    for kind in ("json", "csv"):
        texts = {outputs[(w, j, kind)] for w in (1, 2) for j in (1, 2)}
        assert len(texts) == 1, kind


def test_a_process_pool_gives_the_reports_in_input_order(run_folder: Path, tmp_path: Path) -> None:
    paths = sorted(run_folder.iterdir())
    paths.insert(2, tmp_path / "missing.safetensors")
    settings = RunSettings()
    here = list(analyze_paths(paths, settings, runner=LocalRunner(jobs=1)))
    there = list(analyze_paths(paths, settings, runner=ProcessRunner(workers=2, jobs=1)))
    assert [type(item) for item in there] == [type(item) for item in here]
    assert isinstance(there[2], InputFailure) and there[2].path == str(paths[2])

    def render(outcomes: list[CheckpointReport | InputFailure]) -> str:
        reports = tuple(item for item in outcomes if isinstance(item, CheckpointReport))
        return formatter_for("json").render(RunResult(settings, reports))

    assert render(there) == render(here)


def test_analyze_with_workers_is_the_same_bytes(run_folder: Path) -> None:
    paths = [str(path) for path in sorted(run_folder.glob("*.safetensors"))[:3]]
    base = runner.invoke(app, ["analyze", *paths, "-f", "json", "--exit-zero", "--isolated"])
    pooled = runner.invoke(
        app, ["analyze", *paths, "-f", "json", "--exit-zero", "--isolated", "--workers", "2"]
    )
    assert base.exit_code == pooled.exit_code == 0, pooled.output
    assert pooled.stdout == base.stdout


def test_workers_times_jobs_never_exceeds_the_cores() -> None:
    for cores in (1, 2, 3, 8, 16):
        for units in (1, 5, 40):
            for workers in (None, 1, 2, 4, 32):
                for jobs in (None, 1, 2, 4, 32):
                    plan = plan_execution(workers, jobs, units, cores=cores)
                    assert plan.workers * plan.jobs <= cores, (cores, units, workers, jobs)
                    assert plan.workers >= 1 and plan.jobs >= 1
                    if workers is not None and jobs is not None and workers * jobs > cores:
                        assert "threads on" in plan.note
    # The default fills the machine: a worker per checkpoint up to the cores, the rest as jobs.
    assert plan_execution(None, None, 40, cores=16) == plan_execution(16, 1, 40, cores=16)
    few = plan_execution(None, None, 4, cores=16)
    assert (few.workers, few.jobs) == (4, 4)
    assert plan_execution(None, None, 3, cores=16, spread=False).jobs == 16
    with pytest.raises(ValueError):
        plan_execution(0, None, 3)


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


@pytest.mark.slow  # 15-35 s here: the pool's processes start, then the signal
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ctrl_c_stops_the_worker_processes(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "run"
    make_run(folder, count=6, hf_folders=(), scale=4)
    wwcli = Path(sys.executable).parent / "wwcli"
    command = [str(wwcli), "sweep", str(folder), "--no-cache", "--workers", "2", "-q"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    sweep = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=environment,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )
    try:
        deadline = time.monotonic() + 60
        workers: set[int] = set()
        while len(workers) < 2 and time.monotonic() < deadline and sweep.poll() is None:
            time.sleep(0.2)
            workers = _children(sweep.pid)
        assert len(workers) >= 2, "the pool's processes did not start"
        os.kill(sweep.pid, signal.SIGINT)
        _, err = sweep.communicate(timeout=30)
    finally:
        if sweep.poll() is None:
            os.kill(sweep.pid, signal.SIGKILL)
            sweep.wait()
    assert sweep.returncode == -signal.SIGINT, err
    assert b"interrupted" in err
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.2)
    left = {pid: _command_line(pid) for pid in workers if _running(pid)}
    assert not left, f"left running: {left}"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "?"
