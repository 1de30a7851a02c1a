"""The seed study's over-training experiment, reproduced from saved checkpoints with wwcli.

One 3-layer MLP is trained per batch size, in decreasing order, only its hidden Dense(100) layer
trainable, until the training loss stops improving; each is saved as `.keras`, named so that a
sweep's natural order is the experiment's (`checkpoints/init/step-0.keras`, the untrained model,
then `checkpoints/bs32/step-1.keras`, `checkpoints/bs16/step-2.keras`, ...). Then ONE command, as
a user runs it (a subprocess),

    wwcli sweep 'DIR/checkpoints/*/step-*.keras' --json DIR/sweep.json --csv DIR/sweep.csv
        --plot DIR --no-cache

analyzes every checkpoint and follows each layer across them: its table (the layers whose alpha
crossed below 2 and the first checkpoint where it did), long-format JSON and CSV and trajectory
figure are the results, and its exit code is the gate on the last checkpoint, the smallest batch.
This script adds what only training knows (accuracies, epochs), from the sweep's JSON.

    python examples/overtraining/experiment.py [--out DIR] [--batch-sizes 32 16 8 4 2 1]
        [--max-epochs N] [--learning-rate LR] [--min-delta X] [--train-size N] [--seed N]
        [--mnist PATH.npz]
    python examples/overtraining/experiment.py --out DIR --replot   # table and plot again

Outputs under DIR (default: this folder): `checkpoints/*/step-*.keras` (regenerated, not
committed); the sweep's `sweep.txt` (its table), `sweep.json`, `sweep.csv`, `trajectory-alpha.png`
and `trajectory-log_spectral_norm.png`; `results.json` (settings, per-run metrics and training
histories, the sweep's command, exit code and crossings), `results.csv`, `results.md` (the table)
and `alpha_vs_accuracy.png`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent

SEED = 1
"""Seed of every kernel initializer (GlorotNormal(seed=1), as the original), of keras' global
random state (batch shuffling) and of the train/test split."""

TRAINABLE_LAYER = "fc2"
"""The hidden Dense(100): a 300x100 kernel, 100 eigenvalues, the only layer that is trained.
The layers are named flatten, fc1, fc2, fc3; wwcli numbers them 0 to 3 (`wwcli describe`)."""

FROZEN_LAYERS = ("fc1", "fc3")
"""Layers that keep their initial weights."""

INIT_FOLDER = "init"
"""The untrained model is saved too, as step 0 of the sweep: the starting point every run shares,
so the trajectory starts where training did and a crossing has an alpha "before" it."""

CHECKPOINT_GLOB = "*/step-*.keras"
"""What the sweep is given, under DIR/checkpoints: every checkpoint, init included."""

ALPHA_LINES = (2.0, 6.0)
"""wwcli's default lines: alpha < 2 is "very heavy-tailed", alpha > 6 "light tail"."""


def checkpoint_path(folder: Path, step: int, batch_size: int | None) -> Path:
    """`folder/bs{N}/step-{k}.keras` (`folder/init/step-0.keras` for the untrained model): the file
    name carries the step, which orders the sweep (wwcli's natural order, the last number in the
    name), and the folder the batch size, which shows on the figure's axis and in the table."""
    sub = INIT_FOLDER if batch_size is None else f"bs{batch_size}"
    return folder / sub / f"step-{step}.keras"


@dataclass(frozen=True)
class Settings:
    """Everything that decides the outcome of a run, recorded with the results."""

    dataset: str
    """"digits" (scikit-learn's bundled 8x8 digits) or the path of an MNIST .npz."""
    batch_sizes: tuple[int, ...]
    """One model per batch size, in this (strictly decreasing) order: steps 1, 2, ..."""
    max_epochs: int
    """Safety cap on epochs; a run that reaches it did not early-stop (recorded per run)."""
    learning_rate: float
    """Plain SGD step size (no momentum, no decay)."""
    patience: int
    """EarlyStopping patience on the training loss."""
    min_delta: float
    """EarlyStopping min_delta on the training loss."""
    train_size: int | None
    """Stratified subset of the training split to train on; None for all of it."""
    test_fraction: float
    """Fraction of the digits held out as the test set (stratified); unused for MNIST."""
    seed: int
    """See SEED."""


