import json
import math
import re

from tests.results_factory import report, result, spec
from wwcli import __version__
from wwcli.loaders.interface import LayerType
from wwcli.report.csv import render_csv
from wwcli.report.json import analyze_document, render_json
from wwcli.report.rows import ANALYZE_COLUMNS, analyze_rows
from wwcli.report.table import render_analyze_table
from wwcli.results import SkippedLayer

DENSE = spec(1, "dense", shape=(784, 300))
HIDDEN = spec(2, "dense_1", shape=(300, 100))
CONV = spec(3, "conv2d", LayerType.CONV2D, shape=(3, 3, 3, 16))
FLATTEN = SkippedLayer(0, "flatten", "other", "no weights")


def sample_report() -> object:
    return report(
        [
            result(DENSE, 3.25),
            result(HIDDEN, 1.75),
            result(CONV, math.nan, message="too few positive eigenvalues"),
        ],
        [FLATTEN],
    )


def test_csv_has_the_header_then_one_exact_row_per_layer() -> None:
    text = render_csv(analyze_rows(sample_report()), ANALYZE_COLUMNS)  # type: ignore[arg-type]
    lines = text.splitlines()
    assert lines[0] == ",".join(ANALYZE_COLUMNS)
    log_spectral = repr(math.log10(4.0))
    assert lines[1] == (
        f"model.keras,1,dense,dense,784,300,1,300,3.25,0.0625,0.25,0.5,4.0,12,4.0,4.0,10.0,"
        f"1.0,{log_spectral},{3.25 * math.log10(4.0)!r},2.5,2.5,0.75,300,success,,typical,"
    )
    # wwcli's verdict describes the tail; `warning` keeps weightwatcher's word for comparison.
    assert lines[2].split(",")[24:27] == ["success", "over-trained", "very-heavy-tailed"]
    # A failed fit: NaN metrics are empty cells, the reason is in `message`.
    assert lines[3] == (
        f"model.keras,3,conv2d,conv2d,16,3,9,27,,,,,,,4.0,4.0,10.0,1.0,{log_spectral},,,2.5,"
        "0.75,3,failed,,failed,too few positive eigenvalues"
    )
    assert len(lines) == 4


def test_csv_floats_round_trip() -> None:
    awkward = 2.0 / 3.0
    text = render_csv(analyze_rows(report([result(DENSE, awkward)])), ANALYZE_COLUMNS)
    row = dict(zip(ANALYZE_COLUMNS, text.splitlines()[1].split(","), strict=True))
    assert float(row["alpha"]) == awkward


def test_json_document_has_the_contract_keys_and_nulls_for_nan() -> None:
    text = render_json(analyze_document([sample_report()], {"layers": None}))  # type: ignore[list-item]
    document = json.loads(text)
    assert list(document) == [
        "wwcli_version",
        "checkpoint",
        "format",
        "ids_note",
        "source_note",
        "options",
        "layers",
        "skipped",
        "summary",
    ]
    assert document["wwcli_version"] == __version__
    assert document["checkpoint"] == "model.keras"
    assert [layer["layer_id"] for layer in document["layers"]] == [1, 2, 3]
    assert all(list(layer) == list(ANALYZE_COLUMNS) for layer in document["layers"])
    failed = document["layers"][2]
    assert failed["alpha"] is None and failed["status"] == "failed"
    assert failed["verdict"] == "failed" and failed["warning"] == ""
    assert document["skipped"] == [
        {"layer_id": 0, "name": "flatten", "layer_type": "other", "reason": "no weights"}
    ]
    summary = document["summary"]
    assert summary["layers_analyzed"] == 3
    assert summary["layers_skipped"] == 1
    assert summary["fits_failed"] == 1
    assert summary["over_trained"] == [2]
    assert summary["alpha"] == (3.25 + 1.75) / 2  # failed fits are excluded from means


def test_json_of_several_checkpoints_wraps_them() -> None:
    first = report([result(DENSE, 3.0)], checkpoint="a.keras")
    second = report([result(DENSE, 1.5)], checkpoint="b.keras")
    document = json.loads(render_json(analyze_document([first, second], {})))
    assert [c["checkpoint"] for c in document["checkpoints"]] == ["a.keras", "b.keras"]
    assert document["checkpoints"][1]["layers"][0]["checkpoint"] == "b.keras"


ANSI = re.compile(r"\x1b\[([0-9;]*)m")


def styled_lines(text: str) -> dict[str, set[str]]:
    """Map each table row's id (its first word) to the set of SGR codes used on that line."""
    styles: dict[str, set[str]] = {}
    for line in text.splitlines():
        plain = ANSI.sub("", line).split()
        if plain and plain[0] not in styles:
            codes = {code for match in ANSI.findall(line) for code in match.split(";") if code}
            styles[plain[0]] = codes
    return styles


def test_table_highlights_very_heavy_tailed_rows_in_bold_red_and_dims_failed_ones() -> None:
    text = render_analyze_table(sample_report(), width=200, color=True)  # type: ignore[arg-type]
    styles = styled_lines(text)
    assert {"1", "31"} <= styles["2"]  # the alpha < 2 row: bold (1) red (31)
    assert "31" not in styles["1"]  # a typical row is not red
    assert "2" in styles["3"]  # a failed fit is dim (2)
    plain = ANSI.sub("", text)
    assert "very heavy-tailed" in plain
    assert "over-trained" not in plain  # no table calls a layer over-trained on alpha alone
    assert "fit failed: too few positive eigenvalues" in plain
    assert "1 layer very heavy-tailed (alpha < 2): 2 dense_1" in plain
    assert "skipped (no weights): 0 flatten" in plain


def test_under_trained_rows_are_yellow() -> None:
    text = render_analyze_table(report([result(DENSE, 7.5)]), width=200, color=True)
    assert "33" in styled_lines(text)["1"]


def test_table_fits_an_80_column_terminal() -> None:
    long_name = "model.encoder.layers.11.self_attention.query_key_value"
    text = render_analyze_table(
        report([result(spec(7, long_name, shape=(768, 2304)), 1.5)]), width=80, color=False
    )
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    header = next(line for line in lines if " id " in line)
    kept = header.split()
    assert kept[:2] == ["id", "name"] and "alpha" in kept and kept[-1] == "verdict"
    assert "log_norm" not in kept and "stable_rank" not in kept  # low priority gives way
    # The long name is folded inside its column, never cut: its pieces read back in order,
    # and it folds after dots, not inside a word.
    row = lines.index(header) + 2
    start = lines[row].index("model.")
    pieces = [line[start:].split()[0] for line in lines[row : row + 4]]
    assert "".join(pieces) == long_name
    assert all(piece.endswith(".") for piece in pieces[:-1])


def test_the_summary_names_at_most_ten_layers_per_verdict() -> None:
    many = [result(spec(i, f"layer{i}", shape=(64, 64)), 1.5) for i in range(13)]
    text = render_analyze_table(report(many), width=400, color=False)
    line = next(line for line in text.splitlines() if line.startswith("13 layers"))
    assert line.startswith("13 layers very heavy-tailed (alpha < 2): 0 layer0")
    assert "9 layer9 (alpha 1.500), ... (+3)" in line
    assert "layer10" not in line
