"""Embedding tables are typed `embedding` whatever the format, and a tied embedding and output
head are marked `tied_to` where the file says so; neither changes an id or a number.

The folders and files are generated here: BERT-style safetensors folders (as
tests/hostile/make_corpus.py writes safetensors), GPT-2-style PyTorch state dicts with a tied
head, `safetensors.torch.save_model` of a tied module, and a pickled module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.hostile.make_corpus import tensors_to_safetensors
from tests.loaders.layer_views import our_rows, ww_rows
from wwcli.analysis import analyze_path, list_path
from wwcli.engine import analyze_layer
from wwcli.loaders import open_checkpoint
from wwcli.loaders._statedict import is_embedding_name
from wwcli.loaders.interface import LayerType
from wwcli.results import CheckpointListing, CheckpointReport
from wwcli.settings import RunSettings

EMBEDDINGS = (
    "bert.embeddings.word_embeddings",
    "bert.embeddings.position_embeddings",
    "bert.embeddings.token_type_embeddings",
)


def _bert_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_t(3, size=(rows, cols)) / np.sqrt(cols)).astype(np.float32)

    return {
        "bert.embeddings.LayerNorm.bias": np.zeros(32, np.float32),
        "bert.embeddings.LayerNorm.weight": np.ones(32, np.float32),
        "bert.embeddings.position_embeddings.weight": matrix(64, 32),
        "bert.embeddings.token_type_embeddings.weight": matrix(2, 32),
        "bert.embeddings.word_embeddings.weight": matrix(200, 32),
        "bert.encoder.layer.0.attention.self.query.weight": matrix(32, 32),
        "bert.encoder.layer.0.intermediate.dense.weight": matrix(96, 32),
        "bert.encoder.layer.0.output.dense.weight": matrix(32, 96),
        "bert.pooler.dense.weight": matrix(32, 32),
    }


@pytest.fixture
def bert_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(tensors_to_safetensors(_bert_tensors()))
    config = {"architectures": ["BertModel"], "model_type": "bert"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "name",
    [
        *EMBEDDINGS,
        "transformer.wte",
        "transformer.wpe",
        "shared",
        "model.embed_tokens",
        "model.decoder.embed_positions",
        "tok_embeddings",
        "gpt_neox.embed_in",
        "text_model.embeddings.token_embedding",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
        "params.Embed_0.embedding",
        "embedding/embeddings:0",
        "Model.Embeddings",
    ],
)
def test_embedding_names(name: str) -> None:
    assert is_embedding_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "lm_head",
        "gpt_neox.embed_out",
        "unembed",
        "model.layers.0.self_attn.q_proj",
        "bert.encoder.layer.0.output.dense",
        "fc1",
        "embedding_projection.dense",
        "electra.embeddings_project",
        "deberta.embeddings.embed_proj",
        "bert.embeddings.LayerNorm",
        "embedded_dense",
    ],
)
def test_dense_names_stay_dense(name: str) -> None:
    assert not is_embedding_name(name)


def test_bert_folder_embeddings_typed_with_ids_and_numbers_unchanged(
    bert_folder: Path,
) -> None:
    with open_checkpoint(bert_folder) as checkpoint:
        types = {spec.name: spec.layer_type for spec in checkpoint.layers()}
        # weightwatcher numbers the same layers with the same ids and sizes.
        assert our_rows(checkpoint) == ww_rows(str(bert_folder))
    assert {name for name, kind in types.items() if kind is LayerType.EMBEDDING} == set(EMBEDDINGS)
    assert types["bert.encoder.layer.0.attention.self.query"] is LayerType.DENSE
    assert types["bert.embeddings.LayerNorm"] is LayerType.NORM

    report = analyze_path(bert_folder, RunSettings())
    assert isinstance(report, CheckpointReport)
    word = next(r for r in report.layers if r.spec.name == "bert.embeddings.word_embeddings")
    assert word.spec.layer_type is LayerType.EMBEDDING
    # An embedding is read exactly as a dense matrix.
    matrix = _bert_tensors()["bert.embeddings.word_embeddings.weight"]
    assert word.metrics == analyze_layer([matrix])


def test_layers_minus_embedding_on_a_bert_folder(bert_folder: Path) -> None:
    everything = list_path(bert_folder, RunSettings())
    without = list_path(bert_folder, RunSettings(layers="-embedding"))
    only = list_path(bert_folder, RunSettings(layers="embedding"))
    assert isinstance(everything, CheckpointListing)
    assert isinstance(without, CheckpointListing) and isinstance(only, CheckpointListing)
    names = [listed.spec.name for listed in without.layers]
    assert not set(names) & set(EMBEDDINGS)
    assert len(names) == len(everything.layers) - 3
    assert sorted(listed.spec.name for listed in only.layers) == sorted(EMBEDDINGS)
    ids = {listed.spec.name: listed.spec.layer_id for listed in everything.layers}
    assert all(listed.spec.layer_id == ids[listed.spec.name] for listed in without.layers)


def _gpt2_state(*, tied: bool) -> dict[str, object]:
    import torch as t

    t.manual_seed(0)
    wte = t.randn(50, 16)
    return {
        "transformer.wte.weight": wte,
        "transformer.wpe.weight": t.randn(20, 16),
        "transformer.h.0.mlp.c_fc.weight": t.randn(16, 64),
        "lm_head.weight": wte if tied else wte.clone(),
    }


@pytest.mark.parametrize("tied", [True, False])
def test_torch_state_dict_embeddings_and_tied_head(tmp_path: Path, tied: bool) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "gpt2.pt"
    torch.save(_gpt2_state(tied=tied), path)
    with open_checkpoint(path) as checkpoint:
        specs = {spec.name: spec for spec in checkpoint.layers()}
    assert [spec.layer_id for spec in specs.values()] == [0, 1, 2, 3]
    assert specs["transformer.wte"].layer_type is LayerType.EMBEDDING
    assert specs["transformer.wpe"].layer_type is LayerType.EMBEDDING
    assert specs["lm_head"].layer_type is LayerType.DENSE
    assert specs["transformer.h.0.mlp.c_fc"].tied_to is None
    if tied:
        assert specs["lm_head"].tied_to == "transformer.wte"
        assert specs["transformer.wte"].tied_to == "lm_head"
    else:  # equal values in two storages are not a tie the file records
        assert specs["lm_head"].tied_to is None and specs["transformer.wte"].tied_to is None


def test_safetensors_save_model_metadata_marks_the_kept_embedding(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(40, 12)
            self.proj = torch.nn.Linear(12, 12)
            self.lm_head = torch.nn.Linear(12, 40, bias=False)
            self.lm_head.weight = self.embed_tokens.weight

    path = tmp_path / "tied.safetensors"
    safetensors_torch.save_model(Tied(), str(path))
    with open_checkpoint(path) as checkpoint:
        specs = {spec.name: spec for spec in checkpoint.layers()}
    assert "lm_head" not in specs  # dropped as a duplicate; __metadata__ says of what
    assert specs["embed_tokens"].layer_type is LayerType.EMBEDDING
    assert specs["embed_tokens"].tied_to == "lm_head"
    assert specs["proj"].tied_to is None


@pytest.mark.parametrize(("flag", "with_head"), [(True, False), (True, True), (False, False)])
def test_folder_config_tie_word_embeddings(tmp_path: Path, flag: bool, with_head: bool) -> None:
    rng = np.random.default_rng(1)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((60, 16)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((32, 16)).astype(np.float32),
    }
    if with_head:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    (tmp_path / "model.safetensors").write_bytes(tensors_to_safetensors(tensors))
    config = {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": flag}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with open_checkpoint(tmp_path) as checkpoint:
        specs = {spec.name: spec for spec in checkpoint.layers()}
    embedding = specs["model.embed_tokens"]
    assert embedding.layer_type is LayerType.EMBEDDING
    assert specs["model.layers.0.mlp.up_proj"].tied_to is None
    if not flag:
        assert embedding.tied_to is None
    elif with_head:
        assert (embedding.tied_to, specs["lm_head"].tied_to) == ("lm_head", "model.embed_tokens")
        assert specs["lm_head"].layer_type is LayerType.DENSE
    else:
        assert embedding.tied_to == "lm_head"


def test_pickled_module_tied_head(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    embedding = torch.nn.Embedding(30, 8)
    head = torch.nn.Linear(8, 30, bias=False)
    head.weight = embedding.weight
    model = torch.nn.Sequential(embedding, torch.nn.Linear(8, 8), head)
    path = tmp_path / "module.pt"
    torch.save(model, path)
    with open_checkpoint(path, trust_pickle=True) as checkpoint:
        specs = {spec.name: spec for spec in checkpoint.layers()}
    assert specs["0"].layer_type is LayerType.EMBEDDING  # by class, as before
    assert (specs["0"].tied_to, specs["2"].tied_to, specs["1"].tied_to) == ("2", "0", None)
    assert specs["2"].layer_type is LayerType.DENSE
