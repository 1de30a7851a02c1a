"""Numbering and slicing shared by the readers of files without an architecture (state dicts):
safetensors files and folders, PyTorch `.pt`/`.bin` state dicts.

weightwatcher 0.7.7 numbers such a file by its tensors whose names end in `.weight`, in the
order it reads them, from 0 for a model folder; every such tensor consumes an id, also a 1-D
norm scale it will never analyze. weightwatcher types them by rank alone (2-D dense, 4-D
conv2d); wwcli also types a 2-D embedding table `embedding` by its name (`is_embedding_name`),
which changes no id and no number (the engine reads an embedding exactly as a dense matrix).

Recurrent weights (`nn.LSTM`, `nn.GRU`, `nn.RNN`: `weight_ih_l0`, `weight_hh_l0`, their
`_reverse` twins and an LSTM's projection `weight_hr_l0`) do not end in `.weight`, and
weightwatcher 0.7.7 never analyzes them (nor an nn.LSTM module: it has no `weight`). wwcli lists
them after the `.weight` tensors, with the next ids, so that no weightwatcher id moves, and reads
each as one matrix per gate block (`recurrent_gates`): (4H, in) is LSTM's 4 gates (i, f, g, o)
of (H, in), GRU's 3, RNN's 1, pooled into one spectrum like the kernel positions of a conv.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wwcli.loaders.interface import Checkpoint, LayerSpec, LayerType, LoaderError

WEIGHT_SUFFIX = ".weight"

# The last name component of a 1-D scale that belongs to a normalization layer: LayerNorm
# (`ln_1`, `ln_f`, `layernorm`), BatchNorm (`bn1`), RMSNorm (`norm`, `input_layernorm`).
_NORM_NAME = re.compile(r"(norm|^ln(_|\d|$)|^bn(_|\d|$))", re.IGNORECASE)


_EMBEDDING_NAME = re.compile(
    r"(wte|wpe|shared|embed_tokens|embed_positions|embed_in|relative_attention_bias"
    r"|token_embd|pos_embd|token_types"
    r"|(\w+_)?(embed|embeds|embedding|embeddings))",
    re.IGNORECASE,
)
"""The last name component of an embedding table (see `is_embedding_name`)."""


def is_embedding_name(name: str) -> bool:
    """Whether a layer name (a tensor key without `.weight`) names an embedding table.

    The rule looks at the last component only (split on "." and "/", a Keras ":0" dropped),
    the module that owns the weight, so that a projection inside an embeddings block
    (`embeddings.projection`, ELECTRA's `embeddings_project`, DeBERTa's `embed_proj`,
    `embedding_projection.dense`) stays dense. That component, case aside, must be one of
    `wte`, `wpe` (GPT-2), `shared` (T5, BART), `embed_tokens`, `embed_positions` (Llama, OPT,
    BART, Whisper), `embed_in` (GPT-NeoX), `relative_attention_bias` (T5's bias table, an
    nn.Embedding), or be `embed`, `embeds`, `embedding`, `embeddings`, alone or after a word
    and "_": `word_embeddings`, `position_embeddings`, `token_type_embeddings` (BERT),
    `tok_embeddings` (Llama's original), `token_embedding` (CLIP), `pos_embed`, and Flax's
    `Embed_0.embedding`. So `unembed` and GPT-NeoX's `embed_out` (output heads), `q_proj`,
    `dense`, `fc1`, `lm_head` never match. llama.cpp's GGUF names `token_embd`, `pos_embd` and
    `token_types` are embeddings too.
    """
    last = re.split(r"[./]", name)[-1]
    last = re.sub(r":\d+$", "", last)
    return _EMBEDDING_NAME.fullmatch(last) is not None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a state dict as its file describes it; its values are not read."""

    key: str
    """Full key in the file, e.g. `model.layers.0.self_attn.q_proj.weight`."""
    shape: tuple[int, ...]
    """Shape as stored."""
    dtype: str
    """Stored dtype in torch's words: "float32", "bfloat16", "float8_e4m3fn", "int8", ..."""
    unreadable: str | None = None
    """Why the values cannot become a float matrix (e.g. "unsupported dtype F8_E4M3 (install
    ml_dtypes)", "integer tensor (int8), not analyzed"); None when they can."""


def numbered_keys(keys: Sequence[str]) -> tuple[list[str], str | None]:
    """The keys that get layer ids, in id order, and a note when they are not weightwatcher's.

    weightwatcher numbers the keys ending in `.weight`. A file with no such key (Keras or JAX
    exports: `dense/kernel:0`, `params.Dense_0.kernel`) gets nothing analyzed by weightwatcher;
    wwcli then numbers every tensor in the same order so that the file is still usable.
    """
    weight_keys = [key for key in keys if key.endswith(WEIGHT_SUFFIX)]
    if weight_keys or not keys:
        return weight_keys, None
    return list(keys), (
        "no tensor name ends in '.weight', so every tensor is numbered in file order; "
        "weightwatcher 0.7.7 analyzes none of them"
    )


def layer_name(key: str) -> str:
    """The layer name of a tensor key: the key without its `.weight` suffix."""
    return key[: -len(WEIGHT_SUFFIX)] if key.endswith(WEIGHT_SUFFIX) else key


def spec_for_tensor(layer_id: int, entry: TensorEntry) -> LayerSpec:
    """The LayerSpec weightwatcher's state-dict reader would give this tensor.

    Rank decides the type, as in weightwatcher: 2-D dense (embedding when
    `is_embedding_name` says so), 4-D conv2d (torch layout out, in, kh, kw). weightwatcher
    leaves 3-D tensors of a state dict unanalyzed; wwcli reads them as conv1d (out, in, k),
    kernel axis 2. A tensor whose first dimension is below 2 is never analyzed by
    weightwatcher (its rank test is `len(weights) < 2`), and neither is it here.
    """
    name = layer_name(entry.key)
    shape = entry.shape
    rank = len(shape)
    if rank == 0:
        return _unanalyzed(layer_id, entry, LayerType.OTHER, entry.unreadable or "scalar")
    if rank == 1:
        if _NORM_NAME.search(name.rsplit(".", 1)[-1]):
            return _unanalyzed(layer_id, entry, LayerType.NORM, "normalization layer (1-D scale)")
        return _unanalyzed(layer_id, entry, LayerType.OTHER, "1-D tensor")
    if rank > 4:
        return _unanalyzed(layer_id, entry, LayerType.OTHER, f"{rank}-D tensor, not analyzed")
    layer_type = {2: LayerType.DENSE, 3: LayerType.CONV1D, 4: LayerType.CONV2D}[rank]
    if rank == 2 and is_embedding_name(name):
        layer_type = LayerType.EMBEDDING
    out_features, in_features = shape[0], shape[1]
    N, M = max(out_features, in_features), min(out_features, in_features)
    rf = math.prod(shape[2:])
    skip_reason = entry.unreadable
    if 0 in shape:
        skip_reason = "empty tensor"
    elif out_features < 2:
        skip_reason = "first dimension below 2 (weightwatcher does not analyze it)"
    return LayerSpec(
        layer_id=layer_id,
        name=name,
        layer_type=layer_type,
        shape=shape,
        dtype=entry.dtype,
        N=N,
        M=M,
        rf=rf,
        skip_reason=skip_reason,
        kernel_axis=2 if rank == 3 else None,
    )


def _unanalyzed(layer_id: int, entry: TensorEntry, layer_type: LayerType, reason: str) -> LayerSpec:
    """A layer that is listed with its id but has no matrices."""
    return LayerSpec(
        layer_id=layer_id,
        name=layer_name(entry.key),
        layer_type=layer_type,
        shape=entry.shape,
        dtype=entry.dtype,
        skip_reason=reason,
    )


def matrices_of_tensor(tensor: np.ndarray, layer: LayerSpec) -> list[np.ndarray]:
    """Split a weight tensor into the layer's 2-D matrices, in weightwatcher's slice order.

    Dense and embedding: the matrix itself. conv2d (out, in, kh, kw): the kh*kw slices
    W[:, :, i, j], i outer, j inner, as weightwatcher's `conv2D_Wmats` walks them (it
    transposes each slice to N x M, which leaves the spectrum unchanged). conv1d (out, in, k):
    the k slices W[:, :, i]. A recurrent weight (a 2-D dense layer of rf > 1): its rf gate
    blocks W[g*H:(g+1)*H], in stored order.
    """
    if tensor.shape != layer.shape:
        raise LoaderError(f"{layer.name}: tensor has shape {tensor.shape}, expected {layer.shape}")
    if tensor.ndim == 2 and layer.rf > 1:
        return [np.ascontiguousarray(block) for block in np.split(tensor, layer.rf, axis=0)]
    if tensor.ndim == 2:
        return [tensor]
    if tensor.ndim == 3:
        return [np.ascontiguousarray(tensor[:, :, i]) for i in range(tensor.shape[2])]
    if tensor.ndim == 4:
        return [
            np.ascontiguousarray(tensor[:, :, i, j])
            for i in range(tensor.shape[2])
            for j in range(tensor.shape[3])
        ]
    raise LoaderError(f"{layer.name}: a {tensor.ndim}-D tensor has no matrices")


HEAD_NAME = "lm_head"
"""The output head Hugging Face ties to the input embedding (`tie_word_embeddings`)."""

INPUT_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")
"""Last name components of the input embedding a tied head shares (T5's `shared` too)."""


def tied_head_pairs(keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """For a file whose config says `tie_word_embeddings: true`: key -> the layer it shares
    weights with, for the input embedding and `lm_head` (both ways when both are stored; the
    embedding alone, tied to `lm_head`, when the head was left out as a duplicate). {} when no
    input embedding is found, or the head is stored with a shape of its own."""
    embedding = next(
        (
            key
            for key in keys
            if key.endswith(WEIGHT_SUFFIX)
            and len(shapes.get(key, ())) == 2
            and layer_name(key).rsplit(".", 1)[-1] in (*INPUT_EMBEDDING_NAMES, "shared")
        ),
        None,
    )
    if embedding is None:
        return {}
    head = next((key for key in keys if layer_name(key).rsplit(".", 1)[-1] == HEAD_NAME), None)
    if head is None:
        return {embedding: HEAD_NAME}
    if shapes.get(head) != shapes[embedding]:
        return {}
    return {embedding: layer_name(head), head: layer_name(embedding)}


def metadata_ties(metadata: Mapping[str, str], keys: Sequence[str]) -> dict[str, str]:
    """Ties a safetensors `__metadata__` records: `safetensors.torch.save_model` drops a tensor
    that shares storage with another and writes `{"<dropped key>": "<kept key>"}`. Returns
    kept key -> the dropped layer's name (and dropped -> kept, should both be stored), only for
    entries whose value is a tensor of the file and whose key is a `.weight` name."""
    present = set(keys)
    ties: dict[str, str] = {}
    for dropped, kept in metadata.items():
        if kept in present and dropped != kept and dropped.endswith(WEIGHT_SUFFIX):
            ties.setdefault(kept, layer_name(dropped))
            if dropped in present:
                ties.setdefault(dropped, layer_name(kept))
    return ties


_RECURRENT_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?)weight_(?P<kind>ih|hh|hr)_l(?P<layer>\d+)(?P<reverse>_reverse)?$"
)
"""The recurrent weights PyTorch names: `lstm.weight_ih_l0`, `gru.weight_hh_l1_reverse`, ..."""

