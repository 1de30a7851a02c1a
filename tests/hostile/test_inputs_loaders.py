"""Names from files are data, listing is linear, model folders read only what they may, and the
loader boundary turns whatever a crafted file provokes into one LoaderError naming it."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.hostile.make_corpus import safetensors_bytes, valid_safetensors
from wwcli.cli import app
from wwcli.loaders import Checkpoint, LayerSpec, LayerType, LoaderError, open_checkpoint
from wwcli.loaders._statedict import StateDictCheckpoint
from wwcli.loaders.interface import guard_checkpoint
from wwcli.loaders.safetensors import read_header

runner = CliRunner()
SHARDED = Path(__file__).resolve().parents[2] / "fixtures" / "safetensors" / "hf_sharded_bf16"

HOSTILE_NAMES = [
    "\x1b]0;pwned\x07",
    "\x1b]0;pwned\x07.weight",
    "a[/bold].weight",
    "[link=file:///etc/passwd]x[/link].weight",
    "line\nbreak.weight",
]


def _matrices_file(path: Path, names: list[str]) -> Path:
    header = {
        name: {"dtype": "F32", "shape": [2, 2], "data_offsets": [16 * i, 16 * i + 16]}
        for i, name in enumerate(names)
    }
    path.write_bytes(safetensors_bytes(header, np.ones(4 * len(names), "<f4").tobytes()))
    return path


# --- Names are data ------------------------------------------------------------------------------


def test_names_with_escapes_and_markup_reach_describe_json_exactly(tmp_path: Path) -> None:
    path = _matrices_file(tmp_path / "names.safetensors", HOSTILE_NAMES)
    result = runner.invoke(app, ["describe", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    names = [layer["name"] for layer in json.loads(result.stdout)["layers"]]
    # Sorted key order, `.weight` dropped; the key without `.weight` is not numbered (as in
    # weightwatcher), so the terminal title sequence arrives once, as a layer name.
    assert names == [
        "\x1b]0;pwned\x07",
        "[link=file:///etc/passwd]x[/link]",
        "a[/bold]",
        "line\nbreak",
    ]
    for name in names:
        assert json.dumps(name) in result.stdout  # json-escaped: no raw ESC or newline inside


def test_names_with_escapes_are_plain_str_in_the_loader(tmp_path: Path) -> None:
    path = _matrices_file(tmp_path / "names.safetensors", HOSTILE_NAMES)
    assert sorted(info.key for info in read_header(path).tensors) == sorted(HOSTILE_NAMES)
    with open_checkpoint(path) as checkpoint:
        for spec in checkpoint.layers():
            assert type(spec.name) is str
            (matrix,) = checkpoint.matrices(spec)
            assert matrix.shape == (2, 2)


# --- Listing is linear ---------------------------------------------------------------------------


def _tiny_tensors(path: Path, count: int) -> Path:
    entries = ",".join(
        f'"l{i}.weight":{{"dtype":"F32","shape":[1,1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
        for i in range(count)
    )
    header = ("{" + entries + "}").encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4 * count))
    return path


_LISTING_TIMES = """
import json, sys, time
from pathlib import Path
from wwcli.loaders import open_checkpoint

def seconds(path):
    started = time.process_time()
    with open_checkpoint(path) as checkpoint:
        count = len(checkpoint.layers())
    return count, time.process_time() - started

