"""Checkpoint readers: one module per file format, chosen by `open_checkpoint`."""

from wwcli.loaders.detect import open_checkpoint
from wwcli.loaders.interface import Checkpoint, LayerSpec, LayerType, LoaderError

__all__ = ["Checkpoint", "LayerSpec", "LayerType", "LoaderError", "open_checkpoint"]
