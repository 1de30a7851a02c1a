"""Engine benchmarks: the power-law fit and the eigenvalues, against weightwatcher 0.7.7's.

    .venv/bin/python benchmarks/bench_engine.py            # everything (~15 min on 2 cores)
    .venv/bin/python benchmarks/bench_engine.py --quick    # fewer repeats, no 4096 x 4096

Every figure is the median of several runs after one warm-up run, and every ratio compares two
timings taken side by side in the same process, their runs interleaved, under the same BLAS
thread count: one thread (threadpoolctl + torch.set_num_threads(1)) and the machine's default.
Prints Markdown tables; ``--json FILE`` also writes the raw numbers.

- Fit: ``fit_power_law`` (pruned KS search) against weightwatcher's ``WWFit`` (a Python loop over
  candidates), and two other ways to vectorize the same search: a loop over candidates with one
  numpy pass per tail, and the exhaustive chunked 2-D evaluation (``ks_distances``). Spectra:
  an MP bulk (random-like layer) and an MP bulk whose top 10 % is a power law of exponent 2.5
  (trained-like layer). The chosen xmin must be the same for all; the table says so.
- Eigenvalues: ``eigenvalues`` (float64 Gram + symmetric eigensolver; numpy and torch backends)
  against ``scipy.linalg.svd(W.astype(float64), compute_uv=False) ** 2`` (weightwatcher's path)
  on float32 Student-t weight matrices, with the largest relative difference over the top 10 %
  of the spectrum.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
from numpy.typing import NDArray
from threadpoolctl import threadpool_info, threadpool_limits

import wwcli.engine._lapack as lapack
from wwcli.analysis import TORCH_EIGH_MIN_ORDER
from wwcli.engine import eigenvalues, fit_power_law, ks_distances, tail_alphas

FIT_SIZES = (768, 1536, 4096, 8192)
MATRIX_SHAPES = ((768, 768), (3072, 768), (5632, 2048), (4096, 4096))


Contenders = dict[str, tuple[Callable[[], object], int]]
"""{name: (function, number of timed runs)}."""


def _interleaved_medians(functions: Contenders) -> dict[str, float]:
    """Median seconds of each function ({name: (function, runs)}), after one warm-up run each.

    The runs are interleaved (A, B, C, A, B, C, ...) so that a change in the load of a shared
    machine hits every contender alike and the ratios stay fair.
    """
    for function, _ in functions.values():
        function()  # warm-up: imports, page faults, thread pools
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_number in range(max(runs for _, runs in functions.values())):
        for name, (function, runs) in functions.items():
            if round_number < runs:
                start = time.perf_counter()
                function()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """BLAS/OpenMP and torch limited to `count` threads (None: the defaults)."""
    torch = sys.modules.get("torch")
    previous = torch.get_num_threads() if torch is not None else None
    if count is None:
        yield
        return
    with threadpool_limits(limits=count):
        if torch is not None:
            torch.set_num_threads(count)
        try:
            yield
        finally:
            if torch is not None and previous is not None:
                torch.set_num_threads(previous)


def _marchenko_pastur(rng: np.random.Generator, n: int) -> NDArray[np.float64]:
    """n eigenvalues of W^T W / 2n, W Gaussian 2n x n (Dumitriu-Edelman bidiagonal model)."""
    rows = 2 * n
    diagonal = np.sqrt(rng.chisquare(rows - np.arange(n)))
    upper = np.sqrt(rng.chisquare(n - 1 - np.arange(n - 1)))
    main = diagonal**2 + np.concatenate([[0.0], upper**2])
    values = scipy.linalg.eigvalsh_tridiagonal(main, diagonal[:-1] * upper)
    return np.sort(np.maximum(values, 0.0)) / rows


def _spectrum(kind: str, n: int) -> NDArray[np.float64]:
    rng = np.random.default_rng([n, len(kind)])
    bulk = _marchenko_pastur(rng, n)
    if kind == "mp":
        return bulk
    tail_size = n // 10
    tail = bulk[-1] * (1.0 + rng.pareto(1.5, size=tail_size))  # exponent 2.5
    return np.sort(np.concatenate([bulk[: n - tail_size], tail]))


def _per_candidate_loop(values: NDArray[np.float64]) -> int:
    """The same search as a loop over candidates, one numpy pass per tail (O(n^2) work)."""
    data = np.sort(values[values > 1e-5])
    n = data.size
    alphas = tail_alphas(data)
    log_data = np.log(data)
    distances = np.ones(n - 1)
    for i in range(n - 1):
        if 1 < alphas[i] < np.inf:
            m = n - i
            fitted = 1 - np.exp((1 - alphas[i]) * (log_data[i:] - log_data[i]))
            distances[i] = np.max(np.abs(fitted - np.arange(m) / m))
    return int(np.argmin(distances))


def _exhaustive(values: NDArray[np.float64]) -> int:
    data = np.sort(values[values > 1e-5])
    return int(np.argmin(ks_distances(data)))


def bench_fit(thread_counts: list[int | None], repeats: int) -> list[dict[str, Any]]:
    from weightwatcher.WW_powerlaw import WWFit  # type: ignore[import-untyped]

    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    rows = []
    for n in FIT_SIZES:
        for kind in ("mp", "mp+tail2.5"):
            values = _spectrum(kind, n)
            data = np.sort(values[values > 1e-5])
            with contextlib.redirect_stdout(io.StringIO()):
                reference = WWFit(data)
            fit = fit_power_law(values)
            same = (
                fit.xmin == reference.xmin
                and data[_per_candidate_loop(values)] == fit.xmin
                and data[_exhaustive(values)] == fit.xmin
            )
            for threads in thread_counts:
                with _threads(threads):
                    seconds = _interleaved_medians(
                        {
                            "weightwatcher_s": (partial(WWFit, data), repeats),
                            "loop_s": (partial(_per_candidate_loop, values), repeats),
                            "chunked_2d_s": (partial(_exhaustive, values), repeats),
                            "ours_s": (partial(fit_power_law, values), repeats),
                        }
                    )
                row = {
                    "n": n,
                    "spectrum": kind,
                    "threads": threads or "default",
                    **seconds,
                    "alpha": fit.alpha,
                    "alpha_rel_diff": abs(fit.alpha - reference.alpha) / reference.alpha,
                    "same_xmin": same,
                }
                row["speedup"] = row["weightwatcher_s"] / row["ours_s"]
                rows.append(row)
                print(f"  fit n={n} {kind} threads={row['threads']}: {row}", file=sys.stderr)
    return rows


def _weights(rows: int, columns: int) -> NDArray[np.float32]:
    rng = np.random.default_rng([rows, columns])
    weights: NDArray[np.float32] = (
        rng.standard_t(3.0, size=(rows, columns)) / np.sqrt(columns)
    ).astype(np.float32)
    return weights


def _svd(w: NDArray[np.float32]) -> NDArray[np.float64]:
    """weightwatcher's path to the singular values on a machine without CUDA."""
    values: NDArray[np.float64] = scipy.linalg.svd(w.astype(np.float64), compute_uv=False)
    return values


