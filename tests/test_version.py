from typer.testing import CliRunner

from wwcli import __version__
from wwcli.cli import app


def test_version_prints_the_package_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"wwcli {__version__}"


def test_python_dash_m_runs_the_command() -> None:
    import subprocess
    import sys

    completed = subprocess.run(
        [sys.executable, "-m", "wwcli", "--version"], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0
    assert completed.stdout.strip() == f"wwcli {__version__}"