RECURRENT_GATES = (1, 3, 4)
"""Gate blocks of nn.RNN, nn.GRU and nn.LSTM weights."""


def recurrent_gates(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Recurrent weight key -> its gate blocks, for every `weight_ih_l*`, `weight_hh_l*` (4 for
    LSTM, 3 for GRU, 1 for RNN, from the shapes: `weight_hh` is (gates x H, H), or (4H, P) with
    a projection `weight_hr` of (P, H)) and `weight_hr_l*` (1) key whose shapes agree. A key
    whose shapes do not fit none of these is left out (then it is read like any tensor)."""
    gates: dict[str, int] = {}
    for key, shape in shapes.items():
        found = _RECURRENT_KEY.match(key)
        if found is None or len(shape) != 2:
            continue
        if found["kind"] == "hr":
            gates[key] = 1
            continue
        suffix = f"_l{found['layer']}{found['reverse'] or ''}"
        hidden_to_hidden = shapes.get(f"{found['prefix']}weight_hh{suffix}", ())
        projection = shapes.get(f"{found['prefix']}weight_hr{suffix}", ())
        if len(hidden_to_hidden) != 2 or shape[0] != hidden_to_hidden[0]:
            continue
        hidden = projection[1] if len(projection) == 2 else hidden_to_hidden[1]
        if hidden > 0 and shape[0] % hidden == 0 and shape[0] // hidden in RECURRENT_GATES:
            gates[key] = shape[0] // hidden
    return gates


def recurrent_spec(spec: LayerSpec, gates: int) -> LayerSpec:
    """A 2-D recurrent weight (gates x H, X) listed as `gates` matrices of (H, X)."""
    rows, columns = spec.shape
    hidden = rows // gates
    return dataclasses.replace(
        spec,
        layer_type=LayerType.DENSE,
        N=max(hidden, columns),
        M=min(hidden, columns),
        rf=gates,
    )


TensorReader = Callable[[str], np.ndarray]
"""Reads one tensor by key, now, as a float array of its stored shape."""


@dataclass(frozen=True)
class NumberedTensor:
    """Where the tensor behind a layer id lives."""

    spec: LayerSpec
    """The layer as listed."""
    key: str
    """The tensor's key in its file."""
    read: TensorReader
    """Reads the tensor of that key from its file."""


class StateDictCheckpoint(Checkpoint):
    """A checkpoint whose layers are the `.weight` tensors of one or more state-dict files."""

    def __init__(
        self,
        path: Path,
        file_format: str,
        tensors: Sequence[tuple[TensorEntry, TensorReader]],
        *,
        ids_note: str | None = None,
        source_note: str | None = None,
        close: Callable[[], None] | None = None,
        tied: Mapping[str, str] | None = None,
    ) -> None:
        """Number `tensors` (all of them, in weightwatcher's reading order) from 0.

        `tied`: tensor key -> the name of the layer it shares its weights with, where the file
        says so; it becomes `LayerSpec.tied_to` of that key's layer."""
        self.path = path
        self.format = file_format
        keys = [entry.key for entry, _ in tensors]
        chosen, keys_note = numbered_keys(keys)
        chosen_set = set(chosen)
        gates = recurrent_gates({entry.key: entry.shape for entry, _ in tensors})
        extra = [(entry, read) for entry, read in tensors if entry.key in gates]
        extra = [(entry, read) for entry, read in extra if entry.key not in chosen_set]
        recurrent_note = (
            f"{len(extra)} recurrent weights (weight_ih, weight_hh) get ids after the '.weight' "
            "tensors; weightwatcher 0.7.7 analyzes none of them"
            if extra
            else None
        )
        self.ids_note = (
            "; ".join(note for note in (ids_note, keys_note, recurrent_note) if note) or None
        )
        self.source_note = source_note
        """What part of the file(s) the layers come from, for people; None when all of it."""
        self._numbered: list[NumberedTensor] = []
        numbered = [(entry, read) for entry, read in tensors if entry.key in chosen_set]
        for entry, read in numbered + extra:
            spec = spec_for_tensor(len(self._numbered), entry)
            if entry.key in gates and spec.layer_type is LayerType.DENSE:
                spec = recurrent_spec(spec, gates[entry.key])
            if tied and entry.key in tied:
                spec = dataclasses.replace(spec, tied_to=tied[entry.key])
            self._numbered.append(NumberedTensor(spec=spec, key=entry.key, read=read))
        self._close = close

    def layers(self) -> list[LayerSpec]:
        return [numbered.spec for numbered in self._numbered]

    def matrices(self, layer: LayerSpec) -> list[np.ndarray]:
        if not 0 <= layer.layer_id < len(self._numbered):
            raise LoaderError(f"{self.path}: no layer with id {layer.layer_id}")
        numbered = self._numbered[layer.layer_id]
        if numbered.spec.name != layer.name:
            raise LoaderError(
                f"{self.path}: layer {layer.layer_id} is {numbered.spec.name!r}, not {layer.name!r}"
            )
        if numbered.spec.skip_reason is not None:
            raise LoaderError(
                f"{self.path}: layer {layer.layer_id} ({layer.name}) is not analyzable: "
                f"{numbered.spec.skip_reason}"
            )
        return matrices_of_tensor(numbered.read(numbered.key), numbered.spec)

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None