small, large = map(Path, sys.argv[1:])
seconds(small)  # imports and caches warmed, so the runs below pay the same
print(json.dumps([seconds(path) for path in (small, large, small)]))
"""


def test_30000_tiny_tensors_are_listed_in_linear_time(tmp_path: Path) -> None:
    small = _tiny_tensors(tmp_path / "small.safetensors", 3_000)
    large = _tiny_tensors(tmp_path / "many.safetensors", 30_000)
    # In a fresh process, whose heap is wwcli's own as on the command line: in this test
    # process, full garbage collections walk every object the test session made, which grows
    # with what ran before (2.76 s against 0.074 s, 37x, once in CI).
    result = subprocess.run(
        [sys.executable, "-c", _LISTING_TIMES, str(small), str(large)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    counts, seconds = zip(*json.loads(result.stdout), strict=True)
    assert counts == (3_000, 30_000, 3_000)
    # 1.3-1.6 s of CPU for 30,000 here against 0.06-0.13 s for 3,000 (12-20x: the garbage
    # collector's full passes grow with the heap; 7x with it off), measured side by side so the
    # machine's load cancels. A quadratic walk is 100x; 10 s fails one slow per tensor (> 0.3 ms).
    baseline = min(seconds[0], seconds[2])
    assert seconds[1] < 30 * baseline + 0.2, f"{seconds[1]:.2f} s vs {baseline:.3f} s for 3,000"
    assert seconds[1] < 10, f"{seconds[1]:.2f} s of CPU"


def test_an_index_of_many_shards_is_grouped_in_one_pass(tmp_path: Path) -> None:
    weight_map = {}
    for i in range(2000):
        shard = f"model-{i:05d}.safetensors"
        weight_map[f"l{i}.weight"] = shard
        (tmp_path / shard).write_bytes(
            safetensors_bytes(
                {f"l{i}.weight": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}},
                bytes(4),
            )
        )
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    started = time.process_time()
    with open_checkpoint(tmp_path) as checkpoint:
        assert len(checkpoint.layers()) == 2000
        assert len(checkpoint.source_files()) == 2001
    assert time.process_time() - started < 3


# --- Model folders: links and FIFOs --------------------------------------------------------------


def _hf_cache(root: Path) -> Path:
    """A Hugging Face cache layout of the sharded fixture: blobs named by hash, snapshot links."""
    repo = root / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for file in sorted(SHARDED.iterdir()):
        blob = repo / "blobs" / f"sha256-{file.name}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snapshot


def test_a_hugging_face_cache_snapshot_is_read_through_its_links(tmp_path: Path) -> None:
    snapshot = _hf_cache(tmp_path)
    with open_checkpoint(SHARDED) as direct, open_checkpoint(snapshot) as cached:
        assert cached.layers() == direct.layers()
        assert cached.source_note == direct.source_note
        blobs = (tmp_path / "hub" / "models--org--name" / "blobs").resolve()
        assert sorted(cached.source_files()) == sorted(blobs.iterdir())
        assert all(file.is_absolute() for file in cached.source_files())
        spec = next(spec for spec in cached.layers() if spec.analyzable)
        assert np.array_equal(cached.matrices(spec)[0], direct.matrices(spec)[0])


def test_a_folder_outside_a_cache_may_not_link_into_blobs(tmp_path: Path) -> None:
    snapshot = _hf_cache(tmp_path)
    folder = tmp_path / "copy"
    folder.mkdir()
    for link in snapshot.iterdir():
        (folder / link.name).symlink_to(link.resolve())
    with pytest.raises(LoaderError, match=r"config\.json: is a link to .*blobs/sha256-config"):
        open_checkpoint(folder)


def test_source_files_of_a_plain_folder_are_what_it_read(tmp_path: Path) -> None:
    header, data = valid_safetensors()
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(safetensors_bytes(header, data))
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(
        safetensors_bytes(
            {"x.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16)
        )
    )
    (tmp_path / "README.md").write_text("not read")
    with open_checkpoint(tmp_path) as checkpoint:
        assert checkpoint.source_files() == (
            (tmp_path / "model-00001-of-00002.safetensors").resolve(),
            (tmp_path / "model-00002-of-00002.safetensors").resolve(),
        )
    single = tmp_path / "model-00001-of-00002.safetensors"
    with open_checkpoint(single) as checkpoint:
        assert checkpoint.source_files() == (single,)


def _opened_paths_while(action: str, watched: Path) -> list[str]:
    """Run `action` (Python source, `folder` bound) in a fresh interpreter with an audit hook
    that records every file it opens; returns the opened paths under `watched`."""
    script = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "opened = []\n"
        "sys.addaudithook(lambda event, args: opened.append(str(args[0])) "
        "if event == 'open' and isinstance(args[0], (str, bytes, Path)) else None)\n"
        "from wwcli.loaders import LoaderError, open_checkpoint\n"
        f"folder = Path({str(watched.parent)!r})\n"
        f"{action}\n"
        f"print(json.dumps([p for p in opened if p.startswith({str(watched)!r})]))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    printed = completed.stdout.strip().splitlines()
    return list(json.loads(printed[-1]))


def test_a_shard_linked_out_of_the_folder_is_refused_and_never_opened(tmp_path: Path) -> None:
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(safetensors_bytes(*valid_safetensors()))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(outside)
    with pytest.raises(LoaderError) as raised:
        open_checkpoint(folder)
    assert str(raised.value) == (
        f"{folder / 'model.safetensors'}: is a link to {outside.resolve()}, outside {folder}; "
        "wwcli reads only files inside the folder"
    )
    action = (
        "try:\n    open_checkpoint(folder / 'model')\nexcept LoaderError as error:\n"
        "    print(error)"
    )
    assert _opened_paths_while(action, outside) == []
    # The same hook sees the file opened when it is given directly (the user's choice).
    direct = "open_checkpoint(folder / 'secret.safetensors').close()"
    assert _opened_paths_while(direct, outside) != []


def test_a_shard_linked_to_etc_hostname_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").symlink_to("/etc/hostname")
    with pytest.raises(LoaderError, match=r"is a link to /etc/hostname, outside"):
        open_checkpoint(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize(
    "name", ["model.safetensors", "model.safetensors.index.json", "config.json"]
)
def test_a_fifo_in_a_folder_is_refused_without_waiting(tmp_path: Path, name: str) -> None:
    header, data = valid_safetensors()
    if name != "model.safetensors":
        (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(header, data))
    os.mkfifo(tmp_path / name)
    # In a subprocess with a deadline: opening a FIFO waits for a writer that never comes, and
    # a regression must fail this test, not hang the run.
    completed = subprocess.run(
        [sys.executable, "-m", "wwcli", "describe", str(tmp_path), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert f"{tmp_path / name}: not a regular file (a FIFO)" in completed.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_given_directly_is_refused_and_never_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    action = (
        "try:\n    open_checkpoint(folder / 'model.safetensors')\n"
        "except LoaderError as error:\n    print(error)"
    )
    assert _opened_paths_while(action, fifo) == []
    with pytest.raises(LoaderError, match=r"model\.safetensors: not a regular file \(a FIFO\)"):
        open_checkpoint(fifo)


# --- The loader boundary -------------------------------------------------------------------------


class _BrokenCheckpoint(StateDictCheckpoint):
    """A reader with bugs a crafted file could trigger: each method raises what it is told."""

    def __init__(self, path: Path, error: BaseException) -> None:
        super().__init__(path, "broken", [])
        self.error = error

    def layers(self) -> list[LayerSpec]:
        raise self.error

    def matrices(self, layer: LayerSpec) -> list[np.ndarray]:
        raise self.error

    def close(self) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (RecursionError("maximum recursion depth exceeded"), "RecursionError while reading"),
        (OverflowError("int too large to convert to float"), "OverflowError while reading"),
        (ValueError("Exceeds the limit (4300 digits)"), "ValueError while reading"),
        (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates"), "UnicodeEncodeError while"),
        (struct.error("unpack requires a buffer"), "error while reading"),
        (KeyError("weight"), "KeyError while reading"),
        (IndexError("list index out of range"), "IndexError while reading"),
        (TypeError("unhashable type"), "TypeError while reading"),
        (MemoryError(), "ran out of memory while reading it"),
        (OSError(5, "Input/output error"), "cannot read: Input/output error"),
    ],
)
def test_what_a_crafted_file_provokes_becomes_one_loader_error(
    tmp_path: Path, error: Exception, message: str
) -> None:
    path = tmp_path / "crafted.safetensors"
    checkpoint = guard_checkpoint(_BrokenCheckpoint(path, error))
    assert isinstance(checkpoint, _BrokenCheckpoint)  # the same object, still of its class
    assert (checkpoint.path, checkpoint.format, checkpoint.source_files()) == (
        path,
        "broken",
        (path,),
    )
    spec = LayerSpec(layer_id=0, name="x", layer_type=LayerType.DENSE, shape=(2, 2))
    for call in (checkpoint.layers, lambda: checkpoint.matrices(spec), checkpoint.close):
        with pytest.raises(LoaderError) as raised:
            call()
        text = str(raised.value)
        assert text.startswith(f"{path}: ") and message in text and "\n" not in text
        assert raised.value.__cause__ is error  # --debug shows the original traceback


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3), AttributeError("bug")])
def test_interrupts_and_wwcli_bugs_are_not_disguised(tmp_path: Path, error: BaseException) -> None:
    checkpoint = guard_checkpoint(_BrokenCheckpoint(tmp_path / "x.safetensors", error))
    with pytest.raises(type(error)):
        checkpoint.layers()


def test_guarding_twice_wraps_once_and_open_checkpoint_guards(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes(*valid_safetensors()))
    checkpoint: Checkpoint = open_checkpoint(path)
    guarded_class = type(checkpoint)
    assert isinstance(checkpoint, StateDictCheckpoint)
    assert type(guard_checkpoint(checkpoint)) is guarded_class
    assert [spec.name for spec in checkpoint.layers()] == ["fc1", "fc2"]


def test_a_crash_while_opening_is_a_loader_error(tmp_path: Path) -> None:
    path = tmp_path / "bad\0name.safetensors"  # os.stat raises ValueError on a NUL byte
    with pytest.raises(LoaderError, match=r"cannot read: ValueError while reading the file"):
        open_checkpoint(path)
