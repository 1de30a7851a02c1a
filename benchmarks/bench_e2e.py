"""End-to-end benchmarks (issue #6): `wwcli analyze FOLDER --format json` against
`weightwatcher.WeightWatcher(model=FOLDER).analyze()` (0.7.7, CPU), as users run them.

    .venv/bin/python benchmarks/bench_e2e.py                       # everything (~1 h on 2 cores)
    .venv/bin/python benchmarks/bench_e2e.py --sections b,jobs --repeats 3
    .venv/bin/python benchmarks/bench_e2e.py --sections startup,growth

Every run is a fresh process; the contenders of a section run side by side, interleaved (A, B, A,
B, ... with the order flipped every round) so that a change in the load of a shared machine hits
them alike; figures are medians over the rounds, and ratios divide two such medians. For each run:
wall time, CPU time (user + system, from wait4) and peak RSS (ru_maxrss) of the child.

Sections:
- fixtures, b, c: the fixtures (copied to a folder whose path does not contain "safetensors":
  weightwatcher 0.7.7 ignores the index then), a ~126M-parameter model (hidden 768, ffn 3072, 12
  blocks) and a ~420M one (hidden 1024, ffn 4096, 24 blocks), written by make_synthetic.py. Two
  thread modes: "1" (OMP/OPENBLAS/MKL_NUM_THREADS=1 for both, `--jobs 1` for wwcli) and
  "default" (nothing set: wwcli's --jobs is the number of cores, weightwatcher's BLAS uses all
  cores). Also per round, in this process, the bare eigensolver floor: the float64 Gram
  (syrk) plus numpy's eigvalsh of every matrix wwcli analyzes, one BLAS thread, summed
  (matrices read and cast beforehand, outside the clock). Then the largest |alpha difference|
  between the tools, layers matched by name, and whether xmin and num_pl_spikes agree.
- jobs: `--jobs 2` against `--jobs 1` on (b), both with default threads otherwise.
- growth: peak RSS of wwcli (and wall time) on models of 2, 8 and 32 blocks (hidden 768, ffn
  3072, vocab 1024): 1x, ~4x and ~15x the bytes.
- startup: `wwcli --help` and `wwcli describe` on (c).

Results: Markdown on stdout and in OUT/e2e.md, raw numbers in OUT/e2e.json (OUT = --workdir).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from make_synthetic import write_model  # noqa: E402

PYTHON = sys.executable
WWCLI = str(Path(PYTHON).with_name("wwcli"))
WW_CHILD = str(REPO / "benchmarks" / "ww_child.py")
TIME = "/usr/bin/time"
"""GNU time, for the CPU time and peak RSS of a child."""
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

MODELS: dict[str, dict[str, Any]] = {
    "b": {"hidden": 768, "ffn": 3072, "blocks": 12, "vocab": 8192},
    "c": {"hidden": 1024, "ffn": 4096, "blocks": 24, "vocab": 8192},
    "grow1": {"hidden": 768, "ffn": 3072, "blocks": 2, "vocab": 1024},
    "grow4": {"hidden": 768, "ffn": 3072, "blocks": 8, "vocab": 1024},
    "grow16": {"hidden": 768, "ffn": 3072, "blocks": 32, "vocab": 1024},
}
FIXTURES = {
    "hf_sharded_bf16": REPO / "fixtures" / "safetensors" / "hf_sharded_bf16",
    "hf_bin": REPO / "fixtures" / "torch" / "hf_bin",
}


@dataclass
class Run:
    """One child process."""

    wall_s: float
    """Wall-clock seconds from spawn to exit."""
    cpu_s: float
    """User + system CPU seconds of the child."""
    peak_rss_mib: float
    """Peak resident set size of the child (ru_maxrss)."""
    load_1min: float
    """The machine's 1-minute load average just before the run."""


@dataclass
class Series:
    """The runs of one contender in one section."""

    runs: list[Run] = field(default_factory=list)

    def median(self, name: str) -> float:
        return float(statistics.median(getattr(run, name) for run in self.runs))


