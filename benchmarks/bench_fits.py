"""Benchmarks of the fit options: fix_fingers='clip_xmax', fit='tpl' and the tail tests, against
weightwatcher 0.7.7's own code for the same option, on one BLAS thread.

    .venv/bin/python benchmarks/bench_fits.py                 # ~15 min on 2 shared cores
    .venv/bin/python benchmarks/bench_fits.py --quick         # 1 repeat, no 4096 x 4096
    .venv/bin/python benchmarks/bench_fits.py --tpl-layers 0  # no TPL (the slow part)

Models: a BERT-sized synthetic encoder (6 blocks, hidden 384, FFN 1536: per block q, k, v, o
(384 x 384), FFN in (1536 x 384) and out (384 x 1536), plus word embeddings (30522 x 384),
position embeddings (512 x 384) and a pooler (384 x 384): 39 layers of 384 eigenvalues; the
tensors are drawn as ``make_synthetic.py`` draws them: planted power-law tails for q and k,
Student-t for o, FFN out and the embeddings, Gaussian for v, FFN in and the pooler), and one
4096 x 4096 Student-t (df 3) layer.

Two views, medians of --repeats runs after a warm-up:

- Fit stage, on the same eigenvalues (computed once by the engine): ours (``fit_power_law``,
  ``clip_xmax_fit``, ``tpl_fit``, ``tail_tests``) against weightwatcher's (``WWFit``,
  ``RMT_Util.fit_clipped_powerlaw``, ``pl_fit(distribution='truncated_power_law',
  pl_package='powerlaw')``; weightwatcher has no tail tests: its ``pl_compare`` is unused code).
  TPL runs once, on the first --tpl-layers layers only (about 4 minutes per 384-eigenvalue
  layer each side; O(n^2) in the eigenvalues, so the 4096 x 4096 layer is not fitted).
- Whole analysis of the encoder: ``analyze_layer`` over the 39 layers with each option against
  ``WeightWatcher(model).analyze(...)`` on the same weights (torch modules), TPL excepted.

Prints Markdown tables; ``--json FILE`` writes the raw numbers.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from make_synthetic import TensorPlan, draw

from wwcli.engine import (
    EngineOptions,
    analyze_layer,
    analyze_layer_spectrum,
    clip_xmax_fit,
    fit_power_law,
)
from wwcli.engine.tpl import tail_tests, tpl_fit


def encoder_plans() -> list[TensorPlan]:
    """The 39 analyzed matrices of a MiniLM-sized BERT encoder, in model order."""
    hidden, ffn = 384, 1536
    plans = [
        TensorPlan("embeddings.word_embeddings.weight", (30522, hidden), "student"),
        TensorPlan("embeddings.position_embeddings.weight", (512, hidden), "student"),
    ]
    for block in range(6):
        prefix = f"encoder.layer.{block}"
        for name, kind in (("query", "powerlaw"), ("key", "powerlaw"), ("value", "gaussian")):
            plans.append(TensorPlan(f"{prefix}.attention.self.{name}.weight", (hidden,) * 2, kind))
        output = f"{prefix}.attention.output.dense.weight"
        plans.append(TensorPlan(output, (hidden, hidden), "student"))
        plans.append(TensorPlan(f"{prefix}.intermediate.dense.weight", (ffn, hidden), "gaussian"))
        plans.append(TensorPlan(f"{prefix}.output.dense.weight", (hidden, ffn), "student"))
    plans.append(TensorPlan("pooler.dense.weight", (hidden, hidden), "gaussian"))
    return plans


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        try:
            import torch

            torch.set_num_threads(1)
        except ImportError:
            pass
        yield


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def median_time(function: Callable[[], Any], repeats: int, warmup: bool = True) -> float:
    if warmup:
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def silent_logger() -> logging.Logger:
    logger = logging.getLogger("bench_fits.silent")
    logger.setLevel(logging.CRITICAL)
    logger.propagate = False
    return logger


def fit_stage(
    spectra: list[NDArray[np.float64]], repeats: int, tpl_layers: int
) -> dict[str, dict[str, float]]:
    """Seconds for the fit stage of each option over `spectra` (sum over layers), ours and ww's."""
    from weightwatcher import RMT_Util
    from weightwatcher.WW_powerlaw import WWFit, pl_fit

    logger = silent_logger()
    data = [v[v > 1e-5] for v in spectra]
    fits = [fit_power_law(v) for v in spectra]

    def ours_plain() -> None:
        for v in spectra:
            fit_power_law(v)

    def ww_plain() -> None:
        with quiet():
            for d in data:
                WWFit(d)

    def ours_clip() -> None:
        for v in spectra:
            clip_xmax_fit(v)

    def ww_clip() -> None:
        with quiet():
            for d in data:
                RMT_Util.fit_clipped_powerlaw(d, logger=logger)

    def ours_tests() -> None:
        for v, f in zip(spectra, fits, strict=True):
            tail_tests(v, xmin=f.xmin)

    results = {
        "plain": {"ours": median_time(ours_plain, repeats), "ww": median_time(ww_plain, repeats)},
        "clip_xmax": {
            "ours": median_time(ours_clip, repeats),
            "ww": median_time(ww_clip, repeats),
        },
        "tail_tests": {"ours": median_time(ours_tests, repeats)},
    }
    if tpl_layers:
        subset, subset_data = spectra[:tpl_layers], data[:tpl_layers]

        def ours_tpl() -> None:
            for v in subset:
                tpl_fit(v)

        def ww_tpl() -> None:
            with quiet():
                for d in subset_data:
                    fit = pl_fit(d, distribution="truncated_power_law", pl_package="powerlaw")
                    _ = fit.truncated_power_law.alpha

        results["tpl"] = {
            "ours": median_time(ours_tpl, 1, warmup=False),
            "ww": median_time(ww_tpl, 1, warmup=False),
            "layers": float(len(subset)),
        }
    return results


