"""The HTML report: one self-contained page, checked as text (parsed with the stdlib's
html.parser) and in a real headless Chromium with no network (tests/report/browser.py).

The run is the real run layer on a shipped fixture, and the images are the real plots
(wwcli/report/plots.py), so the page under test is the page `wwcli analyze --html` writes."""

from __future__ import annotations

import base64
import dataclasses
import functools
import html
import io
import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from tests.report.browser import MISSING_REASON, Chromium, chromium_path
from wwcli import __version__
from wwcli.analysis import analyze_path
from wwcli.engine.results import Verdict
from wwcli.report import plots
from wwcli.report.columns import ANALYZE_REGISTRY, table_views
from wwcli.report.escape import printable
from wwcli.report.html import CONTENT_SECURITY_POLICY, ReportImages, render_html, verdict_class
from wwcli.report.table import summary_lines
from wwcli.results import CheckpointReport, InputFailure, RunResult
from wwcli.settings import RunSettings

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "fixtures" / "safetensors" / "cnn.safetensors"
SETTINGS = RunSettings(keep_spectra=True)

HOSTILE = (
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "\x1b]0;t\x07",
    "</title>",
)
"""Names a file could hold: markup, an attribute break-out, a terminal escape, a title closer."""
HOSTILE_NAME = "".join(HOSTILE)


# ---------------------------------------------------------------------------------------------
# The run and its images


@functools.cache
def cnn_report() -> CheckpointReport:
    report = analyze_path(str(FIXTURE), SETTINGS)
    assert isinstance(report, CheckpointReport), report
    return report


@functools.cache
def _drawn(report: CheckpointReport) -> ReportImages:
    return ReportImages(
        overviews={report.checkpoint: plots.figure_bytes(plots.overview_figure(report))},
        esd={
            (report.checkpoint, layer.spec.layer_id): plots.figure_bytes(
                plots.esd_figure(layer, checkpoint=report.checkpoint), image_format="png", dpi=100
            )
            for layer in report.layers
        },
    )


def images_for(report: CheckpointReport) -> ReportImages:
    """The real plots of a report: an overview and one ESD per analyzed layer."""
    return _drawn(report)


def cnn_run() -> RunResult:
    return RunResult(SETTINGS, (cnn_report(),))


def hostile_report() -> CheckpointReport:
    """The fixture's report with every string a file supplies made hostile: the path, layer and
    skipped names, skip reasons, a fit message and both notes (their numbers stay real)."""
    report = cnn_report()
    layers = []
    for index, layer in enumerate(report.layers):
        spec = dataclasses.replace(layer.spec, name=f"{HOSTILE[index % len(HOSTILE)]}{index}")
        fit = dataclasses.replace(layer.metrics.fit, message=HOSTILE_NAME)
        metrics = dataclasses.replace(layer.metrics, fit=fit)
        layers.append(dataclasses.replace(layer, spec=spec, metrics=metrics))
    skipped = [
        dataclasses.replace(layer, name=HOSTILE_NAME, reason=HOSTILE[1]) for layer in report.skipped
    ]
    return dataclasses.replace(
        report,
        checkpoint=f"models/{HOSTILE_NAME}.safetensors",
        ids_note=HOSTILE[0],
        source_note=HOSTILE[3],
        layers=tuple(layers),
        skipped=tuple(skipped),
    )


def with_verdicts(report: CheckpointReport, verdicts: list[Verdict]) -> CheckpointReport:
    """The report with its layers' verdicts set (to see every row style on a real report)."""
    layers = tuple(
        dataclasses.replace(layer, metrics=dataclasses.replace(layer.metrics, verdict=verdict))
        for layer, verdict in zip(report.layers, verdicts, strict=True)
    )
    return dataclasses.replace(report, layers=layers)


def relabelled(images: ReportImages, old: str, new: str) -> ReportImages:
    return ReportImages(
        overviews={new if k == old else k: v for k, v in images.overviews.items()},
        esd={(new if c == old else c, i): v for (c, i), v in images.esd.items()},
    )


# ---------------------------------------------------------------------------------------------
# A parse of the page


@dataclasses.dataclass
class Element:
    tag: str
    attrs: dict[str, str]


