"""A training run as the unit of work: find its checkpoints, order them by step, and follow each
layer (matched by name, never by id) across them.

`discover` turns DIR|GLOB arguments into checkpoints: files of any format wwcli reads, and
sub-folders that are model folders (Hugging Face style: a config.json or weight files inside),
one checkpoint each. `Sweep` holds the ordered inputs and the run's `RunResult` (analyzed by
`analysis.analyze_paths` through a Runner, never by a loop of its own) and derives from them
the long-format trajectory rows (checkpoint, order key, layer, metrics), the layers whose alpha
crossed below the gate's line with the first checkpoint where it did, and the JSON document,
which reads back (`trajectory_from_document`) to the same rows.
"""

from __future__ import annotations

import glob
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from wwcli import __version__

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from wwcli.gate import GatePolicy
    from wwcli.results import LayerResult, RunResult

Order = Literal["natural", "name", "mtime"]
ORDERS: tuple[str, ...] = ("natural", "name", "mtime")

CHECKPOINT_SUFFIXES = (
    ".keras",
    ".h5",
    ".hdf5",
    ".pt",
    ".pth",
    ".bin",
    ".ckpt",
    ".safetensors",
    ".onnx",
    ".gguf",
)
"""File names a sweep picks up in a folder (any format wwcli reads)."""

TRAJECTORY_METRICS = ("alpha", "log_spectral_norm", "D", "num_pl_spikes")
"""The metrics a trajectory row carries, besides the layer's identity."""

TRAJECTORY_COLUMNS = (
    "checkpoint",
    "index",
    "order_key",
    "layer_id",
    "name",
    "layer_type",
    "num_evals",
    *TRAJECTORY_METRICS,
    "status",
)
"""The long format's columns (CSV header, JSON row keys), in order."""


class SweepError(ValueError):
    """The arguments name no checkpoint, or a checkpoint twice: a usage error."""


@dataclass(frozen=True)
class SweepInput:
    """One checkpoint of the run."""

    path: Path
    """The path as found (the report's label is its text)."""
    order_key: int | float | str | None
    """What it was ordered by: the step (the last number in its name) for natural order, its
    name for name order, its mtime (seconds) for mtime order."""


_NUMBER = re.compile(r"(\d+)")


def _name(path: Path) -> str:
    return path.name or str(path)


