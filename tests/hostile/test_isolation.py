"""The helper process that reads HDF5 for wwcli: a crash or a hang in the middle of a run is
a LoaderError for that file, the next file gets a fresh helper, and the main process never
loads h5py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from wwcli.loaders import Checkpoint, LayerSpec, LoaderError, open_checkpoint
from wwcli.loaders.isolated import IsolatedCheckpoint, helper_pid

SEED_H5 = Path(__file__).resolve().parents[2] / "fixtures" / "keras" / "seed_mlp.h5"


@pytest.fixture
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("WWCLI_HDF5_TIMEOUT", "1")
    monkeypatch.delenv("WWCLI_HDF5_IN_PROCESS", raising=False)
    yield


def _dense_layers(checkpoint: Checkpoint) -> list[LayerSpec]:
    assert isinstance(checkpoint, IsolatedCheckpoint)
    return [spec for spec in checkpoint.layers() if spec.analyzable]


def test_a_helper_that_stops_answering_mid_run_is_a_hang(short_deadline: None) -> None:
    with open_checkpoint(SEED_H5) as checkpoint:
        first, second, _ = _dense_layers(checkpoint)
        assert len(checkpoint.matrices(first)) == 1
        pid = helper_pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # what a C call that never returns looks like from here
        with pytest.raises(LoaderError) as caught:
            checkpoint.matrices(second)
        message = str(caught.value)
        assert message.startswith(f"{SEED_H5}: HDF5 library hung while reading layer 2 (dense_1)")
        assert "no answer in 1 s" in message and "\n" not in message
        with pytest.raises(LoaderError, match="was stopped after an earlier failure"):
            checkpoint.matrices(first)
    assert helper_pid() is None
    with open_checkpoint(SEED_H5) as reopened:
        assert len(reopened.matrices(_dense_layers(reopened)[1])) == 1
        assert helper_pid() not in (None, pid)


def test_a_helper_killed_between_requests_is_a_crash(short_deadline: None) -> None:
    with open_checkpoint(SEED_H5) as checkpoint:
        layer = _dense_layers(checkpoint)[0]
        pid = helper_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(LoaderError, match=r"HDF5 library crashed \(SIGKILL\) while reading"):
            checkpoint.matrices(layer)
    with open_checkpoint(SEED_H5) as reopened:
        assert len(reopened.layers()) == 4


def test_the_main_process_never_loads_h5py() -> None:
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from wwcli.loaders import open_checkpoint
        for name in sys.argv[1:]:
            with open_checkpoint(Path(name)) as checkpoint:
                for spec in checkpoint.layers():
                    if spec.analyzable:
                        checkpoint.matrices(spec)
        print(sorted(module for module in sys.modules if module.split(".")[0] == "h5py"))
        """
    )
    fixtures = SEED_H5.parent
    completed = subprocess.run(
        [sys.executable, "-c", script, str(SEED_H5), str(fixtures / "nested.keras")],
        capture_output=True,
        text=True,
        timeout=120,
        env={key: value for key, value in os.environ.items() if key != "WWCLI_HDF5_IN_PROCESS"},
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_matrices_are_the_same_as_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from wwcli.loaders.keras import open_keras

    for name in ("functional_cnn.keras", "conv1d_embedding.keras", "seed_mlp.h5"):
        path = SEED_H5.parent / name
        with open_keras(path) as local, open_checkpoint(path) as isolated:
            assert isinstance(isolated, IsolatedCheckpoint)
            assert local.layers() == isolated.layers()
            assert (local.format, local.ids_note, local.source_note) == (
                isolated.format,
                isolated.ids_note,
                isolated.source_note,
            )
            for spec in local.layers():
                if spec.analyzable:
                    for mine, theirs in zip(
                        local.matrices(spec), isolated.matrices(spec), strict=True
                    ):
                        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
                        assert mine.tobytes() == theirs.tobytes()


def test_a_relative_path_is_read_from_the_current_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with open_checkpoint(SEED_H5) as checkpoint:  # the helper starts in this folder
        assert len(checkpoint.layers()) == 4
    monkeypatch.chdir(SEED_H5.parent)
    with open_checkpoint(Path(SEED_H5.name)) as checkpoint:
        assert checkpoint.path == Path(SEED_H5.name)
        assert len(checkpoint.layers()) == 4
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))
    with pytest.raises(LoaderError, match=r"^model\.h5: the file is not a readable HDF5 file"):
        open_checkpoint(Path("model.h5"))
