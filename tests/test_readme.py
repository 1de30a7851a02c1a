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
