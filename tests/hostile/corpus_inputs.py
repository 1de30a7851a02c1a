"""Bad-input corpus entries for safetensors headers, model folders, symlinks and hostile names.

Each entry is a `BadInput` (tests/hostile/make_corpus.py); test_corpus.py runs every one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.hostile.make_corpus import BadInput


def cases() -> list[BadInput]:
    """This module's entries, in a stable order."""
    return []
