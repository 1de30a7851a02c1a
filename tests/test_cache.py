"""The result cache: a second sweep reads every result from it (the count is the stderr line
people see), an edited checkpoint is analyzed again, a corrupt entry is ignored and rewritten,
and a cached report is value for value the one that was written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.run_factory import make_run, tensors, write_safetensors
from wwcli.analysis import analyze_path
from wwcli.cache import CacheError, ResultCache, decode, encode, report_from_json, report_to_json
from wwcli.cli import app
from wwcli.results import CheckpointReport
from wwcli.settings import RunSettings

runner = CliRunner()
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LINE = re.compile(
    r"cache: (\d+) of (\d+) checkpoints read from the cache, (\d+) analyzed, (\d+) entries written"
)


def sweep(*args: str | Path) -> object:
    return runner.invoke(app, ["sweep", *map(str, args), "--workers", "1", "--exit-zero"])


def counts(stderr: str) -> tuple[int, ...]:
    match = LINE.search(stderr)
    assert match, stderr
    return tuple(int(group) for group in match.groups())


@pytest.fixture()
def run_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    make_run(folder, count=12, hf_folders=(4,))
    return folder


def test_the_second_run_reads_every_result_from_the_cache(run_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = sweep(run_folder, "--cache", cache, "-f", "json")
    assert counts(first.stderr) == (0, 12, 12, 12)
    second = sweep(run_folder, "--cache", cache, "-f", "json")
    assert counts(second.stderr) == (12, 12, 0, 0)
    plain = sweep(run_folder, "--no-cache", "-f", "json")
    assert "cache:" not in plain.stderr
    assert second.stdout == first.stdout == plain.stdout
    # The gate reads cached values as it reads fresh ones; a gate setting is not part of the key.
    judged = sweep(run_folder, "--cache", cache, "--fail-below", "1.2")
    assert counts(judged.stderr)[0] == 12
    # A setting that changes numbers is.
    other = sweep(run_folder, "--cache", cache, "--min-evals", "100")
    assert counts(other.stderr) == (0, 12, 12, 12)


def test_an_edited_checkpoint_is_analyzed_again(run_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    before = json.loads(sweep(run_folder, "--cache", cache, "-f", "json").stdout)
    edited = run_folder / "ckpt-3.safetensors"
    write_safetensors(edited, tensors(30))
    after = sweep(run_folder, "--cache", cache, "-f", "json")
    assert counts(after.stderr) == (11, 12, 1, 1)
    rows = json.loads(after.stdout)["trajectory"]
    changed = {row["checkpoint"] for row in rows} - {
        row["checkpoint"] for row in rows if row in before["trajectory"]
    }
    assert changed == {str(edited)}
    # A checkpoint added to the run: only it is analyzed.
    write_safetensors(run_folder / "ckpt-13.safetensors", tensors(13))
    grown = sweep(run_folder, "--cache", cache)
    assert counts(grown.stderr) == (12, 13, 1, 1)


def test_a_corrupt_entry_does_not_crash_and_is_rewritten(run_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = sweep(run_folder, "--cache", cache, "-f", "json")
    entries = sorted(cache.glob("*.json"))
    assert len(entries) == 12
    entries[0].write_text('{"key": {"trunc', encoding="utf-8")
    entries[1].write_bytes(b"\xff\xfe not text")
    document = json.loads(entries[2].read_text())
    document["report"]["__dataclass__"] = "os:system"  # never rebuilt: not a wwcli type
    entries[2].write_text(json.dumps(document))
    second = sweep(run_folder, "--cache", cache, "-f", "json")
    assert second.exit_code == 0, second.output
    assert counts(second.stderr) == (9, 12, 3, 3)
    assert "3 unreadable entries ignored and rewritten" in second.stderr
    assert second.stdout == first.stdout
    assert counts(sweep(run_folder, "--cache", cache).stderr) == (12, 12, 0, 0)


@pytest.mark.parametrize(
    "path", [FIXTURES / "safetensors" / "cnn.safetensors", FIXTURES / "keras" / "seed_mlp.keras"]
)
def test_a_cached_report_is_the_same_value(path: Path) -> None:
    report = analyze_path(path, RunSettings(keep_spectra=True))
    assert isinstance(report, CheckpointReport)
    back = report_from_json(json.loads(json.dumps(report_to_json(report))))
    assert back == report and repr(back) == repr(report)  # enums stay enums, floats the same
    for old, new in zip(report.layers, back.layers, strict=True):
        assert old.spectrum is not None and new.spectrum is not None
        assert np.array_equal(old.spectrum.eigenvalues, new.spectrum.eigenvalues)
        assert new.spectrum.eigenvalues.dtype == old.spectrum.eigenvalues.dtype
    assert back.source_files == report.source_files


def test_only_wwcli_types_with_their_current_fields_are_rebuilt(tmp_path: Path) -> None:
    with pytest.raises(CacheError):
        decode({"__dataclass__": "subprocess:Popen", "fields": {}})
    report = analyze_path(FIXTURES / "safetensors" / "cnn.safetensors", RunSettings())
    data = encode(report)
    del data["fields"]["layers"]  # an entry written before a field existed: stale
    with pytest.raises(CacheError):
        decode(data)
    assert decode(encode((1.5, float("nan"), None)))[0] == 1.5
    cache = ResultCache(tmp_path / "c")
    key = cache.key(FIXTURES / "safetensors" / "cnn.safetensors", RunSettings())
    assert key is not None and cache.read(key) is None
    assert isinstance(report, CheckpointReport) and cache.write(key, report)
    assert cache.read(key) == report
    assert not list((tmp_path / "c").glob(".*.tmp"))  # written through a rename


def test_diagnostics_round_trip_and_a_base_file_is_part_of_the_key(tmp_path: Path) -> None:
    from wwcli.diagnostics import Diagnostics

    path = FIXTURES / "safetensors" / "cnn.safetensors"
    settings = RunSettings(diagnostics=Diagnostics(mp_fit=True, randomize=True, detx=True))
    report = analyze_path(path, settings)
    assert isinstance(report, CheckpointReport)
    assert all(layer.diagnostics is not None for layer in report.layers)
    back = report_from_json(json.loads(json.dumps(report_to_json(report))))
    assert back == report and repr(back) == repr(report)
    base = tmp_path / "base.safetensors"
    write_safetensors(base, tensors(1))
    cache = ResultCache(tmp_path / "c")
    with_base = RunSettings(diagnostics=Diagnostics(base=str(base)))
    before = cache.key(path, with_base)
    write_safetensors(base, tensors(2))
    assert cache.key(path, with_base) != before
