"""LoRA: only adapters train (no gradients or optimizer state for the base), merged and PEFT exports."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from ftjax import lora, models, optim
from ftjax import params as params_lib
from ftjax import sharding as sharding_lib
from ftjax.config import ConfigError, default_config
from ftjax.run import Run
from tests.test_lm_data import CORPUS, tiny_llama

IDS = np.array([[5, 17, 42, 99, 3, 250, 7, 8, 61, 12]], np.int32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama with LoRA (rank 4 on q/v/o/up) after 3 training steps, and its params before them."""
    root = tmp_path_factory.mktemp("lora")
    model_dir = tiny_llama(str(root / "llama"))
    (root / "corpus.txt").write_text("\n\n".join(CORPUS * 10))
    c = default_config()
    c.model.name_or_path = model_dir
    c.model.task = "causal_lm"
    c.data.source = f"files:{root / 'corpus.txt'}"
    c.data.lm.documents = "paragraph"
    c.data.max_len = 32
    c.optim.lr = 1e-2
    c.optim.lora.rank = 4
    c.optim.lora.alpha = 8.0
    c.optim.lora.dropout = 0.1
    c.optim.lora.targets = r".*/(q_proj|v_proj|o_proj|up_proj)"
    c.model.scan_layers = False  # these tests read per-layer paths; tests/test_scan_layers.py covers scanned LoRA
    c.train.batch_size = 2
    c.train.steps = 3
    c.train.compilation_cache = ""
    run = Run(c, str(root / "work"), devices=jax.devices()[:1])
    before = jax.device_get(run.state["params"])
    batches = run.data.train_iterator()
    for step in range(3):
        batch = sharding_lib.shard_batch(next(batches), run.mesh)
        with jax.set_mesh(run.mesh):
            run.state, metrics = run.train_step_for(step)(run.state, batch, run.key)
        assert np.isfinite(float(metrics["loss"]))
    return run, before, jax.device_get(run.state["params"]), model_dir, root


def _logits(run, params) -> np.ndarray:
    model = params_lib.merge(run.graphdef, params, run.rest)
    return np.asarray(model(input_ids=jnp.asarray(IDS))["logits"])


def test_lora_trains_adapters_only_and_base_params_stay_bit_equal(trained):
    run, before, after, _, _ = trained
    flat0, flat1 = params_lib.flatten(before), params_lib.flatten(after)
    adapters = [p for p in flat1 if lora.is_lora_param(p)]
    assert len(adapters) == 2 * 4 * 2  # (a, b) x 4 targets x 2 layers
    assert "model/layers/0/self_attn/q_proj/kernel" in flat1  # base weights keep their paths
    for path, value in flat1.items():
        if lora.is_lora_param(path):
            continue
        np.testing.assert_array_equal(value, flat0[path], err_msg=path)
    changed = [p for p in adapters if p.endswith("lora_b") and not np.array_equal(flat0[p], flat1[p])]
    assert len(changed) == 8, "every lora_b should have moved from zero"
    assert run.optimizer.trainable_at(0) == frozenset(adapters)


def test_optimizer_state_exists_only_for_adapters(trained):
    run, _, after, _, _ = trained
    adapter_elems = sum(v.size for p, v in params_lib.flatten(after).items() if lora.is_lora_param(p))
    total_elems = sum(v.size for v in params_lib.flatten(after).values())
    leaves = [x for x in jax.tree_util.tree_leaves(run.state["opt_state"]) if x.ndim > 0]
    assert {tuple(x.shape) for x in leaves} <= {
        tuple(v.shape) for p, v in params_lib.flatten(after).items() if lora.is_lora_param(p)
    }
    assert sum(x.size for x in leaves) == 2 * adapter_elems  # Adam's mu and nu, nothing for the base
    assert adapter_elems < total_elems / 10
    assert run.optimizer.state_bytes() < 2 * 4 * adapter_elems + 1024


