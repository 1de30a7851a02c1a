"""Pictures from the command line: --plot, --html, `wwcli report`, --spectra. They are drawn
after the numbers and never change them; matplotlib is needed only when one is asked for."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from wwcli.cli import app

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
CNN = FIXTURES / "safetensors" / "cnn.safetensors"
SEED = FIXTURES / "keras" / "seed_mlp.keras"

runner = CliRunner()

pytest.importorskip("matplotlib")


def _json(*args: str) -> dict[str, object]:
    result = runner.invoke(app, ["analyze", str(CNN), "-f", "json", "--exit-zero", *args])
    assert result.exit_code == 0, result.output
    document: dict[str, object] = json.loads(result.stdout)
    return document


def test_plot_writes_an_overview_and_one_esd_per_analyzed_layer(tmp_path: Path) -> None:
    folder = tmp_path / "plots"
    with_plots = _json("--plot", str(folder), "-q")
    layers = with_plots["layers"]
    assert isinstance(layers, list) and layers
    files = sorted(path.name for path in folder.iterdir())
    assert len(files) == len(layers) + 1
    assert sum(name.startswith("overview-") for name in files) == 1
    for layer in layers:
        assert any(name.startswith(f"{layer['layer_id']:04d}-") for name in files)
    assert all(name.endswith(".png") for name in files)
    # Pictures never change a number: the layers are the same with and without them.
    assert _json()["layers"] == layers


def test_plot_format_svg_and_several_checkpoints_get_a_folder_each(tmp_path: Path) -> None:
    folder = tmp_path / "plots"
    result = runner.invoke(
        app,
        ["analyze", str(CNN), str(SEED), "--plot", str(folder), "--plot-format", "svg"],
    )
    assert result.exit_code in (0, 1), result.output
    folders = sorted(path for path in folder.iterdir())
    assert len(folders) == 2 and all(path.is_dir() for path in folders)
    for sub in folders:
        assert all(path.suffix == ".svg" for path in sub.iterdir())
        assert sum(path.name.startswith("overview-") for path in sub.iterdir()) == 1


def test_plot_refuses_a_file_in_the_folders_place(tmp_path: Path) -> None:
    occupied = tmp_path / "plots"
    occupied.write_text("mine")
    result = runner.invoke(app, ["analyze", str(CNN), "--plot", str(occupied)])
    assert result.exit_code == 2
    assert occupied.read_text() == "mine"


def test_spectra_hold_every_layers_eigenvalues_by_name(tmp_path: Path) -> None:
    target = tmp_path / "spectra.npz"
    document = _json("--spectra", str(target))
    layers = document["layers"]
    assert isinstance(layers, list)
    with np.load(target, allow_pickle=False) as archive:
        assert sorted(archive.files) == sorted(layer["name"] for layer in layers)
        for layer in layers:
            eigenvalues = archive[layer["name"]]
            assert eigenvalues.shape == (layer["num_evals"],)
            assert eigenvalues.max() == pytest.approx(layer["lambda_max"], rel=1e-12)
            assert np.all(np.diff(eigenvalues) >= 0)
    first = target.read_bytes()
    _json("--spectra", str(target))
    assert target.read_bytes() == first  # the same run, the same bytes


def test_html_from_analyze_and_from_report(tmp_path: Path) -> None:
    page = tmp_path / "analyze.html"
    document = _json("--html", str(page))
    layers = document["layers"]
    assert isinstance(layers, list)
    text = page.read_text(encoding="utf-8")
    assert text.count("<img") == len(layers) + 1
    assert "http://" not in text and "https://" not in text and "<script" not in text

    other = tmp_path / "report.html"
    result = runner.invoke(
        app, ["report", str(FIXTURES / "keras" / "heavy_tailed_mlp.keras"), "-o", str(other)]
    )
    assert result.exit_code == 0, result.output  # report shows; it does not gate
    assert result.stdout == ""
    assert other.read_text(encoding="utf-8").count("<img") >= 2


def test_without_matplotlib_a_picture_is_a_clear_usage_error(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["matplotlib"] = None  # as if it were not installed
        sys.argv = ["wwcli", "analyze", {str(CNN)!r}, "--plot", {str(tmp_path / "p")!r}]
        from wwcli.entry import main
        main()
        """
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 2, completed.stderr
    assert "wwcli[plot]" in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_a_plain_analyze_does_not_import_matplotlib() -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from typer.testing import CliRunner
        from wwcli.cli import app
        result = CliRunner().invoke(app, ["analyze", {str(CNN)!r}, "--exit-zero"])
        assert result.exit_code == 0, result.output
        print("matplotlib" in sys.modules)
        """
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.stdout.strip() == "False", completed.stderr
