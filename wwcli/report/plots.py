"""Figures of a run: a layer's ESD with its power-law fit, a checkpoint's alpha per layer, and
a metric's trajectory across checkpoints; PNG or SVG bytes of them, and safe file names.

matplotlib is an optional extra (`pip install 'wwcli[plot]'`), so this module imports it only
inside its functions: importing it costs nothing and works without matplotlib. Every figure is a
`matplotlib.figure.Figure` with its own Agg canvas, never pyplot: pyplot keeps global state
(a current figure, a figure manager), and the run draws figures from several threads at once.

Text in a figure comes from files (layer names, paths, messages), so it goes through
`escape.printable` (no control characters) and has every `$` escaped: matplotlib would otherwise
read `$...$` as mathtext, which renders a name as something else or fails to parse.

Where the ESD panels differ from weightwatcher 0.7.7's `plot=True` figures, on purpose: both
panels show the eigenvalues above the fit's threshold (1e-5 by default; weightwatcher shows
those above xmin / 100 for a successful fit, which hides the bulk of a layer whose tail starts
high), and the power-law line is the fitted density scaled by the tail's share of the plotted
eigenvalues, so that it overlays the density histogram where weightwatcher draws the fit's own
normalization.
"""

from __future__ import annotations

import functools
import io
import math
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from wwcli.engine.results import FitStatus, Verdict
from wwcli.report.columns import VERDICT_WORDS, number, shape_text
from wwcli.report.escape import printable
from wwcli.results import CheckpointReport, LayerResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from numpy.typing import ArrayLike, NDArray

__all__ = [
    "DEFAULT_THRESHOLD",
    "ESD_AXES_GIDS",
    "IMAGE_FORMATS",
    "VERDICT_COLORS",
    "EsdAxes",
    "PlotError",
    "add_diagnostic_curves",
    "add_esd_curve",
    "esd_axes",
    "esd_figure",
    "figure_bytes",
    "marchenko_pastur_density",
    "overview_figure",
    "overview_file_name",
    "plain",
    "plot_file_name",
    "power_law_density",
    "require_matplotlib",
    "safe_name",
    "trajectory_figure",
]

IMAGE_FORMATS: tuple[str, ...] = ("png", "svg")
"""The formats `figure_bytes` writes."""

DEFAULT_THRESHOLD = 1e-5
"""Eigenvalues at or below this are not plotted: the fit's threshold (EngineOptions'
eigenvalue_threshold, weightwatcher's), and zeros have no place on a log axis."""

ESD_AXES_GIDS = ("esd-loglog", "esd-linear")
"""The gids of the ESD figure's two panels, left to right (`esd_axes` finds them by these)."""

VERDICT_COLORS: dict[Verdict, str] = {
    Verdict.OVER_TRAINED: "#d62728",
    Verdict.UNDER_TRAINED: "#ff9f0e",
    Verdict.TYPICAL: "#1f77b4",
    Verdict.FAILED: "#7f7f7f",
}
"""How a verdict is coloured: red very heavy-tailed (alpha < 2), orange light tail (alpha > 6),
blue typical, grey failed."""

_ESD_SIZE = (12.0, 4.5)
_OVERVIEW_SIZE = (12.0, 7.5)
_TRAJECTORY_SIZE = (10.0, 5.5)
_LOG_BINS_MAX = 100
_LINEAR_BINS = 100  # weightwatcher's
_NAME_IN_TITLE = 100
_NAME_ON_TICK = 32
_MAX_TICK_LABELS = 40
_MAX_LEGEND_LAYERS = 12
_MAX_DPI = 1200
_SVG_SALT = "wwcli"
_salt_lock = threading.Lock()


class PlotError(Exception):
    """matplotlib is not installed (the message names the extra: pip install 'wwcli[plot]')."""


