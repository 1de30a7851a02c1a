"""Writes a synthetic transformer-shaped checkpoint: a Hugging Face style folder of BF16 safetensors
shards with a `model.safetensors.index.json`, for benchmarks. Deterministic: the same arguments
give byte-identical files, whatever --workers is (processes drawing tensors in parallel).

    .venv/bin/python benchmarks/make_synthetic.py /tmp/wwbench/b --preset b     # ~126M parameters
    .venv/bin/python benchmarks/make_synthetic.py /tmp/wwbench/c --preset c     # ~420M
    .venv/bin/python benchmarks/make_synthetic.py OUT --hidden 4096 --ffn 11008 --blocks 32 \
        --vocab 32000 --shard-size 5GB                                          # Llama-7B shape

Layout (Llama names): `model.embed_tokens` (vocab x hidden); per block `input_layernorm`,
`self_attn.{q,k,v,o}_proj` (hidden x hidden), `post_attention_layernorm`, and
`mlp.{gate,up,down}_proj` (ffn x hidden, ffn x hidden, hidden x ffn; `--mlp plain` drops the
gate); then `model.norm` and `lm_head` (vocab x hidden). Tensors are written in that order and the
index lists them in that order, so layer ids follow the model (weightwatcher and wwcli agree).

Spectra, so that the power-law fits are realistic (a trained layer is a random bulk plus a
heavy tail): q_proj and k_proj are a Gaussian bulk plus a planted rank-M/8 term U diag(s) V^T
whose squared singular values follow a power law (exponent drawn in [2.5, 4.5]); o_proj, down_proj
and the embedding have Student-t entries (df 3: heavy-tailed ESD); v_proj, gate_proj, up_proj and
lm_head are Gaussian (a Marchenko-Pastur bulk, the fit of an untrained-looking layer). Every
tensor gets its own random stream, seeded by --seed and the tensor's name.

Keep the output folder's path free of the word "safetensors": weightwatcher 0.7.7 then ignores the
index (it replaces that word in the whole glob).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden": 64, "ffn": 160, "blocks": 2, "vocab": 256},
    "b": {"hidden": 768, "ffn": 3072, "blocks": 12, "vocab": 8192},
    "c": {"hidden": 1024, "ffn": 4096, "blocks": 24, "vocab": 8192},
    "llama7b": {"hidden": 4096, "ffn": 11008, "blocks": 32, "vocab": 32000},
}
"""Named sizes: (b) and (c) are issue #6's ~100M and ~400M models, llama7b its GPU check."""

