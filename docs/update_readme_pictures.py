"""Regenerates the README's pictures: the ESD plot of the very heavy-tailed layer of a shipped
fixture and that fixture's overview figure, drawn by `wwcli analyze --plot` itself.

Run: python docs/update_readme_pictures.py   (tests/test_readme.py checks that it works)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from typer.testing import CliRunner

from wwcli.cli import app

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "keras" / "heavy_tailed_mlp.keras"
PICTURES = {
    "0001-dense_1.png": "esd-example.png",
    "overview-00-heavy_tailed_mlp.keras.png": "overview-example.png",
}
"""The picture --plot writes, and the name it has in docs/."""


def write_pictures(folder: Path) -> list[Path]:
    """Draw the fixture's pictures and copy the README's two into `folder`."""
    with tempfile.TemporaryDirectory() as scratch:
        result = CliRunner().invoke(
            app, ["analyze", str(FIXTURE), "--plot", scratch, "--exit-zero", "-q", "-f", "csv"]
        )
        if result.exit_code != 0:
            raise RuntimeError(f"wwcli analyze --plot failed: {result.output}")
        written = []
        for drawn, name in PICTURES.items():
            target = folder / name
            shutil.copyfile(Path(scratch) / drawn, target)
            written.append(target)
    return written


def main() -> int:
    for path in write_pictures(ROOT / "docs"):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
