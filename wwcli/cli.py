"""The `wwcli` command line: parses options, wires loaders, engine, reports and the gate."""

from __future__ import annotations

from typing import Annotated

import typer

from wwcli import __version__

app = typer.Typer(
    name="wwcli",
    help="Heavy-tailed spectral diagnostics (alpha) for saved neural-network checkpoints.",
    no_args_is_help=True,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"wwcli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Heavy-tailed spectral diagnostics (alpha) for saved neural-network checkpoints."""