def run_child(command: Sequence[str], *, env: dict[str, str], stdout: Path | None) -> Run:
    """Run `command` to completion: wall time here, CPU time and peak RSS from GNU time.

    Not from this process's wait4: Linux carries the parent's peak RSS into a child across
    fork/vfork + exec, so a child of this (large) process would report at least our peak. GNU
    time is small, and reports its own child's rusage.
    """
    load = os.getloadavg()[0]
    with tempfile.NamedTemporaryFile("r", suffix=".time") as usage:
        timed = [TIME, "-f", "%M %U %S", "-o", usage.name, *command]
        with open(stdout if stdout else os.devnull, "wb") as out:
            start = time.perf_counter()
            returncode = subprocess.call(timed, stdout=out, stderr=subprocess.DEVNULL, env=env)
            wall = time.perf_counter() - start
        if returncode not in (0, 1):  # 1: wwcli's gate tripped, still a full run
            raise RuntimeError(f"{' '.join(command)} exited {returncode}")
        peak_kib, user, system = usage.read().split()[-3:]
    return Run(
        wall_s=wall,
        cpu_s=float(user) + float(system),
        peak_rss_mib=int(peak_kib) / 1024,
        load_1min=load,
    )


def environment(threads: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in THREAD_VARIABLES}
    if threads == "1":
        env.update(dict.fromkeys(THREAD_VARIABLES, "1"))
    return env


def ensure_model(workdir: Path, name: str) -> Path:
    folder = workdir / "models" / name
    if not (folder / "model.safetensors.index.json").is_file():
        print(f"  writing model {name} to {folder} ...", file=sys.stderr, flush=True)
        write_model(folder, workers=2, **MODELS[name])
    return folder


def ensure_fixture(workdir: Path, name: str) -> Path:
    folder = workdir / "fixtures" / name
    if not folder.is_dir():
        shutil.copytree(FIXTURES[name], folder)
    return folder


# --- the floor --------------------------------------------------------------------------------


def eigensolver_floor(folder: Path) -> dict[str, float]:
    """Seconds of float64 Gram (syrk) + numpy eigvalsh summed over the matrices wwcli analyzes,
    one BLAS thread; reading and casting to float64 happen outside the clock."""
    from threadpoolctl import threadpool_limits

    from wwcli.analysis import skip_reason
    from wwcli.engine import DEFAULT_OPTIONS
    from wwcli.loaders import open_checkpoint

    wall = cpu = 0.0
    count = 0
    with threadpool_limits(limits=1), open_checkpoint(folder) as checkpoint:
        for spec in checkpoint.layers():
            if skip_reason(spec, DEFAULT_OPTIONS) is not None:
                continue
            for matrix in checkpoint.matrices(spec):
                w = np.ascontiguousarray(matrix, dtype=np.float64)
                start, start_cpu = time.perf_counter(), time.thread_time()
                gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
                np.linalg.eigvalsh(gram)
                wall += time.perf_counter() - start
                cpu += time.thread_time() - start_cpu
                count += 1
    return {"wall_s": wall, "cpu_s": cpu, "matrices": count}


def svd_floor(folder: Path) -> dict[str, float]:
    """weightwatcher's eigenvalue work on CPU: scipy.linalg.svd(W float64, compute_uv=False) of
    the same matrices, one BLAS thread, summed (for context: its time without its overheads)."""
    import scipy.linalg
    from threadpoolctl import threadpool_limits

    from wwcli.analysis import skip_reason
    from wwcli.engine import DEFAULT_OPTIONS
    from wwcli.loaders import open_checkpoint

    wall = 0.0
    with threadpool_limits(limits=1), open_checkpoint(folder) as checkpoint:
        for spec in checkpoint.layers():
            if skip_reason(spec, DEFAULT_OPTIONS) is not None:
                continue
            for matrix in checkpoint.matrices(spec):
                w = np.asarray(matrix, dtype=np.float64)
                start = time.perf_counter()
                scipy.linalg.svd(w, compute_uv=False)
                wall += time.perf_counter() - start
    return {"wall_s": wall}


# --- comparing the outputs --------------------------------------------------------------------