def _syevd_eigenvalues(w: NDArray[np.float32]) -> NDArray[np.float64]:
    """``eigenvalues(w)`` with the two-stage solver turned off: numpy's syevd for every order."""
    lapack.enabled = False
    try:
        return eigenvalues(w)
    finally:
        lapack.enabled = True


def _top_relative_difference(values: NDArray[np.float64], reference: NDArray[np.float64]) -> float:
    """Largest relative difference over the top 10 % of two ascending spectra."""
    top = slice(-max(1, reference.size // 10), None)
    return float(np.max(np.abs(values[top] - reference[top]) / reference[top]))


def _bench_shape(
    shape: tuple[int, int], thread_counts: list[int | None], repeats: int, has_torch: bool
) -> list[dict[str, Any]]:
    w = _weights(*shape)
    reference = np.sort(_svd(w) ** 2)
    # The SVD of the largest shapes takes tens of seconds per run here: fewer runs.
    svd_repeats = max(1, repeats // 2) if min(shape) >= 2048 else repeats
    rows = []
    for threads in thread_counts:
        contenders: Contenders = {
            "svd_s": (partial(_svd, w), svd_repeats),
            "numpy_s": (partial(eigenvalues, w), repeats),
        }
        if min(shape) >= lapack.TWO_STAGE_MIN_ORDER:
            contenders["syevd_s"] = (partial(_syevd_eigenvalues, w), repeats)
        if has_torch and min(shape) >= TORCH_EIGH_MIN_ORDER:
            # What `wwcli analyze` runs for such layers where torch is installed and worth it.
            contenders["mkl_s"] = (
                partial(eigenvalues, w, torch_eigh_min_order=TORCH_EIGH_MIN_ORDER),
                repeats,
            )
        if has_torch:
            contenders["torch_s"] = (partial(eigenvalues, w, backend="torch"), repeats)
        with _threads(threads):
            row: dict[str, Any] = {
                "shape": f"{shape[0]}x{shape[1]}",
                "threads": threads or "default",
                **_interleaved_medians(contenders),
                "numpy_top10_rel_diff": _top_relative_difference(eigenvalues(w), reference),
            }
            if has_torch:
                row["torch_top10_rel_diff"] = _top_relative_difference(
                    eigenvalues(w, backend="torch"), reference
                )
        row["speedup_numpy"] = row["svd_s"] / row["numpy_s"]
        if "syevd_s" in row:
            row["speedup_syevd"] = row["svd_s"] / row["syevd_s"]
        if "mkl_s" in row:
            row["speedup_mkl"] = row["svd_s"] / row["mkl_s"]
            row["mkl_top10_rel_diff"] = _top_relative_difference(
                eigenvalues(w, torch_eigh_min_order=TORCH_EIGH_MIN_ORDER), reference
            )
        if has_torch:
            row["speedup_torch"] = row["svd_s"] / row["torch_s"]
        rows.append(row)
        print(f"  eigenvalues {row['shape']} threads={row['threads']}: {row}", file=sys.stderr)
    return rows


def bench_eigenvalues(
    thread_counts: list[int | None], repeats: int, shapes: tuple[tuple[int, int], ...]
) -> list[dict[str, Any]]:
    try:
        import torch  # noqa: F401
    except ImportError:
        has_torch = False
    else:
        has_torch = True
    rows = []
    for shape in shapes:
        rows.extend(_bench_shape(shape, thread_counts, repeats, has_torch))
    return rows


def _markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    header = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        cells = []
        for key, _, form in columns:
            value = row.get(key, "")
            cells.append(format(value, form) if value != "" else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, no 4096x4096")
    parser.add_argument("--repeats", type=int, default=None, help="runs per median (default 7)")
    parser.add_argument("--only", choices=["fit", "eigenvalues"], default=None)
    parser.add_argument(
        "--threads", choices=["1", "default", "both"], default="both", help="BLAS threads"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write raw numbers here")
    arguments = parser.parse_args()
    repeats = arguments.repeats or (3 if arguments.quick else 7)
    shapes = MATRIX_SHAPES[:-1] if arguments.quick else MATRIX_SHAPES
    thread_counts: list[int | None] = {"1": [1], "default": [None], "both": [1, None]}[
        arguments.threads
    ]
    blas = [(i["internal_api"], i["num_threads"]) for i in threadpool_info()]
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}, "
        f"BLAS/OpenMP pools {blas}; medians of {repeats} runs\n"
    )
    results: dict[str, Any] = {}
    if arguments.only in (None, "fit"):
        results["fit"] = bench_fit(thread_counts, repeats)
        print("### Power-law fit\n")
        print(
            _markdown(
                results["fit"],
                [
                    ("n", "eigenvalues", "d"),
                    ("spectrum", "spectrum", "s"),
                    ("threads", "BLAS threads", ""),
                    ("weightwatcher_s", "WWFit (s)", ".4f"),
                    ("loop_s", "per-candidate loop (s)", ".4f"),
                    ("chunked_2d_s", "chunked 2-D, all D (s)", ".4f"),
                    ("ours_s", "fit_power_law (s)", ".5f"),
                    ("speedup", "WWFit / ours", ".0f"),
                    ("same_xmin", "same xmin", ""),
                    ("alpha_rel_diff", "alpha rel. diff", ".1e"),
                ],
            )
        )
        print()
    if arguments.only in (None, "eigenvalues"):
        results["eigenvalues"] = bench_eigenvalues(thread_counts, repeats, shapes)
        print("### Eigenvalues\n")
        print(
            _markdown(
                results["eigenvalues"],
                [
                    ("shape", "W (float32)", "s"),
                    ("threads", "BLAS threads", ""),
                    ("svd_s", "scipy SVD (s)", ".3f"),
                    ("numpy_s", "ours, numpy (s)", ".3f"),
                    ("speedup_numpy", "SVD / numpy", ".1f"),
                    ("syevd_s", "ours, syevd only (s)", ".3f"),
                    ("speedup_syevd", "SVD / syevd only", ".1f"),
                    ("mkl_s", "ours, torch eigensolver (s)", ".3f"),
                    ("speedup_mkl", "SVD / torch eigensolver", ".1f"),
                    ("mkl_top10_rel_diff", "top 10 % rel. diff, torch eigensolver", ".1e"),
                    ("numpy_top10_rel_diff", "top 10 % rel. diff, numpy", ".1e"),
                    ("torch_s", "ours, torch CPU (s)", ".3f"),
                    ("speedup_torch", "SVD / torch", ".1f"),
                    ("torch_top10_rel_diff", "top 10 % rel. diff, torch", ".1e"),
                ],
            )
        )
    if arguments.json is not None:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
