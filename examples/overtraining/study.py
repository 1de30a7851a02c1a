"""Validation study: do weight-only diagnostics tell which checkpoints lost test accuracy?

The seed MLP (experiment.py's; trained as `study_train.py` says) is trained on scikit-learn's
digits over a grid: label noise 0, 0.2 and 0.4; 250 training images and the full 1,257; six
seeds (1-2 select the rule, 3-6 judge it); fc2 of width 100 (a 300x100 kernel) and 300
(300x300); batch sizes 32, 16, 8, 4, 2, 1.
Every initial and trained model is saved as a PyTorch state dict, and wwcli measures fc2 of each
checkpoint through its Python API (`wwcli.analysis.analyze_path`: alpha, clip_xmax alpha, the MP
fit, randomized spectra and traps, detX) and the update W - W_init (`--base`). Then one rule
from a family declared here is chosen on the selection seeds and judged on the held-out seeds.

Declared before any diagnostic was looked at (README.md, "The validation study"):

- A trained run **lost test accuracy** when its test accuracy is below that of the batch-size-32
  run of the same group (noise, training set, seed, width) by more than MARGIN (0.01, 5.4 of the
  540 test images). The batch-size-32 runs are the references and are not judged; every other
  run is a positive (lost) or a negative.
- The rules: `alpha < 2` (fixed); `x > t` and `x < t` for each diagnostic x in RULE_FEATURES
  (spike counts as fractions of the layer's eigenvalues, so that one threshold can serve both
  widths); and `alpha < 2 and x op t`. Thresholds t are midpoints between consecutive distinct
  values on the selection seeds. The chosen rule maximizes F1 on the selection seeds (ties: higher
  precision, then a single condition before a conjunction, then RULE_FEATURES' order).
- The rule **holds** when, on the held-out seeds, precision >= 0.8 and recall >= 0.5 with at least
  10 positives.

    OPENBLAS_NUM_THREADS=1 python examples/overtraining/study.py [--reduced] [--out DIR]
        [--jobs 2] [--skip-training] [--replot]

Writes into DIR (default: this folder): `results_study.csv` (one row per trained checkpoint),
`results_study.md` (the rule tables, then the rows), `results_study.json` (settings, rows, the
initial checkpoints, the rule search, timings), `study_diagnostics.png`, `study_alpha.png`; the
checkpoints under DIR/study_checkpoints/ (not committed). `--skip-training` analyzes the
checkpoints of an earlier run again (its `runs.json`); `--replot` remakes the tables and plots
from results_study.json.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from study_train import RunResult, RunSpec, finished_run, run_one  # noqa: E402

MARGIN = 0.01
"""A run lost test accuracy when it is below its group's batch-size-32 run by more than this."""
REFERENCE_BATCH = 32
"""The batch size whose run is each group's reference."""
MIN_PRECISION, MIN_RECALL, MIN_POSITIVES = 0.8, 0.5, 10
"""A rule holds when on the held-out seeds precision >= 0.8 and recall >= 0.5 with >= 10
positives."""
ALPHA_LINE = 2.0
"""The seed finding's threshold."""

RULE_FEATURES = (
    "alpha",
    "alpha_clip",
    "D",
    "pl_spike_frac",
    "mp_spike_frac",
    "mp_softrank",
    "num_traps",
    "rand_distance",
    "detX_frac",
    "delta_alpha",
    "delta_mp_spike_frac",
    "delta_rel_norm",
)
"""The diagnostics a rule may threshold (all from the checkpoint and, for delta_*, the initial
weights): alpha (plain) and alpha with clip_xmax; the fit's KS distance D; num_pl_spikes / M;
the MP fit's num_spikes / M and mp_softrank; num_traps and rand_distance of the randomized
spectrum; detX_num / M; the update W - W_init's alpha, MP num_spikes / M, and Frobenius norm
relative to W_init's."""


@dataclass(frozen=True)
class StudyConfig:
    """The grid, and how long each run may train."""

    noise_levels: tuple[float, ...]
    train_sizes: tuple[int, ...]
    """0 means the whole training split."""
    selection_seeds: tuple[int, ...]
    held_out_seeds: tuple[int, ...]
    hidden: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    learning_rate: float
    max_epochs: int

    @property
    def seeds(self) -> tuple[int, ...]:
        """Every seed, selection first."""
        return self.selection_seeds + self.held_out_seeds

    def specs(self) -> list[RunSpec]:
        """Every run of the grid."""
        return [
            RunSpec(
                noise=noise,
                train_size=size,
                seed=seed,
                hidden=hidden,
                batch_size=batch,
                learning_rate=self.learning_rate,
                max_epochs=self.max_epochs,
            )
            for noise in self.noise_levels
            for size in self.train_sizes
            for seed in self.seeds
            for hidden in self.hidden
            for batch in self.batch_sizes
        ]


