"""`wwcli sweep --scheduler`, for real: a Dask scheduler and two workers started as processes on
127.0.0.1 (random free ports, one thread each), the same JSON as a local run, byte for byte,
and a run that completes when one worker is killed in the middle of it. Every process started
here is stopped by its pid."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.run_factory import DEGRADES_FROM, PLANTED, make_run
from wwcli.cli import app

pytest.importorskip("distributed")

BIN = Path(sys.executable).parent
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment.update(
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        DASK_DISTRIBUTED__WORKER__DAEMON="False",
        DASK_LOGGING__DISTRIBUTED="warning",
    )
    environment.pop("DASK_SCHEDULER_ADDRESS", None)
    return environment


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


class Cluster:
    """A scheduler and its workers, as processes this test started."""

    def __init__(self, log: Path) -> None:
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        self.log = log
        self.processes: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []

    def _start(self, *command: str) -> subprocess.Popen[bytes]:
        with (self.log / f"{len(self.processes)}.log").open("wb") as output:
            process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, env=_environment()
            )
        self.processes.append(process)
        return process

    def start(self, workers: int) -> None:
        port = self.address.rsplit(":", 1)[1]
        self._start(
            str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", port,
            "--no-dashboard",
        )  # fmt: skip
        worker = [
            str(BIN / "dask"), "worker", self.address, "--nthreads", "1", "--no-nanny",
            "--no-dashboard", "--host", "127.0.0.1", "--memory-limit", "0",
        ]  # fmt: skip
        for _ in range(workers):
            self.workers.append(self._start(*worker))
        self.wait_for(workers)

    def wait_for(self, workers: int, timeout: float = 90) -> None:
        from distributed import Client

        deadline = time.monotonic() + timeout
        while True:
            try:
                with Client(self.address, timeout=5, set_as_default=False) as client:
                    if workers:
                        remaining = max(1, deadline - time.monotonic())
                        client.wait_for_workers(workers, timeout=remaining)
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError):
                _stop(process)


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    logs = tmp_path / "logs"
    logs.mkdir()
    started = Cluster(logs)
    try:
        started.start(workers=2)
        yield started
    finally:
        started.stop()
        assert all(process.poll() is not None for process in started.processes)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dask") / "run"
    make_run(folder, count=12, hf_folders=(4,))
    return folder


def _sweep(*args: str | Path) -> object:
    return runner.invoke(app, ["sweep", *map(str, args), "--no-cache", "-f", "json", "--exit-zero"])


def test_a_sweep_on_the_cluster_is_the_local_json_byte_for_byte(
    cluster: Cluster, run_folder: Path
) -> None:
    local = _sweep(run_folder, "--workers", "1")
    remote = _sweep(run_folder, "--scheduler", cluster.address)
    assert local.exit_code == remote.exit_code == 0, remote.output
    assert remote.stdout == local.stdout
    crossings = json.loads(remote.stdout)["crossings"]
    assert [(c["name"], c["order_key"]) for c in crossings] == [(PLANTED, DEGRADES_FROM)]
    # DASK_SCHEDULER_ADDRESS is --scheduler's default; chunks of layers merge into one report.
    chunked = runner.invoke(
        app,
        [
            "sweep",
            str(run_folder),
            "--no-cache",
            "-f",
            "json",
            "--exit-zero",
            *["--layers-per-task", "1"],
        ],
        env={"DASK_SCHEDULER_ADDRESS": cluster.address},
    )
    assert chunked.exit_code == 0, chunked.output
    assert chunked.stdout == local.stdout


def test_the_run_completes_when_a_worker_is_killed_mid_run(
    cluster: Cluster, tmp_path: Path
) -> None:
    folder = tmp_path / "big"
    make_run(folder, count=12, hf_folders=(), scale=4)  # ~0.3-1 s per checkpoint
    command = [
        str(BIN / "wwcli"), "sweep", str(folder), "--no-cache", "-f", "json", "--exit-zero",
        "--scheduler", cluster.address,
    ]  # fmt: skip
    sweep = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_environment()
    )
    try:
        assert sweep.stderr is not None
        first = sweep.stderr.readline().decode()  # the first checkpoint is back
        assert first.startswith("[1/12]"), first
        victim = cluster.workers[0]
        os.kill(victim.pid, signal.SIGKILL)
        assert sweep.poll() is None  # killed in the middle of the run, not after it
        out, err = sweep.communicate(timeout=120)
    finally:
        if sweep.poll() is None:
            os.kill(sweep.pid, signal.SIGKILL)
            sweep.wait()
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert sweep.returncode == 0, err.decode()
    document = json.loads(out)
    assert document["failures"] == []
    assert len(document["checkpoints"]) == 12
    assert {row["order_key"] for row in document["trajectory"]} == set(range(1, 13))


def test_a_cluster_without_workers_is_an_input_failure_not_a_hang(
    tmp_path: Path, run_folder: Path
) -> None:
    from wwcli.analysis import analyze_paths
    from wwcli.results import InputFailure
    from wwcli.runners import DaskRunner
    from wwcli.settings import RunSettings

    logs = tmp_path / "logs"
    logs.mkdir()
    lonely = Cluster(logs)
    try:
        lonely.start(workers=0)
        started = time.monotonic()
        paths = sorted(run_folder.glob("*.safetensors"))[:2]
        dask = DaskRunner(lonely.address, no_worker_timeout=2)
        outcomes = list(analyze_paths(paths, RunSettings(), runner=dask))
        assert time.monotonic() - started < 30
    finally:
        lonely.stop()
    assert all(isinstance(outcome, InputFailure) for outcome in outcomes)
    assert all("no Dask worker connected" in outcome.message for outcome in outcomes)  # type: ignore[union-attr]
    assert [outcome.path for outcome in outcomes] == [str(path) for path in paths]  # type: ignore[union-attr]
