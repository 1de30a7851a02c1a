"""Names from files are data, reports never replace what they should not, and signals and closed
pipes end a run as they end any Unix tool: the command line's side of docs/SAFETY.md."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.hostile.make_corpus import tensors_to_safetensors
from wwcli.cli import UsageError, _write_atomically, app
from wwcli.report.escape import printable

runner = CliRunner()

HOSTILE_NAMES = (
    "title\x1b]0;pwned\x07",
    "a[/bold]",
    "[link=file:///etc/passwd]click[/link]",
    "line\nbreak",
    "clear\x1b[2J\x1b[H",
    "rtl\u202eexe.txt",
)


def _hostile_file(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    tensors = {
        f"{name}.weight": rng.standard_normal((48, 24)).astype(np.float32) for name in HOSTILE_NAMES
    }
    path = folder / "names.safetensors"
    path.write_bytes(tensors_to_safetensors(tensors))
    return path


def _assert_inert(text: str) -> None:
    """No control character from a name reached the text (our own table uses none when
    piped), and no markup was interpreted."""
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "\u202e" not in text
    assert "]8;" not in text  # an OSC 8 hyperlink


def test_printable_escapes_controls_and_keeps_letters() -> None:
    assert printable("a\x1b[2Jb\nc\td\u202e\udc80é漢") == "a\\x1b[2Jb\\nc\\td\\u202e\\udc80é漢"
    assert printable(printable("x\x1by")) == "x\\x1by"  # escaping twice changes nothing


@pytest.mark.parametrize("command", ["describe", "analyze"])
def test_hostile_names_neither_crash_the_table_nor_reach_the_terminal(
    command: str, tmp_path: Path
) -> None:
    path = _hostile_file(tmp_path)
    args = [command, str(path)] + (
        ["--exit-zero", "--fail-below", "100"] if command == "analyze" else []
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    _assert_inert(result.stdout)
    _assert_inert(result.stderr)
    assert "a[/bold]" in result.stdout  # shown as written, not as markup
    assert "[link=file:///etc/passwd]" in result.stdout.replace("\n", "")
    assert "title\\x1b]0;pwned\\x07" in result.stdout.replace("\n", "")


def test_gate_lines_show_hostile_names_escaped_on_one_line(tmp_path: Path) -> None:
    path = _hostile_file(tmp_path)
    result = runner.invoke(
        app, ["analyze", str(path), "-f", "json", "--fail-below", "100", "--gate-min-evals", "1"]
    )
    assert result.exit_code == 1
    gate_lines = [line for line in result.stderr.splitlines() if line.startswith("gate:")]
    assert len(gate_lines) == len(HOSTILE_NAMES), result.stderr
    assert any("line\\nbreak" in line for line in gate_lines)
    _assert_inert(result.stderr)
    names = {layer["name"] for layer in json.loads(result.stdout)["layers"]}
    assert names == set(HOSTILE_NAMES)  # machine output keeps the exact names


def test_the_table_is_safe_in_color_too() -> None:
    from tests.results_factory import spec
    from wwcli.report.table import render_describe_table
    from wwcli.results import CheckpointListing, ListedLayer

    layers = tuple(
        ListedLayer(spec(i, name, shape=(48, 24)), None) for i, name in enumerate(HOSTILE_NAMES)
    )
    listing = CheckpointListing("f\x1b]0;t\x07", "safetensors", None, None, layers)
    text = render_describe_table(listing, width=120, color=True)
    assert "\x07" not in text and "]8;" not in text and "\u202e" not in text
    assert "\x1b]" not in text  # colour codes are CSI (ESC [), never OSC (ESC ])


def test_an_error_line_naming_a_hostile_shard_stays_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    index = {"weight_map": {"fc.weight": "evil\n\x1b[2Jshard.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    result = runner.invoke(app, ["describe", str(folder)])
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "\x1b" not in result.stderr


def test_a_csv_keeps_names_and_survives_lone_surrogates(tmp_path: Path) -> None:
    from wwcli.report.csv import render_csv

    text = render_csv([{"name": "a\udc80b", "layer_id": 1}], ["layer_id", "name"])
    assert text == "layer_id,name\n1,a\\udc80b\n"
    text.encode("utf-8")


# --- Report files ----------------------------------------------------------------------------


def _fixture() -> Path:
    return Path(__file__).resolve().parents[2] / "fixtures" / "safetensors" / "cnn.safetensors"


@pytest.mark.skipif(not os.access("/dev/null", os.W_OK), reason="needs a writable /dev/null")
def test_a_report_to_dev_null_leaves_the_device_node_alone() -> None:
    before = os.stat("/dev/null")
    result = runner.invoke(
        app, ["analyze", str(_fixture()), "--json", "/dev/null", "--exit-zero", "-q"]
    )
    assert result.exit_code == 0, result.output
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode)
    assert (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)


def test_a_report_to_a_fifo_is_written_into_it(tmp_path: Path) -> None:
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def read() -> None:
        with fifo.open("rb") as stream:
            received.append(stream.read())

    reader = threading.Thread(target=read)
    reader.start()
    result = runner.invoke(app, ["analyze", str(_fixture()), "--json", str(fifo), "--exit-zero"])
    reader.join(timeout=30)
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert json.loads(received[0])["checkpoint"] == str(_fixture())


def test_a_symlinked_report_replaces_its_target_and_keeps_the_link(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    result = runner.invoke(app, ["analyze", str(_fixture()), "--json", str(link), "--exit-zero"])
    assert result.exit_code == 0, result.output
    assert link.is_symlink()
    assert json.loads(real.read_text())["checkpoint"] == str(_fixture())


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "report.csv"
    target.write_text("earlier\n")
    with pytest.raises(UnicodeEncodeError):  # not an OSError: the text cannot be encoded
        _write_atomically(target, "a\udc80b")
    assert sorted(file.name for file in tmp_path.iterdir()) == ["report.csv"]
    assert target.read_text() == "earlier\n"
    with pytest.raises(UsageError, match="cannot write"):
        _write_atomically(tmp_path / "missing" / "report.csv", "x")


def test_a_report_over_a_file_the_folder_loader_reads_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    rng = np.random.default_rng(1)
    shard = tensors_to_safetensors({"fc.weight": rng.standard_normal((32, 16)).astype("f4")})
    (folder / "model-00001-of-00001.safetensors").write_bytes(shard)
    index = folder / "model.safetensors.index.json"
    original = json.dumps({"weight_map": {"fc.weight": "model-00001-of-00001.safetensors"}})
    index.write_text(original)
    result = runner.invoke(app, ["analyze", str(folder), "--json", str(index), "--exit-zero"])
    assert result.exit_code == 2
    assert "refusing to overwrite" in result.stderr
    assert index.read_text() == original


# --- Signals and pipes -------------------------------------------------------------------------


def _slow_checkpoint(folder: Path) -> Path:
    rng = np.random.default_rng(2)
    tensors = {
        f"layer{i}.weight": rng.standard_normal((1500, 1500)).astype(np.float32) for i in range(12)
    }
    path = folder / "slow.safetensors"
    path.write_bytes(tensors_to_safetensors(tensors))
    return path


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "wwcli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_and_the_process_dies_by_it(signum: int, tmp_path: Path) -> None:
    path = _slow_checkpoint(tmp_path)
    report = tmp_path / "report.json"
    process = _start(["analyze", str(path), "--jobs", "1", "--json", str(report)])
    time.sleep(3.0)  # past start-up: the run is inside the analysis
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signum, stderr
    text = stderr.decode()
    assert "Traceback" not in text
    assert text.strip().splitlines()[-1] in (
        "wwcli: error: interrupted",
        "wwcli: error: terminated",
    )
    assert not report.exists()
    assert [file.name for file in tmp_path.iterdir()] == ["slow.safetensors"]


def test_ctrl_c_during_start_up_prints_no_traceback() -> None:
    # A real SIGINT, delivered while the command line's modules are being imported.
    code = textwrap.dedent(
        """
        import builtins, os, signal, sys
        real_import = builtins.__import__
        def interrupting_import(name, *args, **kwargs):
            if name == "typer":
                os.kill(os.getpid(), signal.SIGINT)
            return real_import(name, *args, **kwargs)
        builtins.__import__ = interrupting_import
        sys.argv = ["wwcli", "--help"]
        from wwcli.entry import main
        main()
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False
    )
    assert b"Traceback" not in completed.stderr, completed.stderr
    assert completed.stdout == b""
    assert completed.returncode == -signal.SIGINT


def test_a_closed_stdout_ends_the_run_quietly() -> None:
    # The reader is gone before wwcli writes (as `| head -1` is once it has its line).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "wwcli", "describe", str(_fixture()), "--format", "csv"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert completed.stderr == b""
    assert completed.returncode == -signal.SIGPIPE


def test_thirty_thousand_layers_are_listed_as_plain_text_in_seconds(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    tensors = {f"t{i}.weight": rng.standard_normal((2, 2)).astype("f4") for i in range(30_000)}
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(tensors_to_safetensors(tensors))
    started = time.monotonic()
    result = runner.invoke(app, ["describe", str(path)])
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert result.stdout.count(".weight") == 0  # names are the keys without .weight
    assert len(result.stdout.splitlines()) >= 30_000
    assert elapsed < 15, f"{elapsed:.1f} s (rich's table took ~36 s)"