FULL = StudyConfig(
    noise_levels=(0.0, 0.2, 0.4),
    train_sizes=(250, 0),
    selection_seeds=(1, 2),
    held_out_seeds=(3, 4, 5, 6),
    hidden=(100, 300),
    batch_sizes=(32, 16, 8, 4, 2, 1),
    learning_rate=0.01,
    max_epochs=200,
)
"""The study: 72 groups (noise x training set x seed x width) of 6 batch sizes, 432 models."""

REDUCED = StudyConfig(
    noise_levels=(0.0, 0.4),
    train_sizes=(100,),
    selection_seeds=(1,),
    held_out_seeds=(2,),
    hidden=(100,),
    batch_sizes=(32, 4),
    learning_rate=0.01,
    max_epochs=3,
)
"""A handful of tiny runs for CI: end to end, no conclusion."""


# --- diagnostics through wwcli ------------------------------------------------------------------


def _fc2(report: Any) -> Any:
    """The fc2 LayerResult of an analyze_path outcome (RuntimeError for an input failure)."""
    for layer in getattr(report, "layers", ()):
        if layer.spec.name == "fc2":
            return layer
    raise RuntimeError(f"wwcli could not analyze fc2: {report}")


def _count(value: int | None) -> float:
    """A count as a float; None and -1 (not computed) as NaN."""
    return math.nan if value is None or value < 0 else float(value)


def layer_numbers(layer: Any) -> dict[str, float]:
    """What the study records of one wwcli LayerResult analyzed with the MP fit, randomized
    spectra and detX (and, where it has one, the update against its base)."""
    metrics = layer.metrics
    M = metrics.M
    out: dict[str, float] = {
        "alpha": metrics.alpha,
        "D": metrics.fit.D,
        "num_pl_spikes": _count(metrics.fit.num_pl_spikes),
        "pl_spike_frac": _count(metrics.fit.num_pl_spikes) / M,
        "lambda_max": metrics.lambda_max,
        "frobenius": math.sqrt(metrics.norm),
    }
    groups = layer.diagnostics
    mp = groups.mp if groups is not None else None
    out["mp_num_spikes"] = _count(mp.num_spikes) if mp is not None else math.nan
    out["mp_spike_frac"] = out["mp_num_spikes"] / M
    out["sigma_mp"] = mp.sigma_mp if mp is not None else math.nan
    out["mp_softrank"] = mp.mp_softrank if mp is not None else math.nan
    rand = groups.random if groups is not None else None
    out["num_traps"] = _count(rand.num_traps) if rand is not None else math.nan
    out["rand_distance"] = rand.rand_distance if rand is not None else math.nan
    out["rand_num_spikes"] = _count(rand.rand_num_spikes) if rand is not None else math.nan
    detx = groups.detx if groups is not None else None
    out["detX_num"] = _count(detx.detX_num) if detx is not None else math.nan
    out["detX_frac"] = out["detX_num"] / M
    delta = groups.delta if groups is not None else None
    if delta is not None:
        out["delta_alpha"] = delta.alpha
        out["delta_num_pl_spikes"] = _count(delta.num_pl_spikes)
        out["delta_pl_spike_frac"] = out["delta_num_pl_spikes"] / M
        out["delta_mp_num_spikes"] = _count(delta.num_spikes)
        out["delta_mp_spike_frac"] = out["delta_mp_num_spikes"] / M
        out["delta_lambda_max"] = delta.spectral_norm
        out["delta_frobenius"] = math.sqrt(delta.norm)
    return out


