"""The `wwcli` executable: the command line, and what a well-behaved Unix tool does at its edges.

Ctrl-C and SIGTERM stop the run with the same clean-up (the HDF5 helper process is stopped,
no half-written report is left), then the process dies by that signal, so a shell loop over
checkpoints stops too. A closed stdout (`wwcli analyze ... | head -1`) ends the run quietly.
A Ctrl-C during start-up, while modules are imported, prints no traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def _die_by(signum: int) -> None:
    """Stop helper processes, then end this process by `signum` with its default action."""
    isolated = sys.modules.get("wwcli.loaders.isolated")
    stop = getattr(isolated, "stop_helpers", None)
    if callable(stop):
        stop()
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    sys.exit(128 + signum)  # only where the signal did not end the process


def main() -> None:
    """Run the command line (the `wwcli` console script and `python -m wwcli`)."""
    try:
        from wwcli import cli

        signal.signal(signal.SIGTERM, cli.raise_terminated)
    except KeyboardInterrupt:
        _die_by(signal.SIGINT)
        return
    code: int | str | None = 0
    try:
        cli.app(prog_name="wwcli")
    except SystemExit as exit_:
        code = exit_.code
    except KeyboardInterrupt:  # outside a command (while options are parsed)
        cli.death_signal = signal.SIGINT
    if cli.death_signal is None:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            cli.death_signal = signal.SIGPIPE
    if cli.death_signal is not None:
        if cli.death_signal == signal.SIGPIPE:
            cli.silence_stdout()
        _die_by(cli.death_signal)
    sys.exit(code)
