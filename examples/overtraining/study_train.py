"""Training for the validation study (`study.py`): the seed MLP, trained by plain SGD in numpy.

The model is experiment.py's: Flatten, Dense(300, relu) `fc1`, Dense(H, relu) `fc2`, Dense(10,
softmax) `fc3`, every kernel keras' GlorotNormal (a truncated normal), biases zero, and only
`fc2` (kernel and bias) trained. Because `fc1` is frozen, its outputs are computed once per data
set and SGD runs on `fc2` alone, with hand-written gradients (`tests/examples/test_study.py`
checks them against torch's autograd): at batch size 1 that is ~30 us a step on one core, where
keras takes several times as long. Stopping as in experiment.py: keras' EarlyStopping on the
epoch's mean training loss (patience 3, min_delta 0.001), best epoch's weights restored.

Checkpoints are PyTorch state dicts (`fc1.weight` of shape (300, 64), torch's (out, in) layout,
and so on), written with `torch.save`, so wwcli reads them as it reads any `.pt` file.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float32]

INPUTS = 64
"""8x8 digits, flattened."""
FC1_UNITS = 300
"""fc1's width, as in the original."""
CLASSES = 10

TEST_FRACTION = 0.3
"""Share of the 1,797 digits held out for testing (stratified), as experiment.py."""


@dataclass(frozen=True)
class RunSpec:
    """One training run: which data, which model, which batch size."""

    noise: float
    """Fraction of the training labels replaced by a uniformly drawn *other* class."""
    train_size: int
    """Training images used (a stratified subset); 0 for the whole training split (1,257)."""
    seed: int
    """Split, subset, label noise, initial weights and batch order all follow it."""
    hidden: int
    """Width H of fc2 (its kernel is 300 x H)."""
    batch_size: int
    """Mini-batch size of SGD."""
    learning_rate: float
    """Plain SGD step size."""
    max_epochs: int
    """Cap on epochs (a run reaching it is recorded as not early-stopped)."""
    patience: int = 3
    """EarlyStopping patience on the training loss."""
    min_delta: float = 0.001
    """EarlyStopping min_delta on the training loss."""

    @property
    def group(self) -> str:
        """Name of the (data, seed, shape) group: the runs that share a batch-size-32 reference."""
        size = "full" if self.train_size == 0 else str(self.train_size)
        return f"noise{self.noise:g}_train{size}_seed{self.seed}_h{self.hidden}"


@dataclass(frozen=True)
class Data:
    """Digits scaled to [0, 1], flattened, split once; training labels possibly noisy."""

    x_train: Array
    y_train: NDArray[np.int64]
    """The labels trained on (with the label noise)."""
    y_train_clean: NDArray[np.int64]
    """The true labels of the training images."""
    x_test: Array
    y_test: NDArray[np.int64]


@dataclass(frozen=True)
class Weights:
    """The MLP's parameters, kernels as (in, out)."""

    W1: Array
    b1: Array
    W2: Array
    b2: Array
    W3: Array
    b3: Array


@dataclass(frozen=True)
class RunResult:
    """What training produced, before any spectral analysis."""

    spec: RunSpec
    checkpoint: str
    """The trained state dict's path."""
    init_checkpoint: str
    """The initial weights' state dict (shared by every run of the same seed and width)."""
    epochs: int
    best_epoch: int
    early_stopped: bool
    steps: int
    """SGD updates up to and including the best epoch."""
    train_loss: float
    """Mean cross-entropy of the saved weights on the training labels (noisy ones included)."""
    train_accuracy: float
    """Accuracy on the labels trained on."""
    train_clean_accuracy: float
    """Accuracy on the training images' true labels."""
    test_accuracy: float
    init_test_accuracy: float
    seconds: float


