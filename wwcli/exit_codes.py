"""What `wwcli` returns to the shell. Imports nothing, so `wwcli --help` stays fast."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What `wwcli` returns to the shell."""

    OK = 0
    """No layer tripped the gate (or --exit-zero was given)."""
    GATE = 1
    """Some analyzed layer tripped the gate: alpha below --fail-below, above --fail-above, or a
    failed fit with --fail-on-failed-fit."""
    ERROR = 2
    """Usage error, or an input that is missing, unreadable, unsupported or unsafe; also any
    internal error (a crash is never reported as 1)."""
