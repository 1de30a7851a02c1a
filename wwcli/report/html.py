"""The report as one self-contained HTML page: summaries, tables and ESD plots of every
checkpoint of a run, for people to open in a browser, mail or attach to a CI run.

Self-contained because it is read where there may be no network and no wwcli: images are
embedded as `data:` PNGs, the style is inline, and there is no JavaScript and no URL of any kind
(the only links are fragments inside the page). Every string that came from a file (paths, layer
names, skip reasons, fit messages, notes) is data: `printable` shows its control characters as
escapes, as in the terminal, and `html.escape` makes it text, never markup. The page's
Content-Security-Policy allows nothing but inline style and `data:` images, so even a name that
became markup through some bug could load nothing and run nothing.

The output is a function of its inputs alone (no date, no host, no random ids): the same run
renders to the same bytes, so reports can be compared and committed.
"""

from __future__ import annotations

import base64
import html
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from wwcli import __version__
from wwcli.engine.results import Verdict
from wwcli.report.columns import (
    ANALYZE_REGISTRY,
    VERDICT_VALUES,
    VERDICT_WORDS,
    TableView,
    table_views,
)
from wwcli.report.escape import printable
from wwcli.report.rows import run_groups
from wwcli.report.table import VERDICT_STYLES, summary_lines
from wwcli.results import CheckpointReport, InputFailure, LayerResult, RunResult, SkippedLayer

__all__ = ["CONTENT_SECURITY_POLICY", "ReportImages", "render_html", "verdict_class"]

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'"
)
"""What the page may load: its own inline style and `data:` images, nothing else. base-uri and
form-action are not covered by default-src, so they are closed too."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_STYLE_WORDS: dict[str, str] = {
    "bold": "font-weight: 700;",
    "dim": "color: #6e7781;",
    "red": "color: #b3261e;",
    "yellow": "color: #7a5c00; background: #fff5c2;",
}
"""The terminal's style words (VERDICT_STYLES) as CSS, so a row reads as it does in the table:
dark yellow on light yellow, because yellow text on white cannot be read."""

_BASE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
  margin: 0 auto; padding: 1rem 2rem 3rem; max-width: 80rem; color: #1f2328; background: #fff;
  line-height: 1.4; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; margin-top: 2.5rem; border-bottom: 1px solid #d0d7de;
  padding-bottom: 0.2rem; overflow-wrap: anywhere; }
h3 { font-size: 1.05rem; margin-top: 1.6rem; }
.meta { color: #59636e; margin-top: 0; }
code, pre, .name { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 0.9em; }
ul.summary { padding-left: 1.2rem; }
ul.summary li { overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #d8dee4; text-align: left;
  vertical-align: top; }
th { background: #f6f8fa; border-bottom: 2px solid #d0d7de; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.name { overflow-wrap: anywhere; max-width: 28rem; }
a { color: #0969da; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d8dee4; }
figure.overview img { max-width: min(100%, 60rem); }
figcaption { font-size: 0.9rem; color: #59636e; overflow-wrap: anywhere; }
figure.esd { display: inline-block; vertical-align: top; margin-right: 1rem; max-width: 100%; }
dl.settings { display: grid; grid-template-columns: max-content auto; gap: 0.1rem 1rem;
  font-size: 0.9rem; }
dl.settings dt { font-weight: 600; }
dl.settings dd { margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas,
  monospace; overflow-wrap: anywhere; }
.failure { color: #b3261e; overflow-wrap: anywhere; }
footer { margin-top: 3rem; color: #59636e; font-size: 0.85rem; }
"""


@dataclass(frozen=True)
class ReportImages:
    """PNG bytes to embed: per checkpoint an overview figure, per (checkpoint, layer_id) an ESD
    plot. Keys are the checkpoint label as the report holds it (CheckpointReport.checkpoint); a
    checkpoint or layer without an image is shown without one."""

    overviews: Mapping[str, bytes] = field(default_factory=dict)
    """Checkpoint label -> PNG bytes of its overview figure."""
    esd: Mapping[tuple[str, int], bytes] = field(default_factory=dict)
    """(checkpoint label, layer_id) -> PNG bytes of that layer's ESD plot."""


def verdict_class(verdict: Verdict) -> str:
    """The CSS class of a row with this verdict ("verdict-very-heavy-tailed", the row's
    `verdict` value): from the enum, never from a file."""
    return f"verdict-{VERDICT_VALUES[verdict]}"


