"""A generated training run for the sweep, compare, cache, worker and Dask tests: checkpoints
written with numpy (safetensors by hand, a Hugging Face style sub-folder, and on request a
PyTorch state dict), deterministic, with one planted layer that turns heavy-tailed from the
7th checkpoint on (Student-t entries with one degree of freedom: alpha well below 2), while
the other layers stay Gaussian (alpha well above 2)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

PLANTED = "encoder.planted"
"""The layer that degrades."""
DEGRADES_FROM = 7
"""The first checkpoint (1-based) where the planted layer is heavy-tailed."""
SHAPES = {
    "encoder.dense": (256, 128),
    PLANTED: (256, 128),
    "head.proj": (192, 96),
}
"""The analyzed layers (2-D weights, stored (out, in)); every checkpoint also has a norm scale."""


def tensors(step: int, *, scale: int = 1) -> dict[str, np.ndarray]:
    """The weights of checkpoint `step` (1-based), float32; `scale` multiplies every side."""
    weights: dict[str, np.ndarray] = {}
    for number, (name, (rows, columns)) in enumerate(SHAPES.items()):
        rng = np.random.default_rng([number, step])
        shape = (rows * scale, columns * scale)
        if name == PLANTED and step >= DEGRADES_FROM:
            values = rng.standard_t(1.0, shape)
        else:
            values = rng.standard_normal(shape)
        weights[f"{name}.weight"] = (0.05 * values).astype(np.float32)
    weights["encoder.norm.weight"] = np.ones(SHAPES["encoder.dense"][1] * scale, np.float32)
    return weights


def write_safetensors(path: Path, weights: dict[str, np.ndarray]) -> None:
    """A safetensors file written by hand: a JSON header, then the raw little-endian bytes."""
    header: dict[str, object] = {}
    offset = 0
    for key, value in weights.items():
        header[key] = {
            "dtype": "F32",
            "shape": list(value.shape),
            "data_offsets": [offset, offset + value.nbytes],
        }
        offset += value.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with path.open("wb") as stream:
        stream.write(struct.pack("<Q", len(text)))
        stream.write(text)
        for value in weights.values():
            stream.write(np.ascontiguousarray(value, dtype="<f4").tobytes())


def write_torch(path: Path, weights: dict[str, np.ndarray]) -> None:
    """A PyTorch state dict (torch.save), for a run of mixed formats."""
    import torch

    torch.save({key: torch.from_numpy(value.copy()) for key, value in weights.items()}, path)


def make_run(
    folder: Path,
    *,
    count: int = 12,
    hf_folders: tuple[int, ...] = (4,),
    torch_files: tuple[int, ...] = (),
    scale: int = 1,
) -> list[Path]:
    """Checkpoints ckpt-1 ... ckpt-<count> in `folder` (created), in step order: safetensors
    files, a model sub-folder (config.json + model.safetensors) for the steps in `hf_folders`,
    and a .pt state dict for those in `torch_files`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for step in range(1, count + 1):
        weights = tensors(step, scale=scale)
        if step in hf_folders:
            path = folder / f"ckpt-{step}"
            path.mkdir(exist_ok=True)
            (path / "config.json").write_text('{"model_type": "test"}\n', encoding="utf-8")
            write_safetensors(path / "model.safetensors", weights)
        elif step in torch_files:
            path = folder / f"ckpt-{step}.pt"
            write_torch(path, weights)
        else:
            path = folder / f"ckpt-{step}.safetensors"
            write_safetensors(path, weights)
        paths.append(path)
    return paths
