"""Loading onto a mesh: each checkpoint tensor goes straight into the trainer's sharding (each device holds only
its slice), with the same values, load report and new-head init as a plain load; sharded checkpoints too."""

from __future__ import annotations

import math
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import Mesh

from ftjax import models
from ftjax import params as params_lib
from ftjax import sharding as sharding_lib


def mesh_of(data: int, fsdp: int, tensor: int) -> Mesh:
    return Mesh(np.asarray(jax.devices()[: data * fsdp * tensor]).reshape(data, fsdp, tensor),
                sharding_lib.MESH_AXES)


def save_bert(path: str, **kwargs) -> str:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(path, **kwargs)
    return path


def save_llama(path: str) -> str:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loading")
    return {"bert": save_bert(str(root / "bert")), "llama": save_llama(str(root / "llama")),
            "bert_shards": save_bert(str(root / "bert_shards"), max_shard_size="20KB")}


def trainer_shardings(model, mesh: Mesh) -> dict:
    """What ftjax.run.Run._init_state gives each param."""
    _, params, _ = params_lib.split(model)
    return params_lib.flatten(sharding_lib.param_shardings(
        params, model.logical_axes(), mesh, head_dim=sharding_lib.head_dim_of(model)))


def assert_placed_like_the_trainer(sharded, plain, mesh: Mesh) -> None:
    want = trainer_shardings(plain, mesh)
    got = params_lib.flatten(nnx.to_pure_dict(nnx.state(sharded, nnx.Param)))
    ref = params_lib.flatten(nnx.to_pure_dict(nnx.state(plain, nnx.Param)))
    assert got.keys() == ref.keys() == want.keys()
    split_params = 0
    for path, x in got.items():
        assert x.sharding == want[path], path
        axes = [a for entry in want[path].spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
        shards = math.prod(mesh.shape[a] for a in axes)
        split_params += shards > 1
        assert len(x.addressable_shards) == mesh.size
        for shard in x.addressable_shards:
            assert shard.data.nbytes * shards == x.nbytes, path  # each device holds its slice only
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref[path]), err_msg=path)
    assert split_params > len(got) / 3  # the test would not notice much if nothing were split


@pytest.mark.parametrize("kind,task,mesh_shape", [
    ("bert", "classification", (1, 8, 1)),
    ("bert", "token_classification", (2, 4, 1)),
    ("llama", "causal_lm", (1, 8, 1)),
    ("llama", "classification", (2, 2, 2)),
])
def test_load_onto_a_mesh_places_each_param_in_the_trainers_sharding(folders, kind, task, mesh_shape):
    mesh = mesh_of(*mesh_shape)
    plain = models.from_pretrained(folders[kind], task=task, num_labels=3, seed=5)
    sharded = models.from_pretrained(folders[kind], task=task, num_labels=3, seed=5, mesh=mesh)
    assert_placed_like_the_trainer(sharded, plain, mesh)
    assert sharded.load_report == plain.load_report
    if task != "causal_lm":  # the new head, initialised in place, has the seed's values
        assert sharded.load_report["initialized"]


def test_sharded_checkpoint_with_index_loads_onto_a_mesh(folders):
    shards = folders["bert_shards"]
    assert os.path.isfile(os.path.join(shards, "model.safetensors.index.json"))
    mesh = mesh_of(1, 8, 1)
    sharded = models.from_pretrained(shards, task="base", mesh=mesh)
    assert len(sharded.load_report["files"]) > 2
    plain = models.from_pretrained(folders["bert"], task="base")
    assert_placed_like_the_trainer(sharded, plain, mesh)


def test_a_mesh_load_reads_each_tensor_once_and_never_the_whole_file(folders, monkeypatch):
    from safetensors import numpy as st_numpy

    def whole_file(*args, **kwargs):
        raise AssertionError("the whole file was read")

    monkeypatch.setattr(st_numpy, "load_file", whole_file)
    reads = []
    original = models.hf.Weights.read
    monkeypatch.setattr(models.hf.Weights, "read", lambda self, key: reads.append(key) or original(self, key))
    model = models.from_pretrained(folders["llama"], task="causal_lm", mesh=mesh_of(1, 8, 1))
    assert sorted(reads) == sorted(set(reads)) and len(reads) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_the_installed_transformers_is_one_the_parity_tests_cover():
    """The parity tests measure ftjax against this transformers; a release past the newest tested must fail
    here (and bump ftjax.hf.TRANSFORMERS_TESTED once the suite passes on it) rather than in a user's run."""
    from ftjax import hf

    assert hf.transformers_outside_tested() is None, hf.transformers_outside_tested()
    assert hf.transformers_outside_tested("5.24.3") is None
    assert "5.25.0 is outside" in hf.transformers_outside_tested("5.25.0")
    assert "4.40.0 is outside" in hf.transformers_outside_tested("4.40.0")
