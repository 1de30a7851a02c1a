"""The layer views the state-dict loader tests compare: weightwatcher 0.7.7's and wwcli's."""

from __future__ import annotations

import pytest

from wwcli.loaders.interface import Checkpoint

Row = tuple[str, str, int, int, int]


def ww_rows(model: object) -> dict[int, Row]:
    """weightwatcher 0.7.7's describe() of a model or folder: id -> (name, type, N, M, rf) for
    every layer it would analyze (no size filter)."""
    ww = pytest.importorskip("weightwatcher")
    details = ww.WeightWatcher(model=model).describe(min_evals=0, max_evals=50000)
    return {
        int(row.layer_id): (row.longname, str(row.layer_type), int(row.N), int(row.M), int(row.rf))
        for row in details.itertuples()
    }


def our_rows(checkpoint: Checkpoint) -> dict[int, Row]:
    """The same view of wwcli's layers: the analyzable ones."""
    return {
        layer.layer_id: (layer.name, layer.layer_type.value, layer.N, layer.M, layer.rf)
        for layer in checkpoint.layers()
        if layer.analyzable
    }
