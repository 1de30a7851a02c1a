"""Nothing in a file runs: pickles whose loading calls os.system, exec, subprocess or a
functools.partial, in every container wwcli reads, and Keras configs that name a Lambda layer
with marshalled code or a module to import. Each payload would create a marker file; the tests
show that it does not exist after wwcli read the file, and that the payload is live: plain
`pickle.loads` (or torch/keras told to trust the file, or a plain import) does create it."""

from __future__ import annotations

import base64
import builtins
import functools
import json
import marshal
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.hostile.fuzzing import Reduces
from wwcli.cli import app

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SEED_KERAS = FIXTURES / "keras" / "seed_mlp.keras"
SEED_H5 = FIXTURES / "keras" / "seed_mlp.h5"
EVIL_MODULE = "wwcli_evil_module"

runner = CliRunner()


def _payloads(marker: Path) -> dict[str, object]:
    """Objects whose unpickling creates `marker`, each by a different route to code."""
    shell = f"touch '{marker}'"
    return {
        "os_system": Reduces((os.system, (shell,))),
        "builtins_exec": Reduces((builtins.exec, (f"open({str(marker)!r}, 'w').close()",))),
        "subprocess": Reduces((subprocess.check_call, (["touch", str(marker)],))),
        "functools_partial": Reduces((functools.partial(os.system, shell), ())),
        "nested_in_a_dict": {
            "epoch": 3,
            "callbacks": {"early_stopping": [Reduces((os.system, (shell,)))]},
        },
    }


PAYLOADS = list(_payloads(Path("marker")))


def _torch_writer(
    wrap: Callable[[Any, object], object], **save_options: Any
) -> Callable[[Path, object], None]:
    def write(path: Path, payload: object) -> None:
        import torch

        torch.save(wrap(torch, payload), path, **save_options)

    return write


def _state_dict_and(torch: Any, payload: object) -> object:
    return {"fc1.weight": torch.ones(16, 8), "fc2.weight": torch.ones(8, 4), "extra": payload}


def _lightning_like(torch: Any, payload: object) -> object:
    return {
        "epoch": 3,
        "state_dict": {"model.fc1.weight": torch.ones(16, 8)},
        "callbacks": payload,
    }


def _plain_pickle(path: Path, payload: object) -> None:
    path.write_bytes(pickle.dumps(payload, protocol=2))


CONTAINERS: dict[str, tuple[str, Callable[[Path, object], None]]] = {
    "plain_pickle": ("payload.pt", _plain_pickle),
    "zip_pt": ("payload.pt", _torch_writer(_state_dict_and)),
    "legacy_pt": (
        "payload.pth",
        _torch_writer(_state_dict_and, _use_new_zipfile_serialization=False),
    ),
    "ckpt": ("payload.ckpt", _torch_writer(_lightning_like)),
    "bin_in_a_folder": ("model/pytorch_model.bin", _torch_writer(_state_dict_and)),
}


def _target(tmp_path: Path, container: str) -> tuple[Path, Path]:
    """(the file holding the payload, the path wwcli is pointed at)."""
    name, _ = CONTAINERS[container]
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    return path, path.parent if container == "bin_in_a_folder" else path


def test_every_payload_runs_under_plain_pickle_loads(tmp_path: Path) -> None:
    """The payloads are live: unpickled by `pickle.loads` in a throwaway process, each creates
    its marker. (So a missing marker below means wwcli did not run them.)"""
    for kind in PAYLOADS:
        marker = tmp_path / f"ran-{kind}"
        pickled = tmp_path / f"{kind}.pickle"
        pickled.write_bytes(pickle.dumps(_payloads(marker)[kind], protocol=2))
        loads = "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())"
        subprocess.run(
            [sys.executable, "-c", loads, str(pickled)],
            check=False,
            capture_output=True,
            timeout=60,
        )
        assert marker.exists(), kind