def require_matplotlib() -> None:
    """Raise PlotError, with the install command, when matplotlib cannot be imported."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
    except ImportError as error:
        raise PlotError(
            f"plots need matplotlib, which is not installed ({error}): pip install 'wwcli[plot]'"
        ) from None


# --- text -----------------------------------------------------------------------------------


@functools.cache
def _font_characters() -> frozenset[int]:
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    path = font_manager.findfont(font_manager.FontProperties())
    return frozenset(FT2Font(path).get_charmap())


def _drawable(text: str) -> str:
    # A character the font lacks draws as a box and makes matplotlib warn once per glyph on
    # stderr ("Glyph 21517 missing from font(s)"); written as its escape it reads as data.
    if text.isascii():
        return text
    known = _font_characters()
    return "".join(
        c if ord(c) in known else (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
        for c in text
    )


def plain(text: str, limit: int | None = None) -> str:
    """`text` as a figure shows it literally: controls escaped (`escape.printable`), characters
    the font lacks escaped, `$` escaped (no mathtext), and shortened in the middle to `limit`
    characters when it is longer."""
    text = printable(text)
    if limit is not None and len(text) > limit:
        half = (limit - 1) // 2
        text = text[:half] + "\u2026" + text[len(text) - (limit - 1 - half) :]
    return _drawable(text).replace("$", r"\$")


def _tail_label(text: str, limit: int) -> str:
    # Tick labels keep the end of a name: "...layer.3.attention.self.query" says more than
    # its common prefix.
    text = printable(text)
    if len(text) > limit:
        text = "\u2026" + text[len(text) - limit + 1 :]
    return _drawable(text).replace("$", r"\$")


def _layer_title(result: LayerResult, checkpoint: str) -> str:
    spec, fit = result.spec, result.metrics.fit
    head = f"layer {spec.layer_id}: {plain(spec.name, _NAME_IN_TITLE)}  ({shape_text(spec.shape)})"
    if checkpoint:
        head = f"{plain(checkpoint, _NAME_IN_TITLE)} \u2014 {head}"
    words = VERDICT_WORDS[result.metrics.verdict]
    if fit.status is FitStatus.SUCCESS:
        detail = f"alpha = {number(fit.alpha)}  ({words})"
    else:
        detail = f"{words}: {plain(fit.message or 'no reason given', 200)}"
    return f"{head}\n{detail}"


# --- figures --------------------------------------------------------------------------------


def _new_figure(
    size: tuple[float, float], *, layout: Literal["constrained"] | None = None
) -> Figure:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=100, layout=layout)
    FigureCanvasAgg(figure)
    return figure


@dataclass(frozen=True)
class EsdAxes:
    """The two panels of an ESD figure: where `add_esd_curve` draws a curve."""

    loglog: Axes
    """Left: the density on log-log axes, the power-law fit and the tail."""
    linear: Axes
    """Right: the density on linear axes."""


def esd_axes(figure: Figure) -> EsdAxes:
    """The panels of a figure `esd_figure` drew; ValueError for one without them (the figure
    of a layer with no eigenvalues)."""
    found = {axes.get_gid(): axes for axes in figure.axes}
    try:
        return EsdAxes(found[ESD_AXES_GIDS[0]], found[ESD_AXES_GIDS[1]])
    except KeyError:
        raise ValueError("the figure has no ESD panels (no eigenvalues were drawn)") from None


def add_esd_curve(
    figure: Figure,
    x: ArrayLike,
    density: ArrayLike,
    *,
    label: str,
    gid: str | None = None,
    **style: Any,
) -> None:
    """Draw a density curve (a Marchenko-Pastur bulk, a randomized layer's ESD) on both panels
    of an ESD figure, in its legends. `label` is shown literally; `style` goes to `Axes.plot`.
    On the log-log panel only the points with x > 0 and density > 0 are drawn."""
    panels = esd_axes(figure)
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(density, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and density must be 1-D of one length, got {xs.shape}, {ys.shape}")
    positive = (xs > 0) & (ys > 0)
    text = plain(label, 80)
    panels.loglog.plot(xs[positive], ys[positive], label=text, gid=gid, **style)
    panels.linear.plot(xs, ys, label=text, gid=gid, **style)
    for axes in (panels.loglog, panels.linear):
        axes.legend(loc="upper right", fontsize="small")


def _log_edges(values: NDArray[np.float64]) -> NDArray[np.float64]:
    low, high = float(values[0]), float(values[-1])
    if high <= low:
        low, high = low / 1.5, high * 1.5
    bins = int(np.clip(round(2 * math.sqrt(values.size)), 10, _LOG_BINS_MAX))
    edges = np.logspace(math.log10(low), math.log10(high), bins + 1)
    # 10 ** log10(x) is not always x: pin the ends so no eigenvalue falls outside.
    edges[0], edges[-1] = low, high
    return edges


def _linear_edges(values: NDArray[np.float64]) -> NDArray[np.float64]:
    low, high = float(values[0]), float(values[-1])
    if high <= low:
        low, high = low * 0.5, high * 1.5
    return np.linspace(low, high, _LINEAR_BINS + 1)


def _density(
    values: NDArray[np.float64], edges: NDArray[np.float64]
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    counts, _ = np.histogram(values, bins=edges)
    return counts, counts / (values.size * np.diff(edges))


def power_law_density(
    alpha: float, xmin: float, xmax: float, tail_fraction: float, x: NDArray[np.float64]
) -> NDArray[np.float64]:
    """The fitted law's density at x, as a share of all plotted eigenvalues: tail_fraction times
    the tail's density p(x) = (alpha - 1) / xmin (x / xmin)^-alpha (for alpha <= 1, which has no
    untruncated density, the law normalized on [xmin, xmax]). On log-log axes a line of slope
    exactly -alpha."""
    if alpha > 1:
        log_c = math.log((alpha - 1) / xmin) + alpha * math.log(xmin)
    elif alpha == 1:
        log_c = -math.log(math.log(xmax / xmin))
    else:
        log_c = math.log((1 - alpha) / (xmax ** (1 - alpha) - xmin ** (1 - alpha)))
    return np.exp(math.log(tail_fraction) + log_c - alpha * np.log(x))


def esd_figure(
    result: LayerResult, *, checkpoint: str = "", threshold: float = DEFAULT_THRESHOLD
) -> Figure:
    """A layer's ESD, 12 x 4.5 inches: left, the density histogram of its eigenvalues above
    `threshold` on log-log axes (log-spaced bins), the fitted power law from xmin to xmax, the
    xmin line and the fitted tail shaded; right, the same eigenvalues' density on linear axes
    (100 bins, as weightwatcher) with the xmin line. A failed fit: the histograms, the reason in
    the title. No spectrum kept, or none above `threshold`: a figure that says so and why.

    Artists carry gids a caller (or a test) can find: "histogram-loglog", "histogram-linear"
    (StepPatch; its label counts the eigenvalues drawn), "power-law", "xmin-loglog",
    "xmin-linear", "tail"."""
    figure = _new_figure(_ESD_SIZE)
    figure.suptitle(_layer_title(result, checkpoint), fontsize="medium")
    fit = result.metrics.fit
    values = None if result.spectrum is None else np.asarray(result.spectrum.eigenvalues)
    if values is None:
        reason = fit.message or "the run did not keep the eigenvalues"
        return _no_eigenvalues(figure, reason)
    plotted = np.sort(values[values > threshold])
    if plotted.size == 0:
        reason = f"all {values.size} eigenvalues are at or below {threshold:g}"
        if fit.message:
            reason = f"{reason}; {fit.message}"
        return _no_eigenvalues(figure, reason)

    figure.subplots_adjust(left=0.07, right=0.985, bottom=0.12, top=0.86, wspace=0.17)
    loglog, linear = figure.subplots(1, 2)
    loglog.set_gid(ESD_AXES_GIDS[0])
    linear.set_gid(ESD_AXES_GIDS[1])
    noun = "eigenvalue" if plotted.size == 1 else "eigenvalues"
    label = f"ESD: {plotted.size} {noun} > {threshold:g}"
    dropped = values.size - plotted.size
    if dropped:
        label += f" ({dropped} at or below not shown)"

    edges = _log_edges(plotted)
    _, heights = _density(plotted, edges)
    _histogram(loglog, heights, edges, label=label, gid="histogram-loglog")
    loglog.set_xscale("log")
    loglog.set_yscale("log")
    shown = heights[heights > 0]
    _plain_log_ticks(
        loglog,
        x_range=(float(edges[0]), float(edges[-1])),
        y_range=(float(shown.min()), float(shown.max())),
    )
    loglog.set_xlabel("eigenvalue (log scale)")
    loglog.set_ylabel("density (log scale)")

    edges = _linear_edges(plotted)
    _, heights = _density(plotted, edges)
    _histogram(linear, heights, edges, label=label, gid="histogram-linear")
    _few_linear_ticks(linear)
    linear.set_xlabel("eigenvalue")
    linear.set_ylabel("density")

    if fit.status is FitStatus.SUCCESS and math.isfinite(fit.xmin):
        tail_fraction = np.count_nonzero(plotted >= fit.xmin) / plotted.size
        xmax = fit.xmax if math.isfinite(fit.xmax) else float(plotted[-1])
        if xmax > fit.xmin and tail_fraction > 0:
            loglog.axvspan(fit.xmin, xmax, color="#fdd0a2", alpha=0.35, lw=0, zorder=0, gid="tail")
            x = np.geomspace(fit.xmin, xmax, 64)
            y = power_law_density(fit.alpha, fit.xmin, xmax, tail_fraction, x)
            loglog.plot(
                x,
                y,
                color="#d62728",
                lw=1.8,
                label=f"power law: alpha = {fit.alpha:.3f}, D = {fit.D:.3f}",
                gid="power-law",
            )
        line = {"color": "#e6550d", "ls": "--", "lw": 1.2, "label": f"xmin = {fit.xmin:.4g}"}
        loglog.axvline(fit.xmin, gid="xmin-loglog", **line)
        linear.axvline(fit.xmin, gid="xmin-linear", **line)
    # One legend: the panels share their artists' meaning, and a legend is ~15 % of a figure.
    loglog.legend(loc="upper right", fontsize="small")
    add_diagnostic_curves(figure, result, threshold=threshold)
    return figure


def marchenko_pastur_density(
    x: NDArray[np.float64], *, sigma: float, Q: float, W_scale: float
) -> NDArray[np.float64]:
    """The Marchenko-Pastur density of an MP fit (wwcli.engine.mpfit) on the eigenvalues' own
    scale: in the fit's rescaled units u = W_scale^2 x, Q / (2 pi sigma^2 u) sqrt((u+ - u)(u -
    u-)) on [u-, u+] = sigma^2 (1 -+ 1/sqrt Q)^2, zero outside; times W_scale^2 for x."""
    scale = W_scale * W_scale
    u = np.asarray(x, dtype=np.float64) * scale
    low = (sigma * (1 - 1 / math.sqrt(Q))) ** 2
    high = (sigma * (1 + 1 / math.sqrt(Q))) ** 2
    inside = (u > low) & (u < high) & (u > 0)
    density = np.zeros_like(u)
    ui = u[inside]
    density[inside] = Q / (2 * math.pi * sigma * sigma * ui) * np.sqrt((high - ui) * (ui - low))
    return density * scale


def add_diagnostic_curves(
    figure: Figure, result: LayerResult, *, threshold: float = DEFAULT_THRESHOLD
) -> None:
    """The diagnostics' curves over an ESD figure, when the run computed them: the fitted
    Marchenko-Pastur bulk (--mp-fit; its sigma_mp and Q = N / M in the legend) and the
    randomized layer's ESD (--randomize). Scaled as the histogram: a share of the eigenvalues
    above `threshold`. Nothing is drawn on a figure without ESD panels or spectrum."""
    extra = result.diagnostics
    if extra is None or result.spectrum is None:
        return
    try:
        esd_axes(figure)
    except ValueError:
        return
    values = np.asarray(result.spectrum.eigenvalues)
    plotted = np.sort(values[values > threshold])
    if plotted.size == 0:
        return
    share = values.size / plotted.size
    mp = extra.mp
    Q = result.metrics.N / result.metrics.M
    if mp is not None and math.isfinite(mp.sigma_mp) and mp.sigma_mp > 0 and Q >= 1:
        top = max(float(plotted[-1]), mp.bulk_max) * 1.02
        x = np.linspace(max(float(plotted[0]), mp.bulk_min * 0.98, top * 1e-4), top, 400)
        density = share * marchenko_pastur_density(x, sigma=mp.sigma_mp, Q=Q, W_scale=mp.W_scale)
        label = f"MP bulk: sigma_mp = {mp.sigma_mp:.3f}, Q = {Q:.3g}, {mp.num_spikes} spikes"
        add_esd_curve(figure, x, density, label=label, gid="mp-bulk", color="#2ca02c", lw=1.6)
    random = extra.random
    shuffled = None if random is None else random.rand_eigenvalues
    if random is not None and shuffled is not None:
        above = np.sort(np.asarray(shuffled, dtype=np.float64))
        above = above[above > threshold]
        if above.size:
            # A curve, not a histogram: about 2 sqrt(n) bins keep it readable over the ESD's.
            bins = int(np.clip(round(2 * math.sqrt(above.size)), 10, _LINEAR_BINS))
            edges = np.linspace(float(above[0]), float(above[-1]) * 1.000001, bins + 1)
            _, heights = _density(above, edges)
            centres = (edges[:-1] + edges[1:]) / 2
            traps = "" if random.num_traps < 0 else f", {random.num_traps} traps"
            add_esd_curve(
                figure,
                centres,
                heights,
                label=f"randomized ESD{traps}",
                gid="randomized-esd",
                color="#9467bd",
                lw=1.2,
                alpha=0.85,
            )


def _histogram(
    axes: Axes, heights: NDArray[np.float64], edges: NDArray[np.float64], *, label: str, gid: str
) -> None:
    # One StepPatch rather than a bar per bin; added as an artist, with the data limits given
    # directly: Axes.stairs walks the patch's path segment by segment in Python to find them
    # (~10 % of a figure's time for 100 bins).
    from matplotlib.patches import StepPatch

    patch = StepPatch(heights, edges, fill=True, color="#9ecae1", label=label, gid=gid)
    axes.add_artist(patch)
    positive = heights[heights > 0]
    low = float(positive.min()) if positive.size else 1.0
    axes.update_datalim([(float(edges[0]), low), (float(edges[-1]), float(heights.max()))])
    axes.autoscale_view()


def _plain_log_ticks(
    axes: Axes, *, x_range: tuple[float, float], y_range: tuple[float, float]
) -> None:
    # The default log formatter writes "$\\mathdefault{10^{-3}}$", mathtext, whose parser was
    # 60 % of a figure's time; minor ticks are ~50 Tick objects per panel, made at every draw.
    # Plain labels ("0.001", "2e-05") at decades, or at 1-2-5 on a range of under two decades
    # (where decades alone would leave one tick or none).
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    for axis, (low, high) in ((axes.xaxis, x_range), (axes.yaxis, y_range)):
        narrow = 0 < low < high and math.log10(high / low) < 2
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if narrow else (1.0,), numticks=8))
        axis.set_major_formatter(FuncFormatter(_decade_label))
        axis.set_minor_locator(NullLocator())


def _decade_label(value: float, _: object = None) -> str:
    # Where the locator falls back to linear steps (a range of one value), a short format
    # would repeat a label: up to six digits in plain notation, two significant ones beyond.
    if 1e-3 <= value < 1e5:
        return f"{value:.6g}"
    return str(np.format_float_scientific(value, precision=1, trim="-", exp_digits=2))


def _few_linear_ticks(axes: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(nbins=6))
    axes.yaxis.set_major_locator(MaxNLocator(nbins=5))


def _no_eigenvalues(figure: Figure, reason: str) -> Figure:
    axes = figure.add_subplot()
    axes.set_axis_off()
    axes.text(
        0.5,
        0.5,
        f"no eigenvalues to plot:\n{plain(reason, 200)}",
        ha="center",
        va="center",
        wrap=True,
        gid="no-eigenvalues",
    )
    return figure


def _threshold_lines(axes: Axes, low: float, high: float) -> None:
    axes.axhline(low, color=VERDICT_COLORS[Verdict.OVER_TRAINED], ls="--", lw=1, gid="alpha-low")
    axes.axhline(high, color=VERDICT_COLORS[Verdict.UNDER_TRAINED], ls="--", lw=1, gid="alpha-high")


def overview_figure(
    report: CheckpointReport,
    *,
    over_trained_below: float = 2.0,
    under_trained_above: float = 6.0,
) -> Figure:
    """A checkpoint at a glance, 12 x 7.5 inches: top, alpha of each analyzed layer (in id order)
    coloured by verdict, with dashed lines at the two verdict thresholds (pass the run's when
    they are not 2 and 6); a layer whose fit failed is a grey x on the panel's bottom edge.
    Bottom, log10 of each layer's spectral norm. The x axis names the layers (every k-th past
    40, keeping the end of long names).

    gids: "alpha-<verdict>" (one Line2D per verdict), "alpha-failed", "alpha-low",
    "alpha-high", "log-spectral-norm"."""
    figure = _new_figure(_OVERVIEW_SIZE, layout="constrained")
    figure.suptitle(plain(report.checkpoint, 160), fontsize="medium")
    alpha_axes, norm_axes = figure.subplots(2, 1, sharex=True)
    layers = report.layers
    positions = np.arange(len(layers), dtype=np.float64)
    for verdict in (Verdict.TYPICAL, Verdict.OVER_TRAINED, Verdict.UNDER_TRAINED):
        chosen = [
            i
            for i, layer in enumerate(layers)
            if layer.metrics.verdict is verdict and layer.metrics.fit.status is FitStatus.SUCCESS
        ]
        if not chosen:
            continue
        alpha_axes.plot(
            positions[chosen],
            [layers[i].metrics.alpha for i in chosen],
            ls="none",
            marker="o",
            ms=5,
            color=VERDICT_COLORS[verdict],
            label=f"{VERDICT_WORDS[verdict]} ({len(chosen)})",
            gid=f"alpha-{verdict.value}",
        )
    failed = [i for i, layer in enumerate(layers) if layer.metrics.fit.status is FitStatus.FAILED]
    if failed:
        alpha_axes.plot(
            positions[failed],
            np.zeros(len(failed)),
            ls="none",
            marker="x",
            ms=6,
            color=VERDICT_COLORS[Verdict.FAILED],
            transform=alpha_axes.get_xaxis_transform(),
            clip_on=False,
            label=f"{VERDICT_WORDS[Verdict.FAILED]} ({len(failed)}, on the edge)",
            gid="alpha-failed",
        )
    _threshold_lines(alpha_axes, over_trained_below, under_trained_above)
    alphas = [layer.metrics.alpha for layer in layers if math.isfinite(layer.metrics.alpha)]
    top = max([under_trained_above + 1.0, *[a + 0.5 for a in alphas]])
    bottom = min([0.0, *[a - 0.5 for a in alphas]])
    alpha_axes.set_ylim(bottom, top)
    alpha_axes.set_ylabel("alpha")
    if not layers:
        alpha_axes.text(0.5, 0.5, "no layers analyzed", ha="center", transform=alpha_axes.transAxes)
    if alpha_axes.get_legend_handles_labels()[0]:
        # Outside, right of the panel: inside it would hide the points of the last layers.
        alpha_axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")

    norms = np.array([layer.metrics.log_spectral_norm for layer in layers], dtype=np.float64)
    finite = np.isfinite(norms)
    norm_axes.plot(
        positions[finite],
        norms[finite],
        marker=".",
        lw=0.8,
        color="#31a354",
        gid="log-spectral-norm",
    )
    norm_axes.set_ylabel("log10 spectral norm")
    step = max(1, math.ceil(len(layers) / _MAX_TICK_LABELS))
    ticks = list(range(0, len(layers), step))
    norm_axes.set_xticks(ticks)
    norm_axes.set_xticklabels(
        [_tail_label(layers[i].spec.name, _NAME_ON_TICK) for i in ticks], rotation=90, fontsize=7
    )
    norm_axes.set_xlabel("layer" if step == 1 else f"layer (every {step}th named)")
    if layers:
        norm_axes.set_xlim(-0.5, len(layers) - 0.5)
    return figure


def trajectory_figure(
    trajectories: Mapping[str, Sequence[tuple[str, float]]],
    *,
    metric: str = "alpha",
    title: str = "",
    over_trained_below: float = 2.0,
    under_trained_above: float = 6.0,
) -> Figure:
    """A metric across checkpoints, 10 x 5.5 inches: one line per layer (key: its name; value:
    (checkpoint label, value) pairs, NaN for a gap). The x axis lists the checkpoint labels in
    order of first appearance; with metric "alpha", dashed lines at the verdict thresholds; a
    legend when there are at most 12 layers. gids: "trajectory-<i>" in mapping order."""
    figure = _new_figure(_TRAJECTORY_SIZE, layout="constrained")
    axes = figure.add_subplot()
    labels: dict[str, int] = {}
    for points in trajectories.values():
        for label, _ in points:
            labels.setdefault(label, len(labels))
    for index, (name, points) in enumerate(trajectories.items()):
        ordered = sorted(((labels[label], float(value)) for label, value in points))
        axes.plot(
            [x for x, _ in ordered],
            [y for _, y in ordered],
            marker="o",
            ms=3,
            lw=1,
            label=plain(name, 60),
            gid=f"trajectory-{index}",
        )
    if metric == "alpha":
        _threshold_lines(axes, over_trained_below, under_trained_above)
    axes.set_xticks(range(len(labels)))
    axes.set_xticklabels([_tail_label(label, _NAME_ON_TICK) for label in labels], rotation=45)
    axes.set_xlabel("checkpoint")
    axes.set_ylabel(plain(metric, 40))
    axes.set_title(plain(title or f"{metric} across checkpoints", 160), fontsize="medium")
    if 0 < len(trajectories) <= _MAX_LEGEND_LAYERS:
        axes.legend(fontsize="small")
    return figure


# --- output ---------------------------------------------------------------------------------


def _set_svg_salt() -> None:
    # SVG ids (clip paths) are hashes salted with svg.hashsalt, a fresh uuid4 when unset: fix it
    # once for the process so the same figure gives the same bytes. A global rcParam, but one
    # no other wwcli code reads; a salt someone else set is left alone.
    import matplotlib as mpl

    with _salt_lock:
        if mpl.rcParams["svg.hashsalt"] is None:
            mpl.rcParams["svg.hashsalt"] = _SVG_SALT


def figure_bytes(figure: Figure, *, image_format: str = "png", dpi: int = 100) -> bytes:
    """The figure as PNG or SVG bytes; the same figure gives the same bytes (no date, no
    software version, fixed SVG ids). Closes nothing and touches no pyplot state."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or not 1 <= dpi <= _MAX_DPI:
        raise ValueError(f"dpi must be an int from 1 to {_MAX_DPI}, got {dpi!r}")
    buffer = io.BytesIO()
    options: dict[str, Any] = {}
    if image_format == "svg":
        _set_svg_salt()
        metadata: dict[str, str | None] = {"Date": None, "Creator": None}
    else:
        metadata = {"Software": None}
        # zlib level 1: a third of level 6's time on a figure, for files ~10 % larger.
        options["pil_kwargs"] = {"compress_level": 1}
    figure.savefig(buffer, format=image_format, dpi=dpi, metadata=metadata, **options)
    return buffer.getvalue()