def diagnose(checkpoint: str, init_checkpoint: str | None) -> dict[str, float]:
    """fc2 of a checkpoint through wwcli's Python API (what `wwcli analyze --layers name:fc2
    --mp-fit --randomize --detx --base INIT` computes; a second run for --fix-fingers clip_xmax,
    which changes alpha itself). Without an init checkpoint: no update numbers."""
    from wwcli.analysis import analyze_path
    from wwcli.diagnostics import Diagnostics
    from wwcli.engine import EngineOptions
    from wwcli.settings import RunSettings

    diagnostics = Diagnostics(mp_fit=True, randomize=True, detx=True, base=init_checkpoint)
    layer = _fc2(analyze_path(checkpoint, RunSettings(layers="name:fc2", diagnostics=diagnostics)))
    numbers = layer_numbers(layer)
    clipping = RunSettings(layers="name:fc2", engine=EngineOptions(fix_fingers="clip_xmax"))
    clipped = _fc2(analyze_path(checkpoint, clipping)).metrics
    numbers["alpha_clip"] = clipped.alpha
    numbers["num_fingers"] = _count(clipped.num_fingers)
    if init_checkpoint is not None:
        plain = RunSettings(layers="name:fc2")
        initial = _fc2(analyze_path(init_checkpoint, plain)).metrics
        numbers["delta_rel_norm"] = numbers["delta_frobenius"] / math.sqrt(initial.norm)
    return numbers


def _diagnose_job(args: tuple[str, str | None]) -> dict[str, float]:
    return diagnose(*args)


# --- labels, rules and scores -------------------------------------------------------------------


def label_rows(rows: list[dict[str, Any]]) -> None:
    """Add ref_test_accuracy, delta_test_accuracy, lost (vs the group's batch-32 run) and
    lost_vs_less_training (below the best run of the group with a larger batch) in place."""
    by_group: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
    for members in by_group.values():
        reference = next(row for row in members if row["batch_size"] == REFERENCE_BATCH)
        for row in members:
            row["ref_test_accuracy"] = reference["test_accuracy"]
            row["delta_test_accuracy"] = row["test_accuracy"] - reference["test_accuracy"]
            row["judged"] = row["batch_size"] != REFERENCE_BATCH
            row["lost"] = row["judged"] and row["delta_test_accuracy"] < -MARGIN
            larger = [m["test_accuracy"] for m in members if m["batch_size"] > row["batch_size"]]
            row["lost_vs_less_training"] = bool(larger) and (
                row["test_accuracy"] < max(larger) - MARGIN
            )


@dataclass(frozen=True)
class Rule:
    """`feature op threshold`, optionally under `alpha < 2`."""

    feature: str
    """A name in RULE_FEATURES, or "" for the rule alpha < 2 alone."""
    op: str
    """">" or "<"."""
    threshold: float
    with_alpha: bool
    """Also require alpha < 2."""

    def describe(self) -> str:
        """The rule in words."""
        if not self.feature:
            return f"alpha < {ALPHA_LINE:g}"
        text = f"{self.feature} {self.op} {self.threshold:.4g}"
        return f"alpha < {ALPHA_LINE:g} and {text}" if self.with_alpha else text

    def flags(self, row: dict[str, Any]) -> bool:
        """Whether the rule calls a row over-trained (NaN never flags)."""
        alpha = row["alpha"]
        alpha_ok = isinstance(alpha, float) and alpha < ALPHA_LINE
        if not self.feature:
            return alpha_ok
        if self.with_alpha and not alpha_ok:
            return False
        value = row.get(self.feature)
        if value is None or math.isnan(value):
            return False
        return bool(value > self.threshold if self.op == ">" else value < self.threshold)


ALPHA_RULE = Rule("", "<", ALPHA_LINE, False)


@dataclass(frozen=True)
class Score:
    """A rule's confusion counts on a set of rows, with precision, recall and F1."""

    flagged: int
    true_positives: int
    positives: int
    rows: int

    @property
    def precision(self) -> float:
        """tp / flagged (NaN when nothing is flagged)."""
        return self.true_positives / self.flagged if self.flagged else math.nan

    @property
    def recall(self) -> float:
        """tp / positives (NaN without positives)."""
        return self.true_positives / self.positives if self.positives else math.nan

    @property
    def f1(self) -> float:
        """2 tp / (flagged + positives); 0 when both are 0."""
        total = self.flagged + self.positives
        return 2 * self.true_positives / total if total else 0.0


def score(rule: Rule, rows: Iterable[dict[str, Any]], label: str = "lost") -> Score:
    """Confusion counts of a rule on the judged rows."""
    judged = [row for row in rows if row["judged"]]
    flagged = [rule.flags(row) for row in judged]
    truth = [bool(row[label]) for row in judged]
    return Score(
        flagged=sum(flagged),
        true_positives=sum(f and t for f, t in zip(flagged, truth, strict=True)),
        positives=sum(truth),
        rows=len(judged),
    )


