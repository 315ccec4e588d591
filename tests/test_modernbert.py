"""ModernBERT vs transformers-PyTorch: parity per task and pooling on padded batches (a local window shorter
than the rows, separate global / local RoPE bases), packed rows, HF round trips, LoRA all-linear (PEFT
export), FLOPs of the local window, a short fine-tune through the trainer, and refused configs."""

from __future__ import annotations

import functools
import json
import os
import re

import jax
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx

from ftjax import flops, lora, models, sharding, trainer
from ftjax import params as params_lib
from tests import tiny

HF_CLASSES = {
    "base": T.ModernBertModel,
    "classification": T.ModernBertForSequenceClassification,
    "token_classification": T.ModernBertForTokenClassification,
    "masked_lm": T.ModernBertForMaskedLM,
}
# hidden 32 (4 heads of 8), 4 layers global / local / global / local; local_attention=6: a local layer's
# query sees |q - k| <= 3, far less than the 12-token rows. RoPE bases far apart; dropout on everywhere
# (deterministic=True must switch it off).
CONFIG = dict(vocab_size=100, hidden_size=32, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
              global_attn_every_n_layers=2, local_attention=6, global_rope_theta=1000.0, local_rope_theta=50.0,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
              sep_token_id=2, num_labels=3, embedding_dropout=0.1, attention_dropout=0.1, mlp_dropout=0.1,
              classifier_dropout=0.1)
# Every optional bias on (norms, attention, MLP, head dense), the MLM decoder's off.
BIASES = dict(norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True, decoder_bias=False)


def save_tiny(path, task: str, seed: int = 0, **overrides) -> str:
    """A random transformers ModernBERT for `task` saved as an HF folder: norm scales and biases perturbed, so
    a wrong mapping cannot hide, and Wqkv scaled up, so attention is sharp enough for RoPE and the window to
    matter (at init scale it is nearly uniform)."""
    torch.manual_seed(seed)
    model = HF_CLASSES[task](T.ModernBertConfig(**{**CONFIG, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("Wqkv.weight"):
                p.mul_(8.0)
    model.save_pretrained(str(path))
    return str(path)


def batch(left: bool = True):
    """ids [4, 12]: a full row, right-padded rows of 7 and 2 tokens, and (left=True) one left-padded by 5."""
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 100, size=(4, 12))
    mask = np.ones((4, 12), np.int64)
    mask[1, 7:] = 0
    mask[3, 2:] = 0
    if left:
        mask[2, :5] = 0
    ids[mask == 0] = 0
    return ids.astype(np.int64), mask


def torch_out(folder: str, task: str, ids, mask, attn: str = "sdpa", **kw) -> dict:
    hf = HF_CLASSES[task].from_pretrained(folder, attn_implementation=attn).eval()
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask), **kw)
    return out


def call(model, **inputs) -> dict:
    """The model's forward as one jitted program (on this CPU much faster than op-by-op eager dispatch at each
    new shape); bool options (output_hidden_states) are static."""
    flags = tuple(sorted((k, v) for k, v in inputs.items() if isinstance(v, bool)))
    return _jitted(model, {k: v for k, v in inputs.items() if not isinstance(v, bool)}, flags)


@functools.partial(nnx.jit, static_argnums=2)
def _jitted(model, arrays, flags):
    return model(**arrays, **dict(flags))


def diff(a, b, mask=None) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if mask is not None:  # real tokens only
        a, b = a[mask.astype(bool)], b[mask.astype(bool)]
    return float(np.abs(a - b).max())


