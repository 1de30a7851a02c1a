"""Bad-input corpus entries for HDF5 (.keras, .h5, .weights.h5): external storage, links, virtual datasets, storage-size bombs, link DAGs, the helper's caps.

Each entry is a `BadInput` (tests/hostile/make_corpus.py); test_corpus.py runs every one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.hostile.make_corpus import BadInput


def cases() -> list[BadInput]:
    """This module's entries, in a stable order."""
    return []
