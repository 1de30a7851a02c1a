"""Time per layer of an ESD figure: `esd_figure` + `figure_bytes` (PNG, 100 dpi) on the 39
matrices of a small BERT-style encoder, in one thread.

The layers: 6 blocks of hidden size 384, each with query, key, value, attention output
(384 x 384), intermediate (384 x 1536) and output (1536 x 384): 36 matrices; plus the position
embeddings (512 x 384), the pooler (384 x 384) and a classification head's dense layer
(384 x 384): 39, each with 384 eigenvalues. (The word embeddings, 30522 x 384, are left out:
they would dominate the engine's time, not the plot's, and a plot of one is like any other.)
Weights are seeded Student-t (df 1.6 to 2.8), so the fits succeed with alphas of about 1.8 to 6,
like a trained model's, all three verdicts among them; the spectra are computed before the clock
starts.

    .venv/bin/python benchmarks/bench_plots.py [--runs 5] [--profile] [--out DIR]

Prints the median over runs of the mean time per layer (wall and CPU), its split (building the
figure's artists, drawing it with Agg, figure_bytes on a drawn figure), and the same for a bare
figure (the same size, two empty axes, savefig to PNG): what matplotlib costs on this machine
before wwcli draws anything, to read the numbers against on a busy or slow machine. --profile
prints cProfile's top functions of one run; --out writes the 39 PNGs there, to look at.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np

from wwcli.engine import analyze_layer_spectrum
from wwcli.loaders.interface import LayerSpec, LayerType
from wwcli.report.plots import esd_figure, figure_bytes
from wwcli.results import LayerResult, Spectrum

HIDDEN = 384
BLOCKS = 6


def encoder_shapes() -> list[tuple[str, tuple[int, int]]]:
    """The 39 (name, (out, in)) of the encoder, in the order a state dict lists them."""
    shapes = [("embeddings.position_embeddings", (512, HIDDEN))]
    for block in range(BLOCKS):
        prefix = f"encoder.layer.{block}"
        for part in ("query", "key", "value"):
            shapes.append((f"{prefix}.attention.self.{part}", (HIDDEN, HIDDEN)))
        shapes.append((f"{prefix}.attention.output.dense", (HIDDEN, HIDDEN)))
        shapes.append((f"{prefix}.intermediate.dense", (4 * HIDDEN, HIDDEN)))
        shapes.append((f"{prefix}.output.dense", (HIDDEN, 4 * HIDDEN)))
    shapes.append(("pooler.dense", (HIDDEN, HIDDEN)))
    shapes.append(("classifier.dense", (HIDDEN, HIDDEN)))
    return shapes


def encoder_results(seed: int = 0) -> list[LayerResult]:
    """The engine's results (eigenvalues kept) for the 39 seeded matrices."""
    rng = np.random.default_rng(seed)
    results = []
    for layer_id, (name, shape) in enumerate(encoder_shapes()):
        df = rng.uniform(1.6, 2.8)
        weights = rng.standard_t(df, size=shape) / np.sqrt(shape[1])
        metrics, eigenvalues = analyze_layer_spectrum([weights])
        assert eigenvalues is not None
        n, m = max(shape), min(shape)
        spec = LayerSpec(layer_id, name, LayerType.DENSE, shape, "float32", n, m, 1)
        results.append(LayerResult(spec, metrics, Spectrum(eigenvalues)))
    return results


def one_run(results: list[LayerResult]) -> dict[str, float]:
    """Seconds per layer (mean over the layers) of building, drawing and encoding."""
    build = draw = encode = 0.0
    for result in results:
        start = time.perf_counter()
        figure = esd_figure(result, checkpoint="bench/encoder.safetensors")
        built = time.perf_counter()
        figure.canvas.draw()
        drawn = time.perf_counter()
        build += built - start
        draw += drawn - built
        # figure_bytes draws again: its time minus a draw is the encoding's.
        start = time.perf_counter()
        figure_bytes(figure, image_format="png", dpi=100)
        encode += time.perf_counter() - start
    layers = len(results)
    return {"build": build / layers, "draw": draw / layers, "bytes": encode / layers}


def end_to_end(results: list[LayerResult]) -> tuple[float, float]:
    """Seconds per layer (wall, CPU) of what the CLI does: esd_figure, then figure_bytes."""
    start, cpu = time.perf_counter(), time.process_time()
    for result in results:
        figure_bytes(esd_figure(result, checkpoint="bench/encoder.safetensors"), dpi=100)
    layers = len(results)
    return (time.perf_counter() - start) / layers, (time.process_time() - cpu) / layers


def bare_figures(count: int) -> tuple[float, float]:
    """Seconds per figure (wall, CPU) of a 12 x 4.5 in figure with two empty axes, as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        figure = Figure(figsize=(12, 4.5), dpi=100)
        FigureCanvasAgg(figure)
        figure.subplots(1, 2)
        figure.savefig(io.BytesIO(), format="png", dpi=100)
    return (time.perf_counter() - start) / count, (time.process_time() - cpu) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    results = encoder_results()
    fits = sum(r.metrics.fit.status.value == "success" for r in results)
    alphas = [r.metrics.alpha for r in results]
    print(
        f"{len(results)} layers, {fits} fits succeeded, alpha {min(alphas):.2f}..{max(alphas):.2f}"
    )
    end_to_end(results[:3])  # warm-up: imports, font cache

    totals, bare = [], []
    for _ in range(args.runs):  # interleaved, so a busy spell weighs on both alike
        totals.append(end_to_end(results))
        bare.append(bare_figures(len(results) // 3))
    splits = [one_run(results) for _ in range(max(1, args.runs // 2))]
    for title, times in (
        ("esd_figure + figure_bytes(png, dpi=100)", totals),
        ("bare figure", bare),
    ):
        wall = statistics.median(t[0] for t in times) * 1e3
        cpu = statistics.median(t[1] for t in times) * 1e3
        print(
            f"{title}: {wall:.1f} ms per layer wall, {cpu:.1f} ms CPU "
            f"(median of {args.runs} runs; walls: "
            + ", ".join(f"{t[0] * 1e3:.1f}" for t in times)
            + ")"
        )
    for key in ("build", "draw", "bytes"):
        value = statistics.median(split[key] for split in splits) * 1e3
        print(f"  {key:>5}: {value:.1f} ms per layer")
    print("  (bytes = figure_bytes on a drawn figure: a second draw plus the PNG encoding)")

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        end_to_end(results)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for result in results:
            data = figure_bytes(esd_figure(result), dpi=100)
            (args.out / f"{result.spec.layer_id:04d}.png").write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