SCALE = 0.02
"""Typical magnitude of a transformer weight; keeps the BF16 values in their normal range."""


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: its key, shape and how its values are drawn."""

    key: str
    """Tensor name, e.g. `model.layers.0.self_attn.q_proj.weight`."""
    shape: tuple[int, ...]
    """Shape as stored (out, in) for a matrix, (hidden,) for a norm scale."""
    kind: str
    """"ones", "gaussian", "student" or "powerlaw" (see the module docstring)."""

    @property
    def nbytes(self) -> int:
        """Size in BF16."""
        return 2 * math.prod(self.shape)


def plan_model(*, hidden: int, ffn: int, blocks: int, vocab: int, mlp: str) -> list[TensorPlan]:
    """The tensors of the model, in model order."""
    plans = [TensorPlan("model.embed_tokens.weight", (vocab, hidden), "student")]
    for block in range(blocks):
        prefix = f"model.layers.{block}"
        plans.append(TensorPlan(f"{prefix}.input_layernorm.weight", (hidden,), "ones"))
        for name, kind in (
            ("q", "powerlaw"),
            ("k", "powerlaw"),
            ("v", "gaussian"),
            ("o", "student"),
        ):
            plans.append(
                TensorPlan(f"{prefix}.self_attn.{name}_proj.weight", (hidden, hidden), kind)
            )
        plans.append(TensorPlan(f"{prefix}.post_attention_layernorm.weight", (hidden,), "ones"))
        if mlp == "gated":
            plans.append(TensorPlan(f"{prefix}.mlp.gate_proj.weight", (ffn, hidden), "gaussian"))
        plans.append(TensorPlan(f"{prefix}.mlp.up_proj.weight", (ffn, hidden), "gaussian"))
        plans.append(TensorPlan(f"{prefix}.mlp.down_proj.weight", (hidden, ffn), "student"))
    plans.append(TensorPlan("model.norm.weight", (hidden,), "ones"))
    plans.append(TensorPlan("lm_head.weight", (vocab, hidden), "gaussian"))
    return plans


def shard_plans(plans: list[TensorPlan], shard_bytes: int) -> list[list[TensorPlan]]:
    """Tensors packed in order into shards of at most `shard_bytes` (a larger tensor alone)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for plan in plans:
        if shards[-1] and size + plan.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += plan.nbytes
    return shards


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def _powerlaw_matrix(rng: np.random.Generator, rows: int, columns: int) -> NDArray[np.float32]:
    """Unit Gaussian entries plus a planted rank-M/8 term: in units of N (the larger side), the
    bulk's ESD ends near (1 + sqrt(M/N))^2 and the planted squared singular values follow a power
    law from that edge up (density ~ lambda^-exponent)."""
    small, large = min(rows, columns), max(rows, columns)
    exponent = float(rng.uniform(2.5, 4.5))
    rank = max(1, small // 8)
    bulk_edge = (1.0 + math.sqrt(small / large)) ** 2
    quantiles = (np.arange(rank, dtype=np.float64) + 0.5) / rank
    tail = bulk_edge * (1.0 - quantiles) ** (-1.0 / (exponent - 1.0))  # eigenvalues, power law
    left = rng.standard_normal((rows, rank), dtype=np.float32)
    right = rng.standard_normal((rank, columns), dtype=np.float32)
    left /= np.linalg.norm(left, axis=0, keepdims=True)
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    left *= np.sqrt(tail * large).astype(np.float32)[None, :]
    matrix = rng.standard_normal((rows, columns), dtype=np.float32)
    matrix += left @ right
    return matrix


def draw(plan: TensorPlan, seed: int) -> NDArray[np.float32]:
    """The float32 values of one tensor (deterministic in seed and key)."""
    if plan.kind == "ones":
        return np.ones(plan.shape, dtype=np.float32)
    rng = _rng(seed, plan.key)
    if plan.kind == "gaussian":
        values = rng.standard_normal(plan.shape, dtype=np.float32)
    elif plan.kind == "student":
        values = rng.standard_t(3.0, size=plan.shape).astype(np.float32)
        values *= np.float32(1.0 / math.sqrt(3.0))  # unit variance
    elif plan.kind == "powerlaw":
        values = _powerlaw_matrix(rng, plan.shape[0], plan.shape[1])
    else:
        raise ValueError(f"unknown kind {plan.kind!r}")
    values *= np.float32(SCALE)
    return values


def to_bfloat16_bits(values: NDArray[np.float32]) -> NDArray[np.uint16]:
    """float32 -> BF16 bit patterns, rounded to nearest even (finite inputs)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    result: NDArray[np.uint16] = ((bits + rounding) >> np.uint32(16)).astype(np.uint16)
    return result


def _header(shard: list[TensorPlan]) -> bytes:
    """The safetensors header of a shard, padded with spaces to a multiple of 8 bytes."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for plan in shard:
        entries[plan.key] = {
            "dtype": "BF16",
            "shape": list(plan.shape),
            "data_offsets": [offset, offset + plan.nbytes],
        }
        offset += plan.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _one_blas_thread() -> None:
    """Worker processes run BLAS on one thread each: `workers` of them share the cores."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)


def write_tensor(path: Path, offset: int, plan: TensorPlan, seed: int) -> None:
    """Draw one tensor and write its BF16 bytes at `offset` of the (pre-sized) file `path`."""
    bits = to_bfloat16_bits(draw(plan, seed))
    with path.open("r+b") as stream:
        stream.seek(offset)
        bits.tofile(stream)


def write_model(
    folder: Path,
    *,
    hidden: int,
    ffn: int,
    blocks: int,
    vocab: int,
    mlp: str = "gated",
    shard_bytes: int = 128 << 20,
    seed: int = 0,
    workers: int = 1,
) -> dict[str, Any]:
    """Write the model's shards, index and config.json into `folder`; returns a summary."""
    plans = plan_model(hidden=hidden, ffn=ffn, blocks=blocks, vocab=vocab, mlp=mlp)
    shards = shard_plans(plans, shard_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("model-*-of-*.safetensors"):
        stale.unlink()
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {
        plan.key: name for name, shard in zip(names, shards, strict=True) for plan in shard
    }
    # Headers first, files at their final size; then every tensor is drawn and written at its
    # offset, by `workers` processes (no data goes through pipes; the bytes do not depend on
    # which process wrote them).
    jobs: list[tuple[Path, int, TensorPlan]] = []
    for name, shard in zip(names, shards, strict=True):
        header = _header(shard)
        path = folder / name
        with path.open("wb") as stream:
            stream.write(header)
            stream.truncate(len(header) + sum(plan.nbytes for plan in shard))
        offset = len(header)
        for plan in shard:
            jobs.append((path, offset, plan))
            offset += plan.nbytes
    # Largest first, so that the pool does not end on one big tensor.
    jobs.sort(key=lambda job: -job[2].nbytes)
    if workers == 1:
        for path, offset, plan in jobs:
            write_tensor(path, offset, plan, seed)
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_one_blas_thread) as pool:
            futures = [
                pool.submit(write_tensor, path, offset, plan, seed) for path, offset, plan in jobs
            ]
            for future in futures:
                future.result()
    total = sum(plan.nbytes for plan in plans)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": blocks,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "wwcli_synthetic": {"seed": seed, "mlp": mlp},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    matrices = [plan for plan in plans if len(plan.shape) == 2]
    return {
        "folder": str(folder),
        "parameters": sum(math.prod(plan.shape) for plan in plans),
        "bytes": total,
        "shards": len(shards),
        "tensors": len(plans),
        "matrices": len(matrices),
    }


def parse_size(text: str) -> int:
    """'256MB', '5GB', '1000000' -> bytes (powers of 1024 for KB/MB/GB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB, 5GB)")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    return int(number * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="output folder (created; shards replaced)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named sizes (flags override)")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--ffn", type=int)
    parser.add_argument("--blocks", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--mlp", choices=("gated", "plain"), default="gated")
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("128MB"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes drawing tensors")
    args = parser.parse_args(argv)
    sizes = dict(PRESETS[args.preset]) if args.preset else {}
    for name in ("hidden", "ffn", "blocks", "vocab"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    missing = [name for name in ("hidden", "ffn", "blocks", "vocab") if name not in sizes]
    if missing:
        parser.error(f"give --preset or --{' --'.join(missing)}")
    if "safetensors" in str(args.folder.resolve()):
        print(
            f"warning: {args.folder}: a path containing 'safetensors' makes weightwatcher 0.7.7 "
            "ignore the index",
            file=sys.stderr,
        )
    start = time.perf_counter()
    summary = write_model(
        args.folder,
        mlp=args.mlp,
        shard_bytes=args.shard_size,
        seed=args.seed,
        workers=max(1, args.workers),
        **sizes,
    )
    summary["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