def natural_key(text: str) -> tuple[tuple[int, int, str], ...]:
    """A sort key in which the numbers of a name compare as numbers: ckpt-2 < ckpt-10."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part.lower())
        for part in _NUMBER.split(text)
        if part
    )


def step_of(path: Path) -> int | None:
    """The last number in the name without its suffixes (epoch_03.pt -> 3), or None."""
    stem = _name(path)
    for suffix in CHECKPOINT_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    numbers = _NUMBER.findall(stem)
    return int(numbers[-1]) if numbers else None


def _is_checkpoint_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(CHECKPOINT_SUFFIXES)


def is_model_folder(path: Path) -> bool:
    """A folder that is one checkpoint: a config.json, an index, or weight files directly in it."""
    if not path.is_dir():
        return False
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(
        name == "config.json"
        or name.endswith(".index.json")
        or name.lower().endswith(CHECKPOINT_SUFFIXES)
        for name in names
    )


def _single_file(folder: Path) -> Path | None:
    """The one checkpoint file of a sub-folder that holds nothing else a model folder has (no
    config.json, no index, no second weight file): `bs32/step-1.keras` stands for itself."""
    try:
        names = [name for name in os.listdir(folder) if not name.startswith(".")]
    except OSError:
        return None
    if any(name == "config.json" or name.endswith(".index.json") for name in names):
        return None
    files = [folder / name for name in names if _is_checkpoint_file(folder / name)]
    return files[0] if len(files) == 1 else None


def _checkpoint(path: Path) -> Path | None:
    """What a run folder's entry contributes: a checkpoint file, the file a one-file sub-folder
    holds, a model sub-folder, or nothing."""
    if _is_checkpoint_file(path):
        return path
    if not is_model_folder(path):
        return None
    return _single_file(path) or path


def _in_folder(folder: Path) -> list[Path]:
    """The checkpoints of a run folder: its checkpoint files and model sub-folders (a sub-folder
    holding one checkpoint file gives that file); the folder itself when it is one model (a
    sharded index, or weights without any run structure)."""
    if any(name.endswith(".index.json") for name in os.listdir(folder)):
        return [folder]
    found = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        entry = _checkpoint(child)
        if entry is not None:
            found.append(entry)
    return found


def discover(arguments: Sequence[str | Path], *, order: str = "natural") -> list[SweepInput]:
    """The checkpoints that DIR|GLOB|FILE arguments name, each once, in `order`.

    SweepError when an argument names nothing, or when nothing is found at all."""
    if order not in ORDERS:
        raise SweepError(f"--order {order}: one of {', '.join(ORDERS)}")
    paths: list[Path] = []
    for argument in arguments:
        text = str(argument)
        path = Path(text)
        if not path.exists() and glob.has_magic(text):
            matches = [Path(match) for match in sorted(glob.glob(text))]
            chosen = [entry for m in matches if (entry := _checkpoint(m)) is not None]
            if not chosen:
                raise SweepError(f"{text}: matches no checkpoint")
            paths.extend(chosen)
        elif path.is_dir():
            chosen = _in_folder(path)
            if not chosen:
                raise SweepError(
                    f"{text}: no checkpoints in this folder (files ending in "
                    f"{', '.join(CHECKPOINT_SUFFIXES)}, or model sub-folders)"
                )
            paths.extend(chosen)
        elif path.exists():
            paths.append(path)
        else:
            raise SweepError(f"{text}: no such file or folder")
    seen: set[str] = set()
    unique = []
    for path in paths:
        resolved = os.path.realpath(path)
        if resolved not in seen:
            seen.add(resolved)
            unique.append(path)
    return ordered(unique, order)


def ordered(paths: Iterable[Path], order: str) -> list[SweepInput]:
    """The paths as sweep inputs, sorted by `order` (ties by the whole path)."""
    paths = list(paths)
    if order == "mtime":
        stamps = {path: path.stat().st_mtime_ns for path in paths}
        paths.sort(key=lambda p: (stamps[p], natural_key(str(p))))
        return [SweepInput(p, stamps[p] / 1e9) for p in paths]
    if order == "name":
        paths.sort(key=lambda p: (_name(p), str(p)))
        return [SweepInput(p, _name(p)) for p in paths]
    paths.sort(key=lambda p: (natural_key(_name(p)), natural_key(str(p))))
    return [SweepInput(p, step_of(p)) for p in paths]


# --- The run's values -------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class Crossing:
    """A layer whose alpha went below the gate's line, and the first checkpoint where it did."""

    name: str
    """The layer's name (layers are matched across checkpoints by name)."""
    layer_type: str
    """Its type."""
    line: float
    """The line it crossed (the gate's line for its type)."""
    checkpoint: str
    """The first checkpoint where its alpha was below the line."""
    index: int
    """That checkpoint's position in the run (0-based)."""
    order_key: int | float | str | None
    """That checkpoint's order key (its step)."""
    alpha: float
    """Its alpha there."""
    before: float | None
    """Its alpha at the checkpoint before, where it was measured; None when it was below the
    line from its first checkpoint on."""
    last: float | None
    """Its alpha at the last checkpoint that has it (None when that fit failed)."""


