"""DeBERTa-v2/v3 (ftjax/models/deberta.py) vs transformers-PyTorch: log-bucketed relative positions, parity per
config and task on padded batches, round trips, packed rows, LoRA all-linear, FLOPs, a short fine-tune."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta

from ftjax import flops, lora, models, trainer
from ftjax import params as params_lib
from ftjax.data import example_packing
from ftjax.models import deberta
from tests import tiny

HF_CLASSES = {
    "base": T.DebertaV2Model,
    "classification": T.DebertaV2ForSequenceClassification,
    "token_classification": T.DebertaV2ForTokenClassification,
    "masked_lm": T.DebertaV2ForMaskedLM,
}
LENGTH = 12  # longer than every config's position_buckets' half (4), so the log buckets are really used
V3 = {  # a DeBERTa-v3 config in miniature: what microsoft/deberta-v3-* set, buckets and sizes shrunk
    "relative_attention": True, "position_buckets": 8, "max_relative_positions": 24, "pos_att_type": ["p2c", "c2p"],
    "share_att_key": True, "norm_rel_ebd": "layer_norm", "position_biased_input": False, "type_vocab_size": 0,
}
CONFIGS = {
    "v3": V3,
    # position_buckets (32) past the sequence: the embedding table (64 rows) larger than what 12 tokens reach
    "wide_buckets": {**V3, "position_buckets": 32, "max_relative_positions": 64},
    # own pos_key_proj / pos_query_proj, no buckets, max_relative_positions 4 < L (clipped), absolute positions
    # and token types, no LayerNorm of the table; the non-legacy masked LM head
    "separate_keys": {**V3, "share_att_key": False, "position_buckets": -1, "max_relative_positions": 4,
                      "position_biased_input": True, "type_vocab_size": 2, "norm_rel_ebd": "none", "legacy": False},
    # one relative term (the old "|" string form): scale sqrt(2 d); embedding_size < hidden (embed_proj)
    "c2p_only": {**V3, "pos_att_type": "c2p", "embedding_size": 16},
}


def hf_config(name: str, **overrides) -> T.DebertaV2Config:
    """hidden 32, 2 layers, 4 heads, vocab 100, dropout on (deterministic=True must switch it off). Weights of
    std 0.2 (HF's 0.02 leaves attention nearly uniform, and the relative terms below what parity can see)."""
    kw = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 37, "max_position_embeddings": 64, "num_labels": 3, "pooler_dropout": 0.1,
          "initializer_range": 0.2}
    return T.DebertaV2Config(**{**kw, **CONFIGS[name], **overrides})


def save_tiny(path, name: str, task: str, seed: int = 0, **overrides) -> str:
    torch.manual_seed(seed)
    model = HF_CLASSES[task](hf_config(name, **overrides)).eval()
    with torch.no_grad():  # non-trivial LayerNorm params and biases, so a wrong mapping cannot hide
        for key, p in model.named_parameters():
            if key.endswith("bias") or "LayerNorm" in key:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return str(path)


