"""The figures: what each draws (checked on its artists, before saving), that the images are
the size asked and not blank, that names from files cannot break them, their file names, and
that the same input gives the same bytes."""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
import threading
import xml.etree.ElementTree as ElementTree
from typing import Any

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import matplotlib.image
from matplotlib.cbook import is_math_text
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from tests.engine.spectra import orthogonal, with_singular_values
from tests.results_factory import report, result, spec
from wwcli.engine import analyze_layer_spectrum
from wwcli.engine.results import FitStatus, Verdict
from wwcli.report import plots
from wwcli.report.escape import printable
from wwcli.results import LayerResult, Spectrum

ROWS, COLUMNS, RANK = 600, 300, 250
"""The planted layer: 600 x 300 of rank 250, so 50 of its 300 eigenvalues are (round-off) zeros."""

HOSTILE_NAMES = [
    "$\\alpha$",
    "\x1b[2J",
    "../../etc/passwd",
    "a/b\\c",
    "$\\frac{$",
    "\\$$x$",
    "$$",
    "..",
    ".hidden..name.",
    "\u202egnp.exe",
    "名前/层.weight",
    "emoji\U0001f600.ü.Ω",
    "\n\r\t\x00",
    "x" * 5000,
]


def engine_result(
    matrix: np.ndarray[Any, Any], name: str = "encoder.layer.0.dense", layer_id: int = 7
) -> LayerResult:
    """What the run hands the plots: the engine's metrics and the eigenvalues they came from."""
    metrics, eigenvalues = analyze_layer_spectrum([matrix])
    layer = spec(layer_id, name, shape=matrix.shape)
    return LayerResult(layer, metrics, None if eigenvalues is None else Spectrum(eigenvalues))


@pytest.fixture(scope="module")
def planted() -> LayerResult:
    """A layer whose squared singular values are Pareto samples: a power-law tail to fit."""
    rng = np.random.default_rng(7)
    eigenvalues = np.sort(1.0 + rng.pareto(2.0, size=RANK))[::-1]
    layer = engine_result(with_singular_values(rng, ROWS, COLUMNS, np.sqrt(eigenvalues)))
    assert layer.metrics.fit.status is FitStatus.SUCCESS
    return layer


def artist(axes: Any, gid: str) -> Any:
    found = [child for child in axes.get_children() if child.get_gid() == gid]
    assert len(found) == 1, f"{gid}: {len(found)} artists"
    return found[0]


def png_pixels(data: bytes) -> np.ndarray[Any, Any]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return matplotlib.image.imread(io.BytesIO(data), format="png")


def assert_drawn(data: bytes, width: int, height: int) -> None:
    pixels = png_pixels(data)
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0.05
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 20


def texts(figure: Figure) -> list[str]:
    return [text.get_text() for text in figure.findobj(lambda a: hasattr(a, "get_text"))]


# --- the ESD figure -------------------------------------------------------------------------


def test_power_law_line_has_slope_minus_alpha_and_overlays_the_tail(planted: LayerResult) -> None:
    fit = planted.metrics.fit
    figure = plots.esd_figure(planted)
    panels = plots.esd_axes(figure)
    line = artist(panels.loglog, "power-law")
    x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    slope, _ = np.polyfit(np.log10(x), np.log10(y), 1)
    assert slope == pytest.approx(-fit.alpha, abs=1e-6)
    assert (x[0], x[-1]) == pytest.approx((fit.xmin, fit.xmax), rel=1e-12)
    # The tail's density scaled by its share: at xmin, share * (alpha - 1) / xmin.
    eigenvalues = planted.spectrum.eigenvalues  # type: ignore[union-attr]
    plotted = eigenvalues[eigenvalues > plots.DEFAULT_THRESHOLD]
    share = np.count_nonzero(plotted >= fit.xmin) / plotted.size
    assert np.count_nonzero(plotted >= fit.xmin) == fit.num_pl_spikes
    assert y[0] == pytest.approx(share * (fit.alpha - 1) / fit.xmin, rel=1e-12)
    assert f"alpha = {fit.alpha:.3f}" in line.get_label()
    assert f"D = {fit.D:.3f}" in line.get_label()
    assert panels.loglog.get_xscale() == "log" and panels.loglog.get_yscale() == "log"
    span = artist(panels.loglog, "tail")
    assert span.get_x() == pytest.approx(fit.xmin)
    assert span.get_x() + span.get_width() == pytest.approx(fit.xmax)