def _css() -> str:
    rules = [_BASE_CSS.strip()]
    for verdict, style in VERDICT_STYLES.items():
        declarations = " ".join(_STYLE_WORDS[word] for word in style.split())
        if declarations:
            rules.append(f"tr.{verdict_class(verdict)} td {{ {declarations} }}")
    return "\n".join(rules)


def _text(value: str) -> str:
    """Text from anywhere (a file above all) as HTML text: controls shown escaped, then every
    markup character, quotes included, as an entity."""
    return html.escape(printable(value), quote=True)


def _image_size(png: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; ValueError for bytes that are not a PNG (the
    page says image/png, so it must be one)."""
    if len(png) < 24 or not png.startswith(_PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("images: every image must be PNG bytes")
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)


def _img(png: bytes, alt: str) -> str:
    width, height = _image_size(png)
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<img src="data:image/png;base64,{data}" width="{width}" height="{height}" '
        f'alt="{_text(alt)}">'
    )


@dataclass(frozen=True)
class _Anchors:
    """The fragment ids of one checkpoint's section: built from its position in the run and
    from layer ids (integers), never from names, so they are unique and need no escaping."""

    index: int
    """The checkpoint's position among the run's reports."""

    @property
    def section(self) -> str:
        return f"ckpt{self.index}"

    @property
    def table(self) -> str:
        return f"ckpt{self.index}-layers"

    def row(self, layer_id: int) -> str:
        return f"ckpt{self.index}-row{layer_id}"

    def plot(self, layer_id: int) -> str:
        return f"ckpt{self.index}-layer{layer_id}"


def _layer_table(
    report: CheckpointReport,
    anchors: _Anchors,
    images: ReportImages,
    views: Sequence[TableView[LayerResult]],
) -> list[str]:
    header = "".join(
        f'<th class="num" scope="col">{_text(view.header)}</th>'
        if view.numeric
        else f'<th scope="col">{_text(view.header)}</th>'
        for view in views
    )
    lines = [f'<table id="{anchors.table}">', f"<thead><tr>{header}</tr></thead>", "<tbody>"]
    rows_seen: set[int] = set()
    for result in report.layers:
        layer_id = result.spec.layer_id
        # Loaders number layers uniquely; should two ever share an id, only the first row
        # carries the anchor, so the page's ids stay unique.
        row_id = f' id="{anchors.row(layer_id)}"' if layer_id not in rows_seen else ""
        rows_seen.add(layer_id)
        has_plot = (report.checkpoint, layer_id) in images.esd
        cells = []
        for view in views:
            text = _text(view.cell(result))
            if view.header == "name":
                if has_plot:
                    text = f'<a href="#{anchors.plot(layer_id)}">{text}</a>'
                cells.append(f'<td class="name">{text}</td>')
            else:
                cells.append(f'<td class="num">{text}</td>' if view.numeric else f"<td>{text}</td>")
        css = verdict_class(result.metrics.verdict)
        lines.append(f'<tr class="{css}"{row_id}>{"".join(cells)}</tr>')
    lines.extend(["</tbody>", "</table>"])
    return lines


def _skipped_table(skipped: Sequence[SkippedLayer]) -> list[str]:
    lines = [
        "<table>",
        '<thead><tr><th class="num" scope="col">id</th><th scope="col">name</th>'
        '<th scope="col">type</th><th scope="col">reason</th></tr></thead>',
        "<tbody>",
    ]
    for layer in skipped:
        lines.append(
            f'<tr class="skipped"><td class="num">{layer.layer_id}</td>'
            f'<td class="name">{_text(layer.name)}</td><td>{_text(layer.layer_type)}</td>'
            f"<td>{_text(layer.reason)}</td></tr>"
        )
    lines.extend(["</tbody>", "</table>"])
    return lines


def _esd_figures(report: CheckpointReport, anchors: _Anchors, images: ReportImages) -> list[str]:
    lines: list[str] = []
    shown: set[int] = set()
    for result in report.layers:
        layer_id = result.spec.layer_id
        png = images.esd.get((report.checkpoint, layer_id))
        if png is None or layer_id in shown:
            continue
        shown.add(layer_id)
        name = result.spec.name
        words = VERDICT_WORDS[result.metrics.verdict]
        lines.append(
            f'<figure class="esd" id="{anchors.plot(layer_id)}">'
            f"{_img(png, f'ESD of layer {layer_id} {name}')}"
            f'<figcaption>layer {layer_id} <span class="name">{_text(name)}</span>: '
            f"{_text(words)} &middot; "
            f'<a href="#{anchors.row(layer_id)}">back to the table</a></figcaption>'
            "</figure>"
        )
    return lines


def _checkpoint_section(
    report: CheckpointReport,
    anchors: _Anchors,
    images: ReportImages,
    views: Sequence[TableView[LayerResult]],
) -> list[str]:
    lines = [
        f'<section id="{anchors.section}">',
        f"<h2><code>{_text(report.checkpoint)}</code></h2>",
        '<ul class="summary">',
        *(f"<li>{_text(line)}</li>" for line in summary_lines(report)),
        "</ul>",
    ]
    overview = images.overviews.get(report.checkpoint)
    if overview is not None:
        lines.extend(
            [
                '<figure class="overview">',
                _img(overview, f"overview of {report.checkpoint}"),
                "</figure>",
            ]
        )
    lines.append("<h3>Analyzed layers</h3>")
    if report.layers:
        lines.extend(_layer_table(report, anchors, images, views))
    else:
        lines.append("<p>No layer was analyzed.</p>")
    if report.skipped:
        lines.append("<h3>Skipped layers</h3>")
        lines.extend(_skipped_table(report.skipped))
    figures = _esd_figures(report, anchors, images)
    if figures:
        lines.append("<h3>Empirical spectral densities</h3>")
        lines.extend(figures)
    lines.append("</section>")
    return lines


def _failures_section(failures: Sequence[InputFailure]) -> list[str]:
    return [
        '<section id="failures">',
        "<h2>Inputs that could not be read</h2>",
        "<ul>",
        *(f'<li class="failure">{_text(failure.message)}</li>' for failure in failures),
        "</ul>",
        "</section>",
    ]


def _settings_section(run: RunResult) -> list[str]:
    lines = ['<section id="settings">', "<h2>Run settings</h2>", '<dl class="settings">']
    for key, value in run.settings.to_json().items():
        shown = json.dumps(value, ensure_ascii=False, allow_nan=True)
        lines.append(f"<dt>{_text(key)}</dt><dd>{_text(shown)}</dd>")
    lines.extend(["</dl>", "</section>"])
    return lines


def render_html(run: RunResult, images: ReportImages, *, title: str = "wwcli report") -> str:
    """The run as one HTML5 page: per checkpoint in input order its summary, overview figure,
    table of analyzed layers (rows styled by verdict, names linking to their ESD plots),
    skipped layers and ESD plots; then unreadable inputs and the run's settings. Deterministic:
    the same run and images give the same text. ValueError if an image is not a PNG."""
    views = table_views(ANALYZE_REGISTRY, run_groups(run.reports))
    body: list[str] = []
    for index, report in enumerate(run.reports):
        body.extend(_checkpoint_section(report, _Anchors(index), images, views))
    if run.failures:
        body.extend(_failures_section(run.failures))
    body.extend(_settings_section(run))

    # Contents only where there is more than one place to go (the meta line links the settings).
    entries = [
        f'<li><a href="#{_Anchors(index).section}"><code>{_text(report.checkpoint)}</code></a></li>'
        for index, report in enumerate(run.reports)
    ]
    if run.failures:
        entries.append('<li><a href="#failures">inputs that could not be read</a></li>')
    contents = ['<nav><ul class="contents">', *entries, "</ul></nav>"] if len(entries) > 1 else []
    checkpoints = len(run.reports)
    noun = "checkpoint" if checkpoints == 1 else "checkpoints"

    page = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta name="generator" content="wwcli {_text(__version__)}">',
        f"<title>{_text(title)}</title>",
        f"<style>\n{_css()}\n</style>",
        "</head>",
        "<body>",
        "<header>",
        f"<h1>{_text(title)}</h1>",
        f'<p class="meta">{checkpoints} {noun} analyzed by wwcli {_text(__version__)}'
        + (f"; {len(run.failures)} could not be read" if run.failures else "")
        + ' &middot; <a href="#settings">run settings</a></p>',
        *contents,
        "</header>",
        "<main>",
        *body,
        "</main>",
        f"<footer>wwcli {_text(__version__)}</footer>",
        "</body>",
        "</html>",
    ]
    return "\n".join(page) + "\n"