def compare(wwcli_json: Path, ww_json: Path) -> dict[str, Any]:
    """Largest |alpha difference| between the tools (layers matched by name), and agreement on
    which layers are analyzed, xmin and num_pl_spikes."""
    ours = {layer["name"]: layer for layer in json.loads(wwcli_json.read_text())["layers"]}
    theirs = {
        layer["name"]: layer
        for layer in json.loads(ww_json.read_text())["layers"]
        if layer["alpha"] is not None and layer["alpha"] != -1
    }
    common = sorted(set(ours) & set(theirs))
    absolute = relative = xmin_relative = 0.0
    xmin_differs = spikes_differ = beyond = 0
    for name in common:
        a, b = ours[name], theirs[name]
        if a["alpha"] is None:
            xmin_differs += 1
            continue
        difference = abs(a["alpha"] - b["alpha"])
        absolute = max(absolute, difference)
        relative = max(relative, difference / abs(b["alpha"]))
        beyond += difference / abs(b["alpha"]) > 1e-6
        xmin_gap = abs(a["xmin"] - b["xmin"]) / abs(b["xmin"])
        xmin_relative = max(xmin_relative, xmin_gap)
        xmin_differs += xmin_gap > 1e-9
        spikes_differ += a["num_pl_spikes"] != b["num_pl_spikes"]
    return {
        "layers_compared": len(common),
        "only_wwcli": sorted(set(ours) - set(theirs)),
        "only_weightwatcher": sorted(set(theirs) - set(ours)),
        "max_abs_alpha_diff": absolute,
        "max_rel_alpha_diff": relative,
        "alpha_beyond_1e-6": beyond,
        "max_rel_xmin_diff": xmin_relative,
        "xmin_differs": xmin_differs,
        "num_pl_spikes_differ": spikes_differ,
    }


# --- sections ---------------------------------------------------------------------------------


@contextmanager
def section(name: str, results: dict[str, Any]) -> Iterator[dict[str, Any]]:
    entry: dict[str, Any] = {"load_start": os.getloadavg()}
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield entry
    entry["load_end"] = os.getloadavg()
    entry["seconds"] = time.perf_counter() - start
    results[name] = entry
    print(f"  done in {entry['seconds']:.0f} s", file=sys.stderr, flush=True)


def interleave(
    contenders: dict[str, Callable[[int], Run]], repeats: int, per_round: Callable[[], None] | None
) -> dict[str, Series]:
    """Run every contender `repeats` times, interleaved, the order flipped every round."""
    series = {name: Series() for name in contenders}
    names = list(contenders)
    for round_number in range(repeats):
        order = names if round_number % 2 == 0 else names[::-1]
        for name in order:
            run = contenders[name](round_number)
            series[name].runs.append(run)
            print(f"    {name}: {run}", file=sys.stderr, flush=True)
        if per_round is not None:
            per_round()
    return series


