"""LAPACK's two-stage eigensolver (engine/_lapack.py): the same eigenvalues and fits as numpy's
syevd, used only from TWO_STAGE_MIN_ORDER up, and a clean fall-back where it is unavailable."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import wwcli.engine._lapack as lapack
import wwcli.engine.esd as esd
from tests.engine.spectra import heavy_tailed, with_singular_values
from wwcli.engine import analyze_layer, eigenvalues, per_matrix_eigenvalues

ORDER = lapack.TWO_STAGE_MIN_ORDER + 40


@pytest.fixture
def solver_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The orders of the Grams that reached the two-stage solver during the test."""
    calls: list[int] = []
    real = lapack.two_stage_eigvalsh

    def counting(gram: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
        calls.append(gram.shape[0])
        return real(gram)

    monkeypatch.setattr(esd, "two_stage_eigvalsh", counting)
    return calls


def _syevd_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lapack, "enabled", False)


def test_numpy_openblas_provides_the_two_stage_solver() -> None:
    # The pinned numpy wheels bundle scipy-openblas64 with LAPACKE; if a numpy update drops it,
    # this test says so (wwcli still works, through syevd, only slower on large layers).
    gram = np.diag(np.arange(1.0, 9.0))
    values = lapack.two_stage_eigvalsh(gram.copy())
    assert values is not None, "no dsyevd_2stage found in numpy's OpenBLAS"
    np.testing.assert_allclose(values, np.arange(1.0, 9.0), rtol=1e-14)


def test_known_spectrum_above_the_threshold(solver_calls: list[int]) -> None:
    rng = np.random.default_rng(11)
    singular_values = np.sort(np.geomspace(1.0, 1e-2, ORDER) * 3.0)
    w = with_singular_values(rng, ORDER + 60, ORDER, singular_values)
    got = eigenvalues(w)
    expected = singular_values**2
    assert solver_calls == [ORDER]
    assert np.all(np.diff(got) >= 0)
    assert got[-1] == pytest.approx(expected[-1], rel=1e-10)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10 * expected[-1])