def test_save_pretrained_merges_the_adapters_and_keeps_the_lora_models_logits(trained):
    run, _, after, _, root = trained
    want = _logits(run, after)
    # models.save_pretrained (what --mode=export calls) writes the adapters merged into the kernels.
    out = models.save_pretrained(run.model, str(root / "merged"), tokenizer=run.tokenizer, params=after)
    merged = models.from_pretrained(out, task="causal_lm")
    loaded = params_lib.flatten(nnx_params(merged))
    assert not [p for p in loaded if lora.is_lora_param(p)]
    np.testing.assert_allclose(np.asarray(merged(input_ids=jnp.asarray(IDS))["logits"]), want, atol=2e-5)
    # lora.merged_params: W + alpha/r * A @ B for the adapted kernels, the other params as they are.
    expected = params_lib.flatten(lora.merged_params(run.model, after))
    assert set(expected) == set(loaded)
    q = "model/layers/0/self_attn/q_proj/kernel"
    flat = params_lib.flatten(after)
    delta = (8.0 / 4) * flat[q.replace("kernel", "lora_a")] @ flat[q.replace("kernel", "lora_b")]
    np.testing.assert_allclose(expected[q], flat[q] + delta, atol=1e-6)
    for path, value in expected.items():
        np.testing.assert_allclose(loaded[path], value, atol=1e-6, err_msg=path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = hf(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def nnx_params(model):
    return params_lib.split(model)[1]


def test_peft_export_loads_in_peft_with_equal_logits(trained):
    run, _, after, model_dir, root = trained
    out = lora.export_peft(run.model, str(root / "adapter"), params=after, base_model_name_or_path=model_dir)
    with open(f"{out}/adapter_config.json") as f:
        cfg = json.load(f)
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8.0)
    tensors = safetensors.numpy.load_file(f"{out}/adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 32) and b.shape == (32, 4) and len(tensors) == 16
    peft = pytest.importorskip("peft")  # installed with `pip install --no-deps peft`
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        got = model(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, _logits(run, after), atol=1e-4)


def test_lora_dropout_is_random_in_training_and_off_in_eval(trained):
    run, _, after, _, _ = trained
    model = params_lib.merge(run.graphdef, after, run.rest)
    ids = jnp.asarray(IDS)
    train_out = [
        np.asarray(model(input_ids=ids, deterministic=False, rngs=nnx.Rngs(dropout=k))["logits"])
        for k in (0, 1)
    ]
    assert not np.allclose(train_out[0], train_out[1])
    np.testing.assert_array_equal(_logits(run, after), _logits(run, after))


def test_encoder_lora_trains_adapters_and_the_new_head():
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    model = models.from_config(cfg, task="classification", num_labels=3)
    ids = jnp.arange(12).reshape(2, 6)
    before = np.asarray(model(input_ids=ids)["logits"])
    lora.apply_lora(model, {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": r".*(query|value)"})
    np.testing.assert_array_equal(np.asarray(model(input_ids=ids)["logits"]), before)  # lora_b = 0
    _, params, _ = params_lib.split(model)
    o = default_config().optim
    o.lora.rank = 2
    opt = optim.build(
        o, params, total_steps=10, steps_per_epoch=10, head_pattern=lora.optim_head_pattern(model)
    )
    trainable = opt.trainable_at(0)
    assert {p for p in trainable if not lora.is_lora_param(p)} == {
        p for p in params_lib.flatten(params) if p.startswith(("classifier/", "bert/pooler/"))
    }
    assert len([p for p in trainable if lora.is_lora_param(p)]) == 2 * 2 * 2
    with pytest.raises(ConfigError, match="optim.lora.targets"):
        lora.apply_lora(models.from_config(cfg, task="base"), {"rank": 2, "targets": r".*q_proj"})


def test_gpt2_conv1d_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(tmp_path / "gpt2"))
    model = models.from_pretrained(str(tmp_path / "gpt2"), task="causal_lm")
    lora.apply_lora(model, {"rank": 2, "alpha": 4.0, "targets": r".*/(c_attn|c_fc)"})
    graphdef, params, rest = params_lib.split(model)
    key = jax.random.key(1)
    params = params_lib.map_with_path(
        lambda p, x: (
            jax.random.normal(jax.random.fold_in(key, len(p)), x.shape) * 0.1 if p.endswith("lora_b") else x
        ),
        params,
    )
    want = np.asarray(params_lib.merge(graphdef, params, rest)(input_ids=jnp.asarray(IDS))["logits"])
    out = lora.export_peft(model, str(tmp_path / "adapter"), params=params)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "gpt2"))
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    merged = peft_model.merge_and_unload()  # fan_in_fan_out: PEFT merges into the Conv1D [in, out] weight
    with torch.no_grad():
        np.testing.assert_allclose(
            merged(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.numpy(), want, atol=1e-4
        )


def test_all_linear_adapts_every_projection_but_not_the_lm_head(tmp_path):
    model_dir = tiny_llama(str(tmp_path / "llama"))
    model = models.from_pretrained(model_dir, task="causal_lm")
    lora.apply_lora(model, {"rank": 2, "targets": "all-linear"})
    adapted = set(lora.lora_modules(model))
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert {m.rsplit("/", 1)[-1] for m in adapted} == set(names) and len(adapted) == 2 * len(names)
    assert not any("lm_head" in m for m in adapted)
    out = lora.export_peft(model, str(tmp_path / "adapter"))
    with open(f"{out}/adapter_config.json") as f:
        assert len(json.load(f)["target_modules"]) == 2 * len(names)
