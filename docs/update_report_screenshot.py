"""Regenerate docs/report-screenshot.png: the HTML report of a shipped fixture, as headless
Chromium shows its first 1200 x 1400 pixels (summary, overview and table), with no network.

    .venv/bin/python docs/update_report_screenshot.py [--output PATH] [--html PATH]

Needs Debian's Chromium (apt-get install chromium). The report is the one `wwcli analyze`
writes: the real run layer, the real plots, wwcli.report.html.render_html.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "safetensors" / "cnn.safetensors"
SCREENSHOT = ROOT / "docs" / "report-screenshot.png"
WIDTH, HEIGHT = 1200, 1400
MAX_BYTES = 300_000
"""The committed screenshot stays small: the repository carries every version of it."""


def report_html() -> str:
    """The fixture's report page, as `wwcli analyze` renders it."""
    from wwcli.analysis import analyze_path
    from wwcli.report import plots
    from wwcli.report.html import ReportImages, render_html
    from wwcli.results import CheckpointReport, RunResult
    from wwcli.settings import RunSettings

    settings = RunSettings(keep_spectra=True)
    # The label as a user would type it from the repository root, not this machine's path.
    label = str(FIXTURE.relative_to(ROOT))
    report = analyze_path(label, settings)
    if not isinstance(report, CheckpointReport):
        raise SystemExit(f"{FIXTURE}: {report.message}")
    images = ReportImages(
        overviews={label: plots.figure_bytes(plots.overview_figure(report))},
        esd={
            (label, layer.spec.layer_id): plots.figure_bytes(
                plots.esd_figure(layer, checkpoint=label), image_format="png", dpi=100
            )
            for layer in report.layers
        },
    )
    return render_html(RunResult(settings, (report,)), images, title="wwcli report: cnn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=SCREENSHOT, help="the PNG to write")
    parser.add_argument("--html", type=Path, help="also keep the report page here")
    options = parser.parse_args()

    sys.path.insert(0, str(ROOT))  # run from anywhere: wwcli and tests.report.browser
    os.chdir(ROOT)  # the fixture's label is relative to the repository root
    from tests.report.browser import Chromium

    with tempfile.TemporaryDirectory(prefix="wwcli-screenshot-") as folder:
        page = Path(options.html) if options.html else Path(folder) / "report.html"
        page.write_text(report_html(), encoding="utf-8")
        started = time.perf_counter()
        with Chromium(timeout=60) as browser:
            tab = browser.open(page, width=WIDTH, height=HEIGHT)
            loaded = tab.evaluate("[...document.images].every(i => i.naturalWidth > 0)")
            if loaded is not True:
                raise SystemExit("the report's images did not load in Chromium")
            png = tab.screenshot()
        elapsed = time.perf_counter() - started
    if len(png) > MAX_BYTES:
        raise SystemExit(f"the screenshot is {len(png)} bytes, over {MAX_BYTES}: not written")
    options.output.write_bytes(png)
    print(f"{options.output}: {WIDTH}x{HEIGHT}, {len(png)} bytes, browser {elapsed:.1f} s")


if __name__ == "__main__":
    main()