def batch(seed: int = 0, token_types: bool = False) -> dict:
    """ids [4, 12]: full, right-padded to 7 and to 2, left-padded to 5 (pad id 0 at padded positions)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, 100, size=(4, LENGTH))
    mask = np.ones((4, LENGTH), np.int64)
    mask[1, 7:] = mask[2, 2:] = mask[3, :LENGTH - 5] = 0
    ids[mask == 0] = 0
    out = {"input_ids": ids.astype(np.int64), "attention_mask": mask}
    if token_types:
        out["token_type_ids"] = (np.arange(LENGTH) >= 6).astype(np.int64)[None].repeat(4, 0)
    return out


def torch_outputs(folder: str, task: str, inputs: dict, **kw) -> dict:
    model = HF_CLASSES[task].from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(**{k: torch.tensor(v) for k, v in inputs.items()}, **kw)
    return out


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def test_log_buckets_and_windows_equal_transformers():
    for buckets, max_rel, length in ((256, 512, 600), (8, 24, LENGTH), (32, 64, LENGTH), (64, 128, 200)):
        q = torch.zeros(1, length, 8)
        want = hf_deberta.build_relative_position(q, q, bucket_size=buckets, max_position=max_rel)[0].numpy()
        ids = np.arange(length)
        got = deberta.log_bucket_position(ids[:, None] - ids[None, :], buckets, max_rel)
        np.testing.assert_array_equal(got, want)
        c2p, p2c, first, rows = deberta.relative_window(length, buckets, max_rel, buckets)
        np.testing.assert_array_equal(c2p + first, np.clip(want + buckets, 0, 2 * buckets - 1))
        np.testing.assert_array_equal(p2c + first, np.clip(-want + buckets, 0, 2 * buckets - 1))
        assert 0 <= c2p.min() and max(c2p.max(), p2c.max()) == rows - 1
    assert (np.abs(deberta.log_bucket_position(np.arange(-11, 12), 8, 24)) < np.abs(np.arange(-11, 12))).any()
    # The real v3 geometry at 128 tokens: 255 of the 512 rows reach a score (HF projects all 512).
    assert deberta.relative_window(128, 256, 512, 256)[3] == 255


# c2p_only has embedding_size != hidden_size, which masked_lm refuses (test_unsupported_configs_are_refused).
@pytest.mark.parametrize("name,task", [(n, t) for n in sorted(CONFIGS) for t in sorted(HF_CLASSES)
                                       if (n, t) != ("c2p_only", "masked_lm")])
def test_outputs_match_pytorch_on_padded_batches(tmp_path, name, task):
    folder = save_tiny(tmp_path, name, task)
    inputs = batch(token_types=name == "separate_keys")
    ref = torch_outputs(folder, task, inputs, output_hidden_states=True)
    model = models.from_pretrained(folder, task=task)
    out = model(**inputs, output_hidden_states=True)
    key = "last_hidden_state" if task == "base" else "logits"
    assert out[key].shape == tuple(ref[key].shape)
    assert max_diff(out[key], ref[key].numpy()) < 1e-4  # every position, padding included (HF masks it the same)
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
    for ours, theirs in zip(out["hidden_states"], ref.hidden_states):
        assert max_diff(ours, theirs.numpy()) < 1e-4
    report = model.load_report
    assert report["initialized"] == [] and report["unused"] == [] and model.family == "deberta"


def test_each_trap_changes_the_outputs():
    """The relative terms, the log buckets and the query-and-key mask each change the outputs of these configs
    (so parity with transformers pins them). from_config draws each param from its path and the seed alone."""
    inputs = batch()
    out = models.from_config(hf_config("v3"))(**inputs)["last_hidden_state"]
    # max_relative_positions only moves the log buckets (|d| >= 4 here); the table keeps its 16 rows.
    for overrides in ({"pos_att_type": ["c2p"]}, {"pos_att_type": ["p2c"]}, {"max_relative_positions": 8}):
        other = models.from_config(hf_config("v3", **overrides))(**inputs)["last_hidden_state"]
        assert max_diff(other, out) > 0.05, overrides
    model = models.from_config(hf_config("v3"))
    alone = model(input_ids=inputs["input_ids"][1:2, :7], attention_mask=inputs["attention_mask"][1:2, :7])
    assert max_diff(out[1, :7], alone["last_hidden_state"][0]) < 1e-5
    assert max_diff(model(input_ids=inputs["input_ids"])["last_hidden_state"][1, :7], out[1, :7]) > 1e-3


@pytest.mark.parametrize("task", ["classification", "masked_lm"])
def test_save_pretrained_round_trips_through_transformers(tmp_path, task):
    folder = save_tiny(tmp_path / "in", "separate_keys" if task == "masked_lm" else "v3", "base")
    model = models.from_pretrained(folder, task=task, id2label={0: "neg", 1: "neutral", 2: "pos"}, seed=3)
    assert model.load_report["initialized"]  # a new head
    graphdef, params, rest = params_lib.split(model)
    params = jax.tree_util.tree_map(lambda x: x * 1.1, params)  # every param, so a dropped tensor shows
    ours = np.asarray(params_lib.merge(graphdef, params, rest)(**batch())["logits"])
    out = models.save_pretrained(model, str(tmp_path / "out"), params=params)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == [HF_CLASSES[task].__name__]
    assert max_diff(torch_outputs(out, task, batch()).logits.numpy(), ours) < 1e-5
    again = models.from_pretrained(out, task=task)
    assert again.load_report["initialized"] == [] and again.load_report["unused"] == []
    assert max_diff(again(**batch())["logits"], ours) < 1e-6


@pytest.mark.parametrize("name", ["v3", "separate_keys"])
def test_packed_rows_equal_each_example_alone(tmp_path, name):
    folder = save_tiny(tmp_path, name, "classification")
    model = models.from_pretrained(folder, task="classification")
    ids = batch()["input_ids"][0]
    lengths = (5, 4, 2)  # three examples and one padding token in a row of 12
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(1, int)])[None]
    packed = model(input_ids=ids[None], attention_mask=(segment_ids > 0).astype(np.int64), segment_ids=segment_ids,
                   segment_starts=np.array([[0, 5, 9]]))["logits"]
    assert packed.shape == (1, 3, 3)
    alone_ids, alone_mask = np.zeros((3, 5), np.int64), np.zeros((3, 5), np.int64)  # each alone, right-padded
    for i, (start, n) in enumerate(zip((0, 5, 9), lengths)):
        alone_ids[i, :n], alone_mask[i, :n] = ids[start:start + n], 1
    alone = model(input_ids=alone_ids, attention_mask=alone_mask)["logits"]
    assert max_diff(packed[0], alone) < 1e-5


def test_unsupported_configs_are_refused(tmp_path):
    cfg = hf_config("v3", conv_kernel_size=3)
    with pytest.raises(models.UnsupportedModelError, match="conv_kernel_size=3"):
        models.from_config(cfg)
    with pytest.raises(models.UnsupportedModelError, match="embedding_size"):
        models.from_config(hf_config("c2p_only"), task="masked_lm")
    with pytest.raises(models.UnsupportedModelError, match="tie_word_embeddings"):
        models.from_config(hf_config("v3", tie_word_embeddings=False), task="masked_lm")


def test_dropout_overrides_every_param_has_axes_and_bf16_all_padding_is_finite(tmp_path):
    folder = save_tiny(tmp_path, "v3", "classification")
    model = models.from_pretrained(folder, task="classification",
                                   dropout={"hidden": 0.2, "attention": 0.2, "classifier": 0.3})
    assert model.hf_config.cls_dropout == 0.3 and model.dropout.rate == 0.3
    inputs = batch()
    a = model(**inputs)["logits"]
    assert max_diff(a, model(**inputs, deterministic=False, rngs=nnx.Rngs(dropout=1))["logits"]) > 1e-4
    flat = params_lib.flatten(params_lib.split(model)[1])
    axes = model.logical_axes()
    assert set(axes) == set(flat) and all(len(axes[p]) == v.ndim for p, v in flat.items())
    assert axes["deberta/encoder/rel_embeddings/embedding"] == (None, "embed")
    padded = {k: v.copy() for k, v in inputs.items()}
    padded["attention_mask"][2] = 0
    for dtype in ("bfloat16", "float16"):
        out = models.from_pretrained(folder, task="classification", dtype=dtype)(**padded)["logits"]
        assert np.isfinite(np.asarray(out, np.float32)).all(), dtype


def test_lora_all_linear_adapts_every_projection_and_exports_merged(tmp_path):
    folder = save_tiny(tmp_path / "in", "separate_keys", "classification")
    model = models.from_pretrained(folder, task="classification")
    lora.apply_lora(model, {"rank": 2, "alpha": 4.0, "targets": "all-linear"})
    names = {m.split("/layer/")[1].split("/", 1)[1] for m in lora.lora_modules(model)}
    assert names == {"attention/self/query_proj", "attention/self/key_proj", "attention/self/value_proj",
                     "attention/self/pos_key_proj", "attention/self/pos_query_proj", "attention/output/dense",
                     "intermediate/dense", "output/dense"}
    assert len(lora.lora_modules(model)) == 2 * len(names)  # not the pooler, not the classifier
    graphdef, params, rest = params_lib.split(model)
    key = jax.random.key(0)
    params = params_lib.map_with_path(
        lambda p, x: jax.random.normal(jax.random.fold_in(key, len(p)), x.shape) * 0.2 if p.endswith("lora_b") else x,
        params)
    want = np.asarray(params_lib.merge(graphdef, params, rest)(**batch())["logits"])
    out = models.save_pretrained(model, str(tmp_path / "out"), params=params)
    assert max_diff(torch_outputs(out, "classification", batch()).logits.numpy(), want) < 1e-5


def test_forward_flops_by_hand():
    cfg = hf_config("v3")
    model = models.from_config(cfg, task="classification")
    rows, length, h, inter = 4, 16, 32, 37
    w = deberta.window_rows(cfg, length)
    assert w == 15  # bucket(|d| <= 15) spans 7 rows each side of 0 with buckets 8, max 24
    per_layer = (2 * rows * length * (4 * h * h + 2 * h * inter) + 4 * rows * length ** 2 * h
                 + 2 * 2 * w * h * h  # key_proj / query_proj of the window of relative embeddings
                 + 2 * 2 * rows * length * w * h)  # c2p and p2c scores against it
    head = 2 * rows * (h * h + h * 3)
    everything = frozenset(params_lib.flatten(params_lib.split(model)[1]))
    count = flops.step_flops(model, everything, flops.Shape(rows, length))
    assert count.forward == 2 * per_layer + head and count.train == pytest.approx(3 * count.forward)


def test_a_short_classification_fine_tune_learns(tmp_path, data_dir):
    """The trainer end to end on a tiny random DeBERTa-v3 (MiniLM's tokenizer: token types are ignored) on 4
    devices (data 2 x fsdp 2), packed rows: the loss falls and the test split is evaluated."""
    torch.manual_seed(0)
    cfg = hf_config("v3", vocab_size=30522, initializer_range=0.02)
    model_dir = str(tmp_path / "model")
    T.DebertaV2Model(cfg).save_pretrained(model_dir)
    T.AutoTokenizer.from_pretrained(tiny.MINILM).save_pretrained(model_dir)
    run_cfg = tiny.tiny_config(model_dir, str(data_dir), **{
        "train.epochs": 4.0, "train.log_every": 1, "optim.lr": 5e-3, "model.dropout.hidden": 0.0,
        "model.dropout.attention": 0.0, "mesh.data": 2, "mesh.fsdp": 2})
    assert example_packing.packs(run_cfg)  # data.packing: several examples per row, read through segment_ids
    summary = trainer.train(run_cfg, str(tmp_path / "work"), devices=jax.devices()[:4])
    with open(tmp_path / "work" / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
    assert len(losses) > 30 and np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses  # 0.69 -> ~0.35
    assert summary["test"]["accuracy"] >= 0.9, summary["test"]