def load_data(*, noise: float, train_size: int, seed: int) -> Data:
    """scikit-learn's bundled digits, a stratified split (random_state=seed), an optional
    stratified training subset, and label noise on the training labels only."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.reshape(len(digits.target), -1) / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=seed
    )
    if train_size:
        x_train, _, y_train, _ = train_test_split(
            x_train, y_train, train_size=train_size, stratify=y_train, random_state=seed
        )
    rng = np.random.default_rng([seed, round(noise * 1000), train_size, 7])
    noisy = y_train.copy()
    flipped = rng.choice(len(noisy), size=round(noise * len(noisy)), replace=False)
    noisy[flipped] = (noisy[flipped] + rng.integers(1, CLASSES, size=flipped.size)) % CLASSES
    return Data(x_train, noisy, y_train, x_test, y_test)


def glorot_normal(fan_in: int, fan_out: int, rng: np.random.Generator) -> Array:
    """keras' GlorotNormal: a normal truncated at two standard deviations, with the standard
    deviation scaled so that the truncated law has variance 2 / (fan_in + fan_out)."""
    stddev = math.sqrt(2.0 / (fan_in + fan_out)) / 0.87962566103423978
    values = rng.standard_normal((fan_in, fan_out))
    outside = np.abs(values) > 2.0
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 2.0
    return (values * stddev).astype(np.float32)


def initial_weights(*, seed: int, hidden: int) -> Weights:
    """The untrained MLP for a seed and fc2 width; the same for every data variant."""
    rng = np.random.default_rng([seed, hidden, 1])
    return Weights(
        W1=glorot_normal(INPUTS, FC1_UNITS, rng),
        b1=np.zeros(FC1_UNITS, np.float32),
        W2=glorot_normal(FC1_UNITS, hidden, rng),
        b2=np.zeros(hidden, np.float32),
        W3=glorot_normal(hidden, CLASSES, rng),
        b3=np.zeros(CLASSES, np.float32),
    )


def fc1_features(x: Array, weights: Weights) -> Array:
    """relu(x W1 + b1): fc1 is frozen, so this is computed once per data set."""
    out: Array = np.maximum(x @ weights.W1 + weights.b1, 0.0)
    return np.ascontiguousarray(out, dtype=np.float32)


def head(
    h1: Array, W2: Array, b2: Array, W3: Array, b3: Array
) -> tuple[Array, Array, NDArray[np.float64]]:
    """fc2 and fc3 on fc1's outputs: (fc2's pre-activation, fc2's output, softmax probabilities)."""
    z2: Array = h1 @ W2 + b2
    a2: Array = np.maximum(z2, 0.0)
    z3 = (a2 @ W3 + b3).astype(np.float64)
    z3 -= z3.max(axis=-1, keepdims=True)
    p = np.exp(z3)
    p /= p.sum(axis=-1, keepdims=True)
    return z2, a2, p


def sgd_step(
    h1: Array,
    y: NDArray[np.int64],
    W2: Array,
    b2: Array,
    W3: Array,
    W3T: Array,
    b3: Array,
    lr: float,
) -> float:
    """One SGD step on a batch, W2 and b2 updated in place with the gradient of the batch's mean
    cross-entropy; returns the batch's summed loss before the update. float32 throughout."""
    z2 = h1 @ W2
    z2 += b2
    a2 = np.maximum(z2, 0.0)
    p = a2 @ W3
    p += b3
    p -= p.max(axis=1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = -float(np.log(np.maximum(p[rows, y], np.float32(1e-30))).sum())
    p[rows, y] -= 1.0
    dz2 = p @ W3T
    dz2 *= z2 > 0
    step = np.float32(lr / len(y))
    W2 -= step * (h1.T @ dz2)
    b2 -= step * dz2.sum(axis=0)
    return loss


def accuracy(h1: Array, y: NDArray[np.int64], W2: Array, b2: Array, W3: Array, b3: Array) -> float:
    """Share of rows whose most probable class is y."""
    _, _, p = head(h1, W2, b2, W3, b3)
    return float((p.argmax(axis=1) == y).mean())


def sgd_epoch_batch1(
    h1: Array,
    y: NDArray[np.int64],
    order: NDArray[np.int64],
    W2: Array,
    b2: Array,
    W3: Array,
    b3: Array,
    lr: float,
) -> float:
    """One epoch of SGD at batch size 1, W2 updated in place by BLAS rank-1 updates (sger);
    returns the mean training loss seen before each update (keras' epoch `loss`). W2 must be
    Fortran-ordered (sger then writes into it without a copy)."""
    from scipy.linalg.blas import sger

    step = np.float32(lr)
    W3T = np.ascontiguousarray(W3.T)
    total = 0.0
    for index in order:
        x = h1[index]
        label = y[index]
        z2 = x @ W2 + b2
        a2 = np.maximum(z2, 0.0)
        z3 = (a2 @ W3 + b3).astype(np.float64)
        z3 -= z3.max()
        p = np.exp(z3)
        p /= p.sum()
        total -= math.log(max(p[label], 1e-300))
        p[label] -= 1.0
        dz2 = (p.astype(np.float32) @ W3T) * (z2 > 0)
        sger(-step, x, dz2, a=W2, overwrite_a=1)
        b2 -= step * dz2
    return total / len(order)


def train(spec: RunSpec, data: Data, init: Weights) -> tuple[Weights, dict[str, float | int]]:
    """SGD on fc2 from `init` until the epoch's training loss stops improving by min_delta for
    `patience` epochs (or max_epochs); the best epoch's weights are returned."""
    h1 = fc1_features(data.x_train, init)
    y = data.y_train
    # sger writes into a Fortran-ordered W2; the batched update is faster on a C-ordered one.
    W2 = np.array(init.W2, order="F" if spec.batch_size == 1 else "C")
    b2 = init.b2.copy()
    W3T = np.ascontiguousarray(init.W3.T)
    rng = np.random.default_rng([spec.seed, spec.batch_size, spec.hidden, 11])
    best = math.inf
    best_W2, best_b2, best_epoch, wait, epochs = W2.copy(), b2.copy(), 0, 0, 0
    early_stopped = False
    n = len(y)
    for epoch in range(1, spec.max_epochs + 1):
        epochs = epoch
        order = rng.permutation(n)
        if spec.batch_size == 1:
            loss = sgd_epoch_batch1(h1, y, order, W2, b2, init.W3, init.b3, spec.learning_rate)
        else:
            total = 0.0
            shuffled_h1, shuffled_y = h1[order], y[order]
            for start in range(0, n, spec.batch_size):
                stop = start + spec.batch_size
                total += sgd_step(
                    shuffled_h1[start:stop],
                    shuffled_y[start:stop],
                    W2,
                    b2,
                    init.W3,
                    W3T,
                    init.b3,
                    spec.learning_rate,
                )
            loss = total / n
        if not math.isfinite(loss):
            break
        if loss - spec.min_delta < best:
            best, best_W2, best_b2, best_epoch, wait = loss, W2.copy(), b2.copy(), epoch, 0
        else:
            wait += 1
            if wait >= spec.patience:
                early_stopped = True
                break
    trained = Weights(init.W1, init.b1, np.ascontiguousarray(best_W2), best_b2, init.W3, init.b3)
    steps = best_epoch * math.ceil(n / spec.batch_size)
    return trained, {
        "epochs": epochs,
        "best_epoch": best_epoch,
        "early_stopped": early_stopped,
        "steps": steps,
    }


def save_state_dict(weights: Weights, path: Path) -> None:
    """The weights as a PyTorch state dict (kernels transposed to torch's (out, in))."""
    import torch

    state = {
        "fc1.weight": weights.W1.T,
        "fc1.bias": weights.b1,
        "fc2.weight": weights.W2.T,
        "fc2.bias": weights.b2,
        "fc3.weight": weights.W3.T,
        "fc3.bias": weights.b3,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in state.items()}, path)