@dataclass(frozen=True)
class Dataset:
    """Images scaled to [0, 1] and integer labels, split once."""

    x_train: np.ndarray
    """Training images, float32, shape (n, h, w)."""
    y_train: np.ndarray
    """Training labels, int64, shape (n,)."""
    x_test: np.ndarray
    """Test images."""
    y_test: np.ndarray
    """Test labels."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one image."""
        return tuple(int(size) for size in self.x_train.shape[1:])


@dataclass(frozen=True)
class TrainedRun:
    """One trained model: how training went, before wwcli looks at it."""

    batch_size: int
    """Mini-batch size."""
    checkpoint: str
    """Path of the saved `.keras` file."""
    epochs: int
    """Epochs run."""
    best_epoch: int
    """Epoch (1-based) whose weights were restored and saved."""
    early_stopped: bool
    """True when EarlyStopping ended training; False when max_epochs did."""
    steps: int
    """SGD updates made up to and including the best epoch."""
    train_loss: float
    """Training loss of the saved weights, evaluated on the whole training set."""
    train_accuracy: float
    """Accuracy of the saved weights on the training set."""
    test_accuracy: float
    """Accuracy of the saved weights on the test set."""
    seconds: float
    """Wall time of training and saving."""
    loss_history: list[float] = field(default_factory=list)
    """Training loss (running mean over each epoch, what EarlyStopping watches), per epoch."""
    test_accuracy_history: list[float] = field(default_factory=list)
    """Test accuracy after each epoch: logged only, never used to stop or choose anything."""


@dataclass(frozen=True)
class LayerAlpha:
    """What the sweep reported on one layer of one checkpoint (a row of its long format)."""

    alpha: float | None
    """Power-law exponent; None when the fit failed."""
    D: float | None
    """KS distance of the fit."""
    num_pl_spikes: int | None
    """Eigenvalues in the fitted tail."""
    lambda_max: float | None
    """Largest eigenvalue, 10 ** log_spectral_norm."""
    label: str
    """wwcli's words for alpha: very heavy-tailed (< 2), typical, light tail (> 6), fit failed."""


@dataclass(frozen=True)
class SweepRun:
    """The one `wwcli sweep` command over every checkpoint."""

    command: list[str]
    """The command line, with `wwcli` for the interpreter and module."""
    exit_code: int
    """The gate on the last checkpoint: 0 clean, 1 tripped (2 is an error, raised)."""
    table: str
    """What it printed: the crossings and alpha per layer across the run."""
    stderr: str
    """What it told people besides (progress, notes, the gate line)."""


# --- data ---------------------------------------------------------------------------------------


def load_digits_split(*, test_fraction: float, seed: int) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), a stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    return Dataset(x_train, y_train, x_test, y_test)


