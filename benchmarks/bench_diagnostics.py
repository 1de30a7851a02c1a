"""Diagnostics benchmark (issue #13): the MP fit, randomized spectra and detX, ours against
weightwatcher 0.7.7's, one thread.

    .venv/bin/python benchmarks/bench_diagnostics.py                  # BERT-sized + one 4096
    .venv/bin/python benchmarks/bench_diagnostics.py --no-big --repeats 3 --json out.json

Models (float32, fixed seed, values drawn by benchmarks/make_synthetic.py's ``draw``):

- "encoder": a BERT-sized encoder, 6 blocks of hidden 384 and FFN 1536 (per block: query, key
  (planted power-law tails), value (Gaussian), attention output, intermediate and output
  (Student-t)), a word embedding (2048 x 384), a position embedding (512 x 384) and a pooler:
  39 layers of 384 eigenvalues.
- "4096": one 4096 x 4096 Student-t layer.

Ours: per layer ``analyze_layer_spectrum`` (plain), then each diagnostic alone on its result
(``mp_fit``, ``randomized_esd``, ``detx``); a diagnostic's row is plain + that diagnostic, each
the median of --repeats runs. weightwatcher: ``WeightWatcher(model).analyze()`` of a torch model
holding the same weights, with ``mp_fit=True``, ``randomize=True`` or ``detX=True`` (its whole
analysis, SVD included, since it cannot run a diagnostic alone), median of --ww-repeats runs
(--big-ww-repeats for the 4096 layer). One BLAS thread (threadpoolctl) and one torch thread.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic import TensorPlan, draw  # noqa: E402

from wwcli.engine import analyze_layer_spectrum  # noqa: E402
from wwcli.engine.detx import detx  # noqa: E402
from wwcli.engine.mpfit import mp_fit  # noqa: E402
from wwcli.engine.randomize import randomized_esd  # noqa: E402

OPTIONS = ("plain", "mp_fit", "randomize", "detX")
WW_KWARGS: dict[str, dict[str, bool]] = {
    "plain": {},
    "mp_fit": {"mp_fit": True},
    "randomize": {"randomize": True},
    "detX": {"detX": True},
}

Layer = tuple[str, str, np.ndarray[Any, Any]]
"""(name, "linear" or "embedding", weight as torch stores it: (out, in) or (num, dim))."""


def encoder(seed: int = 0) -> list[Layer]:
    """The BERT-sized encoder: 39 layers of 384 eigenvalues."""
    hidden, ffn = 384, 1536
    plans = [
        ("embeddings.word", "embedding", TensorPlan("word", (2048, hidden), "student")),
        ("embeddings.position", "embedding", TensorPlan("position", (512, hidden), "gaussian")),
    ]
    for block in range(6):
        prefix = f"encoder.layer.{block}"
        for name, shape, kind in (
            ("attention.query", (hidden, hidden), "powerlaw"),
            ("attention.key", (hidden, hidden), "powerlaw"),
            ("attention.value", (hidden, hidden), "gaussian"),
            ("attention.output", (hidden, hidden), "student"),
            ("intermediate", (ffn, hidden), "student"),
            ("output", (hidden, ffn), "student"),
        ):
            key = f"{prefix}.{name}"
            plans.append((key, "linear", TensorPlan(key, shape, kind)))
    plans.append(("pooler", "linear", TensorPlan("pooler", (hidden, hidden), "powerlaw")))
    return [(name, kind, draw(plan, seed)) for name, kind, plan in plans]


def big_layer(seed: int = 0) -> list[Layer]:
    """One 4096 x 4096 Student-t layer."""
    return [("big", "linear", draw(TensorPlan("big", (4096, 4096), "student"), seed))]


def _median_time(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(layers: list[Layer], repeats: int) -> dict[str, Any]:
    """Median seconds of the plain analysis and of each diagnostic on its results, and the
    diagnostics' results (for the parity check)."""
    spectra = [analyze_layer_spectrum([weight]) for _, _, weight in layers]

    def plain() -> None:
        for _, _, weight in layers:
            analyze_layer_spectrum([weight])

    def sizes(index: int) -> dict[str, int]:
        metrics = spectra[index][0]
        return {"N": metrics.N, "M": metrics.M, "rf": metrics.rf}

    def run_mp() -> list[Any]:
        return [mp_fit(values, **sizes(i)) for i, (_, values) in enumerate(spectra)]

    def run_random() -> list[Any]:
        rng = np.random.default_rng(0)
        return [
            randomized_esd([weight], spectra[i][1], conv2d_norm=False, rng=rng, **sizes(i))
            for i, (_, _, weight) in enumerate(layers)
        ]

    def run_detx() -> list[Any]:
        return [detx(values, num_pl_spikes=m.fit.num_pl_spikes) for m, values in spectra]

    seconds = {"plain": _median_time(plain, repeats)}
    for option, function in (("mp_fit", run_mp), ("randomize", run_random), ("detX", run_detx)):
        seconds[option] = seconds["plain"] + _median_time(function, repeats)
    return {"seconds": seconds, "mp": run_mp()}


