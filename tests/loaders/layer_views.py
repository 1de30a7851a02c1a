"""The layer views the state-dict loader tests compare: weightwatcher 0.7.7's and wwcli's."""

from __future__ import annotations

import pytest

from wwcli.loaders._statedict import StateDictCheckpoint
from wwcli.loaders.interface import Checkpoint, LayerSpec, LayerType

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
    """The same view of wwcli's layers: the analyzable ones.

    weightwatcher types a state dict's tensors by rank alone, so a 2-D embedding table is its
    "dense"; wwcli types it `embedding` by name (`_statedict.is_embedding_name`), a deliberate
    difference that changes no id and no number. For a state dict the view therefore shows
    wwcli's embedding as weightwatcher's "dense"; every other type must be the same."""
    state_dict = isinstance(checkpoint, StateDictCheckpoint)

    def shown_type(layer: LayerSpec) -> str:
        if state_dict and layer.layer_type is LayerType.EMBEDDING:
            return LayerType.DENSE.value
        return layer.layer_type.value

    return {
        layer.layer_id: (layer.name, shown_type(layer), layer.N, layer.M, layer.rf)
        for layer in checkpoint.layers()
        if layer.analyzable
    }