class Page(HTMLParser):
    """Every start tag with its attributes, and the text inside chosen elements."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self.texts: dict[str, list[str]] = {}
        self._open: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append(Element(tag, {k: v or "" for k, v in attrs}))
        if tag not in ("img", "meta", "br", "link"):
            self._open.append(tag)
            self.texts.setdefault(tag, []).append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._open:
            while self._open.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        for tag in set(self._open):
            self.texts[tag][-1] += data

    def tags(self, tag: str) -> list[Element]:
        return [element for element in self.elements if element.tag == tag]


def render(report: CheckpointReport, images: ReportImages | None = None, **kwargs: str) -> str:
    return render_html(RunResult(SETTINGS, (report,)), images or images_for(report), **kwargs)


# ---------------------------------------------------------------------------------------------
# The page as text


def test_every_image_is_embedded_as_the_png_given() -> None:
    report = cnn_report()
    images = images_for(report)
    page = Page(render(report, images))
    sources = [img.attrs["src"] for img in page.tags("img")]
    assert len(sources) == len(images.overviews) + len(images.esd) == 5
    prefix = "data:image/png;base64,"
    assert all(src.startswith(prefix) for src in sources)
    embedded = {base64.b64decode(src[len(prefix) :], validate=True) for src in sources}
    assert embedded == {*images.overviews.values(), *images.esd.values()}
    for img in page.tags("img"):
        png = base64.b64decode(img.attrs["src"][len(prefix) :])
        assert (int(img.attrs["width"]), int(img.attrs["height"])) == plots_size(png)
        assert img.attrs["alt"]


def plots_size(png: bytes) -> tuple[int, int]:
    array = mpimg.imread(io.BytesIO(png))
    return array.shape[1], array.shape[0]


def test_nothing_points_outside_the_page() -> None:
    text = render(cnn_report())
    page = Page(text)
    for element in page.elements:
        for name in ("src", "href", "action", "srcset", "poster", "data", "formaction"):
            value = element.attrs.get(name)
            if value is None:
                continue
            assert "//" not in value.split(",", 1)[0] or value.startswith("data:"), (element, name)
            assert not re.match(r"(?i)\s*(https?|ftp|file|javascript):", value), (element, name)
            if name == "href":
                assert value.startswith("#"), element
            if name == "src":
                assert value.startswith("data:image/png;base64,"), element.tag
        assert not any(name.startswith("on") for name in element.attrs), element
    forbidden = {"script", "link", "iframe", "object", "embed", "base", "form", "frame", "svg"}
    assert not forbidden & {element.tag for element in page.elements}
    assert "http://" not in text and "https://" not in text
    assert "url(" not in text and "@import" not in text


def test_the_head_has_charset_policy_title_and_version() -> None:
    page = Page(render(cnn_report(), title="alpha of the CNN"))
    metas = page.tags("meta")
    assert metas[0].attrs == {"charset": "utf-8"}
    policy = [
        m.attrs["content"] for m in metas if m.attrs.get("http-equiv") == "Content-Security-Policy"
    ]
    assert policy == [CONTENT_SECURITY_POLICY]
    directives = dict(part.strip().split(" ", 1) for part in policy[0].split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["img-src"] == "data:"
    assert directives["style-src"] == "'unsafe-inline'"
    assert page.texts["title"] == ["alpha of the CNN"]
    assert f"wwcli {__version__}" in page.texts["footer"][0]


def test_every_fragment_link_has_exactly_one_target() -> None:
    page = Page(render(cnn_report()))
    ids = [element.attrs["id"] for element in page.elements if "id" in element.attrs]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z][a-z0-9-]*", anchor) for anchor in ids)
    links = [a.attrs["href"] for a in page.tags("a")]
    assert links and all(link.startswith("#") and link[1:] in ids for link in links)
    report = cnn_report()
    for layer in report.layers:  # each name links to its plot, each plot back to its row
        assert f"#ckpt0-layer{layer.spec.layer_id}" in links
        assert f"#ckpt0-row{layer.spec.layer_id}" in links
    figures = [f.attrs["id"] for f in page.tags("figure") if "id" in f.attrs]
    assert figures == [f"ckpt0-layer{layer.spec.layer_id}" for layer in report.layers]


def test_the_table_shows_the_terminal_columns_and_cells() -> None:
    report = cnn_report()
    text = render(report)
    views = table_views(ANALYZE_REGISTRY)
    table = text.split('<table id="ckpt0-layers">', 1)[1].split("</table>", 1)[0]
    headers = [html.unescape(h) for h in re.findall(r"<th\b[^>]*>(.*?)</th>", table)]
    assert headers == [view.header for view in views]
    rows = re.findall(r"<tr class=[^>]*>(.*?)</tr>", table)
    assert len(rows) == len(report.layers)
    for row, layer in zip(rows, report.layers, strict=True):
        cells = [
            html.unescape(re.sub(r"<[^>]+>", "", c))
            for c in re.findall(r"<td[^>]*>(.*?)</td>", row)
        ]
        assert cells == [view.cell(layer) for view in views]


def test_rows_are_styled_by_verdict_as_in_the_terminal() -> None:
    verdicts = [Verdict.OVER_TRAINED, Verdict.UNDER_TRAINED, Verdict.FAILED, Verdict.TYPICAL]
    report = with_verdicts(cnn_report(), verdicts)
    page = Page(
        render(
            report, relabelled(images_for(cnn_report()), cnn_report().checkpoint, report.checkpoint)
        )
    )
    rows = [tr for tr in page.tags("tr") if tr.attrs.get("class", "").startswith("verdict-")]
    assert [tr.attrs["class"] for tr in rows] == [
        "verdict-very-heavy-tailed",
        "verdict-light-tail",
        "verdict-failed",
        "verdict-typical",
    ]
    style = page.texts["style"][0]
    assert re.search(
        r"tr\.verdict-very-heavy-tailed td \{[^}]*font-weight: 700;[^}]*color: #b3261e;", style
    )
    assert re.search(r"tr\.verdict-light-tail td \{[^}]*color: #7a5c00;", style)
    assert re.search(r"tr\.verdict-failed td \{[^}]*color: #6e7781;", style)
    assert "verdict-typical td" not in style  # typical rows are plain, as in the terminal
    assert verdict_class(Verdict.OVER_TRAINED) == "verdict-very-heavy-tailed"


def test_summary_skipped_layers_and_settings_are_shown() -> None:
    report = cnn_report()
    page = Page(render(report))
    items = page.texts["li"]
    for line in summary_lines(report):
        assert printable(line) in items
    text = render(report)
    for skipped in report.skipped:
        assert f"<td>{html.escape(skipped.reason)}</td>" in text
        assert f'<td class="name">{skipped.name}</td>' in text
    terms = page.texts["dt"]
    assert terms == list(SETTINGS.to_json())
    values = dict(zip(terms, page.texts["dd"], strict=True))
    assert values["keep_spectra"] == "true" and values["device"] == '"cpu"'


def test_a_layer_without_an_image_is_listed_without_a_link() -> None:
    report = cnn_report()
    full = images_for(report)
    missing = report.layers[1].spec.layer_id
    images = ReportImages(
        overviews={}, esd={key: png for key, png in full.esd.items() if key[1] != missing}
    )
    page = Page(render(report, images))
    assert len(page.tags("img")) == len(report.layers) - 1
    links = [a.attrs["href"] for a in page.tags("a")]
    assert f"#ckpt0-layer{missing}" not in links and f"#ckpt0-row{missing}" not in links
    assert report.layers[1].spec.name in page.texts["td"]  # still in the table, as text
    assert not any("overview" in f.attrs.get("class", "") for f in page.tags("figure"))


def test_hostile_names_are_text_never_markup() -> None:
    report = hostile_report()
    images = relabelled(images_for(cnn_report()), cnn_report().checkpoint, report.checkpoint)
    title = f"{HOSTILE_NAME} report"
    text = render(report, images, title=title)
    page = Page(text)
    assert {e.tag for e in page.elements} <= {
        "html", "head", "meta", "title", "style", "body", "header", "h1", "p", "nav", "ul",
        "li", "a", "code", "main", "section", "h2", "figure", "img", "h3", "table", "thead",
        "tr", "th", "tbody", "td", "figcaption", "span", "dl", "dt", "dd", "footer",
    }  # fmt: skip
    assert len(page.tags("img")) == 5 and not page.tags("script")
    assert all(set(img.attrs) == {"src", "width", "height", "alt"} for img in page.tags("img"))
    assert "\x1b" not in text and "\x07" not in text
    assert text.count("<title>") == 1 and text.count("</title>") == 1
    assert text.count("<script") == 0 and "<img src=x" not in text
    assert html.escape(printable(HOSTILE_NAME), quote=True) in text
    # Parsed back, the text is exactly what the file held, control characters shown escaped.
    assert page.texts["title"] == [printable(title)]
    assert page.texts["h2"][0] == printable(report.checkpoint)
    assert [printable(layer.spec.name) for layer in report.layers] == [
        cell
        for cell in page.texts["td"]
        if cell in {printable(h) + str(i) for i, h in enumerate(HOSTILE)}
    ]
    assert f"note: {HOSTILE[0]}" in page.texts["li"] and f"note: {HOSTILE[3]}" in page.texts["li"]
    assert page.texts["td"].count(HOSTILE[1]) == len(report.skipped)  # the skip reasons
    alts = [img.attrs["alt"] for img in page.tags("img")]
    assert f"overview of {printable(report.checkpoint)}" in alts


def test_unreadable_inputs_are_listed_escaped() -> None:
    failure = InputFailure(f"{HOSTILE_NAME}.pt", f"{HOSTILE_NAME}.pt: not a checkpoint")
    run = RunResult(SETTINGS, (cnn_report(),), (failure,))
    page = Page(render_html(run, images_for(cnn_report())))
    assert printable(failure.message) in page.texts["li"]
    assert not page.tags("script")
    assert "#failures" in [a.attrs["href"] for a in page.tags("a")]


def test_the_same_run_renders_to_the_same_text() -> None:
    first = render_html(cnn_run(), images_for(cnn_report()))
    images = images_for(cnn_report())
    again = ReportImages(dict(images.overviews), dict(reversed(list(images.esd.items()))))
    assert render_html(cnn_run(), again) == first
    fresh = analyze_path(str(FIXTURE), SETTINGS)
    assert isinstance(fresh, CheckpointReport)
    assert render_html(RunResult(SETTINGS, (fresh,)), images) == first


def test_images_must_be_png() -> None:
    report = cnn_report()
    with pytest.raises(ValueError, match="PNG"):
        render(report, ReportImages({report.checkpoint: b"GIF89a" + bytes(40)}, {}))


def test_checkpoints_keep_input_order_and_their_own_anchors() -> None:
    first = cnn_report()
    second = dataclasses.replace(first, checkpoint="copy/of/cnn.safetensors")
    images = images_for(first)
    both = ReportImages(
        {**images.overviews, **relabelled(images, first.checkpoint, second.checkpoint).overviews},
        {**images.esd, **relabelled(images, first.checkpoint, second.checkpoint).esd},
    )
    page = Page(render_html(RunResult(SETTINGS, (first, second)), both))
    assert page.texts["h2"][:2] == [first.checkpoint, second.checkpoint]
    sections = [s.attrs["id"] for s in page.tags("section")]
    assert sections == ["ckpt0", "ckpt1", "settings"]
    assert len(page.tags("img")) == 10


# ---------------------------------------------------------------------------------------------
# The page in a real browser

needs_chromium = pytest.mark.skipif(
    chromium_path() is None,
    reason=f"SKIPPED LOUDLY, the HTML report was not opened: {MISSING_REASON}",
)

PROBE = """JSON.stringify({
  title: document.title,
  images: [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
  scripts: document.scripts.length,
  handlers: document.querySelectorAll('[onerror], [onload], [onclick]').length,
  h2: [...document.querySelectorAll('h2')].map(h => h.textContent),
  dangling: [...document.querySelectorAll('a[href]')]
    .map(a => a.getAttribute('href'))
    .filter(h => !h.startsWith('#') || !document.getElementById(h.slice(1))),
  width: document.documentElement.clientWidth,
})"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    with Chromium(timeout=60) as chromium:
        yield chromium
    assert not chromium.group_alive(), "a Chromium process outlived the test"


def only_local(requests: list[str]) -> bool:
    return all(url.startswith(("file://", "data:image/png;base64,")) for url in requests)


@needs_chromium
def test_the_report_opens_offline_with_every_image_loaded(
    browser: Chromium, tmp_path: Path
) -> None:
    report = cnn_report()
    path = tmp_path / "report.html"
    path.write_text(render(report, title="cnn report"), encoding="utf-8")
    tab = browser.open(path, width=1200, height=900)
    state = json.loads(tab.evaluate(PROBE))
    assert state["title"] == "cnn report"
    assert len(state["images"]) == 5
    assert all(complete and width > 0 and height > 0 for complete, width, height in state["images"])
    assert state["scripts"] == 0 and state["handlers"] == 0 and state["dangling"] == []
    assert state["h2"][0] == report.checkpoint
    assert only_local(tab.requests), tab.requests
    assert not [entry for entry in tab.log if entry.get("level") == "error"], tab.log

    screenshot = mpimg.imread(io.BytesIO(tab.screenshot()))
    assert screenshot.shape[:2] == (900, 1200)
    pixels = screenshot[..., :3].reshape(-1, 3)
    assert float(pixels.std()) > 0.05  # not a blank page (a white one has 0)
    assert len(np.unique((pixels * 255).astype(np.uint8), axis=0)) > 100  # text, plot, colours


@needs_chromium
def test_rows_are_styled_in_the_browser(browser: Chromium, tmp_path: Path) -> None:
    verdicts = [Verdict.OVER_TRAINED, Verdict.UNDER_TRAINED, Verdict.FAILED, Verdict.TYPICAL]
    report = with_verdicts(cnn_report(), verdicts)
    path = tmp_path / "styled.html"
    path.write_text(render(report), encoding="utf-8")
    tab = browser.open(path)
    styles = json.loads(
        tab.evaluate(
            """JSON.stringify(
              [...document.querySelectorAll('tr[class^="verdict-"] td:nth-child(3)')]
              .map(td => [getComputedStyle(td).fontWeight, getComputedStyle(td).color]))"""
        )
    )
    assert styles[0] == ["700", "rgb(179, 38, 30)"]  # very heavy-tailed: bold red
    assert styles[1][1] == "rgb(122, 92, 0)"  # light tail: (dark) yellow
    assert styles[2][1] == "rgb(110, 119, 129)"  # failed: dim
    assert styles[3] == ["400", "rgb(31, 35, 40)"]  # typical: plain


@needs_chromium
def test_hostile_names_stay_text_in_the_browser(browser: Chromium, tmp_path: Path) -> None:
    report = hostile_report()
    images = relabelled(images_for(cnn_report()), cnn_report().checkpoint, report.checkpoint)
    title = f"{HOSTILE_NAME} report"
    path = tmp_path / "hostile.html"
    path.write_text(render(report, images, title=title), encoding="utf-8")
    tab = browser.open(path)
    state = json.loads(tab.evaluate(PROBE))
    assert state["title"] == printable(title)
    assert state["h2"][0] == printable(report.checkpoint)
    assert state["scripts"] == 0 and state["handlers"] == 0 and state["dangling"] == []
    assert len(state["images"]) == 5 and all(width > 0 for _, width, _ in state["images"])
    assert only_local(tab.requests), tab.requests


@needs_chromium
def test_the_policy_stops_markup_that_got_in(browser: Chromium, tmp_path: Path) -> None:
    """Were a name ever to become markup, the page's policy would still run and load nothing:
    a script and a remote image spliced into the page are refused by the browser."""
    text = render(cnn_report())
    injected = (
        "<script>document.title = 'ran';</script>"
        '<img id="remote" src="http://127.0.0.1:9/x.png">'
        '<img id="handler" src="data:," onerror="document.title = \'handler ran\'">'
    )
    path = tmp_path / "injected.html"
    path.write_text(text.replace("<main>", f"<main>{injected}", 1), encoding="utf-8")
    tab = browser.open(path)
    state = json.loads(tab.evaluate(PROBE))
    assert state["title"] == "wwcli report"  # neither the script nor the handler ran
    remote = tab.evaluate("document.getElementById('remote').naturalWidth")
    assert remote == 0
    remote = [url for url in tab.requests if not url.startswith(("file:", "data:"))]
    assert remote == ["http://127.0.0.1:9/x.png"]
    assert tab.failed == {remote[0]: "csp"}, tab.failed  # refused by the policy, not the network
    refused = " ".join(e["text"] for e in tab.log if e.get("source") == "security")
    for action in (
        "Executing inline script",
        "Executing inline event handler",
        "Loading the image",
    ):
        pattern = rf"{action}( '[^']*')? violates the following Content Security Policy"
        assert re.search(pattern, refused), tab.log


@needs_chromium
def test_the_browser_leaves_no_process_behind() -> None:
    with Chromium(timeout=30) as chromium:
        assert chromium.group_alive()
        group = chromium.process_group
    assert group is not None and not chromium.group_alive()
