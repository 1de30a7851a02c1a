"""Tests of the Keras reader (`wwcli.loaders.keras`).

The ids, names, types and shapes must be those weightwatcher 0.7.7 reports for the model that
`keras.models.load_model` builds from the same file (sub-models expanded, which weightwatcher does
not do), the matrices byte-equal to the weights keras loads, and every malformed file a one-line
LoaderError naming the file. The reader itself never imports tensorflow; this module does, but
only inside the fixtures that need keras or weightwatcher, so the TF-free tests stay fast.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import logging
import marshal
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import h5py
import numpy as np
import pytest

from wwcli.loaders.interface import LayerSpec, LayerType, LoaderError
from wwcli.loaders.keras import open_keras

REPO = Path(__file__).resolve().parents[2]
COMMITTED_FIXTURES = REPO / "fixtures" / "keras"
MODEL_NAMES = [
    "seed_mlp",
    "functional_cnn",
    "nested",
    "conv1d_embedding",
    "many_dense",
    "heavy_tailed_mlp",
]
FIXTURE_FILES = [f"{name}.keras" for name in MODEL_NAMES] + [
    "seed_mlp.h5",
    "seed_mlp.weights.h5",
]
# Files whose ids weightwatcher numbers like wwcli (no nested sub-model inside).
FLAT_FILES = [name for name in FIXTURE_FILES if not name.startswith("nested")]

# The types wwcli gives the Keras classes of the fixtures; anything else is OTHER.
EXPECTED_TYPES = {
    "Dense": LayerType.DENSE,
    "Conv1D": LayerType.CONV1D,
    "Conv2D": LayerType.CONV2D,
    "Embedding": LayerType.EMBEDDING,
    "BatchNormalization": LayerType.NORM,
    "LayerNormalization": LayerType.NORM,
}
MIN_EVALS, MAX_EVALS = 8, 15000  # weightwatcher's defaults for which layers it analyzes

pytestmark = [
    # weightwatcher 0.7.7 on pandas 3, and keras skipping the unbuilt optimizer of a compiled
    # model: noise from the reference tools, not from wwcli.
    pytest.mark.filterwarnings("ignore:Passing a dict to DataFrame.from_records"),
    pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer"),
]


def _load_fixture_maker() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_keras_fixtures", REPO / "fixtures" / "make_keras_fixtures.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed fixtures, or freshly made ones when they are not there."""
    if all((COMMITTED_FIXTURES / name).exists() for name in FIXTURE_FILES):
        return COMMITTED_FIXTURES
    out_dir = tmp_path_factory.mktemp("keras_fixtures")
    _load_fixture_maker().make_keras_fixtures(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def keras() -> Any:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras as keras_module

    return keras_module


@pytest.fixture(scope="module")
def load(keras: Any) -> Callable[[Path], Any]:
    """keras.models.load_model, once per file."""
    cache: dict[Path, Any] = {}

    def load_model(path: Path) -> Any:
        if path not in cache:
            if path.name.endswith(".weights.h5"):
                model = _load_fixture_maker().MODELS[path.name.split(".")[0]](keras)
                model.load_weights(path)
            else:
                model = keras.models.load_model(path)
            cache[path] = model
        return cache[path]

    return load_model


@pytest.fixture(scope="module")
def ww() -> Any:
    import weightwatcher

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    return weightwatcher


def _expanded(keras: Any, model: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(layer path, layer) in wwcli's order: model.layers, sub-models replaced by their layers."""
    layers: list[tuple[str, Any]] = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            layers += _expanded(keras, layer, f"{prefix}{layer.name}/")
        else:
            layers.append((f"{prefix}{layer.name}", layer))
    return layers


def _layers(path: Path) -> list[LayerSpec]:
    with open_keras(path) as checkpoint:
        return checkpoint.layers()


def _all_matrices(path: Path) -> dict[int, list[np.ndarray]]:
    with open_keras(path) as checkpoint:
        return {
            spec.layer_id: checkpoint.matrices(spec)
            for spec in checkpoint.layers()
            if spec.analyzable
        }


def _keras_slices(layer_type: LayerType, kernel: np.ndarray) -> list[np.ndarray]:
    """The matrices weightwatcher takes from a Keras kernel (its conv2D_Wmats slice order)."""
    if layer_type == LayerType.CONV2D:
        return [kernel[i, j] for i in range(kernel.shape[0]) for j in range(kernel.shape[1])]
    if layer_type == LayerType.CONV1D:
        return [kernel[i] for i in range(kernel.shape[0])]
    return [kernel]


def _pooled_eigenvalues(matrices: list[np.ndarray], count: int) -> np.ndarray:
    """The `count` largest squared singular values of all matrices, ascending."""
    eigenvalues = np.concatenate(
        [np.linalg.svd(matrix.astype(np.float64), compute_uv=False) ** 2 for matrix in matrices]
    )
    return np.sort(eigenvalues)[-count:]


def _assert_same_as_keras(keras: Any, path: Path, model: Any) -> None:
    expected = _expanded(keras, model)
    layers = _layers(path)
    assert [spec.name for spec in layers] == [name for name, _ in expected]
    assert [spec.layer_id for spec in layers] == list(range(len(expected)))
    matrices = _all_matrices(path)
    for spec, (_, layer) in zip(layers, expected, strict=True):
        assert spec.layer_type == EXPECTED_TYPES.get(type(layer).__name__, LayerType.OTHER)
        weights = layer.get_weights()
        if not weights:
            assert (spec.shape, spec.skip_reason) == ((), "no weights")
            continue
        kernel = weights[0]
        assert spec.shape == kernel.shape
        assert spec.dtype == str(kernel.dtype)
        if spec.layer_type == LayerType.NORM:
            assert spec.skip_reason == "normalization layer"
            continue
        assert spec.analyzable
        expected_matrices = _keras_slices(spec.layer_type, kernel)
        assert len(matrices[spec.layer_id]) == len(expected_matrices)
        for matrix, expected_matrix in zip(matrices[spec.layer_id], expected_matrices, strict=True):
            assert matrix.dtype == expected_matrix.dtype
            assert matrix.shape == expected_matrix.shape
            assert matrix.tobytes() == expected_matrix.tobytes()


def _assert_loader_error(path: Path, match: str) -> None:
    with pytest.raises(LoaderError, match=match) as caught, open_keras(path) as checkpoint:
        for spec in checkpoint.layers():
            if spec.analyzable:
                checkpoint.matrices(spec)
    message = str(caught.value)
    assert str(path) in message
    assert "\n" not in message


def _rewrite_zip(
    source: Path,
    target: Path,
    replace: dict[str, bytes | None],
    compression: int | None = None,
) -> Path:
    """Copy a zip, replacing (bytes) or dropping (None) some members."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for info in archive.infolist():
            data = replace.get(info.filename, archive.read(info.filename))
            if data is None:
                continue
            if compression is not None:
                info.compress_type = compression
            out.writestr(info, data)
    return target


def _config(path: Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as archive:
        config: dict[str, Any] = json.loads(archive.read("config.json"))
    return config


# --- Same ids, names, shapes and bytes as keras and weightwatcher --------------------------------


@pytest.mark.parametrize("file_name", FIXTURE_FILES)
def test_layers_and_matrices_are_those_keras_loads(
    file_name: str, fixture_dir: Path, keras: Any, load: Callable[[Path], Any]
) -> None:
    path = fixture_dir / file_name
    _assert_same_as_keras(keras, path, load(path))


@pytest.mark.parametrize("file_name", FLAT_FILES)
def test_ids_sizes_and_spectra_match_weightwatcher(
    file_name: str, fixture_dir: Path, load: Callable[[Path], Any], ww: Any
) -> None:
    path = fixture_dir / file_name
    watcher = ww.WeightWatcher(model=load(path))
    described = watcher.describe()
    # Conv1D is sized differently on purpose (see test_conv1d_pools_its_slices_like_conv2d).
    ours = {
        spec.layer_id: spec
        for spec in _layers(path)
        if spec.analyzable
        and MIN_EVALS <= spec.num_evals <= MAX_EVALS
        and spec.layer_type != LayerType.CONV1D
    }
    described = described[described["layer_type"].astype(str) != "conv1d"]
    assert sorted(described["layer_id"]) == sorted(ours)
    matrices = _all_matrices(path)
    for row in described.itertuples():
        spec = ours[row.layer_id]
        assert spec.name == row.name
        assert spec.layer_type.value == str(row.layer_type)
        # weightwatcher sometimes reports N < M for Conv2D (see the test below); the sides agree.
        weightwatcher_sides = (max(row.N, row.M), min(row.N, row.M))
        assert weightwatcher_sides == (spec.N, spec.M)
        assert spec.rf == row.rf
        spectrum = np.sort(watcher.get_ESD(layer=row.layer_id))
        assert len(spectrum) == spec.num_evals
        ours_spectrum = _pooled_eigenvalues(matrices[spec.layer_id], spec.num_evals)
        np.testing.assert_allclose(ours_spectrum, spectrum, rtol=1e-6, atol=1e-12)


def test_weightwatcher_swaps_n_and_m_for_two_kinds_of_keras_conv2d(
    fixture_dir: Path, load: Callable[[Path], Any], ww: Any
) -> None:
    # conv2d (3, 3, 1, 4): kh + kw >= in + out, so weightwatcher takes N = in, M = out;
    # conv2d_2 (2, 2, 16, 8): out < in and kh*kw even, so its per-slice N/M swap cancels out.
    # wwcli keeps N >= M; weightwatcher's eigenvalues (checked above) are the same.
    path = fixture_dir / "functional_cnn.keras"
    described = ww.WeightWatcher(model=load(path)).describe()
    swapped = described[described["N"] < described["M"]]
    assert list(swapped["name"]) == ["conv2d", "conv2d_2"]
    layers = {spec.name: spec for spec in _layers(path)}
    assert (layers["conv2d"].N, layers["conv2d"].M, layers["conv2d"].rf) == (4, 1, 9)
    assert (layers["conv2d_2"].N, layers["conv2d_2"].M, layers["conv2d_2"].rf) == (16, 8, 4)


def test_conv1d_pools_its_slices_like_conv2d(
    fixture_dir: Path, load: Callable[[Path], Any], ww: Any
) -> None:
    path = fixture_dir / "conv1d_embedding.keras"
    layers = {spec.name: spec for spec in _layers(path)}
    # Kernels (3, 16, 32) and (9, 32, 24): rf = k slices of (in, out), as REFERENCE.md says.
    assert (layers["conv1d"].N, layers["conv1d"].M, layers["conv1d"].rf) == (32, 16, 3)
    assert (layers["conv1d_1"].N, layers["conv1d_1"].M, layers["conv1d_1"].num_evals) == (
        32,
        24,
        216,
    )
    # weightwatcher 0.7.7 sizes the kernel over all three sides (M = k) and keeps only the k
    # largest pooled eigenvalues: its spectrum is the top of ours, and a kernel under 8 is
    # never analyzed there.
    watcher = ww.WeightWatcher(model=load(path))
    described = watcher.describe()
    conv1d_rows = described[described["layer_type"].astype(str) == "conv1d"]
    assert list(conv1d_rows["name"]) == ["conv1d_1"]
    assert (int(conv1d_rows["N"].iloc[0]), int(conv1d_rows["M"].iloc[0])) == (32, 9)
    spec = layers["conv1d_1"]
    with open_keras(path) as checkpoint:
        matrices = checkpoint.matrices(spec)
    ours_spectrum = _pooled_eigenvalues(matrices, spec.num_evals)
    theirs = np.sort(watcher.get_ESD(layer=spec.layer_id))
    np.testing.assert_allclose(ours_spectrum[-9:], theirs, rtol=1e-6, atol=1e-12)
    assert layers["embedding"].layer_type == LayerType.EMBEDDING
    assert (layers["embedding"].N, layers["embedding"].M) == (100, 16)


def test_nested_models_are_expanded_where_weightwatcher_sees_one_layer(
    fixture_dir: Path, load: Callable[[Path], Any], ww: Any
) -> None:
    path = fixture_dir / "nested.keras"
    model = load(path)
    assert [type(layer).__name__ for layer in model.layers] == [
        "InputLayer",
        "Dense",
        "Sequential",
        "Functional",
        "Dense",
    ]
    described = ww.WeightWatcher(model=model).describe()
    # weightwatcher: index in model.layers, sub-models one opaque id each, their Dense not seen.
    assert list(zip(described["layer_id"], described["name"], strict=True)) == [
        (1, "dense_3"),
        (4, "dense_4"),
    ]
    layers = _layers(path)
    assert [(spec.layer_id, spec.name) for spec in layers] == [
        (0, "input_layer_1"),
        (1, "dense_3"),
        (2, "block/dense"),
        (3, "block/dropout"),
        (4, "block/dense_1"),
        (5, "inner/input_layer"),
        (6, "inner/dense_2"),
        (7, "dense_4"),
    ]
    assert [spec.name for spec in layers if spec.analyzable] == [
        "dense_3",
        "block/dense",
        "block/dense_1",
        "inner/dense_2",
        "dense_4",
    ]


def test_heavy_tailed_demo_layer_is_over_trained_by_weightwatcher(
    fixture_dir: Path, load: Callable[[Path], Any], ww: Any
) -> None:
    details = ww.WeightWatcher(model=load(fixture_dir / "heavy_tailed_mlp.keras")).analyze()
    alpha = dict(zip(details["name"], details["alpha"], strict=True))
    assert alpha["dense_1"] < 2.0
    assert alpha["dense"] > 2.0 and alpha["dense_2"] > 2.0


@pytest.fixture(scope="module")
def resaved(
    fixture_dir: Path,
    keras: Any,
    load: Callable[[Path], Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """Every fixture model saved again by keras as a legacy .h5 and as a .weights.h5."""
    out_dir = tmp_path_factory.mktemp("resaved")
    for name in MODEL_NAMES:
        model = load(fixture_dir / f"{name}.keras")
        model.save(out_dir / f"{name}.h5")
        model.save_weights(out_dir / f"{name}.weights.h5")
    return out_dir


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("suffix", [".h5", ".weights.h5"])
def test_legacy_and_weights_only_files_of_every_model(
    name: str,
    suffix: str,
    resaved: Path,
    fixture_dir: Path,
    keras: Any,
    load: Callable[[Path], Any],
) -> None:
    path = resaved / f"{name}{suffix}"
    _assert_same_as_keras(keras, path, load(fixture_dir / f"{name}.keras"))
    with open_keras(path) as checkpoint:
        if suffix == ".h5":
            assert (checkpoint.format, checkpoint.ids_note) == ("h5", None)
        else:
            assert checkpoint.format == "keras-weights"
            assert checkpoint.ids_note is not None and "weights-only" in checkpoint.ids_note


def test_bfloat16_weights_come_back_as_exact_float32(keras: Any, tmp_path: Path) -> None:
    keras.utils.clear_session()
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(12, dtype="bfloat16")])
    path = tmp_path / "bf16.keras"
    model.save(path)
    with open_keras(path) as checkpoint:
        (spec,) = checkpoint.layers()
        assert (spec.dtype, spec.shape, spec.analyzable) == ("bfloat16", (16, 12), True)
        (matrix,) = checkpoint.matrices(spec)
    kernel = model.layers[0].get_weights()[0]
    assert str(kernel.dtype) == "bfloat16"
    assert matrix.dtype == np.float32
    assert np.array_equal(matrix, kernel.astype(np.float32))


def test_subclassed_model_layers_come_from_the_weights_file(keras: Any, tmp_path: Path) -> None:
    class TwoBlocks(keras.Model):  # type: ignore[misc]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.encoder = keras.layers.Dense(16)
            self.block = keras.Sequential([keras.layers.Dense(12), keras.layers.Dense(10)])
            self.head = keras.layers.Dense(8)

        def call(self, inputs: Any) -> Any:
            return self.head(self.block(self.encoder(inputs)))

    keras.utils.clear_session()
    keras.utils.set_random_seed(1)
    model = TwoBlocks()
    model(np.ones((1, 20), dtype=np.float32))
    path = tmp_path / "subclassed.keras"
    model.save(path)
    assert "layers" not in _config(path)["config"]  # nothing to number the layers by
    kernels = {
        "dense": model.encoder.get_weights()[0],
        "sequential/dense_1": model.block.layers[0].get_weights()[0],
        "sequential/dense_2": model.block.layers[1].get_weights()[0],
        "dense_3": model.head.get_weights()[0],
    }
    with open_keras(path) as checkpoint:
        assert checkpoint.ids_note is not None and "subclassed" in checkpoint.ids_note
        layers = checkpoint.layers()
        # keras saves a subclassed model's attributes in sorted order: block, encoder, head.
        assert [spec.name for spec in layers] == [
            "sequential/dense_1",
            "sequential/dense_2",
            "dense",
            "dense_3",
        ]
        for spec in layers:
            assert spec.layer_type == LayerType.DENSE
            (matrix,) = checkpoint.matrices(spec)
            assert matrix.tobytes() == kernels[spec.name].tobytes()


def _lambda_payload(marker: Path) -> str:
    """A marshalled lambda that creates `marker` when keras deserializes and calls it."""
    source = f"lambda x: (open({str(marker)!r}, 'w').write('ran'), x)[1]"
    code = compile(source, "<payload>", "eval").co_consts[0]
    return base64.b64encode(marshal.dumps(code)).decode()


def test_malicious_config_is_listed_and_never_run(
    fixture_dir: Path, keras: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "payload-ran"
    source = fixture_dir / "seed_mlp.keras"
    config = _config(source)
    lambda_layer = {
        "module": "keras.layers",
        "class_name": "Lambda",
        "config": {
            "name": "evil",
            "trainable": True,
            "dtype": "float32",
            "function": {
                "class_name": "__lambda__",
                "config": {"code": _lambda_payload(marker), "defaults": None, "closure": None},
            },
            "arguments": {},
        },
        "registered_name": None,
    }
    config["config"]["layers"].insert(2, lambda_layer)
    evil = _rewrite_zip(
        source, tmp_path / "evil.keras", {"config.json": json.dumps(config).encode()}
    )

    names = [(spec.name, spec.layer_type, spec.skip_reason) for spec in _layers(evil)]
    assert names[:3] == [
        ("flatten", LayerType.OTHER, "no weights"),
        ("evil", LayerType.OTHER, "no weights"),
        ("dense", LayerType.DENSE, None),
    ]
    _all_matrices(evil)
    assert not marker.exists()
    # The payload is live: keras, told to trust the file, runs it.
    keras.models.load_model(evil, safe_mode=False)
    assert marker.exists()


def test_layer_from_an_arbitrary_module_is_listed_as_other(
    fixture_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "os-system-ran"
    source = fixture_dir / "seed_mlp.keras"
    config = _config(source)
    config["config"]["layers"].insert(
        2,
        {
            "module": "os",
            "class_name": "system",
            "config": {"name": "shell", "command": f"touch {marker}"},
            "registered_name": "os>system",
        },
    )
    evil = _rewrite_zip(source, tmp_path / "os.keras", {"config.json": json.dumps(config).encode()})
    layers = _layers(evil)
    assert (layers[1].name, layers[1].layer_type, layers[1].skip_reason) == (
        "shell",
        LayerType.OTHER,
        "no weights",
    )
    assert [spec.name for spec in layers if spec.analyzable] == ["dense", "dense_1", "dense_2"]
    assert not marker.exists()


@pytest.mark.slow
def test_describe_of_a_100_mb_keras_file_is_well_under_a_second(keras: Any, tmp_path: Path) -> None:
    keras.utils.clear_session()
    model = keras.Sequential([keras.Input((2048,))] + [keras.layers.Dense(2048) for _ in range(6)])
    path = tmp_path / "big.keras"
    model.save(path)
    assert path.stat().st_size > 100_000_000
    start = time.perf_counter()
    with open_keras(path) as checkpoint:
        layers = checkpoint.layers()
    elapsed = time.perf_counter() - start
    assert len(layers) == 6
    assert elapsed < 0.5, f"describe took {elapsed:.2f} s"


# --- Without tensorflow --------------------------------------------------------------------------


def test_reading_never_imports_tensorflow_or_keras(fixture_dir: Path) -> None:
    script = """
import sys
from pathlib import Path
from wwcli.loaders.keras import open_keras
read = 0
for name in sys.argv[1:]:
    with open_keras(Path(name)) as checkpoint:
        for spec in checkpoint.layers():
            if spec.analyzable:
                read += len(checkpoint.matrices(spec))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras"))
print(read, heavy)
"""
    files = [str(fixture_dir / name) for name in FIXTURE_FILES]
    result = subprocess.run(
        [sys.executable, "-c", script, *files],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    read, heavy = result.stdout.split(" ", 1)
    assert int(read) > 0
    assert heavy.strip() == "[]"


def test_many_dense_keeps_model_order_not_alphabetical(fixture_dir: Path) -> None:
    path = fixture_dir / "many_dense.keras"
    with zipfile.ZipFile(path) as archive:
        weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
        stored = list(weights["layers"])
        weights.close()
    assert stored[:4] == ["dense", "dense_1", "dense_10", "dense_11"]  # what h5py lists
    layers = _layers(path)
    assert [spec.name for spec in layers] == ["dense"] + [f"dense_{i}" for i in range(1, 12)]
    assert [spec.shape[1] for spec in layers] == list(range(8, 20))
    assert [spec.layer_id for spec in layers] == list(range(12))


def test_seed_mlp_in_its_three_formats(fixture_dir: Path) -> None:
    described = {}
    for name, format_name in [
        ("seed_mlp.keras", "keras"),
        ("seed_mlp.h5", "h5"),
        ("seed_mlp.weights.h5", "keras-weights"),
    ]:
        with open_keras(fixture_dir / name) as checkpoint:
            assert checkpoint.format == format_name
            assert (checkpoint.ids_note is None) == (format_name != "keras-weights")
            described[name] = checkpoint.layers()
    expected = [
        (0, "flatten", LayerType.OTHER, (), 0, 0),
        (1, "dense", LayerType.DENSE, (784, 300), 784, 300),
        (2, "dense_1", LayerType.DENSE, (300, 100), 300, 100),
        (3, "dense_2", LayerType.DENSE, (100, 10), 100, 10),
    ]
    for layers in described.values():
        assert [
            (spec.layer_id, spec.name, spec.layer_type, spec.shape, spec.N, spec.M)
            for spec in layers
        ] == expected
    matrices = [_all_matrices(fixture_dir / name) for name in described]
    for layer_id in (1, 2, 3):
        assert matrices[0][layer_id][0].tobytes() == matrices[1][layer_id][0].tobytes()
        assert matrices[0][layer_id][0].tobytes() == matrices[2][layer_id][0].tobytes()


def test_deflated_keras_zip_reads_the_same(fixture_dir: Path, tmp_path: Path) -> None:
    source = fixture_dir / "functional_cnn.keras"
    deflated = _rewrite_zip(source, tmp_path / "deflated.keras", {}, zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(deflated) as archive:
        assert archive.getinfo("model.weights.h5").compress_type == zipfile.ZIP_DEFLATED
    assert _layers(deflated) == _layers(source)
    original, copy = _all_matrices(source), _all_matrices(deflated)
    assert original.keys() == copy.keys()
    for layer_id, matrices in original.items():
        assert [m.tobytes() for m in matrices] == [m.tobytes() for m in copy[layer_id]]


def test_legacy_weights_only_h5_uses_its_layer_names_order(
    fixture_dir: Path, tmp_path: Path
) -> None:
    # tf-keras' save_weights("x.h5") writes, at the root, what a legacy .h5 has in model_weights.
    source = fixture_dir / "seed_mlp.h5"
    path = tmp_path / "weights_only.h5"
    with h5py.File(source, "r") as legacy, h5py.File(path, "w") as out:
        for key, value in legacy["model_weights"].attrs.items():
            out.attrs[key] = value
        for key in legacy["model_weights"]:
            legacy.copy(legacy["model_weights"][key], out, name=key)
    with open_keras(path) as checkpoint:
        assert checkpoint.format == "h5-weights"
        assert checkpoint.ids_note is not None
    assert [(spec.name, spec.layer_type) for spec in _layers(path)] == [
        ("flatten", LayerType.OTHER),
        ("dense", LayerType.DENSE),
        ("dense_1", LayerType.DENSE),
        ("dense_2", LayerType.DENSE),
    ]
    ours, legacy_matrices = _all_matrices(path), _all_matrices(source)
    assert {k: [m.tobytes() for m in v] for k, v in ours.items()} == {
        k: [m.tobytes() for m in v] for k, v in legacy_matrices.items()
    }


def test_weights_file_with_new_style_groups_keeps_model_order(tmp_path: Path) -> None:
    # HDF5 groups made with libver="latest" have no local heap to read the creation order from:
    # the reader falls back on file positions, with keras' counters ordering each class.
    path = tmp_path / "latest.weights.h5"
    names = ["flatten", "dense"] + [f"dense_{i}" for i in range(1, 12)]
    with h5py.File(path, "w", libver="latest") as out:
        out.create_group("vars").attrs["name"] = "model"
        for index, name in enumerate(names):
            variables = out.create_group(f"layers/{name}/vars")
            variables.attrs["name"] = name
            if name != "flatten":
                variables["0"] = np.full((8, index + 7), index, dtype=np.float32)
    layers = _layers(path)
    assert [spec.name for spec in layers] == names
    assert [spec.shape for spec in layers[1:]] == [(8, i + 7) for i in range(1, 13)]


def test_close_releases_the_file_and_is_idempotent(fixture_dir: Path) -> None:
    checkpoint = open_keras(fixture_dir / "seed_mlp.keras")
    spec = checkpoint.layers()[1]
    checkpoint.close()
    checkpoint.close()
    with pytest.raises(LoaderError, match="closed"):
        checkpoint.matrices(spec)


def test_matrices_of_a_layer_without_weights_is_an_error(fixture_dir: Path) -> None:
    path = fixture_dir / "seed_mlp.keras"
    with open_keras(path) as checkpoint:
        flatten = checkpoint.layers()[0]
        with pytest.raises(
            LoaderError, match=r"layer 0 \(flatten\) cannot be analyzed: no weights"
        ):
            checkpoint.matrices(flatten)


# --- Malformed input: one LoaderError each, naming the file ---------------------------------------


@pytest.fixture()
def seed_keras(fixture_dir: Path) -> Path:
    return fixture_dir / "seed_mlp.keras"


def test_missing_file(tmp_path: Path) -> None:
    _assert_loader_error(tmp_path / "absent.keras", "no such file")


def test_directory(tmp_path: Path) -> None:
    _assert_loader_error(tmp_path, "is a directory")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.keras"
    path.write_bytes(b"")
    _assert_loader_error(path, "empty file")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "random.keras"
    path.write_bytes(np.random.default_rng(3).bytes(4096))
    _assert_loader_error(path, "not a Keras checkpoint")


def test_truncated_keras_zip(seed_keras: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.keras"
    path.write_bytes(seed_keras.read_bytes()[: seed_keras.stat().st_size // 2])
    _assert_loader_error(path, "truncated or corrupted zip archive")


@pytest.mark.parametrize("file_name", ["seed_mlp.h5", "seed_mlp.weights.h5"])
def test_truncated_hdf5(file_name: str, fixture_dir: Path, tmp_path: Path) -> None:
    source = fixture_dir / file_name
    path = tmp_path / file_name
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    _assert_loader_error(path, "truncated file")


def test_weights_member_cut_short_inside_a_valid_zip(seed_keras: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(seed_keras) as archive:
        weights = archive.read("model.weights.h5")
    path = _rewrite_zip(seed_keras, tmp_path / "short.keras", {"model.weights.h5": weights[:5000]})
    _assert_loader_error(path, r"truncated file \(model\.weights\.h5")


def test_zip_without_weights(seed_keras: Path, tmp_path: Path) -> None:
    path = _rewrite_zip(seed_keras, tmp_path / "noweights.keras", {"model.weights.h5": None})
    _assert_loader_error(path, "zip archive without model.weights.h5")


def test_zip_with_npz_weights(seed_keras: Path, tmp_path: Path) -> None:
    path = _rewrite_zip(seed_keras, tmp_path / "npz.keras", {"model.weights.h5": None})
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("model.weights.npz", b"")
    _assert_loader_error(path, "model.weights.npz are not supported")


def test_zip_without_config(seed_keras: Path, tmp_path: Path) -> None:
    path = _rewrite_zip(seed_keras, tmp_path / "noconfig.keras", {"config.json": None})
    _assert_loader_error(path, "zip archive without config.json")


def test_unrelated_zip(tmp_path: Path) -> None:
    path = tmp_path / "notes.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    _assert_loader_error(path, "not a .keras file")


def test_config_not_json(seed_keras: Path, tmp_path: Path) -> None:
    path = _rewrite_zip(seed_keras, tmp_path / "badjson.keras", {"config.json": b"{not json"})
    _assert_loader_error(path, "config.json is not valid JSON")


def test_config_not_a_model(seed_keras: Path, tmp_path: Path) -> None:
    path = _rewrite_zip(seed_keras, tmp_path / "list.keras", {"config.json": b"[1, 2]"})
    _assert_loader_error(path, "config.json does not describe a Keras model")


def test_config_layer_without_a_name(seed_keras: Path, tmp_path: Path) -> None:
    config = _config(seed_keras)
    del config["config"]["layers"][2]["config"]["name"]
    data = json.dumps(config).encode()
    path = _rewrite_zip(seed_keras, tmp_path / "noname.keras", {"config.json": data})
    _assert_loader_error(path, "lists a layer without a class name or a name")


def test_config_naming_weights_that_are_missing(seed_keras: Path, tmp_path: Path) -> None:
    config = _config(seed_keras)
    ghost = json.loads(json.dumps(config["config"]["layers"][-1]))
    ghost["config"]["name"] = "ghost"
    config["config"]["layers"].append(ghost)
    data = json.dumps(config).encode()
    path = _rewrite_zip(seed_keras, tmp_path / "ghost.keras", {"config.json": data})
    _assert_loader_error(path, r"names layer 'ghost' \(Dense\) but model.weights.h5 has no weights")


def test_corrupted_config_member(seed_keras: Path, tmp_path: Path) -> None:
    data = bytearray(seed_keras.read_bytes())
    with zipfile.ZipFile(seed_keras) as archive:
        info = archive.getinfo("config.json")
    # Flip one byte of the stored config text: the zip's CRC-32 no longer matches.
    data[info.header_offset + 30 + len(info.filename) + 40] ^= 0x01
    path = tmp_path / "badcrc.keras"
    path.write_bytes(bytes(data))
    _assert_loader_error(path, "cannot read config.json: Bad CRC-32")


def _weights_member_offset(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("model.weights.h5")
    with path.open("rb") as file:
        file.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(file.read(4), dtype="<u2")
    return int(info.header_offset + 30 + name_length + extra_length)


def test_corrupted_weights_header(seed_keras: Path, tmp_path: Path) -> None:
    data = bytearray(seed_keras.read_bytes())
    start = _weights_member_offset(seed_keras)
    data[start : start + 64] = bytes(64)  # wipe the HDF5 superblock
    path = tmp_path / "badheader.keras"
    path.write_bytes(bytes(data))
    _assert_loader_error(path, "model.weights.h5 is not a readable HDF5 file")


def test_corrupted_weight_values_are_caught_before_use(seed_keras: Path, tmp_path: Path) -> None:
    data = bytearray(seed_keras.read_bytes())
    start = _weights_member_offset(seed_keras)
    with zipfile.ZipFile(seed_keras) as archive:
        weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
        kernel_offset = weights["layers/dense/vars/0"].id.get_offset()
        weights.close()
    data[start + kernel_offset + 1000] ^= 0xFF  # one byte inside dense's kernel
    path = tmp_path / "badvalues.keras"
    path.write_bytes(bytes(data))
    assert [spec.name for spec in _layers(path)] == ["flatten", "dense", "dense_1", "dense_2"]
    _assert_loader_error(path, "model.weights.h5 is corrupted")


def test_hdf5_without_keras_weights(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as out:
        out["data"] = np.arange(10)
    _assert_loader_error(path, "HDF5 file without Keras weights")


def test_legacy_h5_without_model_weights(fixture_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "config_only.h5"
    shutil.copy(fixture_dir / "seed_mlp.h5", path)
    with h5py.File(path, "a") as out:
        del out["model_weights"]
    _assert_loader_error(path, "model_config but no model_weights")


def test_legacy_h5_with_bad_model_config(fixture_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad_config.h5"
    shutil.copy(fixture_dir / "seed_mlp.h5", path)
    with h5py.File(path, "a") as out:
        out.attrs["model_config"] = b"{oops"
    _assert_loader_error(path, "model_config is not valid JSON")


def test_legacy_h5_listing_a_missing_dataset(fixture_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "missing_kernel.h5"
    shutil.copy(fixture_dir / "seed_mlp.h5", path)
    with h5py.File(path, "a") as out:
        del out["model_weights/dense_1/sequential/dense_1/kernel"]
    _assert_loader_error(path, "model_weights lists .*kernel for layer 'dense_1' but it is missing")


def test_keras_writes_the_weights_member_uncompressed(fixture_dir: Path) -> None:
    # What lets describe read model.weights.h5 in place instead of unpacking it.
    for name in FIXTURE_FILES:
        if name.endswith(".keras"):
            with zipfile.ZipFile(fixture_dir / name) as archive:
                info = archive.getinfo("model.weights.h5")
            assert info.compress_type == zipfile.ZIP_STORED