def test_xmin_lines_sit_at_xmin(planted: LayerResult) -> None:
    figure = plots.esd_figure(planted)
    panels = plots.esd_axes(figure)
    for axes, gid in ((panels.loglog, "xmin-loglog"), (panels.linear, "xmin-linear")):
        line = artist(axes, gid)
        assert list(line.get_xdata()) == [planted.metrics.fit.xmin] * 2
        assert line.get_label() == f"xmin = {planted.metrics.fit.xmin:.4g}"


@pytest.mark.parametrize("gid", ["histogram-loglog", "histogram-linear"])
def test_histograms_are_densities_of_the_eigenvalues_above_the_threshold(
    planted: LayerResult, gid: str
) -> None:
    eigenvalues = planted.spectrum.eigenvalues  # type: ignore[union-attr]
    kept = eigenvalues[eigenvalues > plots.DEFAULT_THRESHOLD]
    # The planted zeros (rank 250 of 300) are the ones left out, and the label says so.
    assert planted.metrics.num_evals - kept.size == COLUMNS - RANK
    figure = plots.esd_figure(planted)
    panels = plots.esd_axes(figure)
    axes = panels.loglog if gid.endswith("loglog") else panels.linear
    heights, edges, _ = artist(axes, gid).get_data()
    widths = np.diff(edges)
    assert float(np.sum(heights * widths)) == pytest.approx(1.0, rel=1e-12)
    label = artist(axes, gid).get_label()
    match = re.fullmatch(r"ESD: (\d+) eigenvalues > 1e-05 \((\d+) at or below not shown\)", label)
    assert match, label
    shown, dropped = int(match[1]), int(match[2])
    assert shown == kept.size and dropped == COLUMNS - RANK
    counts = heights * widths * shown
    assert counts == pytest.approx(np.round(counts), abs=1e-9)
    np.testing.assert_array_equal(np.round(counts), np.histogram(kept, bins=edges)[0])
    assert np.round(counts).sum() == shown
    if gid.endswith("loglog"):
        ratios = edges[1:] / edges[:-1]
        np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)  # log-spaced
    else:
        assert len(edges) == 101


def test_esd_png_is_the_size_asked_and_not_blank(planted: LayerResult) -> None:
    figure = plots.esd_figure(planted, checkpoint="runs/model.safetensors")
    assert_drawn(plots.figure_bytes(figure), 1200, 450)
    assert_drawn(plots.figure_bytes(figure, dpi=50), 600, 225)
    title = figure.get_suptitle()
    assert "runs/model.safetensors" in title and "layer 7: encoder.layer.0.dense" in title
    assert "(600x300)" in title and f"alpha = {planted.metrics.alpha:.3f}" in title
    assert "typical" in title


def test_a_failed_fit_is_drawn_with_its_reason() -> None:
    rng = np.random.default_rng(3)
    rank_one = np.outer(rng.standard_normal(200), rng.standard_normal(80))
    layer = engine_result(rank_one)
    fit = layer.metrics.fit
    assert fit.status is FitStatus.FAILED and fit.message
    figure = plots.esd_figure(layer)
    assert printable(fit.message).replace("$", r"\$") in figure.get_suptitle()
    assert "fit failed" in figure.get_suptitle()
    panels = plots.esd_axes(figure)
    assert not [line for line in panels.loglog.lines if line.get_gid() == "power-law"]
    assert artist(panels.loglog, "histogram-loglog") is not None
    assert_drawn(plots.figure_bytes(figure), 1200, 450)


