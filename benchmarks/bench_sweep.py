"""`wwcli sweep` over a run of synthetic checkpoints (benchmarks/make_synthetic.py folders):
wall time with 1 and 2 local workers and through a loopback Dask cluster of 1 and 2 workers,
each against the sum of the checkpoints' single times; then the result cache's second-run
speedup. Not a test: run it by hand and paste the table into benchmarks/README.md.

    .venv/bin/python benchmarks/bench_sweep.py /tmp/wwbench/sweep                 # 40 x (b)
    .venv/bin/python benchmarks/bench_sweep.py /tmp/wwbench/sweep --preset small \\
        --count 40 --cache-preset b --cache-count 20 --json benchmarks/out/sweep.json

Checkpoints: `--distinct` models are drawn (seeds 0, 1, ...) and the run's `--count`
checkpoint folders hard-link their shards in turn (ckpt-1 -> seed 0, ckpt-2 -> seed 1, ...), so
a run of 40 x 126M parameters takes the disk of `--distinct`; every checkpoint is still read and
analyzed (the cache keys on the path too). The page cache holds the shards after the first
read, here as on a cluster worker that read them before.

"single" is the sum over the checkpoints of `analyze_path(path, settings, jobs=1)` timed in this
process (BLAS at one thread): the work itself. Each configuration is timed twice: the command
line (`wwcli sweep ... -q -f json`, a fresh process: its start, imports, and for Dask connecting
to the scheduler included) and the run layer's map alone in this process (for Dask with a
client already connected), whose ratio to "single" is the per-task overhead. Every
configuration's JSON must be the same bytes (checked)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "benchmarks"))

PRESETS = {
    "small": {"hidden": 384, "ffn": 1536, "blocks": 4, "vocab": 4096},
    "medium": {"hidden": 768, "ffn": 3072, "blocks": 4, "vocab": 8192},
}
"""Sizes beyond make_synthetic's own presets: "small" is 12.6M parameters, "medium" (b) with 4
blocks instead of 12: 50M parameters in 30 matrices of (b)'s shapes."""


def _sizes(preset: str) -> dict[str, int]:
    import make_synthetic

    return PRESETS.get(preset) or make_synthetic.PRESETS[preset]


def make_run(out: Path, preset: str, count: int, distinct: int) -> Path:
    """`count` checkpoint folders ckpt-1 ... in out/run-<preset>-<count>, hard-linked from
    `distinct` drawn models."""
    import make_synthetic

    models = out / f"models-{preset}"
    for seed in range(distinct):
        folder = models / f"seed-{seed}"
        if not (folder / "model.safetensors.index.json").is_file():
            make_synthetic.write_model(folder, **_sizes(preset), seed=seed, workers=2)
    run = out / f"run-{preset}-{count}"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    for step in range(1, count + 1):
        source = models / f"seed-{(step - 1) % distinct}"
        target = run / f"ckpt-{step}"
        target.mkdir()
        for member in source.iterdir():
            if member.suffix == ".safetensors":
                os.link(member, target / member.name)
            else:
                shutil.copyfile(member, target / member.name)
    return run