@dataclass(frozen=True)
class Sweep:
    """A sweep's inputs, in order, and what the run made of them."""

    inputs: tuple[SweepInput, ...]
    """The checkpoints, in the run's order."""
    run: RunResult
    """The analysis of every readable input (reports in the inputs' order) and the failures."""
    order: str = "natural"
    """How the inputs were ordered."""

    def _keys(self) -> dict[str, tuple[int, int | float | str | None]]:
        return {str(item.path): (index, item.order_key) for index, item in enumerate(self.inputs)}

    def rows(self) -> list[dict[str, Any]]:
        """The long format: one row per (checkpoint, analyzed layer), in run and id order."""
        keys = self._keys()
        rows: list[dict[str, Any]] = []
        for report in self.run.reports:
            index, order_key = keys[report.checkpoint]
            rows.extend(_row(report.checkpoint, index, order_key, r) for r in report.layers)
        return rows

    def crossings(self, policy: GatePolicy | None = None) -> list[Crossing]:
        """The gated layers whose alpha crossed below the gate's line for their type (the
        engine's very-heavy-tailed line, alpha < 2 by default, when the gate has none), in order
        of first appearance."""
        policy = policy or self.run.settings.gate
        fallback = self.run.settings.engine.over_trained_below
        keys = self._keys()
        history: dict[str, list[tuple[str, LayerResult]]] = {}
        for report in self.run.reports:
            for result in report.layers:
                history.setdefault(result.spec.name, []).append((report.checkpoint, result))
        found = []
        for name, points in history.items():
            before: float | None = None
            for checkpoint, result in points:
                alpha = result.metrics.fit.alpha
                if policy.not_gated(result) or not math.isfinite(alpha):
                    continue
                kind = result.spec.layer_type.value
                line = policy.line_for(kind)
                line = fallback if line is None else line
                if alpha < line:
                    index, order_key = keys[checkpoint]
                    last = _finite(points[-1][1].metrics.fit.alpha)
                    found.append(
                        Crossing(
                            name, kind, line, checkpoint, index, order_key, alpha, before, last
                        )
                    )
                    break
                before = alpha
        return found

    def to_document(self) -> dict[str, Any]:
        """The sweep as one JSON object: the checkpoints, the failures, the long-format rows
        (`trajectory`) and the crossings."""
        keys = self._keys()
        formats = {report.checkpoint: report.format for report in self.run.reports}
        return {
            "wwcli_version": __version__,
            "order": self.order,
            "options": self.run.settings.to_json(),
            "checkpoints": [
                {
                    "index": keys[str(item.path)][0],
                    "checkpoint": str(item.path),
                    "order_key": item.order_key,
                    "format": formats.get(str(item.path)),
                }
                for item in self.inputs
            ],
            "failures": [
                {"checkpoint": failure.path, "message": failure.message}
                for failure in self.run.failures
            ],
            "trajectory": self.rows(),
            "crossings": [_crossing_object(crossing) for crossing in self.crossings()],
        }


def _row(
    checkpoint: str, index: int, order_key: int | float | str | None, result: LayerResult
) -> dict[str, Any]:
    metrics = result.metrics
    spikes = metrics.fit.num_pl_spikes
    return {
        "checkpoint": checkpoint,
        "index": index,
        "order_key": order_key,
        "layer_id": result.spec.layer_id,
        "name": result.spec.name,
        "layer_type": result.spec.layer_type.value,
        "num_evals": metrics.num_evals,
        "alpha": _finite(metrics.fit.alpha),
        "log_spectral_norm": _finite(metrics.log_spectral_norm),
        "D": _finite(metrics.fit.D),
        "num_pl_spikes": spikes if spikes >= 0 else None,
        "status": metrics.fit.status.value,
    }


def _crossing_object(crossing: Crossing) -> dict[str, Any]:
    return {
        "name": crossing.name,
        "layer_type": crossing.layer_type,
        "line": crossing.line,
        "checkpoint": crossing.checkpoint,
        "index": crossing.index,
        "order_key": crossing.order_key,
        "alpha": crossing.alpha,
        "before": crossing.before,
        "last": crossing.last,
    }


def trajectory_from_document(document: Any) -> tuple[list[dict[str, Any]], list[Crossing]]:
    """The rows and crossings of a sweep's JSON document (what `Sweep.to_document` wrote);
    ValueError when it is not one."""
    if not isinstance(document, dict) or not isinstance(document.get("trajectory"), list):
        raise ValueError("not a wwcli sweep JSON document")
    rows: list[dict[str, Any]] = []
    for row in document["trajectory"]:
        if not isinstance(row, dict) or set(row) < set(TRAJECTORY_COLUMNS):
            raise ValueError("a trajectory row without the sweep's columns")
        rows.append(row)
    crossings = [Crossing(**item) for item in document.get("crossings", [])]
    return rows, crossings


def render_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The long format as CSV: a header, one row per (checkpoint, layer); empty for null."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TRAJECTORY_COLUMNS)
    for row in rows:
        writer.writerow(["" if row[key] is None else row[key] for key in TRAJECTORY_COLUMNS])
    return buffer.getvalue()


