"""The picture pass of a run: every analyzed layer's ESD plot and every checkpoint's overview,
drawn after the numbers, in a pool of threads, as files in a folder (`--plot DIR`) or as PNG
bytes for the HTML report. It reads the run's values and never changes them; matplotlib is
imported only here and in wwcli/report/plots.py, and only when a picture is asked for."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wwcli.results import CheckpointReport, LayerResult, RunResult

if TYPE_CHECKING:
    from wwcli.report.html import ReportImages

ImageFormat = str
""""png" or "svg"."""

LayerDone = Callable[[LayerResult], None]


@dataclass(frozen=True)
class Picture:
    """One picture to draw: a layer's ESD plot, or (layer None) a checkpoint's overview."""

    index: int
    """The checkpoint's position in the run."""
    report: CheckpointReport
    """Its checkpoint's report."""
    layer: LayerResult | None
    """The layer whose ESD it is; None for the overview."""


def _pictures(run: RunResult) -> list[Picture]:
    pictures: list[Picture] = []
    for index, report in enumerate(run.reports):
        pictures.append(Picture(index, report, None))
        pictures.extend(Picture(index, report, layer) for layer in report.layers)
    return pictures


def _draw(picture: Picture, image_format: ImageFormat, dpi: int) -> bytes:
    from wwcli.report import plots

    if picture.layer is None:
        figure = plots.overview_figure(picture.report)
    else:
        figure = plots.esd_figure(picture.layer, checkpoint=picture.report.checkpoint)
    return plots.figure_bytes(figure, image_format=image_format, dpi=dpi)


def _drawn(
    run: RunResult, image_format: ImageFormat, dpi: int, jobs: int, on_layer: LayerDone | None
) -> Iterator[tuple[Picture, bytes]]:
    """Every picture of the run with its bytes, in run order, drawn in `jobs` threads (the
    figures are independent objects; pyplot, which is not thread-safe, is never used)."""
    from wwcli.report.plots import require_matplotlib

    require_matplotlib()
    pictures = _pictures(run)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for picture, data in zip(
            pictures, pool.map(lambda item: _draw(item, image_format, dpi), pictures), strict=True
        ):
            if picture.layer is not None and on_layer is not None:
                on_layer(picture.layer)
            yield picture, data


def plot_folder(run: RunResult, folder: Path, index: int) -> Path:
    """Where a checkpoint's pictures go: the folder itself for a run of one checkpoint, a
    sub-folder per checkpoint (its position and a safe form of its name) for several."""
    if len(run.reports) == 1:
        return folder
    from wwcli.report.plots import overview_file_name

    stem = overview_file_name(run.reports[index].checkpoint, index).removeprefix("overview-")
    return folder / stem.rsplit(".", 1)[0]


def write_plots(
    run: RunResult,
    folder: Path,
    *,
    image_format: ImageFormat = "png",
    dpi: int = 100,
    jobs: int = 1,
    on_layer: LayerDone | None = None,
) -> list[Path]:
    """Draw every picture of the run into `folder` (created if needed): per checkpoint an
    overview and one ESD plot per analyzed layer, with stable, safe names. Returns the files."""
    from wwcli.report.plots import overview_file_name, plot_file_name

    written: list[Path] = []
    for picture, data in _drawn(run, image_format, dpi, jobs, on_layer):
        target = plot_folder(run, folder, picture.index)
        target.mkdir(parents=True, exist_ok=True)
        if picture.layer is None:
            name = overview_file_name(picture.report.checkpoint, picture.index, image_format)
        else:
            name = plot_file_name(picture.layer, image_format)
        path = target / name
        path.write_bytes(data)
        written.append(path)
    return written


def report_images(
    run: RunResult, *, dpi: int = 100, jobs: int = 1, on_layer: LayerDone | None = None
) -> ReportImages:
    """Every picture of the run as PNG bytes, for the HTML report."""
    from wwcli.report.html import ReportImages

    overviews: dict[str, bytes] = {}
    esd: dict[tuple[str, int], bytes] = {}
    for picture, data in _drawn(run, "png", dpi, jobs, on_layer):
        if picture.layer is None:
            overviews[picture.report.checkpoint] = data
        else:
            esd[(picture.report.checkpoint, picture.layer.spec.layer_id)] = data
    return ReportImages(overviews=overviews, esd=esd)
