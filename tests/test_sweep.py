"""`wwcli sweep`: a generated run of 12 checkpoints whose planted layer turns heavy-tailed from
the 7th on; ordering, the long format, mixed formats, the gate's scope and the trajectory
figure."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.run_factory import DEGRADES_FROM, PLANTED, SHAPES, make_run
from wwcli.cli import app
from wwcli.sweep import (
    TRAJECTORY_COLUMNS,
    discover,
    natural_key,
    render_json,
    trajectory_from_document,
)

runner = CliRunner()


def sweep(*args: str | Path) -> object:
    return runner.invoke(app, ["sweep", *map(str, args), "--no-cache", "--workers", "1"])


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sweep") / "run"
    make_run(folder, count=12, hf_folders=(4,))
    return folder


def test_the_crossing_table_names_the_planted_layer_and_checkpoint(run_folder: Path) -> None:
    result = sweep(run_folder, "-f", "json", "--exit-zero")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    crossings = document["crossings"]
    assert [c["name"] for c in crossings] == [PLANTED]
    (crossing,) = crossings
    assert crossing["checkpoint"] == str(run_folder / f"ckpt-{DEGRADES_FROM}.safetensors")
    assert crossing["index"] == DEGRADES_FROM - 1 and crossing["order_key"] == DEGRADES_FROM
    assert crossing["alpha"] < 2 <= crossing["before"]
    # Every other layer stays above the line at every checkpoint.
    for row in document["trajectory"]:
        if row["name"] != PLANTED:
            assert row["alpha"] > 2, row
    # The table says the same to people, and the gate (on the last checkpoint) trips on it.
    table = sweep(run_folder)
    assert table.exit_code == 1
    line = next(text for text in table.stdout.splitlines() if text.startswith(PLANTED))
    assert f"ckpt-{DEGRADES_FROM}.safetensors" in line and line.split()[4] == str(DEGRADES_FROM)
    gate_lines = [text for text in table.stderr.splitlines() if text.startswith("gate: ")]
    assert len(gate_lines) == 1 and "ckpt-12.safetensors" in gate_lines[0]
    assert PLANTED in gate_lines[0]


def test_gate_all_judges_every_checkpoint(run_folder: Path) -> None:
    result = sweep(run_folder, "--gate", "all", "-f", "csv")
    assert result.exit_code == 1
    tripped = [text for text in result.stderr.splitlines() if text.startswith("gate: ")]
    assert len(tripped) == 12 - DEGRADES_FROM + 1
    assert all(PLANTED in text for text in tripped)


def test_the_json_long_format_round_trips_and_matches_the_csv(run_folder: Path) -> None:
    as_json = sweep(run_folder, "-f", "json", "--exit-zero")
    as_csv = sweep(run_folder, "-f", "csv", "--exit-zero")
    document = json.loads(as_json.stdout)
    rows, crossings = trajectory_from_document(document)
    assert len(rows) == 12 * len(SHAPES)
    assert all(list(row) == list(TRAJECTORY_COLUMNS) for row in rows)
    assert render_json(document) == as_json.stdout  # read back, written again: the same bytes
    assert [c.name for c in crossings] == [PLANTED]
    from_csv = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(from_csv) == len(rows)
    for text_row, row in zip(from_csv, rows, strict=True):
        for key in TRAJECTORY_COLUMNS:
            value = row[key]
            expected = "" if value is None else str(value)
            assert text_row[key] == expected, key
    # Layers are followed by name: each name appears once per checkpoint, in step order.
    for name in SHAPES:
        steps = [row["order_key"] for row in rows if row["name"] == name]
        assert steps == list(range(1, 13))
    # The sub-folder checkpoint is one checkpoint, read as a model folder.
    entries = {item["checkpoint"]: item for item in document["checkpoints"]}
    assert entries[str(run_folder / "ckpt-4")]["order_key"] == 4


def test_natural_name_and_mtime_orders(tmp_path: Path) -> None:
    names = ["ckpt-10.safetensors", "ckpt-2.safetensors", "ckpt-1.safetensors"]
    for index, name in enumerate(names):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(10**18 + index, 10**18 + index))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    natural = [item.path.name for item in discover([tmp_path])]
    assert natural == ["ckpt-1.safetensors", "ckpt-2.safetensors", "ckpt-10.safetensors"]
    assert [item.order_key for item in discover([tmp_path])] == [1, 2, 10]
    by_name = [item.path.name for item in discover([tmp_path], order="name")]
    assert by_name == ["ckpt-1.safetensors", "ckpt-10.safetensors", "ckpt-2.safetensors"]
    by_mtime = [item.path.name for item in discover([tmp_path], order="mtime")]
    assert by_mtime == names
    # A glob, and the same file twice, give each checkpoint once.
    globbed = discover([str(tmp_path / "ckpt-*"), tmp_path / "ckpt-2.safetensors"])
    assert [item.path.name for item in globbed] == natural
    assert natural_key("step-9") < natural_key("step-10") < natural_key("step-10b")


def test_a_sub_folder_holding_one_checkpoint_file_is_that_file(tmp_path: Path) -> None:
    for step, group in ((1, "bs32"), (2, "bs16"), (3, "bs8")):
        (tmp_path / group).mkdir()
        (tmp_path / group / f"step-{step}.keras").write_bytes(b"x")
    model = tmp_path / "hf"  # a model folder stays one checkpoint
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x")
    two = tmp_path / "two"  # two weight files: the folder is the checkpoint
    two.mkdir()
    (two / "a.safetensors").write_bytes(b"x")
    (two / "b.safetensors").write_bytes(b"x")
    found = [item.path.relative_to(tmp_path).as_posix() for item in discover([tmp_path])]
    # Natural order by name: hf, step-1, step-2, step-3, two.
    assert found == ["hf", "bs32/step-1.keras", "bs16/step-2.keras", "bs8/step-3.keras", "two"]
    globbed = discover([str(tmp_path / "bs*")])
    assert [item.order_key for item in globbed] == [1, 2, 3]


def test_mixed_formats_in_one_run(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    folder = tmp_path / "run"
    make_run(folder, count=4, hf_folders=(2,), torch_files=(3,))
    result = sweep(folder, "-f", "json", "--exit-zero")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    formats = [item["format"] for item in document["checkpoints"]]
    assert formats[0] == formats[3] == "safetensors"
    assert formats[2] == "torch" and formats[1] not in ("torch", None)
    for step in range(1, 5):
        names = [row["name"] for row in document["trajectory"] if row["order_key"] == step]
        assert names and sorted(names) == sorted(SHAPES)


def test_the_trajectory_figure_marks_the_crossing(run_folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    result = sweep(run_folder, "--plot", plots, "--plot-format", "svg", "-q", "--exit-zero")
    assert result.exit_code == 0, result.output
    alpha = (plots / "trajectory-alpha.svg").read_text()
    assert 'id="crossing-0"' in alpha and 'id="crossing-1"' not in alpha
    assert all(f'id="trajectory-{index}"' in alpha for index in range(len(SHAPES)))
    assert (plots / "trajectory-log_spectral_norm.svg").is_file()


def test_nothing_to_sweep_is_a_usage_error(tmp_path: Path) -> None:
    result = sweep(tmp_path)
    assert result.exit_code == 2
    assert "no checkpoints in this folder" in result.stderr
    missing = sweep(tmp_path / "nope-*.pt")
    assert missing.exit_code == 2 and "matches no checkpoint" in missing.stderr