def evaluate(weights: Weights, data: Data) -> dict[str, float]:
    """Training loss and accuracies, and test accuracy, of a set of weights."""
    h_train = fc1_features(data.x_train, weights)
    h_test = fc1_features(data.x_test, weights)
    args = (weights.W2, weights.b2, weights.W3, weights.b3)
    _, _, p = head(h_train, *args)
    rows = np.arange(len(data.y_train))
    return {
        "train_loss": float(-np.log(np.maximum(p[rows, data.y_train], 1e-300)).mean()),
        "train_accuracy": float((p.argmax(axis=1) == data.y_train).mean()),
        "train_clean_accuracy": float((p.argmax(axis=1) == data.y_train_clean).mean()),
        "test_accuracy": accuracy(h_test, data.y_test, *args),
    }


def init_path(folder: Path, *, seed: int, hidden: int) -> Path:
    """Where the initial weights of a seed and width are saved."""
    return folder / f"init_seed{seed}_h{hidden}.pt"


def checkpoint_path(folder: Path, spec: RunSpec) -> Path:
    """Where a run's trained weights are saved; its RunResult goes beside it as .json."""
    return folder / spec.group / f"bs{spec.batch_size}.pt"


def finished_run(folder: Path, spec: RunSpec) -> RunResult | None:
    """The result of this very run from an earlier, interrupted study, or None."""
    sidecar = checkpoint_path(folder, spec).with_suffix(".json")
    if not sidecar.exists():
        return None
    data = json.loads(sidecar.read_text())
    if data["spec"] != asdict(spec):
        return None
    return RunResult(**{**data, "spec": spec})


def run_one(spec: RunSpec, folder: Path) -> RunResult:
    """Train one model and save it (and the initial weights, if not saved yet), with its
    RunResult beside it (so that an interrupted study resumes where it stopped)."""
    started = time.perf_counter()
    data = load_data(noise=spec.noise, train_size=spec.train_size, seed=spec.seed)
    init = initial_weights(seed=spec.seed, hidden=spec.hidden)
    start_path = init_path(folder, seed=spec.seed, hidden=spec.hidden)
    if not start_path.exists():
        # Two processes may write it at once: write aside, then rename (atomic on POSIX).
        aside = start_path.with_suffix(f".{spec.group}.bs{spec.batch_size}.tmp")
        save_state_dict(init, aside)
        aside.replace(start_path)
    trained, info = train(spec, data, init)
    path = checkpoint_path(folder, spec)
    save_state_dict(trained, path)
    scores = evaluate(trained, data)
    result = RunResult(
        spec=spec,
        checkpoint=str(path),
        init_checkpoint=str(start_path),
        epochs=int(info["epochs"]),
        best_epoch=int(info["best_epoch"]),
        early_stopped=bool(info["early_stopped"]),
        steps=int(info["steps"]),
        train_loss=scores["train_loss"],
        train_accuracy=scores["train_accuracy"],
        train_clean_accuracy=scores["train_clean_accuracy"],
        test_accuracy=scores["test_accuracy"],
        init_test_accuracy=evaluate(init, data)["test_accuracy"],
        seconds=time.perf_counter() - started,
    )
    path.with_suffix(".json").write_text(json.dumps(asdict(result)) + "\n")
    return result