def candidate_rules(rows: Sequence[dict[str, Any]]) -> list[Rule]:
    """The declared family, thresholds at midpoints of the given rows' distinct values."""
    rules = [ALPHA_RULE]
    for with_alpha in (False, True):
        for feature in RULE_FEATURES:
            present = [float(row.get(feature, math.nan)) for row in rows]
            values = sorted({value for value in present if not math.isnan(value)})
            cuts = [(a + b) / 2 for a, b in itertools.pairwise(values)]
            for op in (">", "<"):
                rules += [Rule(feature, op, cut, with_alpha) for cut in cuts]
    return rules


def choose_rule(rows: Sequence[dict[str, Any]], label: str = "lost") -> tuple[Rule, Score]:
    """The family's rule with the best F1 on `rows` for `label` (ties as the module docstring
    says)."""
    judged = [row for row in rows if row["judged"]]
    order = {name: index for index, name in enumerate(RULE_FEATURES)}

    def key(item: tuple[Rule, Score]) -> tuple[float, float, int, int]:
        rule, s = item
        precision = 0.0 if math.isnan(s.precision) else s.precision
        return (-s.f1, -precision, int(rule.with_alpha), order.get(rule.feature, -1))

    scored = [(rule, score(rule, judged, label)) for rule in candidate_rules(judged)]
    return min(scored, key=key)


def holds(s: Score) -> bool:
    """The declared success criterion on held-out rows."""
    return (
        s.positives >= MIN_POSITIVES
        and not math.isnan(s.precision)
        and s.precision >= MIN_PRECISION
        and s.recall >= MIN_RECALL
    )


def best_per_feature(rows: Sequence[dict[str, Any]]) -> list[tuple[Rule, Score]]:
    """For each feature (single conditions only), the best-F1 threshold on `rows`."""
    judged = [row for row in rows if row["judged"]]
    best: list[tuple[Rule, Score]] = []
    for feature in RULE_FEATURES:
        rules = [r for r in candidate_rules(judged) if r.feature == feature and not r.with_alpha]
        if not rules:
            continue
        scored = [(rule, score(rule, judged)) for rule in rules]
        best.append(max(scored, key=lambda item: (item[1].f1, item[1].true_positives)))
    return best


# --- reports ------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "group", "noise", "train_size", "seed", "split", "hidden", "batch_size", "epochs",
    "best_epoch", "early_stopped", "steps", "train_loss", "train_accuracy",
    "train_clean_accuracy", "test_accuracy", "ref_test_accuracy", "delta_test_accuracy",
    "judged", "lost", "lost_vs_less_training", "alpha", "alpha_clip", "num_fingers", "D",
    "num_pl_spikes", "pl_spike_frac", "lambda_max", "frobenius", "mp_num_spikes",
    "mp_spike_frac", "sigma_mp", "mp_softrank", "num_traps", "rand_distance", "rand_num_spikes",
    "detX_num", "detX_frac", "delta_alpha", "delta_num_pl_spikes", "delta_mp_num_spikes",
    "delta_mp_spike_frac", "delta_lambda_max", "delta_frobenius", "delta_rel_norm",
)  # fmt: skip

MD_COLUMNS = (
    ("noise", "noise", "{:g}"),
    ("train", "train_size", "{}"),
    ("seed", "seed", "{}"),
    ("H", "hidden", "{}"),
    ("bs", "batch_size", "{}"),
    ("epochs", "best_epoch", "{}"),
    ("test acc", "test_accuracy", "{:.3f}"),
    ("vs bs32", "delta_test_accuracy", "{:+.3f}"),
    ("lost", "lost", "{}"),
    ("alpha", "alpha", "{:.2f}"),
    ("alpha clip", "alpha_clip", "{:.2f}"),
    ("PL spikes", "num_pl_spikes", "{:.0f}"),
    ("MP spikes", "mp_num_spikes", "{:.0f}"),
    ("softrank", "mp_softrank", "{:.3f}"),
    ("traps", "num_traps", "{:.0f}"),
    ("rand dist", "rand_distance", "{:.3f}"),
    ("detX", "detX_num", "{:.0f}"),
    ("dW alpha", "delta_alpha", "{:.2f}"),
    ("dW MP spikes", "delta_mp_num_spikes", "{:.0f}"),
    ("dW/W0", "delta_rel_norm", "{:.2f}"),
)