def render_json(document: Any) -> str:
    """A document as indented JSON ending in a newline (null for NaN, never NaN)."""
    import json

    return json.dumps(document, indent=2, allow_nan=False) + "\n"


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max([len(header[i]), *(len(row[i]) for row in rows)]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ).rstrip()

    return [line(header), line(["-" * width for width in widths]), *(line(row) for row in rows)]


def _number(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def render_table(sweep: Sweep) -> str:
    """For people: the crossings, then per layer alpha at the first and last checkpoint and
    its lowest. Names from files are escaped."""
    from wwcli.report.escape import printable

    rows = sweep.rows()
    names = list(dict.fromkeys(row["name"] for row in rows))
    lines = [
        f"sweep: {len(sweep.run.reports)} checkpoints ({sweep.order} order), {len(names)} layers",
        "",
    ]
    crossings = sweep.crossings()
    if crossings:
        lines.append("Layers whose alpha crossed below the line, and where first:")
        lines += _columns(
            ("layer", "type", "line", "first checkpoint", "step", "alpha", "before", "last"),
            [
                (
                    printable(c.name),
                    c.layer_type,
                    f"{c.line:g}",
                    printable(c.checkpoint),
                    printable(str(c.order_key)) if c.order_key is not None else "-",
                    _number(c.alpha),
                    _number(c.before),
                    _number(c.last),
                )
                for c in crossings
            ],
            {2, 5, 6, 7},
        )
    else:
        lines.append("No gated layer's alpha went below the line.")
    lines += ["", "alpha per layer across the run:"]
    table = []
    for name in names:
        alphas = [row["alpha"] for row in rows if row["name"] == name]
        finite = [alpha for alpha in alphas if alpha is not None]
        table.append(
            (
                printable(name),
                str(len(alphas)),
                _number(alphas[0]),
                _number(alphas[-1]),
                _number(min(finite) if finite else None),
            )
        )
    lines += _columns(("layer", "checkpoints", "first", "last", "lowest"), table, {1, 2, 3, 4})
    return "\n".join(lines) + "\n"


# --- Pictures --------------------------------------------------------------------------------


def trajectory_figures(sweep: Sweep) -> dict[str, Figure]:
    """One figure per trajectory metric (file stem -> figure): one line per layer, every
    checkpoint on the x axis (NaN where a layer is missing), the verdict lines on alpha's, and
    there each crossing marked."""
    from wwcli.report.plots import trajectory_figure

    labels = [str(item.path) for item in sweep.inputs if _analyzed(sweep, str(item.path))]
    rows = sweep.rows()
    engine = sweep.run.settings.engine
    figures: dict[str, Figure] = {}
    for metric in ("alpha", "log_spectral_norm"):
        lines: dict[str, list[tuple[str, float]]] = {}
        values = {(row["name"], row["checkpoint"]): row[metric] for row in rows}
        for name in dict.fromkeys(row["name"] for row in rows):
            points = [(label, values.get((name, label))) for label in labels]
            lines[name] = [(label, math.nan if v is None else float(v)) for label, v in points]
        figure = trajectory_figure(
            lines,
            metric=metric,
            title=f"{metric} across {len(labels)} checkpoints",
            over_trained_below=engine.over_trained_below,
            under_trained_above=engine.under_trained_above,
        )
        if metric == "alpha":
            axes = figure.axes[0]
            for index, crossing in enumerate(sweep.crossings()):
                axes.scatter(
                    [labels.index(crossing.checkpoint)],
                    [crossing.alpha],
                    s=80,
                    marker="x",
                    color="red",
                    zorder=5,
                    gid=f"crossing-{index}",
                )
        figures[f"trajectory-{metric}"] = figure
    return figures


def _analyzed(sweep: Sweep, label: str) -> bool:
    return any(report.checkpoint == label for report in sweep.run.reports)


def write_trajectory_plots(sweep: Sweep, folder: Path, *, image_format: str = "png") -> list[Path]:
    """The trajectory figures as files in `folder` (created): trajectory-alpha.png, ..."""
    from wwcli.report.plots import figure_bytes

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, figure in trajectory_figures(sweep).items():
        target = folder / f"{stem}.{image_format}"
        target.write_bytes(figure_bytes(figure, image_format=image_format))
        written.append(target)
    return written