def head_to_head(
    workdir: Path, folder: Path, label: str, repeats: int, ww_repeats: int, float32: bool
) -> dict[str, Any]:
    """wwcli against weightwatcher on one folder, both thread modes, and the floor."""
    outputs = workdir / "outputs" / label
    outputs.mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {"folder": str(folder), "modes": {}}
    floors: list[dict[str, float]] = []
    for threads in ("1", "default"):
        env = environment(threads)
        jobs = ["--jobs", "1"] if threads == "1" else []

        ours_json = outputs / f"wwcli-{threads}.json"
        theirs_json = outputs / f"weightwatcher-{threads}.json"

        def wwcli(
            round_number: int,
            env: dict[str, str] = env,
            jobs: list[str] = jobs,
            out: Path = ours_json,
        ) -> Run:
            command = [WWCLI, "analyze", str(folder), "--format", "json", "-q", *jobs]
            return run_child(command, env=env, stdout=out)

        def weightwatcher(
            round_number: int, env: dict[str, str] = env, result: Path = theirs_json
        ) -> Run:
            if round_number >= ww_repeats:
                return Run(float("nan"), float("nan"), float("nan"), os.getloadavg()[0])
            return run_child([PYTHON, WW_CHILD, str(folder), str(result)], env=env, stdout=None)

        contenders: dict[str, Callable[[int], Run]] = {
            "wwcli": wwcli,
            "weightwatcher": weightwatcher,
        }
        if float32 and threads == "1":

            def single(round_number: int, env: dict[str, str] = env) -> Run:
                command = [WWCLI, "analyze", str(folder), "--format", "json", "-q", "--jobs", "1"]
                command += ["--precision", "float32"]
                return run_child(command, env=env, stdout=outputs / "wwcli-float32.json")

            contenders["wwcli --precision float32"] = single

        def floor() -> None:
            floors.append(eigensolver_floor(folder))
            print(f"    floor: {floors[-1]}", file=sys.stderr, flush=True)

        series = interleave(contenders, repeats, floor if threads == "1" else None)
        mode: dict[str, Any] = {}
        for name, runs in series.items():
            valid = [run for run in runs.runs if run.wall_s == run.wall_s]
            mode[name] = {
                "runs": [asdict(run) for run in runs.runs],
                "wall_s": statistics.median(run.wall_s for run in valid),
                "cpu_s": statistics.median(run.cpu_s for run in valid),
                "peak_rss_mib": statistics.median(run.peak_rss_mib for run in valid),
                "load_1min": [
                    min(r.load_1min for r in runs.runs),
                    max(r.load_1min for r in runs.runs),
                ],
            }
        mode["comparison"] = compare(
            outputs / f"wwcli-{threads}.json", outputs / f"weightwatcher-{threads}.json"
        )
        if "wwcli --precision float32" in series:
            mode["comparison_float32"] = compare(
                outputs / "wwcli-float32.json", outputs / f"weightwatcher-{threads}.json"
            )
        entry["modes"][threads] = mode
    entry["floor"] = {
        "wall_s": statistics.median(f["wall_s"] for f in floors),
        "cpu_s": statistics.median(f["cpu_s"] for f in floors),
        "matrices": floors[0]["matrices"],
    }
    entry["identical_json_across_modes"] = (outputs / "wwcli-1.json").read_bytes() == (
        outputs / "wwcli-default.json"
    ).read_bytes()
    return entry


def jobs_section(workdir: Path, folder: Path, repeats: int) -> dict[str, Any]:
    outputs = workdir / "outputs" / "jobs"
    outputs.mkdir(parents=True, exist_ok=True)
    env = environment("default")

    def make(jobs: int) -> Callable[[int], Run]:
        def run(round_number: int) -> Run:
            command = [WWCLI, "analyze", str(folder), "--format", "json", "-q", "--jobs", str(jobs)]
            return run_child(command, env=env, stdout=outputs / f"jobs{jobs}.json")

        return run

    series = interleave({"--jobs 1": make(1), "--jobs 2": make(2)}, repeats, None)
    entry: dict[str, Any] = {
        name: {
            "wall_s": runs.median("wall_s"),
            "cpu_s": runs.median("cpu_s"),
            "peak_rss_mib": runs.median("peak_rss_mib"),
            "runs": [asdict(run) for run in runs.runs],
        }
        for name, runs in series.items()
    }
    entry["identical_json"] = (outputs / "jobs1.json").read_bytes() == (
        outputs / "jobs2.json"
    ).read_bytes()
    return entry


def growth_section(workdir: Path, repeats: int) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    folders = {name: ensure_model(workdir, name) for name in ("grow1", "grow4", "grow16")}
    contenders: dict[str, Callable[[int], Run]] = {}
    for name, folder in folders.items():
        for threads in ("1", "default"):
            jobs = ["--jobs", "1"] if threads == "1" else []

            def run(round_number: int, folder: Path = folder, jobs: list[str] = jobs) -> Run:
                command = [WWCLI, "analyze", str(folder), "--format", "json", "-q", *jobs]
                return run_child(command, env=environment("default"), stdout=None)

            contenders[f"{name} jobs={'1' if jobs else 'default'}"] = run
    series = interleave(contenders, repeats, None)
    for name, runs in series.items():
        model = name.split()[0]
        folder = folders[model]
        entry[name] = {
            "bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
            "wall_s": runs.median("wall_s"),
            "peak_rss_mib": runs.median("peak_rss_mib"),
            "peak_rss_mib_max": max(run.peak_rss_mib for run in runs.runs),
        }
    return entry


