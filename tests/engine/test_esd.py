"""Eigenvalues: known spectra, orientation, dtypes, conv pooling, precision and backends."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
import scipy.linalg

from tests.engine.spectra import heavy_tailed, with_singular_values
from wwcli.engine.esd import (
    eigenvalues,
    gram_noise_floor,
    per_matrix_eigenvalues,
    pooled_eigenvalues,
)


@pytest.mark.parametrize(("rows", "columns"), [(200, 200), (300, 120), (80, 250)])
@pytest.mark.parametrize("condition", [10.0, 1e4])
def test_known_spectrum_is_recovered(rows: int, columns: int, condition: float) -> None:
    rng = np.random.default_rng(rows * 7 + columns)
    k = min(rows, columns)
    singular_values = np.sort(np.geomspace(1.0, 1.0 / condition, k) * rng.uniform(0.5, 2.0))
    w = with_singular_values(rng, rows, columns, singular_values)
    expected = singular_values**2
    got = eigenvalues(w)
    assert got.shape == (k,)
    assert got.dtype == np.float64
    assert np.all(np.diff(got) >= 0)
    assert got[-1] == pytest.approx(expected[-1], rel=1e-10)
    # A Gram squares the condition number: every value to 1e-10 * lambda_max, absolute.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10 * expected[-1])


def test_orientation_does_not_matter() -> None:
    w = heavy_tailed(np.random.default_rng(1), 150, 60, df=3)
    np.testing.assert_allclose(eigenvalues(w), eigenvalues(w.T), rtol=1e-12)
    np.testing.assert_allclose(eigenvalues(np.asfortranarray(w)), eigenvalues(w), rtol=1e-12)


def test_top_of_spectrum_matches_full_svd() -> None:
    w = heavy_tailed(np.random.default_rng(2), 400, 300, df=2.5).astype(np.float32)
    reference = np.sort(scipy.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2)
    got = eigenvalues(w)
    top = slice(-30, None)
    np.testing.assert_allclose(got[top], reference[top], rtol=1e-11)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_any_float_dtype_is_accumulated_in_float64(dtype: type[np.floating[object]]) -> None:
    w = np.random.default_rng(3).standard_normal((64, 48)).astype(dtype)
    exact = np.sort(scipy.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2)
    np.testing.assert_allclose(eigenvalues(w), exact, rtol=1e-10, atol=1e-12 * exact[-1])


def test_negative_round_off_is_clipped_and_rank_one_is_one_eigenvalue() -> None:
    rng = np.random.default_rng(4)
    w = np.outer(rng.standard_normal(90), rng.standard_normal(40))
    got = eigenvalues(w)
    assert np.all(got >= 0)
    assert got[-1] == pytest.approx(np.sum(w**2), rel=1e-12)
    assert np.all(got[:-1] <= gram_noise_floor(got[-1], M=40))


def test_pooled_conv_spectrum_is_concatenated_and_halved() -> None:
    rng = np.random.default_rng(5)
    kernel = heavy_tailed(rng, 32, 16, df=3)[:, :, None, None] * rng.uniform(0.5, 2, (1, 1, 3, 3))
    slices = [kernel[:, :, i, j] for i in range(3) for j in range(3)]
    per_slice = per_matrix_eigenvalues(slices)
    assert len(per_slice) == 9
    assert all(values.shape == (16,) for values in per_slice)
    pooled = pooled_eigenvalues(slices)
    np.testing.assert_array_equal(pooled, np.sort(np.concatenate(per_slice)))
    halved = pooled_eigenvalues(slices, conv2d_norm=True)
    np.testing.assert_allclose(halved, pooled / 2, rtol=1e-15)
    # Mixed orientation of the slices gives the same ESD.
    mixed = [s.T if i % 2 else s for i, s in enumerate(slices)]
    np.testing.assert_allclose(pooled_eigenvalues(mixed), pooled, rtol=1e-12)
    # The unpooled mode halves too.
    np.testing.assert_allclose(
        per_matrix_eigenvalues(slices, conv2d_norm=True)[4], per_slice[4] / 2, rtol=1e-15
    )


def test_tall_matrices_are_accumulated_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import wwcli.engine.esd as esd

    w = heavy_tailed(np.random.default_rng(6), 1000, 50, df=3)
    whole = eigenvalues(w)
    monkeypatch.setattr(esd, "_BLOCK_ELEMENTS", 50 * 64)  # 64 rows per block, 16 blocks
    np.testing.assert_allclose(eigenvalues(w), whole, rtol=1e-12)


def test_float32_precision_keeps_the_top_and_loses_the_bottom() -> None:
    rng = np.random.default_rng(7)
    singular_values = np.geomspace(1.0, 1.0 / 4096, 256)
    w = with_singular_values(rng, 512, 256, singular_values)
    expected = np.sort(singular_values**2)
    single = eigenvalues(w, precision="float32")
    assert single.dtype == np.float64
    assert single[-1] == pytest.approx(expected[-1], rel=1e-5)
    smallest = slice(0, 25)
    error_32 = np.max(np.abs(single[smallest] - expected[smallest]) / expected[smallest])
    error_64 = np.max(np.abs(eigenvalues(w)[smallest] - expected[smallest]) / expected[smallest])
    assert error_64 < 1e-6 < error_32  # why float64 is the default


def test_bad_arguments_raise_value_error_naming_them() -> None:
    with pytest.raises(ValueError, match=r"matrices\[0\] must be 2-D"):
        eigenvalues(np.ones(5))
    with pytest.raises(ValueError, match="real"):
        eigenvalues(np.ones((3, 3), dtype=complex))
    with pytest.raises(ValueError, match="empty"):
        eigenvalues(np.ones((0, 3)))
    with pytest.raises(ValueError, match="backend"):
        eigenvalues(np.ones((3, 3)), backend="jax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision"):
        eigenvalues(np.ones((3, 3)), precision="float16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device"):
        eigenvalues(np.ones((3, 3)), device="cuda")


def test_missing_torch_is_a_clear_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ValueError, match="torch is not installed"):
        eigenvalues(np.ones((3, 3)), backend="torch")


def test_numpy_backend_does_not_import_torch() -> None:
    import subprocess

    code = (
        "import sys, numpy as np\n"
        "from wwcli.engine import analyze_layer\n"
        "analyze_layer([np.random.default_rng(0).standard_normal((40, 30))])\n"
        "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def torch() -> Any:
    """The torch module, or a skip where it is not installed."""
    return pytest.importorskip("torch")


@pytest.mark.usefixtures("torch")
@pytest.mark.parametrize(("rows", "columns"), [(300, 120), (120, 300), (64, 64)])
def test_torch_cpu_equals_numpy_to_round_off(rows: int, columns: int) -> None:
    w = heavy_tailed(np.random.default_rng(rows + columns), rows, columns, df=2.5)
    ours = eigenvalues(w)
    theirs = eigenvalues(w, backend="torch", device="cpu")
    assert theirs.dtype == np.float64
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-12 * ours[-1])


@pytest.mark.usefixtures("torch")
def test_torch_pooled_float16_input_and_float32_precision() -> None:
    rng = np.random.default_rng(8)
    slices = [heavy_tailed(rng, 40, 24, df=3).astype(np.float16) for _ in range(4)]
    ours = pooled_eigenvalues(slices, conv2d_norm=True)
    theirs = pooled_eigenvalues(slices, conv2d_norm=True, backend="torch")
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-12 * ours[-1])
    single = pooled_eigenvalues(slices, backend="torch", precision="float32")
    np.testing.assert_allclose(single[-10:], 2 * ours[-10:], rtol=1e-5)


def test_torch_cuda_without_a_gpu_is_a_value_error(torch: Any) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="cuda"):
        eigenvalues(np.ones((3, 3)), backend="torch", device="cuda")


def test_torch_cuda_equals_numpy(torch: Any) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    w = heavy_tailed(np.random.default_rng(9), 500, 200, df=2.5)
    ours = eigenvalues(w)
    on_gpu = eigenvalues(w, backend="torch", device="cuda")
    np.testing.assert_allclose(on_gpu, ours, rtol=0, atol=1e-12 * ours[-1])
