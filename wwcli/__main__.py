"""Entry point for `python -m wwcli`."""

from wwcli.cli import app

app(prog_name="wwcli")
