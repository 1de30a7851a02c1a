"""The command line end to end: exit codes, stdout vs stderr, files, on the shipped fixtures."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wwcli.cli import app
from wwcli.report.rows import ANALYZE_COLUMNS, DESCRIBE_COLUMNS

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SEED_MLP = FIXTURES / "keras" / "seed_mlp.keras"
HEAVY = FIXTURES / "keras" / "heavy_tailed_mlp.keras"

runner = CliRunner()


def invoke(*args: str | Path) -> object:
    return runner.invoke(app, [str(arg) for arg in args])


# --- exit codes -----------------------------------------------------------------------------


def test_clean_model_exits_0_with_the_table_on_stdout() -> None:
    result = invoke("analyze", SEED_MLP)
    assert result.exit_code == 0, result.output
    assert "dense_1" in result.stdout and "alpha" in result.stdout
    assert "3 layers analyzed" in result.stdout
    assert "gate:" not in result.stderr


def test_very_heavy_tailed_layer_exits_1_and_says_which_on_stderr() -> None:
    result = invoke("analyze", HEAVY)
    assert result.exit_code == 1
    assert "very heavy-tailed" in result.stdout and "over-trained" not in result.stdout
    assert "gate: " in result.stderr and "layer 1 dense_1: alpha 1.5" in result.stderr
    assert "gate:" not in result.stdout


def test_very_heavy_tailed_layer_with_exit_zero_exits_0() -> None:
    result = invoke("analyze", HEAVY, "--exit-zero")
    assert result.exit_code == 0
    assert "very heavy-tailed" in result.stdout
    assert "gate:" not in result.stderr


def test_gate_thresholds_are_options() -> None:
    assert invoke("analyze", HEAVY, "--fail-below", "1.0").exit_code == 0
    assert invoke("analyze", HEAVY, "--fail-below", "-1").exit_code == 0
    assert invoke("analyze", SEED_MLP, "--fail-below", "5.5").exit_code == 1
    assert invoke("analyze", SEED_MLP, "--fail-above", "5.5").exit_code == 1
    assert invoke("analyze", SEED_MLP, "--fail-above", "6").exit_code == 0


def test_missing_path_exits_2_with_one_line_and_no_traceback() -> None:
    result = invoke("analyze", "no/such/model.keras")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines == ["wwcli: error: no/such/model.keras: no such file or directory"]


def test_unreadable_input_exits_2_naming_the_file(tmp_path: Path) -> None:
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(os.urandom(64))
    result = invoke("analyze", bogus)
    assert result.exit_code == 2
    assert str(bogus) in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"\x00" * 3)
    result = invoke("analyze", bogus, "--debug")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


def test_bad_layer_selection_exits_2_listing_the_layers() -> None:
    result = invoke("analyze", SEED_MLP, "--layers", "9")
    assert result.exit_code == 2
    assert "--layers 9 matches no layer; layers are: 0 flatten (other); 1 dense" in result.stderr


def test_bad_option_value_exits_2() -> None:
    assert invoke("analyze", SEED_MLP, "--format", "xml").exit_code == 2
    assert invoke("analyze", SEED_MLP, "--min-evals", "0").exit_code == 2
    result = invoke("analyze", SEED_MLP, "--fail-below", "3", "--fail-above", "2")
    assert result.exit_code == 2
    assert "must not exceed" in result.stderr


# --- output formats ---------------------------------------------------------------------------


def test_json_on_stdout_is_parseable_and_the_summary_goes_to_stderr() -> None:
    result = invoke("analyze", HEAVY, "--format", "json", "--exit-zero")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["checkpoint"] == str(HEAVY)
    assert [layer["layer_id"] for layer in document["layers"]] == [0, 1, 2]
    assert document["summary"]["over_trained"] == [1]
    assert document["options"]["fail_below"] == 2.0
    assert "very heavy-tailed" in result.stderr


def test_quiet_keeps_stderr_empty_on_success() -> None:
    result = invoke("analyze", SEED_MLP, "--format", "json", "--quiet")
    assert result.exit_code == 0
    assert result.stderr == ""
    json.loads(result.stdout)


def test_csv_on_stdout_has_one_row_per_analyzed_layer() -> None:
    result = invoke("analyze", SEED_MLP, "--format", "csv", "--layers", "dense")
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["name"] for row in rows] == ["dense", "dense_1", "dense_2"]
    assert list(rows[0]) == list(ANALYZE_COLUMNS)
    assert all(row["checkpoint"] == str(SEED_MLP) for row in rows)


def test_csv_and_json_files_beside_the_table(tmp_path: Path) -> None:
    csv_path, json_path = tmp_path / "out.csv", tmp_path / "out.json"
    result = invoke("analyze", HEAVY, "--csv", csv_path, "--json", json_path)
    assert result.exit_code == 1
    assert "very heavy-tailed" in result.stdout
    rows = list(csv.DictReader(csv_path.open()))
    document = json.loads(json_path.read_text())
    assert [row["layer_id"] for row in rows] == ["0", "1", "2"]
    assert [float(row["alpha"]) for row in rows] == [layer["alpha"] for layer in document["layers"]]
    assert not list(tmp_path.glob(".*.tmp"))


def test_several_checkpoints_are_reported_in_turn(tmp_path: Path) -> None:
    result = invoke("analyze", SEED_MLP, HEAVY, "--format", "csv", "--exit-zero")
    assert result.exit_code == 0
    checkpoints = [row["checkpoint"] for row in csv.DictReader(io.StringIO(result.stdout))]
    assert checkpoints == [str(SEED_MLP)] * 3 + [str(HEAVY)] * 3
    result = invoke("analyze", SEED_MLP, HEAVY, "--format", "json", "--exit-zero")
    document = json.loads(result.stdout)
    assert [c["checkpoint"] for c in document["checkpoints"]] == [str(SEED_MLP), str(HEAVY)]


def test_one_unreadable_input_among_several_exits_2_and_writes_no_file(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    result = invoke("analyze", SEED_MLP, tmp_path / "missing.pt", "--csv", out)
    assert result.exit_code == 2
    assert "missing.pt: no such file or directory" in result.stderr
    assert not out.exists()


def test_refuses_to_write_a_report_over_the_input(tmp_path: Path) -> None:
    copy = tmp_path / "model.keras"
    copy.write_bytes(SEED_MLP.read_bytes())
    before = copy.read_bytes()
    for option in ("--csv", "--json"):
        result = invoke("analyze", copy, option, copy)
        assert result.exit_code == 2
        assert "refusing" in result.stderr
    assert copy.read_bytes() == before


def test_describe_lists_layers_with_ids_and_reasons() -> None:
    result = invoke("describe", SEED_MLP, "--format", "csv")
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == list(DESCRIBE_COLUMNS)
    assert [(row["layer_id"], row["name"], row["analyzable"]) for row in rows] == [
        ("0", "flatten", "false"),
        ("1", "dense", "true"),
        ("2", "dense_1", "true"),
        ("3", "dense_2", "true"),
    ]
    assert rows[0]["reason"] == "no weights"
    table = invoke("describe", SEED_MLP, "--max-evals", "50")
    assert "no: 100 eigenvalues > max_evals 50" in table.stdout


@pytest.mark.parametrize(
    "path",
    [
        FIXTURES / "keras" / "seed_mlp.h5",
        FIXTURES / "keras" / "functional_cnn.keras",
        FIXTURES / "torch" / "cnn_state_dict.pt",
        FIXTURES / "torch" / "cnn_lightning.ckpt",
        FIXTURES / "torch" / "hf_bin",
        FIXTURES / "safetensors" / "cnn.safetensors",
        FIXTURES / "safetensors" / "hf_sharded_bf16",
    ],
    ids=lambda path: path.name,
)
def test_every_format_analyzes_end_to_end(path: Path) -> None:
    result = invoke("analyze", path, "--format", "json", "--exit-zero")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["layers"], "some layer is analyzed"
    assert all(layer["status"] == "success" for layer in document["layers"])


# --- start-up -------------------------------------------------------------------------------


def test_help_is_fast_and_imports_no_framework() -> None:
    code = (
        "import sys, time; t = time.perf_counter();"
        "from wwcli.cli import app;"
        "import contextlib, io;"
        "buf = io.StringIO();"
        "ctx = contextlib.redirect_stdout(buf);"
        "ctx.__enter__();"
        'exec(\'try:\\n app(["--help"], prog_name="wwcli")\\nexcept SystemExit: pass\');'
        "ctx.__exit__(None, None, None);"
        "heavy = [m for m in ('torch', 'tensorflow', 'keras', 'h5py') if m in sys.modules];"
        "print(heavy, time.perf_counter() - t)"
    )
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    wall = time.perf_counter() - started
    assert out.startswith("[]"), out
    assert wall < 5.0  # generous: the measured figure (README) is far lower


def test_analyzing_a_state_dict_imports_only_what_it_needs() -> None:
    """A plain `analyze model.pt --format json` (issue 17: start-up is most of its time) reads
    the file without torch and imports neither the CI formats (XML, SARIF), rich's table, the
    pictures, the sweep and cache layers, nor the optional diagnostics' packages."""
    unwanted = (
        "torch",
        "wwcli.report.ci",
        "xml.etree.ElementTree",
        "rich.table",
        "matplotlib",
        "wwcli.report.html",
        "wwcli.report.plots",
        "wwcli.sweep",
        "wwcli.cache",
        "dask",
        "powerlaw",
        "wwcli.engine.mpfit",
    )
    code = "\n".join(
        [
            "import contextlib, io, sys",
            "from wwcli.cli import app",
            "with contextlib.redirect_stdout(io.StringIO()):",
            "    try:",
            "        app(['analyze', sys.argv[1], '--format', 'json'], prog_name='wwcli')",
            "    except SystemExit:",
            "        pass",
            f"print([m for m in {unwanted!r} if m in sys.modules], 'numpy' in sys.modules)",
        ]
    )
    checkpoint = FIXTURES / "torch" / "cnn_state_dict.pt"
    out = subprocess.run(
        [sys.executable, "-c", code, str(checkpoint)], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["[]", "True"], out  # numpy: the analysis really ran


def test_cuda_without_a_device_is_a_usage_error() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = invoke("analyze", SEED_MLP, "--device", "cuda")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wwcli: error: --device cuda: ")
    assert "internal error" not in lines[0]
