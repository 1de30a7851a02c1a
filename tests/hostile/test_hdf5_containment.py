"""What HDF5 files can no longer do to wwcli: read other files or the environment through
external storage, links or virtual datasets; ask for gigabytes from a small file; walk forever;
outlive wwcli in a helper process. The corpus (tests/hostile/corpus_hdf5.py) runs the same files
through the command line; these tests check the readers and the helper directly."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.hostile import corpus_hdf5
from tests.hostile.make_corpus import SEED_H5, _h5_patch, _shrink_heap_object
from wwcli.loaders import LoaderError, open_checkpoint
from wwcli.loaders.isolated import helper_pid, memory_cap, stop_helpers
from wwcli.loaders.keras import open_keras

ENTRIES = [entry for entry in corpus_hdf5.cases() if not entry.crashes_hdf5 and not entry.slow]


@pytest.fixture(scope="module")
def entries_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hdf5_entries")
    for entry in ENTRIES:
        entry.write(folder / entry.name)
    return folder


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("WWCLI_HDF5_IN_PROCESS", raising=False)
    yield


def _read_everything(path: Path, *, in_process: bool) -> None:
    opener = open_keras if in_process else open_checkpoint
    with opener(path) as checkpoint:
        for spec in checkpoint.layers():
            if spec.analyzable:
                checkpoint.matrices(spec)


@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "helper"])
@pytest.mark.parametrize("entry", ENTRIES, ids=[entry.name for entry in ENTRIES])
def test_every_entry_is_refused_by_the_reader_itself(
    entry: corpus_hdf5.BadInput,
    entries_dir: Path,
    in_process: bool,
    isolated: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in entry.environment.items():
        monkeypatch.setenv(name, value)
    path = entries_dir / entry.name
    started = time.monotonic()
    with pytest.raises(LoaderError) as caught:
        _read_everything(path, in_process=in_process)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert re.search(entry.problem, message, re.IGNORECASE), message
    if entry.secret is not None:
        assert entry.secret.decode() not in message
    assert time.monotonic() - started < 20


# --- What still works ----------------------------------------------------------------------------


def _weights_file(path: Path, kernel: np.ndarray, **options: object) -> None:
    with h5py.File(path, "w") as h5file:
        h5file.create_dataset("layers/dense/vars/0", data=kernel, **options)
        h5file["layers/dense/vars/1"] = np.zeros(kernel.shape[1], dtype="<f4")
        h5file.create_group("vars")


@pytest.mark.parametrize(
    ("side", "options"),
    [
        (64, {"compression": "gzip", "shuffle": True, "fletcher32": True}),
        (64, {"compression": "lzf"}),
        (2048, {"compression": "gzip", "compression_opts": 9}),  # 16 MiB of zeros: the bound
    ],
    ids=["tiny-gzip", "tiny-lzf", "16-mib-of-zeros"],
)
def test_all_zero_layers_up_to_the_bound_are_read(
    tmp_path: Path, side: int, options: dict[str, object]
) -> None:
    path = tmp_path / "zeros.weights.h5"
    _weights_file(path, np.zeros((side, side), dtype="<f4"), chunks=True, **options)
    with open_keras(path) as checkpoint:
        (spec,) = [spec for spec in checkpoint.layers() if spec.analyzable]
        (matrix,) = checkpoint.matrices(spec)
    assert matrix.shape == (side, side) and not matrix.any()


def test_just_past_the_bound_a_zero_layer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "zeros.weights.h5"
    kernel = np.zeros((2048, 2049), dtype="<f4")
    _weights_file(path, kernel, chunks=True, compression="gzip", compression_opts=9)
    with pytest.raises(LoaderError, match=r"expands from \d+ stored bytes to 16785408, more than"):
        open_keras(path)


def test_small_never_written_layers_and_soft_links_inside_the_file_are_read(
    tmp_path: Path,
) -> None:
    path = tmp_path / "linked.weights.h5"
    with h5py.File(path, "w") as h5file:
        h5file.create_dataset("stash/kernel", (16, 8), "<f4", fillvalue=0.25)
        h5file["layers/dense/vars/0"] = h5py.SoftLink("/stash/kernel")
        h5file.create_group("vars")
    with open_keras(path) as checkpoint:
        (spec,) = [spec for spec in checkpoint.layers() if spec.analyzable]
        (matrix,) = checkpoint.matrices(spec)
    assert np.all(matrix == 0.25)


def test_a_weights_file_with_more_layer_groups_than_the_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("wwcli.loaders.keras.MAX_LAYERS", 10)
    path = tmp_path / "many.weights.h5"
    with h5py.File(path, "w") as h5file:
        for index in range(12):
            h5file.create_group(f"layers/dropout_{index}/vars")
        h5file.create_group("vars")
    with pytest.raises(LoaderError, match=r"lists more than 10 layers"):
        open_keras(path)


def test_a_deflated_member_shorter_than_declared_is_refused(tmp_path: Path) -> None:
    weights = corpus_hdf5._weights_bytes(corpus_hdf5._plain_kernel, tmp_path / "x")
    members = [
        ("config.json", corpus_hdf5.json.dumps(corpus_hdf5._CONFIG).encode(), -1, False),
        ("model.weights.h5", weights, len(weights) + 100, True),
    ]
    path = tmp_path / "short.keras"
    path.write_bytes(
        corpus_hdf5._zip_lying_about(corpus_hdf5._fill_declared(lambda _: members)(path))
    )
    with pytest.raises(LoaderError, match=rf"unpacks to {len(weights)} bytes, not the"):
        open_keras(path)


def test_a_deflated_keras_file_still_reads(tmp_path: Path) -> None:
    source = SEED_H5.parent / "seed_mlp.keras"
    path = tmp_path / "deflated.keras"
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(path, "w") as out:
        for info in archive.infolist():
            out.writestr(info.filename, archive.read(info), zipfile.ZIP_DEFLATED)
    with open_keras(source) as stored, open_keras(path) as deflated:
        assert stored.layers() == deflated.layers()
        spec = next(spec for spec in stored.layers() if spec.analyzable)
        assert stored.matrices(spec)[0].tobytes() == deflated.matrices(spec)[0].tobytes()


# --- The helper's memory cap ---------------------------------------------------------------------


def test_the_memory_cap_never_exceeds_the_machine() -> None:
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    in_use = 300 * 2**20
    assert memory_cap(in_use, 2**62) == max(physical, in_use + 2**30)
    assert memory_cap(in_use, 2**20) == in_use + 2**30 + 4 * 2**20
    assert memory_cap(in_use, 2**62) < 2**63  # setrlimit takes it


# --- The helper process: its environment, its life -----------------------------------------------


def test_the_helper_inherits_no_secret_from_the_environment(
    isolated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(corpus_hdf5.SECRET_VARIABLE, corpus_hdf5.MARKER.decode())
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_" + corpus_hdf5.MARKER.decode())
    monkeypatch.setenv("WWCLI_HDF5_TIMEOUT", "61")
    stop_helpers()  # the next file starts a helper with this environment
    with open_checkpoint(SEED_H5) as checkpoint:
        assert len(checkpoint.layers()) == 4
        pid = helper_pid()
        assert pid is not None
        environment = Path(f"/proc/{pid}/environ").read_bytes()
    names = {item.split(b"=", 1)[0] for item in environment.split(b"\0") if item}
    assert corpus_hdf5.MARKER not in environment
    assert corpus_hdf5.SECRET_VARIABLE.encode() not in names and b"GITHUB_TOKEN" not in names
    assert b"WWCLI_HDF5_TIMEOUT=61" in environment.split(b"\0")
    assert b"PATH" in names


def test_stop_helpers_kills_the_helper_at_once(isolated: None) -> None:
    with open_checkpoint(SEED_H5) as checkpoint:
        assert checkpoint.layers()
    pid = helper_pid()
    assert pid is not None
    stop_helpers()
    assert helper_pid() is None
    assert _gone_within(pid, 5)
    with open_checkpoint(SEED_H5) as checkpoint:  # a fresh helper serves the next file
        assert len(checkpoint.layers()) == 4
        assert helper_pid() not in (None, pid)


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"wwcli.loaders.isolated" in command:
            found.append(int(entry.name))
    return found


def _gone_within(pid: int, seconds: float) -> bool:
    """True when the process ends (or is a zombie nobody reaps) within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("death", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_helper_dies_with_wwcli(tmp_path: Path, death: signal.Signals) -> None:
    hanging = tmp_path / "hangs.h5"
    _h5_patch(_shrink_heap_object)(hanging)
    environment = {key: value for key, value in os.environ.items() if "WWCLI" not in key}
    wwcli = subprocess.Popen(
        [sys.executable, "-m", "wwcli", "analyze", str(hanging)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment,
    )
    helpers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not helpers and time.monotonic() < deadline and wwcli.poll() is None:
            helpers = _children(wwcli.pid)
            time.sleep(0.1)
        assert helpers, "the helper never started"
        (helper,) = helpers
        time.sleep(1.5)  # past the greeting: the helper is now inside the hanging HDF5 call
        assert not _gone_within(helper, 0.1), "the helper ended by itself: nothing is tested"
        wwcli.send_signal(death)
        wwcli.wait(timeout=10)
        assert _gone_within(helper, 5), "the helper outlived wwcli"
    finally:
        if wwcli.poll() is None:
            wwcli.kill()
            wwcli.wait()
        for helper in helpers:
            if not _gone_within(helper, 0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(helper, signal.SIGKILL)  # never leave a spinning helper behind
