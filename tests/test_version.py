from typer.testing import CliRunner

from wwcli import __version__
from wwcli.cli import app


def test_version_prints_the_package_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"wwcli {__version__}"
