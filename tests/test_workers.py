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
