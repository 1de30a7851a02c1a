"""The README's example output is the tool's real output, not typed by hand."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_is_current(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    script = ROOT / "docs" / "update_readme_example.py"
    spec = importlib.util.spec_from_file_location("update_readme_example", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- example:start -->\n.*?<!-- example:end -->", readme, re.DOTALL)
    assert found is not None, "README.md lost its example block"
    assert found.group(0) == module.example_block(), (
        "README example is stale: run python docs/update_readme_example.py"
    )


def test_readme_pictures_are_drawn_by_the_tool(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    script = ROOT / "docs" / "update_readme_pictures.py"
    spec = importlib.util.spec_from_file_location("update_readme_pictures", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.write_pictures(tmp_path)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in written:
        assert f"docs/{path.name}" in readme, f"README does not show {path.name}"
        assert (ROOT / "docs" / path.name).is_file()
        pixels = imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 600
        assert pixels.std() > 0.05  # not blank