def test_equals_syevd_to_round_off_and_fits_the_same(
    monkeypatch: pytest.MonkeyPatch, solver_calls: list[int]
) -> None:
    w = heavy_tailed(np.random.default_rng(12), 2 * ORDER, ORDER, df=2.5).astype(np.float32)
    fast = eigenvalues(w)
    layer_fast = analyze_layer([w])
    assert solver_calls == [ORDER, ORDER]
    _syevd_only(monkeypatch)
    plain = eigenvalues(w)
    layer_plain = analyze_layer([w])
    assert solver_calls == [ORDER, ORDER, ORDER, ORDER]  # asked, and declined: disabled
    np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-13 * plain[-1])
    top = slice(-ORDER // 10, None)
    np.testing.assert_allclose(fast[top], plain[top], rtol=1e-12)
    # The same candidate is chosen (same tail size); xmin itself differs by round-off.
    assert layer_fast.fit.xmin == pytest.approx(layer_plain.fit.xmin, rel=1e-12)
    assert layer_fast.fit.num_pl_spikes == layer_plain.fit.num_pl_spikes
    assert layer_fast.fit.alpha == pytest.approx(layer_plain.fit.alpha, rel=1e-10)


def test_small_grams_and_float32_keep_syevd(solver_calls: list[int]) -> None:
    rng = np.random.default_rng(13)
    eigenvalues(rng.standard_normal((300, lapack.TWO_STAGE_MIN_ORDER - 1)))
    eigenvalues(rng.standard_normal((ORDER, ORDER)), precision="float32")
    assert solver_calls == []


def test_stacked_conv_slices_use_it_one_by_one_above_the_threshold(
    solver_calls: list[int],
) -> None:
    rng = np.random.default_rng(14)
    slices = [rng.standard_normal((ORDER, ORDER // 2)) for _ in range(2)]
    per_slice = per_matrix_eigenvalues(slices)
    assert solver_calls == []  # ORDER // 2 is below the threshold: one stacked syevd call
    for matrix, values in zip(slices, per_slice, strict=True):
        np.testing.assert_allclose(values, np.linalg.eigvalsh(matrix.T @ matrix), atol=1e-9)
    big = [rng.standard_normal((ORDER, ORDER)) for _ in range(2)]
    solver_calls.clear()
    per_matrix_eigenvalues(big)
    assert solver_calls == [ORDER, ORDER]


def test_a_library_without_the_solver_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lapack, "_resolved", True)
    monkeypatch.setattr(lapack, "_solver", None)
    w = np.random.default_rng(15).standard_normal((ORDER, ORDER))
    assert lapack.two_stage_eigvalsh(w.T @ w) is None
    np.testing.assert_allclose(
        eigenvalues(w), np.linalg.eigvalsh(w.T @ w), rtol=0, atol=1e-12 * ORDER**2
    )


def test_self_check_rejects_a_solver_that_gives_wrong_values() -> None:
    def wrong(gram: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.sort(np.diag(gram)).astype(np.float64)

    def failing(gram: np.ndarray[Any, Any]) -> None:
        return None

    assert not lapack._self_check(wrong)
    assert not lapack._self_check(failing)
    assert lapack._self_check(np.linalg.eigvalsh)


def test_lapack_failure_falls_back_to_syevd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(esd, "two_stage_eigvalsh", lambda gram: None)
    w = np.random.default_rng(16).standard_normal((ORDER, ORDER))
    np.testing.assert_allclose(
        eigenvalues(w), np.linalg.eigvalsh(w.T @ w), rtol=0, atol=1e-12 * ORDER**2
    )


def test_concurrent_calls_give_the_serial_bytes() -> None:
    # wwcli runs layers in threads, each calling LAPACK with the GIL released.
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(17)
    matrices = [rng.standard_t(3, size=(ORDER + 9 * i, ORDER)).astype(np.float32) for i in range(4)]
    with threadpool_limits(limits=1):
        serial = [eigenvalues(m) for m in matrices]
        with ThreadPoolExecutor(max_workers=2) as pool:
            parallel = list(pool.map(eigenvalues, matrices))
    for one, other in zip(serial, parallel, strict=True):
        assert np.array_equal(one, other)


def test_torch_eigensolver_when_asked_equals_lapack() -> None:
    pytest.importorskip("torch")
    w = heavy_tailed(np.random.default_rng(18), 500, 300, df=2.5)
    via_torch = eigenvalues(w, torch_eigh_min_order=300)
    via_lapack = eigenvalues(w)
    np.testing.assert_allclose(via_torch, via_lapack, rtol=0, atol=1e-13 * via_lapack[-1])
    # Below the order, and in float32, LAPACK keeps the work.
    assert np.array_equal(eigenvalues(w, torch_eigh_min_order=301), via_lapack)
    assert np.array_equal(
        eigenvalues(w, precision="float32", torch_eigh_min_order=1),
        eigenvalues(w, precision="float32"),
    )


def test_torch_eigh_min_order_is_validated() -> None:
    from wwcli.engine import EngineOptions

    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="torch_eigh_min_order"):
            EngineOptions(torch_eigh_min_order=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("block_elements", [None, 700 * 300])
@pytest.mark.parametrize("shape", [(1500, 700), (700, 1500)])
def test_grams_are_exactly_symmetric(
    monkeypatch: pytest.MonkeyPatch, block_elements: int | None, shape: tuple[int, int]
) -> None:
    # The two-stage solver reads the other triangle than numpy's eigvalsh: the same matrix only
    # because the Gram is symmetric to the bit.
    if block_elements is not None:
        monkeypatch.setattr(esd, "_BLOCK_ELEMENTS", block_elements)
    w = np.random.default_rng(19).standard_normal(shape).astype(np.float32)
    gram = esd._gram_numpy(esd._tall(w), np.float64)
    assert np.array_equal(gram, gram.T)