def test_no_eigenvalues_says_why() -> None:
    weights = np.ones((60, 20))
    weights[3, 4] = np.nan
    layer = engine_result(weights)
    assert layer.spectrum is None and layer.metrics.fit.message == "non-finite weights"
    figure = plots.esd_figure(layer)
    assert any("no eigenvalues" in text and "non-finite weights" in text for text in texts(figure))
    with pytest.raises(ValueError, match="no ESD panels"):
        plots.esd_axes(figure)
    pixels = png_pixels(plots.figure_bytes(figure))
    assert pixels.shape[:2] == (450, 1200) and pixels[..., :3].std() > 0.01


def test_a_spectrum_not_kept_says_so(planted: LayerResult) -> None:
    layer = LayerResult(planted.spec, planted.metrics)
    figure = plots.esd_figure(layer)
    assert any("did not keep the eigenvalues" in text for text in texts(figure))


def test_all_eigenvalues_below_the_threshold() -> None:
    layer = engine_result(np.full((40, 10), 1e-4) * np.eye(40, 10))  # eigenvalues 1e-8
    figure = plots.esd_figure(layer)
    assert any("at or below 1e-05" in text for text in texts(figure))
    plots.figure_bytes(figure)


def test_a_curve_can_be_added_to_both_panels(planted: LayerResult) -> None:
    figure = plots.esd_figure(planted)
    x = np.linspace(0.0, 5.0, 50)
    density = np.exp(-x)
    plots.add_esd_curve(figure, x, density, label="MP bulk $x$", gid="mp-bulk", color="green")
    panels = plots.esd_axes(figure)
    on_log = artist(panels.loglog, "mp-bulk")
    assert len(on_log.get_xdata()) == 49  # x = 0 has no place on a log axis
    assert len(artist(panels.linear, "mp-bulk").get_xdata()) == 50
    labels = [text.get_text() for text in panels.linear.get_legend().get_texts()]
    assert labels[-1] == r"MP bulk \$x\$" and not is_math_text(labels[-1])
    assert_drawn(plots.figure_bytes(figure), 1200, 450)


@pytest.mark.parametrize(
    ("alpha", "xmin", "xmax", "share"),
    [(2.5, 1.3, 40.0, 0.3), (1.0, 2.0, 9.0, 1.0), (0.6, 1.0, 5.0, 0.5)],
)
def test_power_law_density_integrates_to_the_tail_share(
    alpha: float, xmin: float, xmax: float, share: float
) -> None:
    x = np.geomspace(xmin, xmax if alpha <= 1 else xmax * 1e6, 200_001)
    density = plots.power_law_density(alpha, xmin, xmax, share, x)
    assert float(np.trapezoid(density, x)) == pytest.approx(share, rel=2e-3)


# --- names from files -----------------------------------------------------------------------


@pytest.mark.filterwarnings("error")  # a glyph the font lacks would warn on stderr
@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=lambda name: ascii(name)[:30])
def test_hostile_names_render_and_give_safe_file_names(planted: LayerResult, name: str) -> None:
    layer = LayerResult(spec(12, name, shape=(600, 300)), planted.metrics, planted.spectrum)
    figure = plots.esd_figure(layer, checkpoint=name)
    for text in texts(figure):
        assert not is_math_text(text), text
        assert not re.search("[\x00-\x09\x0b-\x1f\x7f\u202e]", text), ascii(text)
    assert figure.get_suptitle().count("\n") == 1  # the title's own line break, no other
    plots.figure_bytes(figure)
    ElementTree.fromstring(plots.figure_bytes(figure, image_format="svg"))
    for image_format in plots.IMAGE_FORMATS:
        file_name = plots.plot_file_name(layer, image_format)
        assert re.fullmatch(r"0012-[A-Za-z0-9._-]+\." + image_format, file_name), file_name
        assert ".." not in file_name and len(file_name) <= 5 + 80 + 4
        assert file_name == plots.plot_file_name(layer, image_format)
        overview = plots.overview_file_name(name, 3, image_format)
        assert re.fullmatch(r"overview-03-[A-Za-z0-9._-]+\." + image_format, overview), overview
        assert ".." not in overview


def test_characters_the_font_lacks_are_shown_as_escapes(planted: LayerResult) -> None:
    layer = LayerResult(spec(1, "名.ü\U0010fffd"), planted.metrics, planted.spectrum)
    title = plots.esd_figure(layer).get_suptitle()
    assert "\\u540d.ü\\U0010fffd" in title


