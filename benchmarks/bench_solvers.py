"""CPU eigensolvers for a float64 Gram, one thread: what sets TWO_STAGE_MIN_ORDER and
TORCH_EIGH_MIN_ORDER, and what the choice is worth end to end.

    .venv/bin/python benchmarks/bench_solvers.py                 # both parts (~6 min here)
    .venv/bin/python benchmarks/bench_solvers.py --part solvers  # or --part e2e

- solvers: for Grams of order 768 to 4096 (W^T W of a 2n x n Student-t matrix), numpy's
  ``eigvalsh`` (LAPACK syevd), LAPACK's two-stage ``dsyevd_2stage`` (wwcli/engine/_lapack.py)
  and torch's ``linalg.eigvalsh`` (MKL), interleaved in one process, medians; the largest
  difference of each to syevd, relative to lambda_max.
- e2e: ``wwcli analyze FOLDER --format json --jobs 1`` on a synthetic BF16 model of hidden 2048
  (ffn 5632, 2 blocks: 16 Grams of order 2048), each run a fresh process, interleaved, with
  ``WWCLI_TORCH_EIGH=0`` (LAPACK's two-stage solver) and without (torch's), medians of wall time
  and peak RSS, and the largest relative alpha difference between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from wwcli.engine._lapack import two_stage_eigvalsh

REPO = Path(__file__).resolve().parents[1]
ORDERS = (768, 1024, 1280, 1536, 2048, 3072, 4096)


def _median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def bench_solvers(repeats: int) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    with threadpool_limits(limits=1):
        for order in ORDERS:
            w = rng.standard_t(3.0, size=(2 * order, order)) / np.sqrt(order)
            gram = w.T @ w
            solvers = {
                "syevd": lambda g=gram: np.linalg.eigvalsh(g),
                "two_stage": lambda g=gram: two_stage_eigvalsh(g.copy()),
                "torch": lambda g=gram: torch.linalg.eigvalsh(torch.from_numpy(g)).numpy(),
            }
            reference = np.linalg.eigvalsh(gram)
            times: dict[str, list[float]] = {name: [] for name in solvers}
            runs = repeats if order < 3072 else max(2, repeats // 2)
            for _ in range(runs + 1):  # the first round warms up and is dropped
                for name, solve in solvers.items():
                    started = time.perf_counter()
                    solve()
                    times[name].append(time.perf_counter() - started)
            row: dict[str, Any] = {"order": order}
            for name, solve in solvers.items():
                row[f"{name}_ms"] = _median_ms(times[name][1:])
                values = solve()
                assert values is not None
                row[f"{name}_diff"] = float(np.max(np.abs(values - reference)) / reference[-1])
            rows.append(row)
            print(f"  {row}", file=sys.stderr, flush=True)
    return rows


def _wwcli_command(folder: Path, torch_eigh: bool) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    env.pop("WWCLI_TORCH_EIGH", None)
    if not torch_eigh:
        env["WWCLI_TORCH_EIGH"] = "0"
    command = [sys.executable, "-m", "wwcli", "analyze", str(folder), "--format", "json"]
    return [*command, "--jobs", "1", "--exit-zero", "--quiet"], env


def _run_wwcli(folder: Path, torch_eigh: bool) -> tuple[float, dict[str, float]]:
    """Wall time of one run and its alphas by layer name."""
    command, env = _wwcli_command(folder, torch_eigh)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - started
    return wall, {row["name"]: row["alpha"] for row in json.loads(result.stdout)["layers"]}


def bench_e2e(repeats: int, workdir: Path) -> dict[str, Any]:
    folder = workdir / "hidden2048"
    if not (folder / "model.safetensors.index.json").exists():
        subprocess.run(
            [
                sys.executable,
                str(REPO / "benchmarks" / "make_synthetic.py"),
                str(folder),
                "--hidden",
                "2048",
                "--ffn",
                "5632",
                "--blocks",
                "2",
                "--vocab",
                "4096",
            ],
            check=True,
        )
    walls: dict[bool, list[float]] = {True: [], False: []}
    alphas: dict[bool, dict[str, float]] = {}
    for round_ in range(repeats):
        order = (True, False) if round_ % 2 == 0 else (False, True)
        for torch_eigh in order:
            wall, alphas[torch_eigh] = _run_wwcli(folder, torch_eigh)
            walls[torch_eigh].append(wall)
            print(f"  round {round_} torch={torch_eigh}: {wall:.2f} s", file=sys.stderr)
    rss = {flag: _peak_rss(folder, flag) for flag in (True, False)}
    diff = max(
        abs(alphas[True][n] - alphas[False][n]) / abs(alphas[False][n]) for n in alphas[True]
    )
    return {
        "lapack_two_stage_s": statistics.median(walls[False]),
        "torch_s": statistics.median(walls[True]),
        "lapack_rss_mib": rss[False],
        "torch_rss_mib": rss[True],
        "max_rel_alpha_diff": diff,
        "walls": {"lapack": walls[False], "torch": walls[True]},
    }


def _peak_rss(folder: Path, torch_eigh: bool) -> float:
    """Peak RSS (MiB) of one more run, measured by GNU time around the child."""
    command, env = _wwcli_command(folder, torch_eigh)
    timed = ["/usr/bin/time", "-f", "%M", *command]
    result = subprocess.run(timed, capture_output=True, text=True, env=env, check=True)
    return int(result.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["solvers", "e2e", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "out" / "solvers")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    if args.part in ("solvers", "both"):
        rows = bench_solvers(args.repeats)
        results["solvers"] = rows
        print(
            "| Gram order | syevd (ms) | two-stage (ms) | torch MKL (ms) | syevd / two-stage "
            "| syevd / torch | max diff / lambda_max |"
        )
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            worst = max(row["two_stage_diff"], row["torch_diff"])
            print(
                f"| {row['order']} | {row['syevd_ms']:.0f} | {row['two_stage_ms']:.0f} | "
                f"{row['torch_ms']:.0f} | {row['syevd_ms'] / row['two_stage_ms']:.2f}x | "
                f"{row['syevd_ms'] / row['torch_ms']:.2f}x | {worst:.1e} |"
            )
    if args.part in ("e2e", "both"):
        args.workdir.mkdir(parents=True, exist_ok=True)
        e2e = bench_e2e(max(3, args.repeats), args.workdir)
        results["e2e"] = e2e
        print(
            f"\nhidden 2048 model, --jobs 1: LAPACK two-stage {e2e['lapack_two_stage_s']:.2f} s "
            f"({e2e['lapack_rss_mib']:.0f} MiB), torch {e2e['torch_s']:.2f} s "
            f"({e2e['torch_rss_mib']:.0f} MiB), speed-up "
            f"{e2e['lapack_two_stage_s'] / e2e['torch_s']:.2f}x, max rel. alpha diff "
            f"{e2e['max_rel_alpha_diff']:.1e}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