# ---- parity (float32, padded batches) ----

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_base_hidden_states_match_pytorch(tmp_path, attn):
    folder = save_tiny(tmp_path, "base")
    ids, mask = batch()
    ref = torch_out(folder, "base", ids, mask, attn, output_hidden_states=True)
    model = models.from_pretrained(folder, task="base")
    out = call(model, input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert diff(out["last_hidden_state"], ref.last_hidden_state, mask) < 1e-4
    # HF's: the embeddings, then each layer's output, the last one after final_norm.
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 5
    for ours, theirs in zip(out["hidden_states"], ref.hidden_states):
        assert diff(ours, theirs, mask) < 1e-4
    assert model.load_report["initialized"] == [] and model.load_report["unused"] == []
    assert model.family == "modernbert"
    assert model.layers[0].attn_norm is None and model.layers[1].attn_norm is not None  # HF's Identity


@pytest.mark.parametrize("task,pooling,variant", [
    ("classification", "cls", "default"), ("classification", "mean", "default"), ("classification", "mean", "biases"),
    ("token_classification", None, "default"), ("masked_lm", None, "default"), ("masked_lm", None, "biases"),
])
def test_task_logits_match_pytorch(tmp_path, task, pooling, variant):
    overrides = dict(BIASES if variant == "biases" else {}, **({"classifier_pooling": pooling} if pooling else {}))
    folder = save_tiny(tmp_path, task, **overrides)
    # cls pooling reads slot 0: a left-padded row's would be a pad token (meaningless), so right padding only.
    ids, mask = batch(left=pooling != "cls")
    ref = torch_out(folder, task, ids, mask).logits.numpy()
    model = models.from_pretrained(folder, task=task)
    logits = call(model, input_ids=ids, attention_mask=mask)["logits"]
    assert logits.shape == ref.shape
    assert diff(logits, ref, None if task == "classification" else mask) < 1e-4
    assert model.load_report["initialized"] == [] and model.load_report["unused"] == []
    if variant == "biases":
        assert "model/final_norm/bias" in params_lib.flatten(params_lib.split(model)[1])
        assert task != "masked_lm" or model.decoder is None


def test_the_window_and_both_rope_bases_bind_in_the_test_config(tmp_path):
    """The parity config exercises the traps: a model with the window one wider, or the two RoPE bases
    swapped, would fail it."""
    folder = save_tiny(tmp_path / "m", "base")
    ids, mask = batch()
    ref = torch_out(folder, "base", ids, mask).last_hidden_state.numpy()
    for i, change in enumerate(({"local_attention": 8}, {"global_rope_theta": 50.0, "local_rope_theta": 1000.0})):
        other = save_tiny(tmp_path / str(i), "base")  # the same weights, the config changed
        T.ModernBertConfig(**{**CONFIG, **change}).save_pretrained(other)
        out = call(models.from_pretrained(other, task="base"), input_ids=ids, attention_mask=mask)["last_hidden_state"]
        assert diff(out, ref, mask) > 1e-3, change


def test_packed_rows_equal_each_example_alone(tmp_path):
    """Two examples in one row (segment ids 1, 2, padding 0): attention and the window stay inside each
    example and positions restart, so each equals its own call (a batch of the two, the first right-padded);
    both poolings per segment."""
    ids, _ = batch()
    a, b = ids[0, :5], ids[1, :7]
    row = np.concatenate([a, b])[None]
    seg = np.array([[1] * 5 + [2] * 7])
    starts = np.array([[0, 5]])
    alone_ids = np.stack([np.concatenate([a, [0, 0]]), b])
    alone_mask = (alone_ids > 0).astype(np.int64)
    for pooling in ("cls", "mean"):
        folder = save_tiny(tmp_path / pooling, "classification", classifier_pooling=pooling)
        model = models.from_pretrained(folder, task="classification")
        packed = call(model, input_ids=row, attention_mask=np.ones_like(row), segment_ids=seg,
                      segment_starts=starts)["logits"]
        alone = call(model, input_ids=alone_ids, attention_mask=alone_mask)["logits"]
        assert packed.shape == (1, 2, 3)
        assert diff(packed[0], alone) < 1e-5, pooling
    base = models.from_pretrained(folder, task="base")
    hidden = call(base, input_ids=row, attention_mask=np.ones_like(row), segment_ids=seg)["last_hidden_state"]
    alone = call(base, input_ids=alone_ids, attention_mask=alone_mask)["last_hidden_state"]
    assert diff(hidden[0, :5], alone[0, :5]) < 1e-5 and diff(hidden[0, 5:], alone[1]) < 1e-5


# ---- round trip: ftjax -> HF folder -> transformers ----

@pytest.mark.parametrize("task", ["classification", "masked_lm"])
def test_save_pretrained_round_trips_through_transformers(tmp_path, task):
    folder = save_tiny(tmp_path / "in", "base" if task == "classification" else task)
    model = models.from_pretrained(folder, task=task, num_labels=3, seed=3)
    assert bool(model.load_report["initialized"]) == (task == "classification")  # a new classifier head
    ids, mask = batch(left=False)
    ours = np.asarray(call(model, input_ids=ids, attention_mask=mask)["logits"])
    out = models.save_pretrained(model, str(tmp_path / "out"))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == [HF_CLASSES[task].__name__]
    hf = HF_CLASSES[task].from_pretrained(out).eval()
    if task == "masked_lm":  # the tied decoder: not written, tied again by transformers
        assert hf.decoder.weight.data_ptr() == hf.model.embeddings.tok_embeddings.weight.data_ptr()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert diff(ours, ref, None if task == "classification" else mask) < 1e-5
    again = models.from_pretrained(out, task=task)
    assert again.load_report["initialized"] == [] and again.load_report["unused"] == []
    assert diff(call(again, input_ids=ids, attention_mask=mask)["logits"], ours) < 1e-6


# ---- contract: axes, LoRA, FLOPs ----

def test_every_param_has_logical_axes_of_its_rank():
    model = models.from_config(T.ModernBertConfig(**CONFIG), task="classification")
    flat = params_lib.flatten(params_lib.split(model)[1])
    axes = model.logical_axes()
    assert set(axes) == set(flat)
    for path, value in flat.items():
        assert len(axes[path]) == value.ndim and set(axes[path]) <= {"vocab", "embed", "heads", "mlp", None}, path
    head = {p for p in flat if re.fullmatch(model.head_pattern, p)}
    assert head == {"head/dense/kernel", "head/norm/scale", "classifier/kernel", "classifier/bias"}
    assert not any(p.endswith("bias") for p in set(flat) - head)  # default config: no biases but the classifier's
    # The packed [q | k | v] and [input | gate] outputs are kept off `tensor` (sharding.PACKED_OUTPUTS).
    for path in ("model/layers/1/attn/Wqkv/kernel", "model/layers/1/mlp/Wi/kernel"):
        assert sharding.logical_for(path, axes[path]) == ("embed", None)
    assert sharding.logical_for("model/layers/1/attn/Wo/kernel", axes["model/layers/1/attn/Wo/kernel"]) == (
        "heads", "embed")


def test_lora_all_linear_adapts_the_backbone_and_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    folder = save_tiny(tmp_path / "base", "classification")
    model = models.from_pretrained(folder, task="classification")
    ids, mask = batch(left=False)
    before = np.asarray(call(model, input_ids=ids, attention_mask=mask)["logits"])
    lora.apply_lora(model, {"rank": 2, "alpha": 4.0, "targets": "all-linear"})
    adapted = set(lora.lora_modules(model))
    assert adapted == {f"model/layers/{i}/{m}" for i in range(4) for m in ("attn/Wqkv", "attn/Wo", "mlp/Wi", "mlp/Wo")}
    assert diff(call(model, input_ids=ids, attention_mask=mask)["logits"], before) < 1e-6  # lora_b starts at 0
    graphdef, params, rest = params_lib.split(model)
    key = jax.random.key(1)
    params = params_lib.map_with_path(
        lambda p, x: jax.random.normal(jax.random.fold_in(key, len(p)), x.shape) * 0.1 if p.endswith("lora_b") else x,
        params)
    want = np.asarray(call(params_lib.merge(graphdef, params, rest), input_ids=ids, attention_mask=mask)["logits"])
    assert diff(want, before) > 1e-3
    out = lora.export_peft(model, str(tmp_path / "adapter"), params=params)
    base = T.ModernBertForSequenceClassification.from_pretrained(folder)
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert diff(got, want) < 1e-4
    merged = models.save_pretrained(model, str(tmp_path / "merged"), params=params)
    assert diff(torch_out(merged, "classification", ids, mask).logits.numpy(), want) < 1e-4


def test_flops_count_the_local_window_both_ways():
    """A local layer's query sees 2 * (local_attention // 2) + 1 keys at most: with local_attention=6, 7 of
    the 16 (scores and the weighted sum, forward only), on the two local layers of four."""
    rows, length, h = 2, 16, 32
    narrow, wide = (flops.step_flops(models.from_config(T.ModernBertConfig(**{**CONFIG, "local_attention": w}),
                                                        task="base"), frozenset(), flops.Shape(rows, length))
                    for w in (6, 64))
    assert wide.forward - narrow.forward == 2 * 2 * (2 * rows * length * (length - 7) * h)


# ---- a short fine-tune through the trainer ----

def test_trainer_fine_tunes_a_tiny_modernbert_on_packed_rows(tmp_path, data_dir):
    torch.manual_seed(0)
    cfg = T.ModernBertConfig(**{**CONFIG, "vocab_size": 30522, "num_hidden_layers": 2, "pad_token_id": 0,
                                "cls_token_id": 101, "sep_token_id": 102, "bos_token_id": 101, "eos_token_id": 102,
                                "classifier_pooling": "mean"})
    model_dir = str(tmp_path / "model")
    T.ModernBertModel(cfg).save_pretrained(model_dir)
    T.AutoTokenizer.from_pretrained(tiny.MINILM).save_pretrained(model_dir)
    run_cfg = tiny.tiny_config(model_dir, data_dir, **{"train.log_every": 1, "optim.lr": 3e-3,
                                                       "model.dropout.hidden": 0.0})
    workdir = str(tmp_path / "run")
    trainer.train(run_cfg, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) > 5 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert any(r["split"] == "val" and "accuracy" in r for r in rows)
    # The forgetting monitors read every layer's hidden states (output_hidden_states) through the trainer.
    assert any(r["split"] == "forgetting" and "cka/layer_1" in r and r["step"] > 0 for r in rows)


# ---- refused configs ----

def test_unimplemented_config_features_are_refused(tmp_path):
    cfg = T.ModernBertConfig(**CONFIG)
    object.__setattr__(cfg, "classifier_pooling", "max")  # past transformers' own check (other releases lack it)
    with pytest.raises(models.UnsupportedModelError, match="classifier_pooling='max'"):
        models.from_config(cfg, task="classification")
    untied = T.ModernBertConfig(**{**CONFIG, "tie_word_embeddings": False})
    with pytest.raises(models.UnsupportedModelError, match="tie_word_embeddings"):
        models.from_config(untied, task="masked_lm")
    act = T.ModernBertConfig(**{**CONFIG, "hidden_activation": "quick_gelu"})
    with pytest.raises(models.UnsupportedModelError, match="quick_gelu"):
        models.from_config(act, task="base")
    with pytest.raises(models.UnsupportedModelError, match="causal_lm"):
        models.from_config(T.ModernBertConfig(**CONFIG), task="causal_lm")