def test_file_names() -> None:
    layer = result(spec(5, "encoder.layer.0.attention.self.query"), 3.0)
    assert plots.plot_file_name(layer) == "0005-encoder.layer.0.attention.self.query.png"
    assert plots.plot_file_name(layer, "svg").endswith(".svg")
    assert plots.plot_file_name(result(spec(1, "a  b//c"), 3.0)) == "0001-a_b_c.png"
    assert plots.plot_file_name(result(spec(1, "...x...y..."), 3.0)) == "0001-x.y.png"
    assert plots.plot_file_name(result(spec(2, "/"), 3.0)) == "0002-layer.png"
    assert plots.plot_file_name(result(spec(12345, ""), 3.0)) == "12345-layer.png"
    assert plots.overview_file_name("runs/step-100/model.pt", 0) == "overview-00-model.pt.png"
    assert plots.overview_file_name("C:\\models\\bert\\", 1) == "overview-01-bert.png"
    assert plots.overview_file_name("..", 2) == "overview-02-checkpoint.png"
    assert plots.overview_file_name("", 2, "svg") == "overview-02-checkpoint.svg"
    with pytest.raises(ValueError, match="image_format"):
        plots.plot_file_name(layer, "../png")


# --- the overview ---------------------------------------------------------------------------


def test_overview_colours_layers_by_verdict() -> None:
    alphas = [1.5, 3.0, 7.5, math.nan, 4.0, 1.9, math.nan]
    layers = [result(spec(i + 1, f"layer.{i}"), alpha) for i, alpha in enumerate(alphas)]
    figure = plots.overview_figure(report(layers, checkpoint="runs/m\x1b]0;x\x07.pt"))
    alpha_axes, norm_axes = figure.axes
    points = {
        verdict: artist(alpha_axes, f"alpha-{verdict.value}")
        for verdict in (Verdict.TYPICAL, Verdict.OVER_TRAINED, Verdict.UNDER_TRAINED)
    }
    fitted = sum(len(line.get_xdata()) for line in points.values())
    assert fitted == sum(not math.isnan(a) for a in alphas) == 5
    assert list(points[Verdict.OVER_TRAINED].get_xdata()) == [0, 5]
    assert list(points[Verdict.OVER_TRAINED].get_ydata()) == [1.5, 1.9]
    assert list(points[Verdict.UNDER_TRAINED].get_ydata()) == [7.5]
    for verdict, line in points.items():
        assert to_hex(line.get_color()) == plots.VERDICT_COLORS[verdict]
    failed = artist(alpha_axes, "alpha-failed")
    assert list(failed.get_xdata()) == [3, 6]
    assert to_hex(failed.get_color()) == plots.VERDICT_COLORS[Verdict.FAILED]
    assert list(artist(alpha_axes, "alpha-low").get_ydata()) == [2, 2]
    assert list(artist(alpha_axes, "alpha-high").get_ydata()) == [6, 6]
    assert len(artist(norm_axes, "log-spectral-norm").get_xdata()) == len(alphas)
    assert [label.get_text() for label in norm_axes.get_xticklabels()] == [
        f"layer.{i}" for i in range(len(alphas))
    ]
    assert figure.get_suptitle() == "runs/m\\x1b]0;x\\x07.pt"
    assert_drawn(plots.figure_bytes(figure), 1200, 750)


def test_overview_of_many_layers_names_every_kth() -> None:
    layers = [result(spec(i, f"model.blocks.{i}.mlp.fc{i % 2}"), 2.0 + i / 50) for i in range(130)]
    figure = plots.overview_figure(report(layers))
    labels = figure.axes[1].get_xticklabels()
    assert 30 <= len(labels) <= 40
    assert labels[1].get_text() == "model.blocks.4.mlp.fc0"
    plots.figure_bytes(figure)


def test_overview_of_no_layers() -> None:
    figure = plots.overview_figure(report([]))
    assert any("no layers analyzed" in text for text in texts(figure))
    plots.figure_bytes(figure)


# --- trajectories ---------------------------------------------------------------------------