def _environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    environment.update(DASK_LOGGING__DISTRIBUTED="error")
    environment.pop("DASK_SCHEDULER_ADDRESS", None)
    return environment


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_of(pids: list[int]) -> float:
    """CPU seconds (user + system) the live processes `pids` have used so far."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def cluster(workers: int) -> Iterator[tuple[str, list[int]]]:
    """A Dask scheduler and `workers` one-thread workers on loopback; stopped by pid."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{_free_port()}"
    dask = str(BIN / "dask")
    common = {"env": _environment(), "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    port = address.rsplit(":", 1)[1]
    scheduler = [dask, "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"]
    worker = [dask, "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard"]
    worker += ["--host", "127.0.0.1", "--memory-limit", "0"]
    processes = [subprocess.Popen(scheduler, **common)]
    try:
        for _ in range(workers):
            processes.append(subprocess.Popen(worker, **common))
        deadline = time.monotonic() + 120
        while True:
            try:
                with Client(address, timeout=5, set_as_default=False) as client:
                    client.wait_for_workers(workers, timeout=120)
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield address, [process.pid for process in processes]
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()


def cli(run: Path, *options: str, pids: list[int] | None = None) -> tuple[float, float, bytes, str]:
    """Wall time, CPU time (the command and its worker processes, plus `pids`: a cluster's),
    stdout and stderr of `wwcli sweep RUN -q -f json` with `options`."""
    command = [str(BIN / "wwcli"), "sweep", str(run), "-f", "json", "--exit-zero", "--isolated"]
    cpu = children_cpu() + cpu_of(pids or [])
    started = time.perf_counter()
    done = subprocess.run(
        [*command, *options], capture_output=True, env=_environment(), check=False
    )
    wall = time.perf_counter() - started
    cpu = children_cpu() + cpu_of(pids or []) - cpu
    if done.returncode != 0:
        raise RuntimeError(f"{command} {options}: exit {done.returncode}: {done.stderr.decode()}")
    return wall, cpu, done.stdout, done.stderr.decode()


def in_process(
    paths: list[Path], runner: Any, pids: list[int] | None = None
) -> tuple[float, float]:
    """Wall and CPU seconds (this process, its pool's processes, `pids`) for the run layer to
    map analyze_path over `paths` with `runner`."""
    from wwcli.analysis import analyze_paths
    from wwcli.settings import RunSettings

    cpu = time.process_time() + children_cpu() + cpu_of(pids or [])
    started = time.perf_counter()
    outcomes = list(analyze_paths(paths, RunSettings(), runner=runner))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() + children_cpu() + cpu_of(pids or []) - cpu
    assert len(outcomes) == len(paths) and all(hasattr(o, "layers") for o in outcomes)
    return elapsed, cpu


def single_times(paths: list[Path]) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each checkpoint analyzed alone in this process, one thread."""
    from threadpoolctl import threadpool_limits

    from wwcli.analysis import analyze_path
    from wwcli.settings import RunSettings

    times = []
    with threadpool_limits(limits=1):
        for path in paths:
            cpu = time.process_time()
            started = time.perf_counter()
            analyze_path(path, RunSettings(), jobs=1)
            times.append((time.perf_counter() - started, time.process_time() - cpu))
    return times


def bench_runners(run: Path, *, dask: bool) -> dict[str, Any]:
    from wwcli.runners import DaskRunner, LocalRunner, ProcessRunner
    from wwcli.sweep import discover

    paths = [item.path for item in discover([run])]
    single_times(paths[:1])  # warm-up: imports, the page cache
    singles = single_times(paths)
    wall_sum = sum(wall for wall, _ in singles)
    cpu_sum = sum(cpu for _, cpu in singles)
    results: dict[str, Any] = {
        "checkpoints": len(paths),
        "single_wall_sum_s": wall_sum,
        "single_cpu_sum_s": cpu_sum,
        "configs": {},
    }
    outputs = set()
    for workers in (1, 2):
        wall, cpu, out, _ = cli(run, "--no-cache", "--workers", str(workers), "--jobs", "1")
        outputs.add(out)
        runner = LocalRunner(1) if workers == 1 else ProcessRunner(workers, 1)
        mapped, mapped_cpu = in_process(paths, runner)
        results["configs"][f"local-{workers}"] = {
            "cli_s": wall, "cli_cpu_s": cpu, "map_s": mapped, "map_cpu_s": mapped_cpu
        }  # fmt: skip
    if dask:
        from distributed import Client

        for workers in (1, 2):
            with cluster(workers) as (address, pids):
                wall, cpu, out, _ = cli(run, "--no-cache", "--scheduler", address, pids=pids)
                outputs.add(out)
                with Client(address, set_as_default=False) as client:
                    runner = DaskRunner(address, client=client)
                    mapped, mapped_cpu = in_process(paths, runner, pids)
            results["configs"][f"dask-{workers}"] = {
                "cli_s": wall, "cli_cpu_s": cpu, "map_s": mapped, "map_cpu_s": mapped_cpu
            }  # fmt: skip
    results["same_bytes"] = len(outputs) == 1
    for config in results["configs"].values():
        for kind in ("cli", "map"):
            config[f"{kind}_wall_ratio"] = config[f"{kind}_s"] / wall_sum
            config[f"{kind}_cpu_ratio"] = config[f"{kind}_cpu_s"] / cpu_sum
    return results


def bench_overhead(run: Path) -> dict[str, Any]:
    """Per-task cost of the Dask path on checkpoints so small that the analysis is a few ms:
    the run layer's map in this process against the same map on a one-worker loopback
    cluster (client connected, the worker warmed up by one map first)."""
    from distributed import Client

    from wwcli.runners import DaskRunner, LocalRunner
    from wwcli.sweep import discover

    paths = [item.path for item in discover([run])]
    in_process(paths[:2], LocalRunner(1))
    local, local_cpu = in_process(paths, LocalRunner(1))
    with cluster(1) as (address, pids), Client(address, set_as_default=False) as client:
        runner = DaskRunner(address, client=client)
        in_process(paths[:2], runner, pids)
        remote, remote_cpu = in_process(paths, runner, pids)
    count = len(paths)
    return {
        "tasks": count,
        "local_s": local,
        "local_cpu_s": local_cpu,
        "dask_s": remote,
        "dask_cpu_s": remote_cpu,
        "wall_per_task_ms": 1000 * (remote - local) / count,
        "cpu_per_task_ms": 1000 * (remote_cpu - local_cpu) / count,
    }


def bench_cache(run: Path, cache: Path) -> dict[str, Any]:
    if cache.exists():
        shutil.rmtree(cache)
    first, first_cpu, out_first, _ = cli(run, "--cache", str(cache))
    second, second_cpu, out_second, err_second = cli(run, "--cache", str(cache))
    assert out_first == out_second
    line = [text for text in err_second.splitlines() if text.startswith("cache:")]
    return {
        "checkpoints": len(list(run.iterdir())),
        "first_s": first,
        "second_s": second,
        "speedup": first / second,
        "first_cpu_s": first_cpu,
        "second_cpu_s": second_cpu,
        "cpu_speedup": first_cpu / second_cpu,
        "second_line": line[0] if line else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="working folder (models, runs, the cache)")
    parser.add_argument("--preset", default="b", help="model size of the runner sweep")
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--distinct", type=int, default=4, help="models drawn per preset")
    parser.add_argument("--cache-preset", default="b")
    parser.add_argument("--cache-count", type=int, default=20)
    parser.add_argument("--skip-dask", action="store_true")
    parser.add_argument("--skip-runners", action="store_true")
    parser.add_argument("--skip-cache", action="store_true")
    parser.add_argument(
        "--overhead", type=int, default=0, metavar="N", help="also N tiny tasks through Dask"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    options = parser.parse_args(argv)
    report: dict[str, Any] = {"cores": len(os.sched_getaffinity(0))}
    if not options.skip_runners:
        run = make_run(options.out, options.preset, options.count, options.distinct)
        report["runners"] = {
            "preset": options.preset,
            **bench_runners(run, dask=not options.skip_dask),
        }
        figures = report["runners"]
        count = figures["checkpoints"]
        wall_sum, cpu_sum = figures["single_wall_sum_s"], figures["single_cpu_sum_s"]
        print(f"{count} x {options.preset}: single sum {wall_sum:.2f} s wall, {cpu_sum:.2f} s CPU")
        for name, c in figures["configs"].items():
            print(
                f"  {name:8s} cli {c['cli_s']:7.2f} s ({c['cli_wall_ratio']:.3f}x) "
                f"CPU {c['cli_cpu_s']:7.2f} s ({c['cli_cpu_ratio']:.3f}x) | "
                f"map {c['map_s']:7.2f} s ({c['map_wall_ratio']:.3f}x) "
                f"CPU {c['map_cpu_s']:7.2f} s ({c['map_cpu_ratio']:.3f}x)"
            )
        print(f"  same JSON bytes in every configuration: {figures['same_bytes']}")
    if not options.skip_cache:
        run = make_run(options.out, options.cache_preset, options.cache_count, options.distinct)
        report["cache"] = {
            "preset": options.cache_preset,
            **bench_cache(run, options.out / "cache"),
        }
        figures = report["cache"]
        first, second = figures["first_s"], figures["second_s"]
        print(
            f"cache, {figures['checkpoints']} x {options.cache_preset}: first {first:.2f} s, "
            f"second {second:.2f} s: {figures['speedup']:.1f}x; CPU {figures['first_cpu_s']:.2f}"
            f" s vs {figures['second_cpu_s']:.2f} s: {figures['cpu_speedup']:.1f}x "
            f"({figures['second_line']})"
        )
    if options.overhead:
        run = make_run(options.out, "tiny", options.overhead, 1)
        report["overhead"] = figures = bench_overhead(run)
        print(
            f"Dask per task, {figures['tasks']} tiny checkpoints: local {figures['local_s']:.2f} s,"
            f" Dask {figures['dask_s']:.2f} s: {figures['wall_per_task_ms']:.1f} ms wall and "
            f"{figures['cpu_per_task_ms']:.1f} ms CPU per task"
        )
    if options.json:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