def whole_analysis(weights: list[NDArray[np.float32]], repeats: int) -> dict[str, dict[str, float]]:
    """Seconds for the whole analysis of the encoder per option, ours and ww's."""
    import torch
    import weightwatcher

    modules = []
    for weight in weights:
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight.data = torch.from_numpy(weight)
        modules.append(layer)
    model = torch.nn.Sequential(*modules)
    options = {
        "plain": ({}, EngineOptions()),
        "clip_xmax": ({"fix_fingers": "clip_xmax"}, EngineOptions(fix_fingers="clip_xmax")),
        "tail_tests": (None, EngineOptions(tail_tests=True)),
    }
    results: dict[str, dict[str, float]] = {}
    for name, (ww_options, ours_options) in options.items():

        def ours(opts: EngineOptions = ours_options) -> None:
            for weight in weights:
                analyze_layer([weight], options=opts)

        results[name] = {"ours": median_time(ours, repeats)}
        if ww_options is not None:

            def ww(opts: dict[str, Any] = ww_options) -> None:
                with quiet():
                    weightwatcher.WeightWatcher(model=model).analyze(**opts)

            results[name]["ww"] = median_time(ww, repeats)
    return results


def table(title: str, results: dict[str, dict[str, float]], plain: str = "plain") -> str:
    lines = [
        f"{title}",
        "",
        "| option | wwcli (s) | weightwatcher (s) | ratio | wwcli extra over plain (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    base = results[plain]["ours"]
    for name, row in results.items():
        ours, ww = row["ours"], row.get("ww")
        ratio = f"{ww / ours:.1f}x" if ww else "-"
        extra = "-" if name == plain else f"{ours - base:.3f}"
        if name == "tpl":
            extra = "-"
            name = f"tpl ({int(row['layers'])} layer(s) only)"
        ww_text = f"{ww:.3f}" if ww else "- (no such option)"
        lines.append(f"| {name} | {ours:.3f} | {ww_text} | {ratio} | {extra} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tpl-layers", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 repeat, no 4096 x 4096 layer")
    parser.add_argument("--no-whole", action="store_true", help="skip the whole-analysis view")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    out: dict[str, Any] = {"repeats": repeats}
    with one_thread():
        weights = [draw(plan, seed=0) for plan in encoder_plans()]  # (out, in) float32
        spectra = []
        for weight in weights:
            _, values = analyze_layer_spectrum([weight])
            assert values is not None
            spectra.append(values)
        plans = encoder_plans()
        clipped = [clip_xmax_fit(v) for v in spectra]
        changed = [
            f"{plan.key} ({plan.kind}: alpha {c.raw_fit.alpha:.2f} -> {c.fit.alpha:.2f})"
            for plan, c in zip(plans, clipped, strict=True)
            if c.num_fingers
        ]
        out["encoder_clip_changed"] = changed
        print(f"clip_xmax changes alpha on {len(changed)} of {len(spectra)} encoder layers:")
        print("\n".join(f"  {line}" for line in changed))
        out["encoder_fit"] = fit_stage(spectra, repeats, args.tpl_layers)
        print(table("Encoder (39 layers of 384 eigenvalues), fit stage:", out["encoder_fit"]))
        if not args.no_whole:
            out["encoder_whole"] = whole_analysis(weights, repeats)
            print(table("\nEncoder, whole analysis:", out["encoder_whole"]))
        if not args.quick:
            rng = np.random.default_rng(4096)
            big = (rng.standard_t(3.0, size=(4096, 4096)) / 64.0).astype(np.float32)
            _, values = analyze_layer_spectrum([big])
            assert values is not None
            out["big_fit"] = fit_stage([values], repeats, 0)
            print(table("\n4096 x 4096 layer, fit stage:", out["big_fit"]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