def startup_section(folder: Path, repeats: int) -> dict[str, Any]:
    env = environment("default")
    commands = {
        "wwcli --help": [WWCLI, "--help"],
        "wwcli describe (c)": [WWCLI, "describe", str(folder)],
        "wwcli describe (c) --format json": [WWCLI, "describe", str(folder), "--format", "json"],
    }

    def make(command: list[str]) -> Callable[[int], Run]:
        return lambda round_number: run_child(command, env=env, stdout=None)

    series = interleave({name: make(command) for name, command in commands.items()}, repeats, None)
    return {
        name: {
            "wall_s": runs.median("wall_s"),
            "wall_s_max": max(run.wall_s for run in runs.runs),
            "cpu_s": runs.median("cpu_s"),
            "peak_rss_mib": runs.median("peak_rss_mib"),
        }
        for name, runs in series.items()
    }


# --- report -----------------------------------------------------------------------------------


def _load(entry: dict[str, Any]) -> str:
    return f"{entry['load_start'][0]:.1f} -> {entry['load_end'][0]:.1f}"


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Machine: {results['machine']}", ""]
    models = [
        name
        for name in ("fixtures/hf_sharded_bf16", "fixtures/hf_bin", "b", "c")
        if name in results
    ]
    if models:
        lines += [
            "| model | threads | wwcli wall (s) | weightwatcher wall (s) | speed-up "
            "| wwcli CPU (s) | weightwatcher CPU (s) | wwcli peak RSS (MiB) "
            "| weightwatcher peak RSS (MiB) "
            "| max abs. alpha diff | max rel. alpha diff | xmin / spikes differ | load (1 min) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in models:
            entry = results[name]
            for threads, mode in entry["modes"].items():
                ours, theirs = mode["wwcli"], mode["weightwatcher"]
                comparison = mode["comparison"]
                loads = ours["load_1min"] + theirs["load_1min"]
                lines.append(
                    f"| {name} | {threads} | {ours['wall_s']:.2f} | {theirs['wall_s']:.2f} | "
                    f"{theirs['wall_s'] / ours['wall_s']:.1f}x | {ours['cpu_s']:.2f} | "
                    f"{theirs['cpu_s']:.2f} | {ours['peak_rss_mib']:.0f} | "
                    f"{theirs['peak_rss_mib']:.0f} | {comparison['max_abs_alpha_diff']:.1e} | "
                    f"{comparison['max_rel_alpha_diff']:.1e} | {comparison['xmin_differs']} / "
                    f"{comparison['num_pl_spikes_differ']} of {comparison['layers_compared']} | "
                    f"{min(loads):.1f}-{max(loads):.1f} |"
                )
        lines += [
            "",
            "| model | matrices | floor wall (s) | floor CPU (s) | wwcli 1-thread wall / floor "
            "| wwcli 1-thread CPU / floor CPU | SVD floor (s) | JSON identical across modes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in models:
            entry = results[name]
            floor, ours = entry["floor"], entry["modes"]["1"]["wwcli"]
            svd = entry.get("svd_floor", {}).get("wall_s")
            if floor["wall_s"] < 0.1:
                ratios = "n/a (floor < 0.1 s) | n/a"
            else:
                ratios = (
                    f"{ours['wall_s'] / floor['wall_s']:.2f} | {ours['cpu_s'] / floor['cpu_s']:.2f}"
                )
            lines.append(
                f"| {name} | {floor['matrices']} | {floor['wall_s']:.2f} | {floor['cpu_s']:.2f} | "
                f"{ratios} | "
                f"{'' if svd is None else f'{svd:.1f}'} | {entry['identical_json_across_modes']} |"
            )
        for name in models:
            mode = results[name]["modes"]["1"]
            if "wwcli --precision float32" in mode:
                single, comparison = mode["wwcli --precision float32"], mode["comparison_float32"]
                lines += [
                    "",
                    f"{name}, `--precision float32`, 1 thread: wall {single['wall_s']:.2f} s "
                    f"(float64: {mode['wwcli']['wall_s']:.2f} s); against weightwatcher: max rel. "
                    f"alpha diff {comparison['max_rel_alpha_diff']:.1e} ("
                    f"{comparison['alpha_beyond_1e-6']} of {comparison['layers_compared']} layers "
                    f"beyond 1e-6), max rel. xmin diff {comparison['max_rel_xmin_diff']:.1e}, "
                    f"num_pl_spikes differ in {comparison['num_pl_spikes_differ']} layers",
                ]
    if "jobs" in results:
        entry = results["jobs"]
        one, two = entry["--jobs 1"], entry["--jobs 2"]
        lines += [
            "",
            "| (b), default threads | wall (s) | CPU (s) | peak RSS (MiB) |",
            "|---|---|---|---|",
            f"| --jobs 1 | {one['wall_s']:.2f} | {one['cpu_s']:.2f} | {one['peak_rss_mib']:.0f} |",
            f"| --jobs 2 | {two['wall_s']:.2f} | {two['cpu_s']:.2f} | {two['peak_rss_mib']:.0f} |",
            "",
            f"Speed-up {one['wall_s'] / two['wall_s']:.2f}x; JSON identical: "
            f"{entry['identical_json']}; load {_load(entry)}.",
        ]
    if "growth" in results:
        lines += [
            "",
            "| model | size (MB) | jobs | wall (s) | peak RSS (MiB) |",
            "|---|---|---|---|---|",
        ]
        for name, row in results["growth"].items():
            if not isinstance(row, dict) or "bytes" not in row:
                continue
            model, jobs = name.split()
            lines.append(
                f"| {model} | {row['bytes'] / 1e6:.0f} | {jobs.split('=')[1]} | "
                f"{row['wall_s']:.2f} | {row['peak_rss_mib']:.0f} |"
            )
        lines.append(f"\nLoad {_load(results['growth'])}.")
    if "startup" in results:
        lines += ["", "| command | wall median (s) | wall max (s) | CPU (s) |", "|---|---|---|---|"]
        for name, row in results["startup"].items():
            if isinstance(row, dict) and "wall_s" in row:
                lines.append(
                    f"| `{name}` | {row['wall_s']:.2f} | {row['wall_s_max']:.2f} | "
                    f"{row['cpu_s']:.2f} |"
                )
        lines.append(f"\nLoad {_load(results['startup'])}.")
    return "\n".join(lines) + "\n"


def machine() -> str:
    import threadpoolctl

    blas = {
        info["internal_api"] + " " + info["version"] for info in threadpoolctl.threadpool_info()
    }
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__} ({', '.join(sorted(blas))})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "out" / "e2e")
    parser.add_argument("--sections", default="fixtures,b,c,jobs,growth,startup")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--ww-repeats",
        type=int,
        default=None,
        help="weightwatcher runs on (c) (default: --repeats)",
    )
    parser.add_argument(
        "--float32", action="store_true", help="also wwcli --precision float32 on (b)"
    )
    parser.add_argument("--svd-floor", action="store_true", help="also sum weightwatcher's SVDs")
    args = parser.parse_args(argv)
    workdir: Path = args.workdir.resolve()
    if "safetensors" in str(workdir):
        parser.error(
            f"{workdir}: weightwatcher 0.7.7 ignores the index under a path with 'safetensors'"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    results: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    json_path = workdir / "e2e.json"

    def save() -> None:
        json_path.write_text(json.dumps(results, indent=1))
        (workdir / "e2e.md").write_text(markdown(results))

    if "fixtures" in sections:
        for name in FIXTURES:
            folder = ensure_fixture(workdir, name)
            with section(f"fixtures/{name}", results) as entry:
                entry.update(head_to_head(workdir, folder, name, args.repeats, args.repeats, False))
            save()
    for name in ("b", "c"):
        if name in sections:
            folder = ensure_model(workdir, name)
            ww_repeats = args.ww_repeats if (name == "c" and args.ww_repeats) else args.repeats
            with section(name, results) as entry:
                entry.update(
                    head_to_head(
                        workdir,
                        folder,
                        name,
                        args.repeats,
                        ww_repeats,
                        args.float32 and name == "b",
                    )
                )
                if args.svd_floor:
                    entry["svd_floor"] = svd_floor(folder)
            save()
    if "jobs" in sections:
        with section("jobs", results) as entry:
            entry.update(jobs_section(workdir, ensure_model(workdir, "b"), args.repeats))
        save()
    if "growth" in sections:
        with section("growth", results) as entry:
            entry.update(growth_section(workdir, args.repeats))
        save()
    if "startup" in sections:
        with section("startup", results) as entry:
            entry.update(startup_section(ensure_model(workdir, "c"), max(5, args.repeats)))
        save()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    sys.stdout.write(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