def _torch_model(layers: list[Layer]) -> Any:
    import torch

    modules: list[Any] = []
    for _, kind, weight in layers:
        if kind == "embedding":
            module = torch.nn.Embedding(*weight.shape)
        else:
            module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        module.weight.data = torch.from_numpy(weight.copy())
        modules.append(module)
    return torch.nn.Sequential(*modules)


def weightwatcher(layers: list[Layer], repeats: int, options: tuple[str, ...]) -> dict[str, Any]:
    """Median seconds of weightwatcher's analyze() with each option, and its mp_fit rows."""
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    model = _torch_model(layers)
    seconds: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for option in options:

        def run(option: str = option) -> None:
            np.random.seed(0)
            with contextlib.redirect_stdout(io.StringIO()):
                details = ww.WeightWatcher(model=model).analyze(**WW_KWARGS[option])
            if option == "mp_fit":
                rows[:] = details.to_dict("records")

        seconds[option] = _median_time(run, repeats)
    return {"seconds": seconds, "mp_rows": rows}


def _parity(ours_mp: list[Any], rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "not compared"
    worst = 0.0
    same_spikes = len(rows) == len(ours_mp)
    for fit, row in zip(ours_mp, rows, strict=False):
        same_spikes &= fit.num_spikes == row["num_spikes"]
        for name in ("sigma_mp", "bulk_max", "mp_softrank", "W_scale"):
            worst = max(worst, abs(getattr(fit, name) - row[name]) / abs(row[name]))
    return f"num_spikes {'equal' if same_spikes else 'DIFFER'}, worst rel. diff {worst:.1e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ww-repeats", type=int, default=3)
    parser.add_argument("--big-ww-repeats", type=int, default=1)
    parser.add_argument("--no-big", action="store_true", help="skip the 4096 x 4096 layer")
    parser.add_argument("--no-ww", action="store_true", help="time ours only")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    models = [("encoder (39 x 384)", encoder(), args.ww_repeats)]
    if not args.no_big:
        models.append(("4096 x 4096", big_layer(), args.big_ww_repeats))
    report: list[dict[str, Any]] = []
    with threadpool_limits(limits=1):
        for label, layers, ww_repeats in models:
            mine = ours(layers, args.repeats)
            theirs = None if args.no_ww else weightwatcher(layers, ww_repeats, OPTIONS)
            entry = {
                "model": label,
                "ours": mine["seconds"],
                "weightwatcher": theirs["seconds"] if theirs else None,
                "mp_parity": _parity(mine["mp"], theirs["mp_rows"]) if theirs else "",
                "load_average": os.getloadavg(),
            }
            report.append(entry)
            print(json.dumps(entry), file=sys.stderr, flush=True)
    print(
        "| model | option | ours (s) | ours, the option alone (s) | weightwatcher (s) | "
        "weightwatcher, the option alone (s) | option alone: ww / ours | total: ww / ours |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for entry in report:
        plain = entry["ours"]["plain"]
        ww_seconds = entry["weightwatcher"]
        for option in OPTIONS:
            mine_s = entry["ours"][option]
            mine_extra = mine_s - plain if option != "plain" else plain
            cells = [entry["model"], option, f"{mine_s:.3f}", f"{mine_extra:.3f}"]
            if ww_seconds:
                theirs_s = ww_seconds[option]
                theirs_extra = theirs_s - ww_seconds["plain"] if option != "plain" else theirs_s
                cells += [
                    f"{theirs_s:.2f}",
                    f"{theirs_extra:.2f}",
                    f"{theirs_extra / mine_extra:.0f}x",
                    f"{theirs_s / mine_s:.1f}x",
                ]
            else:
                cells += ["", "", "", ""]
            print("| " + " | ".join(cells) + " |")
        if entry["mp_parity"]:
            print(f"\n{entry['model']}: MP fit parity: {entry['mp_parity']}\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