def _cell(template: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if value is None:
        return "n/a"
    return template.format(value)


def _pr(s: Score) -> str:
    def fmt(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:.2f}"

    return (
        f"| {fmt(s.precision)} | {fmt(s.recall)} | {s.true_positives} | {s.flagged} | "
        f"{s.positives} | {s.rows} |"
    )


def summary_markdown(results: dict[str, Any]) -> str:
    """The rule tables: alpha < 2 everywhere, the chosen rule on selection and held-out seeds,
    and each feature's best single threshold on the selection seeds judged on the held-out."""
    rows = results["rows"]
    selection = [row for row in rows if row["split"] == "selection"]
    held_out = [row for row in rows if row["split"] == "held-out"]
    chosen = Rule(**results["chosen_rule"])
    second, _ = choose_rule(selection, "lost_vs_less_training")
    head = "| rule | rows | precision | recall | TP | flagged | positives | judged |"
    sep = "|---|---|---:|---:|---:|---:|---:|---:|"
    lines = [
        f"Lost test accuracy: more than {MARGIN:g} below the group's batch-size-{REFERENCE_BATCH} "
        f"run. Held-out criterion: precision >= {MIN_PRECISION}, recall >= {MIN_RECALL}, "
        f">= {MIN_POSITIVES} positives.",
        "",
        head,
        sep,
        f"| {ALPHA_RULE.describe()} | all | " + _pr(score(ALPHA_RULE, rows))[2:],
        f"| {ALPHA_RULE.describe()} | selection | " + _pr(score(ALPHA_RULE, selection))[2:],
        f"| {ALPHA_RULE.describe()} | held-out | " + _pr(score(ALPHA_RULE, held_out))[2:],
        f"| chosen: {chosen.describe()} | selection | " + _pr(score(chosen, selection))[2:],
        f"| chosen: {chosen.describe()} | held-out | " + _pr(score(chosen, held_out))[2:],
        "| chosen, label lost_vs_less_training | held-out | "
        + _pr(score(chosen, held_out, "lost_vs_less_training"))[2:],
        f"| exploratory: {second.describe()}, chosen for lost_vs_less_training | selection | "
        + _pr(score(second, selection, "lost_vs_less_training"))[2:],
        f"| exploratory: {second.describe()}, chosen for lost_vs_less_training | held-out | "
        + _pr(score(second, held_out, "lost_vs_less_training"))[2:],
        f"| {ALPHA_RULE.describe()}, label lost_vs_less_training | all | "
        + _pr(score(ALPHA_RULE, rows, "lost_vs_less_training"))[2:],
        "",
        f"Chosen rule holds on the held-out seeds: **{'yes' if results['holds'] else 'no'}**. "
        "(The exploratory rows were added after the declared result was seen: the label "
        "lost_vs_less_training is 'more than the margin below the best run of the group with a "
        "larger batch'.)",
        "",
        "Each diagnostic's best single threshold on the selection seeds, judged on the held-out:",
        "",
        "| rule (threshold from selection) | selection F1 | held-out precision | held-out recall "
        "| TP | flagged | positives | judged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rule, s in best_per_feature(selection):
        lines.append(f"| {rule.describe()} | {s.f1:.2f} " + _pr(score(rule, held_out)))
    return "\n".join(lines) + "\n"


def rows_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One line per trained checkpoint."""
    lines = ["| " + " | ".join(title for title, _, _ in MD_COLUMNS) + " |"]
    lines.append("|" + "|".join("---:" for _ in MD_COLUMNS) + "|")
    for row in rows:
        cells = [_cell(template, row[key]) for _, key, template in MD_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """results_study.csv: CSV_COLUMNS, one row per trained checkpoint."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow(
                [f"{v:.6g}" if isinstance(v, float) else v for v in (row[c] for c in CSV_COLUMNS)]
            )


PLOT_FEATURES = (
    ("alpha", "alpha (fc2)"),
    ("alpha_clip", "alpha, clip_xmax"),
    ("mp_spike_frac", "MP spikes / M"),
    ("mp_softrank", "mp_softrank"),
    ("num_traps", "correlation traps"),
    ("rand_distance", "rand_distance"),
    ("detX_frac", "detX_num / M"),
    ("pl_spike_frac", "num_pl_spikes / M"),
    ("delta_alpha", "alpha of W - W_init"),
    ("delta_mp_spike_frac", "MP spikes of W - W_init / M"),
    ("delta_rel_norm", "||W - W_init|| / ||W_init||"),
    ("D", "KS distance D"),
)


def plot(rows: Sequence[dict[str, Any]], folder: Path) -> None:
    """study_diagnostics.png: each diagnostic against the change in test accuracy from the
    batch-32 run, lost runs red; study_alpha.png: alpha against it, by width and noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judged = [row for row in rows if row["judged"]]
    figure, axes = plt.subplots(3, 4, figsize=(16, 11), constrained_layout=True)
    for axis, (key, title) in zip(axes.flat, PLOT_FEATURES, strict=True):
        for lost, colour, name in ((False, "tab:blue", "kept"), (True, "tab:red", "lost")):
            for hidden, marker in ((100, "o"), (300, "^")):
                points = [
                    (row["delta_test_accuracy"], row[key])
                    for row in judged
                    if row["lost"] == lost and row["hidden"] == hidden
                ]
                if points:
                    x, y = zip(*points, strict=True)
                    axis.scatter(
                        x, y, s=14, c=colour, marker=marker, alpha=0.6, label=f"{name}, H={hidden}"
                    )
        axis.axvline(-MARGIN, color="0.5", linestyle="--", linewidth=1)
        if key == "alpha":
            axis.axhline(ALPHA_LINE, color="0.3", linewidth=1)
        axis.set_title(title)
        axis.set_xlabel("test accuracy minus batch-32 run's")
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(
        f"fc2 diagnostics vs change in test accuracy (red: lost > {MARGIN:g}; o: H=100, ^: H=300)"
    )
    figure.savefig(folder / "study_diagnostics.png", dpi=90)
    plt.close(figure)

    noise_levels = sorted({row["noise"] for row in rows})
    figure, axes = plt.subplots(
        1,
        len(noise_levels),
        figsize=(5 * len(noise_levels), 4.3),
        constrained_layout=True,
        squeeze=False,
    )
    for axis, noise in zip(axes.flat, noise_levels, strict=True):
        for lost, colour in ((False, "tab:blue"), (True, "tab:red")):
            points = [
                (r["delta_test_accuracy"], r["alpha"])
                for r in judged
                if r["noise"] == noise and r["lost"] == lost
            ]
            if points:
                x, y = zip(*points, strict=True)
                axis.scatter(x, y, s=16, c=colour, alpha=0.6, label="lost" if lost else "kept")
        axis.axhline(ALPHA_LINE, color="0.3", linewidth=1)
        axis.axvline(-MARGIN, color="0.5", linestyle="--", linewidth=1)
        axis.set_title(f"label noise {noise:g}")
        axis.set_xlabel("test accuracy minus batch-32 run's")
        axis.set_ylabel("alpha (fc2)")
        axis.legend(fontsize=8)
    figure.savefig(folder / "study_alpha.png", dpi=90)
    plt.close(figure)


def write_outputs(results: dict[str, Any], folder: Path) -> str:
    """results_study.md / .csv / .json and the plots; returns the summary."""
    rows = results["rows"]
    summary = summary_markdown(results)
    (folder / "results_study.md").write_text(
        "# Validation study: results\n\n"
        + summary
        + "\n## Every trained checkpoint\n\n"
        + rows_markdown(rows)
    )
    write_csv(rows, folder / "results_study.csv")
    (folder / "results_study.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(rows, folder)
    return summary


# --- the run ------------------------------------------------------------------------------------


def _train_job(args: tuple[RunSpec, str]) -> RunResult:
    return run_one(args[0], Path(args[1]))


def pool_map(function: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> list[Any]:
    """`function` over `jobs` in `workers` spawned processes (or in this one for 1), in order."""
    if workers <= 1:
        return [function(job) for job in jobs]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(function, jobs, chunksize=1))


def cost(spec: RunSpec) -> float:
    """A rough cost of a run (SGD steps at the cap, a step's fixed cost folded in), to start
    the expensive runs first."""
    n = spec.train_size or 1257
    return spec.max_epochs * n / spec.batch_size * (1 + spec.batch_size / 8) * spec.hidden**0.5


def train_all(config: StudyConfig, folder: Path, workers: int) -> list[RunResult]:
    """Train the grid, most expensive first; results in grid order."""
    specs = config.specs()
    results: list[RunResult | None] = [finished_run(folder, spec) for spec in specs]
    todo = [i for i, result in enumerate(results) if result is None]
    order = sorted(todo, key=lambda i: -cost(specs[i]))
    print(f"{len(specs) - len(todo)} of {len(specs)} runs done earlier", file=sys.stderr)
    done = pool_map(_train_job, [(specs[i], str(folder)) for i in order], workers)
    for index, result in zip(order, done, strict=True):
        results[index] = result
    return [result for result in results if result is not None]


def run_rows(config: StudyConfig, runs: Sequence[RunResult], workers: int) -> list[dict[str, Any]]:
    """Diagnose every checkpoint and merge with how it was trained."""
    jobs = [(run.checkpoint, run.init_checkpoint) for run in runs]
    diagnostics = pool_map(_diagnose_job, jobs, workers)
    rows = []
    for run, numbers in zip(runs, diagnostics, strict=True):
        row: dict[str, Any] = {**asdict(run.spec), "group": run.spec.group}
        row["split"] = "selection" if run.spec.seed in config.selection_seeds else "held-out"
        info = asdict(run)
        del info["spec"]
        row.update(info)
        row.update(numbers)
        rows.append(row)
    label_rows(rows)
    return rows


def run_from_dict(data: dict[str, Any]) -> RunResult:
    """A RunResult from its asdict form (runs.json)."""
    return RunResult(**{**data, "spec": RunSpec(**data["spec"])})


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reduced", action="store_true", help="a handful of tiny runs (CI)")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--skip-training",
        action="store_true",
        help="analyze the checkpoints of an earlier run again",
    )
    parser.add_argument(
        "--replot", action="store_true", help="tables and plots again from results_study.json"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # One BLAS thread per process: the spawned workers inherit this environment.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        results = json.loads((out / "results_study.json").read_text())
        sys.stdout.write(write_outputs(results, out))
        return 0
    config = REDUCED if args.reduced else FULL
    checkpoints = out / "study_checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / ".gitignore").write_text("*\n")
    started = time.perf_counter()
    if args.skip_training:
        document = json.loads((checkpoints / "runs.json").read_text())
        runs = [run_from_dict(item) for item in document["runs"]]
        training_seconds = float(document["seconds"])
    else:
        runs = train_all(config, checkpoints, args.jobs)
        training_seconds = time.perf_counter() - started
        document = {"seconds": training_seconds, "runs": [asdict(run) for run in runs]}
        (checkpoints / "runs.json").write_text(json.dumps(document) + "\n")
    print(f"{len(runs)} models trained in {training_seconds:.0f} s", file=sys.stderr)
    analysis_started = time.perf_counter()
    rows = run_rows(config, runs, args.jobs)
    inits = sorted({(run.init_checkpoint, run.spec.seed, run.spec.hidden) for run in runs})
    init_numbers = pool_map(_diagnose_job, [(path, None) for path, _, _ in inits], args.jobs)
    analysis_seconds = time.perf_counter() - analysis_started

    for row in rows:  # paths relative to the output folder: they end up in committed results
        for key in ("checkpoint", "init_checkpoint"):
            row[key] = os.path.relpath(row[key], out)
    selection = [row for row in rows if row["split"] == "selection"]
    held_out = [row for row in rows if row["split"] == "held-out"]
    chosen, _ = choose_rule(selection)
    results: dict[str, Any] = {
        "config": asdict(config),
        "reduced": bool(args.reduced),
        "margin": MARGIN,
        "criterion": {
            "min_precision": MIN_PRECISION,
            "min_recall": MIN_RECALL,
            "min_positives": MIN_POSITIVES,
        },
        "rule_features": list(RULE_FEATURES),
        "chosen_rule": asdict(chosen),
        "chosen_rule_text": chosen.describe(),
        "holds": holds(score(chosen, held_out)),
        "alpha_rule_all": asdict(score(ALPHA_RULE, rows)),
        "chosen_held_out": asdict(score(chosen, held_out)),
        "rows": rows,
        "initial": [
            {"checkpoint": os.path.relpath(path, out), "seed": seed, "hidden": hidden, **numbers}
            for (path, seed, hidden), numbers in zip(inits, init_numbers, strict=True)
        ],
        "seconds": {
            "training": training_seconds,
            "analysis": analysis_seconds,
            "total": training_seconds + analysis_seconds,
        },
    }
    sys.stdout.write(write_outputs(results, out))
    print(f"training {training_seconds:.0f} s, analysis {analysis_seconds:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