def test_trajectory_draws_one_line_per_layer() -> None:
    trajectories = {
        "layer.0": [("step-1", 3.0), ("step-2", 2.5), ("step-3", 2.1)],
        "layer.$1$": [("step-1", 4.0), ("step-3", 3.5)],
        "layer.2": [("step-2", math.nan), ("step-1", 5.0), ("step-3", 6.5)],
    }
    figure = plots.trajectory_figure(trajectories, title="sweep")
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["step-1", "step-2", "step-3"]
    second = artist(axes, "trajectory-1")
    assert list(second.get_xdata()) == [0, 2] and list(second.get_ydata()) == [4.0, 3.5]
    third = artist(axes, "trajectory-2")
    assert list(third.get_xdata()) == [0, 1, 2] and math.isnan(third.get_ydata()[1])
    assert list(artist(axes, "alpha-low").get_ydata()) == [2, 2]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == [
        "layer.0",
        r"layer.\$1\$",
        "layer.2",
    ]
    assert_drawn(plots.figure_bytes(figure), 1000, 550)


def test_trajectory_of_another_metric_and_many_layers() -> None:
    trajectories = {f"layer.{i}": [("a", float(i)), ("b", i + 0.5)] for i in range(13)}
    figure = plots.trajectory_figure(trajectories, metric="log_norm")
    axes = figure.axes[0]
    assert axes.get_legend() is None
    assert not [line for line in axes.lines if line.get_gid() in ("alpha-low", "alpha-high")]
    assert axes.get_ylabel() == "log_norm"
    plots.figure_bytes(figure, image_format="svg")


# --- output ---------------------------------------------------------------------------------


@pytest.mark.parametrize("image_format", plots.IMAGE_FORMATS)
def test_the_same_input_gives_the_same_bytes(planted: LayerResult, image_format: str) -> None:
    first = plots.figure_bytes(plots.esd_figure(planted), image_format=image_format)
    second = plots.figure_bytes(plots.esd_figure(planted), image_format=image_format)
    assert first == second
    if image_format == "svg":
        root = ElementTree.fromstring(first)
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert root.get("width") == "864pt" and root.get("height") == "324pt"
        assert b"<dc:date>" not in first


def test_figures_drawn_in_threads_match_those_drawn_in_one(planted: LayerResult) -> None:
    rng = np.random.default_rng(11)
    layers = [planted] + [
        engine_result(orthogonal(rng, 120)[:, :60] * rng.pareto(1.5 + i, 60), f"t{i}")
        for i in range(3)
    ]
    expected = [plots.figure_bytes(plots.esd_figure(layer)) for layer in layers]
    results: dict[int, list[bytes]] = {}

    def draw(worker: int) -> None:
        results[worker] = [plots.figure_bytes(plots.esd_figure(layer)) for layer in layers]

    threads = [threading.Thread(target=draw, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(results[worker] == expected for worker in range(4))


def test_figure_bytes_refuses_bad_arguments(planted: LayerResult) -> None:
    figure = plots.esd_figure(planted)
    for bad_format in ("pdf", "PNG", "../svg"):
        with pytest.raises(ValueError, match="image_format"):
            plots.figure_bytes(figure, image_format=bad_format)
    for bad_dpi in (0, -1, True, 100.0, 5000):
        with pytest.raises(ValueError, match="dpi"):
            plots.figure_bytes(figure, dpi=bad_dpi)  # type: ignore[arg-type]


# --- matplotlib stays optional --------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_importing_the_module_does_not_import_matplotlib() -> None:
    done = run_python(
        "import sys, wwcli.report.plots\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib')\n"
        "print(loaded)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_without_matplotlib_the_error_names_the_extra() -> None:
    done = run_python(
        "import sys\n"
        "sys.modules['matplotlib'] = None  # what an environment without it gives: ImportError\n"
        "from tests.results_factory import result, spec\n"
        "from wwcli.report import plots\n"
        "try:\n"
        "    plots.esd_figure(result(spec(1, 'x'), 3.0))\n"
        "except plots.PlotError as error:\n"
        "    print(error)\n"
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'wwcli[plot]'" in done.stdout
    assert "\n" not in done.stdout.strip()