@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("kind", PAYLOADS)
def test_wwcli_never_runs_a_pickled_payload(kind: str, container: str, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    path, argument = _target(tmp_path, container)
    CONTAINERS[container][1](path, _payloads(marker)[kind])
    for command in ("describe", "analyze"):
        result = runner.invoke(app, [command, str(argument)])
        assert result.exit_code == 2, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("wwcli: error: "), result.stderr
        assert str(path) in lines[0]
        assert "whose loading can run code, so it was not loaded" in lines[0]
        assert "--trust-pickle" in lines[0]
        assert "Traceback" not in result.output
        assert not marker.exists()


@pytest.mark.parametrize("container", [name for name in CONTAINERS if name != "plain_pickle"])
def test_the_same_files_do_run_the_payload_when_trusted(container: str, tmp_path: Path) -> None:
    """--trust-pickle hands the file to torch.load(weights_only=False): the payload runs. This
    is what the refusal above protects from."""
    marker = tmp_path / "payload-ran"
    path, argument = _target(tmp_path, container)
    CONTAINERS[container][1](path, _payloads(marker)["os_system"])
    runner.invoke(app, ["describe", str(argument), "--trust-pickle"])
    assert marker.exists()


def test_the_refusal_names_what_would_have_run(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    path, _ = _target(tmp_path, "zip_pt")
    CONTAINERS["zip_pt"][1](path, _payloads(marker)["subprocess"])
    result = runner.invoke(app, ["describe", str(path)])
    # torch.save writes protocol 2, which names the module as Python 2 did ("commands").
    assert "(subprocess.check_call)" in result.stderr
    assert not marker.exists()


# --- Keras configs ---------------------------------------------------------------------------


def _lambda_layer(marker: Path) -> dict[str, Any]:
    """A Lambda layer whose function is marshalled bytecode that creates `marker` when keras
    deserializes and calls it (what CVE-2024-3660 exploited)."""
    source = f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]"
    code = compile(source, "<payload>", "eval").co_consts[0]
    return {
        "module": "keras.layers",
        "class_name": "Lambda",
        "config": {
            "name": "evil_lambda",
            "trainable": True,
            "dtype": "float32",
            "function": {
                "class_name": "__lambda__",
                "config": {
                    "code": base64.b64encode(marshal.dumps(code)).decode(),
                    "defaults": None,
                    "closure": None,
                },
            },
            "arguments": {},
        },
        "registered_name": None,
    }


def _module_layer() -> dict[str, Any]:
    """A layer whose class lives in a module that creates a marker when imported."""
    return {
        "module": EVIL_MODULE,
        "class_name": "EvilLayer",
        "config": {"name": "evil_import", "trainable": True},
        "registered_name": f"{EVIL_MODULE}>EvilLayer",
    }


def _write_evil_module(folder: Path, marker: Path) -> None:
    (folder / f"{EVIL_MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\nclass EvilLayer:\n    pass\n"
    )


def _with_layers(
    config: dict[str, Any], extra: list[dict[str, Any]], *, evil_activation: bool
) -> dict[str, Any]:
    """A copy of a Sequential config with `extra` layers after its first one and, with
    `evil_activation`, a Dense activation that names the evil module."""
    config = json.loads(json.dumps(config))
    layers = config["config"]["layers"]
    layers[2:2] = extra
    for layer in layers:
        if evil_activation and layer["class_name"] == "Dense":
            layer["config"]["activation"] = {
                "module": EVIL_MODULE,
                "class_name": "evil_activation",
                "config": {},
                "registered_name": f"{EVIL_MODULE}>evil_activation",
            }
            break
    return config


def _evil_keras(target: Path, extra: list[dict[str, Any]], *, evil_activation: bool) -> None:
    with zipfile.ZipFile(SEED_KERAS) as archive, zipfile.ZipFile(target, "w") as out:
        for info in archive.infolist():
            data = archive.read(info.filename)
            if info.filename == "config.json":
                config = _with_layers(json.loads(data), extra, evil_activation=evil_activation)
                data = json.dumps(config).encode()
            out.writestr(info, data)


def _evil_h5(target: Path, extra: list[dict[str, Any]], *, evil_activation: bool) -> None:
    import h5py

    shutil.copyfile(SEED_H5, target)
    with h5py.File(target, "r+") as h5file:
        config = json.loads(h5file.attrs["model_config"])
        config = _with_layers(config, extra, evil_activation=evil_activation)
        h5file.attrs["model_config"] = json.dumps(config)


KERAS_WRITERS = {"keras": (_evil_keras, "evil.keras"), "h5": (_evil_h5, "evil.h5")}


def _wwcli(*args: str, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    """wwcli in a fresh process (and so a fresh HDF5 helper) that could import the evil
    module, were anything to import what a config names."""
    environment = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [sys.executable, "-m", "wwcli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        cwd=pythonpath,
    )


@pytest.mark.parametrize("file_format", list(KERAS_WRITERS))
def test_keras_configs_are_read_as_data_only(file_format: str, tmp_path: Path) -> None:
    lambda_marker = tmp_path / "lambda-ran"
    import_marker = tmp_path / "module-imported"
    _write_evil_module(tmp_path, import_marker)
    write, name = KERAS_WRITERS[file_format]
    path = tmp_path / name
    write(path, [_lambda_layer(lambda_marker), _module_layer()], evil_activation=True)

    described = _wwcli("describe", str(path), "--format", "json", pythonpath=tmp_path)
    assert described.returncode == 0, described.stderr
    layers = {layer["name"]: layer for layer in json.loads(described.stdout)["layers"]}
    for evil in ("evil_lambda", "evil_import"):
        assert (layers[evil]["layer_type"], layers[evil]["analyzable"]) == ("other", False)
    assert [name for name, layer in layers.items() if layer["analyzable"]] == [
        "dense",
        "dense_1",
        "dense_2",
    ]
    analyzed = _wwcli("analyze", str(path), "--format", "json", "--exit-zero", pythonpath=tmp_path)
    assert analyzed.returncode == 0, analyzed.stderr
    assert len(json.loads(analyzed.stdout)["layers"]) == 3

    assert not lambda_marker.exists()
    assert not import_marker.exists()
    # The module is live: importing it, as a deserializer would, creates the marker.
    probe = subprocess.run(
        [sys.executable, "-c", f"import {EVIL_MODULE}"], cwd=tmp_path, timeout=60, check=False
    )
    assert probe.returncode == 0 and import_marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("file_format", list(KERAS_WRITERS))
def test_keras_itself_runs_the_lambda_when_told_to_trust_the_file(
    file_format: str, tmp_path: Path
) -> None:
    """The Lambda payload is live: keras.models.load_model(safe_mode=False) runs it."""
    marker = tmp_path / "lambda-ran"
    write, name = KERAS_WRITERS[file_format]
    path = tmp_path / name
    write(path, [_lambda_layer(marker)], evil_activation=False)
    script = textwrap.dedent(
        """
        import sys
        import keras
        model = keras.models.load_model(sys.argv[1], safe_mode=False, compile=False)
        model(keras.ops.zeros((1, 28, 28)))
        """
    )
    subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, timeout=300, check=False
    )
    assert marker.exists()