def load_mnist_npz(path: Path) -> Dataset:
    """MNIST from a local `.npz` with keras' keys x_train, y_train, x_test, y_test."""
    with np.load(path) as archive:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(archive.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)} (keras' mnist.npz layout)")
        return Dataset(
            (archive["x_train"] / 255.0).astype(np.float32),
            archive["y_train"].astype(np.int64),
            (archive["x_test"] / 255.0).astype(np.float32),
            archive["y_test"].astype(np.int64),
        )


def subsample_train(data: Dataset, train_size: int, *, seed: int) -> Dataset:
    """A stratified subset of the training split; the test set is unchanged."""
    from sklearn.model_selection import train_test_split

    if not 10 <= train_size < len(data.y_train):
        raise ValueError(f"train_size must be in [10, {len(data.y_train)}), got {train_size}")
    x_train, _, y_train, _ = train_test_split(
        data.x_train,
        data.y_train,
        train_size=train_size,
        stratify=data.y_train,
        random_state=seed,
    )
    return Dataset(x_train, y_train, data.x_test, data.y_test)


# --- training -----------------------------------------------------------------------------------


def import_keras() -> Any:
    """Import keras quietly, with deterministic ops and one thread per op pool: the layers are
    tiny, and the machine's two cores are shared, so more threads only add contention."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return keras


def build_model(keras: Any, input_shape: tuple[int, ...], *, seed: int) -> Any:
    """The original's MLP: Flatten, Dense(300, relu), Dense(100, relu), Dense(10, softmax), every
    kernel GlorotNormal(seed); only fc2 is trainable. Same seed, same initial weights."""
    keras.utils.clear_session()
    keras.utils.set_random_seed(seed)
    layers = keras.layers

    def glorot() -> Any:
        return keras.initializers.GlorotNormal(seed=seed)

    model = keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Flatten(name="flatten"),
            layers.Dense(300, activation="relu", kernel_initializer=glorot(), name="fc1"),
            layers.Dense(100, activation="relu", kernel_initializer=glorot(), name="fc2"),
            layers.Dense(10, activation="softmax", kernel_initializer=glorot(), name="fc3"),
        ],
        name="mlp3",
    )
    for layer in model.layers:
        layer.trainable = layer.name == TRAINABLE_LAYER
    return model


def compile_model(keras: Any, model: Any, *, learning_rate: float, batch_size: int) -> None:
    """Plain SGD on sparse cross-entropy. steps_per_execution runs many updates per graph call:
    the same updates in the same order (only the per-batch callbacks, unused here, are coarser),
    about three times faster at batch size 1."""
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=max(1, 256 // batch_size),
    )


def train_one(
    keras: Any, data: Dataset, batch_size: int, settings: Settings, checkpoint: Path
) -> TrainedRun:
    """Train one model from the shared initial weights until the training loss stops improving,
    restore the best epoch's weights, evaluate and save it."""
    started = time.perf_counter()
    model = build_model(keras, data.input_shape, seed=settings.seed)
    compile_model(keras, model, learning_rate=settings.learning_rate, batch_size=batch_size)
    stopper = keras.callbacks.EarlyStopping(
        monitor="loss",
        patience=settings.patience,
        min_delta=settings.min_delta,
        restore_best_weights=True,
    )
    history = model.fit(
        data.x_train,
        data.y_train,
        batch_size=batch_size,
        epochs=settings.max_epochs,
        shuffle=True,
        callbacks=[stopper],
        validation_data=(data.x_test, data.y_test),
        validation_batch_size=len(data.y_test),
        verbose=0,
    )
    epochs = len(history.history["loss"])
    best_epoch = int(stopper.best_epoch) + 1
    train_loss, train_accuracy = model.evaluate(
        data.x_train, data.y_train, batch_size=len(data.y_train), verbose=0
    )
    _, test_accuracy = model.evaluate(
        data.x_test, data.y_test, batch_size=len(data.y_test), verbose=0
    )
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    model.save(checkpoint)
    return TrainedRun(
        batch_size=batch_size,
        checkpoint=str(checkpoint),
        epochs=epochs,
        best_epoch=best_epoch,
        early_stopped=stopper.stopped_epoch > 0,
        steps=best_epoch * math.ceil(len(data.y_train) / batch_size),
        train_loss=float(train_loss),
        train_accuracy=float(train_accuracy),
        test_accuracy=float(test_accuracy),
        seconds=time.perf_counter() - started,
        loss_history=[float(loss) for loss in history.history["loss"]],
        test_accuracy_history=[float(acc) for acc in history.history["val_accuracy"]],
    )


def save_initial(keras: Any, data: Dataset, settings: Settings, checkpoint: Path) -> float:
    """Save the untrained model (every run's starting point); return its test accuracy."""
    model = build_model(keras, data.input_shape, seed=settings.seed)
    compile_model(keras, model, learning_rate=settings.learning_rate, batch_size=1)
    _, test_accuracy = model.evaluate(
        data.x_test, data.y_test, batch_size=len(data.y_test), verbose=0
    )
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    model.save(checkpoint)
    return float(test_accuracy)


# --- wwcli, as a user runs it -------------------------------------------------------------------


def wwcli_command(*args: str | Path) -> list[str]:
    """`wwcli ARGS...` through this interpreter, so the venv's wwcli runs without PATH tricks."""
    return [sys.executable, "-m", "wwcli", *(str(arg) for arg in args)]


def run_wwcli_sweep(checkpoints: Path, out: Path) -> tuple[SweepRun, dict[str, Any]]:
    """`wwcli sweep 'CHECKPOINTS/*/step-*.keras' --json --csv --plot OUT --no-cache`: one run over
    every checkpoint (the cache is off: the checkpoints are new each time). Writes its table to
    OUT/sweep.txt; returns the run and its JSON document.

    Raises RuntimeError when wwcli fails (exit 2: it could not read a checkpoint)."""
    args = [
        "sweep",
        str(checkpoints / CHECKPOINT_GLOB),
        "--json",
        str(out / "sweep.json"),
        "--csv",
        str(out / "sweep.csv"),
        "--plot",
        str(out),
        "--no-cache",
    ]
    completed = subprocess.run(wwcli_command(*args), capture_output=True, text=True, check=False)
    if completed.returncode not in (0, 1):
        error = completed.stderr.strip()
        raise RuntimeError(f"wwcli sweep exited {completed.returncode}:\n{error}")
    (out / "sweep.txt").write_text(completed.stdout)
    document: dict[str, Any] = json.loads((out / "sweep.json").read_text())
    run = SweepRun(
        command=["wwcli", *args],
        exit_code=completed.returncode,
        table=completed.stdout,
        stderr=completed.stderr.strip(),
    )
    return run, document


def alpha_label(alpha: float | None) -> str:
    """wwcli's words for an alpha at its default lines (its `verdict` column)."""
    low, high = ALPHA_LINES
    if alpha is None:
        return "fit failed"
    if alpha < low:
        return "very heavy-tailed"
    return "light tail" if alpha > high else "typical"


def layer_alpha(document: dict[str, Any], checkpoint: Path, name: str) -> LayerAlpha:
    """The named layer's metrics at one checkpoint, from the sweep's long-format rows."""
    for row in document["trajectory"]:
        if Path(row["checkpoint"]) == checkpoint and row["name"] == name:
            spectral = row["log_spectral_norm"]
            alpha = row["alpha"] if row["status"] == "success" else None
            return LayerAlpha(
                alpha=alpha,
                D=row["D"],
                num_pl_spikes=row["num_pl_spikes"],
                lambda_max=None if spectral is None else 10.0**spectral,
                label=alpha_label(alpha),
            )
    raise KeyError(f"{checkpoint}: the sweep reported no layer named {name!r}")


# --- table and plot -----------------------------------------------------------------------------

TABLE_COLUMNS = (
    "step",
    "batch size",
    "epochs (best)",
    "SGD steps",
    "train acc",
    "test acc",
    "alpha (fc2)",
    "D",
    "spikes",
    "lambda_max",
    "label",
)


def table_rows(
    runs: Sequence[TrainedRun], alphas: Sequence[LayerAlpha], initial: tuple[float, LayerAlpha]
) -> list[list[str]]:
    """The results table as strings, the untrained model (step 0) first."""

    def fmt(value: float | None, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    init_accuracy, init_alpha = initial
    rows = [
        [
            "0",
            "(initial weights)",
            "0",
            "0",
            "-",
            f"{init_accuracy:.3f}",
            fmt(init_alpha.alpha, 3),
            fmt(init_alpha.D, 3),
            str(init_alpha.num_pl_spikes),
            fmt(init_alpha.lambda_max, 2),
            init_alpha.label,
        ]
    ]
    for step, (run, fit) in enumerate(zip(runs, alphas, strict=True), start=1):
        stop = "" if run.early_stopped else ", cap"
        rows.append(
            [
                str(step),
                str(run.batch_size),
                f"{run.epochs} ({run.best_epoch}{stop})",
                str(run.steps),
                f"{run.train_accuracy:.3f}",
                f"{run.test_accuracy:.3f}",
                fmt(fit.alpha, 3),
                fmt(fit.D, 3),
                str(fit.num_pl_spikes),
                fmt(fit.lambda_max, 2),
                fit.label,
            ]
        )
    return rows


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table with TABLE_COLUMNS as header."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |"]
    lines.append("|" + "|".join("---:" for _ in TABLE_COLUMNS) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_alpha_vs_accuracy(
    runs: Sequence[TrainedRun],
    alphas: Sequence[LayerAlpha],
    initial: tuple[float, LayerAlpha],
    path: Path,
    *,
    title: str,
) -> None:
    """Left: alpha of fc2 against test accuracy, one point per batch size labeled with it, and the
    alpha = 2 line. Right: alpha and test accuracy against the batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(run, fit.alpha) for run, fit in zip(runs, alphas, strict=True)]
    points = [(run, alpha) for run, alpha in pairs if alpha is not None]
    accuracies = [run.test_accuracy for run, _ in points]
    values = [alpha for _, alpha in points]
    sizes = [run.batch_size for run, _ in points]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)

    left.plot(accuracies, values, color="0.7", linewidth=1, zorder=1)
    left.scatter(accuracies, values, color="tab:blue", s=45, zorder=2)
    for index, (run, alpha) in enumerate(points):
        # Alternate sides so that neighbours with the same accuracy do not overwrite each other.
        side = 1 if index % 2 == 0 else -1
        left.annotate(
            f"bs={run.batch_size}",
            (run.test_accuracy, alpha),
            textcoords="offset points",
            xytext=(7 * side, 0),
            ha="left" if side > 0 else "right",
            va="center",
            fontsize=9,
        )
    left.axhline(2.0, color="tab:red", linestyle="--", linewidth=1)
    left.text(
        0.99,
        2.0,
        "alpha = 2",
        color="tab:red",
        ha="right",
        va="bottom",
        transform=left.get_yaxis_transform(),
    )
    init_accuracy, init_fit = initial
    if init_fit.alpha is not None:
        left.text(
            0.01,
            0.01,
            f"initial weights: alpha {init_fit.alpha:.2f}, test acc {init_accuracy:.2f}",
            transform=left.transAxes,
            fontsize=8,
            color="0.35",
        )
    low, high = min([*values, 2.0]), max([*values, 2.0])
    margin = max(0.15, 0.15 * (high - low))
    left.set_ylim(low - margin, high + margin)
    if accuracies:
        span = max(accuracies) - min(accuracies)
        pad = max(0.004, 0.15 * span)
        left.set_xlim(min(accuracies) - pad, max(accuracies) + pad)
    left.set_xlabel("test accuracy")
    left.set_ylabel(f"alpha of {TRAINABLE_LAYER} (wwcli sweep)")
    left.set_title("alpha vs test accuracy, one model per batch size", fontsize=10)

    right.plot(sizes, values, "o-", color="tab:blue")
    right.axhline(2.0, color="tab:red", linestyle="--", linewidth=1)
    right.set_ylim(low - margin, high + margin)
    right.set_xscale("log", base=2)
    right.set_xticks(sizes, [str(size) for size in sizes])
    right.minorticks_off()
    right.invert_xaxis()
    right.set_xlabel("batch size")
    right.set_ylabel(f"alpha of {TRAINABLE_LAYER}", color="tab:blue")
    twin = right.twinx()
    twin.plot(sizes, accuracies, "s--", color="tab:green")
    twin.set_ylabel("test accuracy", color="tab:green")
    right.set_title("alpha (circles) and test accuracy (squares)", fontsize=10)
    figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(figure)


def plot_title(results: dict[str, Any]) -> str:
    """One line that says which sweep a plot shows."""
    settings = results["settings"]
    return (
        f"{Path(settings['dataset']).name}: {results['train_images']} training images, "
        f"SGD lr={settings['learning_rate']}, min_delta={settings['min_delta']}, "
        f"seed {settings['seed']}; only {TRAINABLE_LAYER} (300x100) trained"
    )


def write_report(out: Path, results: dict[str, Any]) -> str:
    """Write results.md, results.csv and the plot from a results.json document; return the
    markdown table."""
    runs = [
        TrainedRun(**{k: v for k, v in run.items() if k not in {TRAINABLE_LAYER, "step"}})
        for run in results["runs"]
    ]
    alphas = [LayerAlpha(**run[TRAINABLE_LAYER]) for run in results["runs"]]
    initial = (
        float(results["initial"]["test_accuracy"]),
        LayerAlpha(**results["initial"][TRAINABLE_LAYER]),
    )
    rows = table_rows(runs, alphas, initial)
    table = markdown_table(rows)
    (out / "results.md").write_text(table)
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TABLE_COLUMNS)
        writer.writerows(rows)
    plot_alpha_vs_accuracy(
        runs, alphas, initial, out / "alpha_vs_accuracy.png", title=plot_title(results)
    )
    return table


# --- the whole experiment -----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--out", type=Path, default=HERE, help="output folder")
    add("--batch-sizes", type=int, nargs="+", default=[32, 16, 8, 4, 2, 1], metavar="N")
    add("--max-epochs", type=int, default=2000, metavar="N", help="safety cap on epochs")
    add("--learning-rate", type=float, default=0.01, metavar="LR", help="plain SGD step size")
    add("--patience", type=int, default=3, metavar="N", help="EarlyStopping on the training loss")
    add("--min-delta", type=float, default=0.001, metavar="X", help="EarlyStopping min_delta")
    add("--train-size", type=int, metavar="N", help="train on a stratified subset of this size")
    add("--test-fraction", type=float, default=0.3, metavar="F", help="digits held out for test")
    add("--seed", type=int, default=SEED, metavar="N", help="initializers, shuffling, split")
    add("--mnist", type=Path, metavar="PATH.npz", help="MNIST from a local .npz instead of digits")
    add("--replot", action="store_true", help="table and plot from OUT/results.json, no training")
    args = parser.parse_args(argv)
    if any(size < 1 for size in args.batch_sizes) or args.max_epochs < 1:
        parser.error("batch sizes and --max-epochs must be positive")
    if any(a <= b for a, b in zip(args.batch_sizes, args.batch_sizes[1:], strict=False)):
        parser.error("--batch-sizes must be strictly decreasing (the sweep's steps 1, 2, ...)")
    return args


def run_experiment(keras: Any, data: Dataset, settings: Settings, out: Path) -> dict[str, Any]:
    """Train and save one model per batch size, then one `wwcli sweep` over all of them; return
    the results.json document, built from the sweep's JSON and what training measured."""
    started = time.perf_counter()
    checkpoints = out / "checkpoints"
    init_path = checkpoint_path(checkpoints, 0, None)
    init_accuracy = save_initial(keras, data, settings, init_path)
    runs: list[TrainedRun] = []
    for step, batch_size in enumerate(settings.batch_sizes, start=1):
        path = checkpoint_path(checkpoints, step, batch_size)
        run = train_one(keras, data, batch_size, settings, path)
        runs.append(run)
        print(
            f"step {step}, batch size {batch_size:>3}: {run.epochs} epochs (best {run.best_epoch}"
            f"{'' if run.early_stopped else ', hit the cap'}), train acc "
            f"{run.train_accuracy:.3f}, test acc {run.test_accuracy:.3f}, {run.seconds:.0f} s",
            file=sys.stderr,
        )
    training_seconds = time.perf_counter() - started

    sweep_started = time.perf_counter()
    sweep, document = run_wwcli_sweep(checkpoints, out)
    sweep_seconds = time.perf_counter() - sweep_started
    paths = [init_path, *(Path(run.checkpoint) for run in runs)]
    swept = [Path(item["checkpoint"]) for item in document["checkpoints"]]
    if swept != paths:
        raise RuntimeError(f"the sweep's order {swept} is not the experiment's {paths}")
    initial_alpha = layer_alpha(document, init_path, TRAINABLE_LAYER)
    alphas = [layer_alpha(document, Path(run.checkpoint), TRAINABLE_LAYER) for run in runs]
    # The frozen layers must come out of every checkpoint with the same spectrum.
    frozen = {name: [layer_alpha(document, path, name) for path in paths] for name in FROZEN_LAYERS}
    smallest = min(runs, key=lambda run: run.batch_size)

    import tensorflow as tf

    return {
        "settings": asdict(settings),
        "train_images": len(data.y_train),
        "test_images": len(data.y_test),
        "initial": {
            "checkpoint": str(init_path),
            "test_accuracy": init_accuracy,
            TRAINABLE_LAYER: asdict(initial_alpha),
        },
        "runs": [
            {**asdict(run), "step": step, TRAINABLE_LAYER: asdict(fit)}
            for step, (run, fit) in enumerate(zip(runs, alphas, strict=True), start=1)
        ],
        "frozen_layers_unchanged": all(
            len({(fit.alpha, fit.lambda_max) for fit in fits}) == 1 for fits in frozen.values()
        ),
        "sweep": {**asdict(sweep), "crossings": document["crossings"]},
        "gate": {
            "checkpoint": smallest.checkpoint,
            "batch_size": smallest.batch_size,
            "exit_code": sweep.exit_code,
        },
        "seconds": {
            "training": training_seconds,
            "sweep": sweep_seconds,
            "total": time.perf_counter() - started,
        },
        "environment": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "wwcli": document["wwcli_version"],
            "machine": platform.machine(),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        results = json.loads((args.out / "results.json").read_text())
        sys.stdout.write(write_report(args.out, results))
        return 0
    settings = Settings(
        dataset=str(args.mnist) if args.mnist else "digits",
        batch_sizes=tuple(args.batch_sizes),
        max_epochs=args.max_epochs,
        learning_rate=args.learning_rate,
        patience=args.patience,
        min_delta=args.min_delta,
        train_size=args.train_size,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    if args.mnist:
        data = load_mnist_npz(args.mnist)
    else:
        data = load_digits_split(test_fraction=settings.test_fraction, seed=settings.seed)
    if settings.train_size is not None:
        data = subsample_train(data, settings.train_size, seed=settings.seed)
    # Paths relative to the working directory where possible: they end up in committed results.
    out = Path(os.path.relpath(args.out)) if args.out.is_absolute() else Path(args.out)
    if out.parts[:1] == ("..",):
        out = args.out

    keras = import_keras()
    print(
        f"{settings.dataset}: {len(data.y_train)} train, {len(data.y_test)} test images "
        f"of shape {data.input_shape}; SGD lr={settings.learning_rate}",
        file=sys.stderr,
    )
    results = run_experiment(keras, data, settings, out)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    sys.stdout.write(write_report(out, results))
    sweep = results["sweep"]
    sys.stdout.write("\n$ " + shlex.join(sweep["command"]) + "\n" + sweep["table"])
    print(
        f"frozen layers unchanged: {results['frozen_layers_unchanged']}; the sweep (its gate: "
        f"the last checkpoint, batch size {results['gate']['batch_size']}) exited "
        f"{sweep['exit_code']}; {results['seconds']['total']:.0f} s in all",
        file=sys.stderr,
    )
    return 0 if results["frozen_layers_unchanged"] else 1


if __name__ == "__main__":
    sys.exit(main())