# --- file names -----------------------------------------------------------------------------

_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
_RUNS = re.compile(r"([._-])\1+")
_NAME_LENGTH = 80


def safe_name(text: str, fallback: str) -> str:
    """`text` as part of a file name: only [A-Za-z0-9._-] (any other run becomes one "_"), no
    run of a repeated separator (so never ".."), no dot or "_" at either end, at most 80
    characters; `fallback` when nothing is left."""
    name = _UNSAFE_CHARACTERS.sub("_", text)
    name = _RUNS.sub(r"\1", name)
    name = name[:_NAME_LENGTH].strip("._")
    return name or fallback


def _check_format(image_format: str) -> None:
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")


def plot_file_name(result: LayerResult, image_format: str = "png") -> str:
    """The ESD figure's file name: "0007-encoder.layer.0.attention.self.query.png" (id, then
    the name made safe by `safe_name`); unique per id, the same on every run."""
    _check_format(image_format)
    name = safe_name(result.spec.name, "layer")
    return f"{result.spec.layer_id:04d}-{name}.{image_format}"


def overview_file_name(checkpoint: str, index: int, image_format: str = "png") -> str:
    """The overview's file name: "overview-00-model.png" (the checkpoint's place among the
    inputs, then its base name made safe); the index keeps two inputs of one base name apart."""
    _check_format(image_format)
    base = re.split(r"[/\\]", checkpoint.rstrip("/\\"))[-1]
    return f"overview-{index:02d}-{safe_name(base, 'checkpoint')}.{image_format}"
