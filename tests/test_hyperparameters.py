"""The hyperparameters beyond the seven, at formula level: LoRA+, rsLoRA, DoRA, all-linear targets, LoRA
dropout, Adam without bias correction (BERTAdam), EMA / SWA weight averaging, re-initialised top layers."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from absl import flags
from flax import nnx

from ftjax import averaging, dry_run, lora, main, models, optim, reinit, trainer
from ftjax import checkpoint as checkpoint_lib
from ftjax import params as params_lib
from ftjax.config import ConfigError, default_config, validate, with_overrides
from ftjax.reporting import optimizer as optimizer_report
from ftjax.run import Run
from tests import tiny
from tests.test_lm_data import tiny_llama

IDS = np.array([[5, 17, 42, 99, 3, 250, 7, 8, 61, 12]], np.int32)


def _optim_cfg(**overrides):
    base = {"schedule.type": "constant", "clip_norm": 0.0, "weight_decay": 0.0, "decay_exclude": ""}
    return with_overrides(default_config(), {f"optim.{k}": v for k, v in {**base, **overrides}.items()}).optim


# ------------------------------------------------------------------------------------------- LoRA+
def test_lora_plus_scales_the_lr_of_lora_b_only():
    rng = np.random.default_rng(0)
    params = {"layer": {"q": {"kernel": jnp.ones((4, 3)), "lora_a": jnp.asarray(rng.normal(size=(4, 2))),
                              "lora_b": jnp.asarray(rng.normal(size=(2, 3)))}}}
    o = _optim_cfg(**{"name": "sgd", "momentum": 0.0, "lr": 0.1, "lora.rank": 2, "lora.lr_ratio": 16.0})
    opt = optim.build(o, params, total_steps=10, steps_per_epoch=10)
    assert opt.table["layer/q/lora_b"].lr_mult == 16.0 and opt.table["layer/q/lora_a"].lr_mult == 1.0
    assert opt.table["layer/q/kernel"].frozen
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.5), params)
    updates, _ = opt.tx.update(grads, opt.tx.init(params), params)
    flat = params_lib.flatten(updates)
    np.testing.assert_allclose(flat["layer/q/lora_a"], -0.1 * 0.5, rtol=1e-6)  # lr_A = lr
    np.testing.assert_allclose(flat["layer/q/lora_b"], -16 * 0.1 * 0.5, rtol=1e-6)  # lr_B = ratio x lr_A
    assert "LoRA+ lr_ratio 16" in optimizer_report.describe(opt)


# ------------------------------------------------------------------------------ LoRA layer formulas
def _layer(dora=False, rslora=False, dropout=0.0, bias=True):
    base = nnx.Linear(6, 5, use_bias=bias, rngs=nnx.Rngs(0))
    if bias:
        base.bias[...] = jnp.linspace(-1, 1, 5)
    layer = lora.LoRALinear(base, 4, 8.0, dropout, jax.random.key(1), 3, rslora=rslora, dora=dora)
    layer.lora_b[...] = jax.random.normal(jax.random.key(2), (4, 5)) * 0.3
    if dora:
        np.testing.assert_allclose(layer.lora_magnitude[...], np.linalg.norm(base.kernel[...], axis=0), rtol=1e-6)
        layer.lora_magnitude[...] = layer.lora_magnitude[...] * jnp.linspace(0.5, 1.5, 5)
    return layer


X = np.asarray(jax.random.normal(jax.random.key(3), (2, 6)))


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_and_rslora_scaling(rslora):
    layer = _layer(rslora=rslora)
    s = 8.0 / (math.sqrt(4) if rslora else 4)  # rsLoRA: alpha / sqrt(r); LoRA: alpha / r
    assert layer.scale == s
    w, b, a, bb = (np.asarray(v[...]) for v in (layer.kernel, layer.bias, layer.lora_a, layer.lora_b))
    np.testing.assert_allclose(layer(jnp.asarray(X)), X @ w + b + s * X @ a @ bb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_dora_forward_is_magnitude_times_normalised_direction(bias):
    layer = _layer(dora=True, bias=bias)
    w, a, bb, m = (np.asarray(v[...], np.float64) for v in (layer.kernel, layer.lora_a, layer.lora_b,
                                                             layer.lora_magnitude))
    v = w + layer.scale * a @ bb  # [in, out]
    w_dora = m * v / np.linalg.norm(v, axis=0)  # W' = m * (W0 + sBA) / ||W0 + sBA||_c
    want = X @ w_dora + (np.asarray(layer.bias[...]) if bias else 0)
    np.testing.assert_allclose(layer(jnp.asarray(X)), want, rtol=1e-5, atol=1e-5)


def test_lora_dropout_is_on_the_adapter_input_in_training_and_off_in_eval():
    p, layer = 0.3, _layer(dropout=0.3)
    w, b, a, bb = (np.asarray(v[...]) for v in (layer.kernel, layer.bias, layer.lora_a, layer.lora_b))
    key = jax.random.key(7)
    token = lora._DROPOUT_KEY.set(key)
    try:
        got = np.asarray(layer(jnp.asarray(X)))
    finally:
        lora._DROPOUT_KEY.reset(token)
    keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 3), 1 - p, X.shape))
    dropped = np.where(keep, X / (1 - p), 0)
    np.testing.assert_allclose(got, X @ w + b + layer.scale * dropped @ a @ bb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer(jnp.asarray(X)), X @ w + b + layer.scale * X @ a @ bb, rtol=1e-5, atol=1e-6)


def test_all_linear_targets_every_dense_but_the_task_head():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    model = models.from_config(cfg, task="classification", num_labels=3)
    linear = [lora.module_path(p) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Linear) and p]
    lora.apply_lora(model, {"rank": 2, "targets": "all-linear"})
    adapted = set(lora.lora_modules(model))
    assert len(adapted) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    assert adapted == {p for p in linear if not p.startswith(("classifier", "bert/pooler"))}
    c = default_config()
    c.model.name_or_path, c.data.source = "x", "files:x"
    c.optim.lora.targets = "all-linear"
    validate(c)
    c.optim.lora.targets = "all-linear("
    with pytest.raises(ConfigError, match="optim.lora.targets"):
        validate(c)


# --------------------------------------------------------------- rsLoRA / DoRA: merged and PEFT exports
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama(str(tmp_path_factory.mktemp("llama")))


def _adapted_llama(llama_dir, **variants):
    model = models.from_pretrained(llama_dir, task="causal_lm")
    lora.apply_lora(model, {"rank": 4, "alpha": 8.0, "targets": r".*/(q_proj|v_proj|up_proj)", **variants})
    graphdef, params, rest = params_lib.split(model)
    key = jax.random.key(1)

    def perturb(path, x):
        k = jax.random.fold_in(key, len(path) + x.size)
        if path.endswith("lora_b"):
            return jax.random.normal(k, x.shape) * 0.1
        if path.endswith("lora_magnitude"):
            return x * (1 + 0.2 * jax.random.uniform(k, x.shape))
        return x

    params = params_lib.map_with_path(perturb, params)
    logits = np.asarray(params_lib.merge(graphdef, params, rest)(input_ids=jnp.asarray(IDS))["logits"])
    return model, params, logits


@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_merged_export_and_peft_load_match_the_forward(variant, llama_dir, tmp_path):
    model, params, want = _adapted_llama(llama_dir, **{variant: True})
    assert any(p.endswith("lora_magnitude") for p in params_lib.flatten(params)) == (variant == "dora")
    merged_dir = models.save_pretrained(model, str(tmp_path / "merged"), params=params)
    merged = models.from_pretrained(merged_dir, task="causal_lm")
    np.testing.assert_allclose(np.asarray(merged(input_ids=jnp.asarray(IDS))["logits"]), want, atol=1e-4)
    out = lora.export_peft(model, str(tmp_path / "adapter"), params=params, base_model_name_or_path=llama_dir)
    with open(f"{out}/adapter_config.json") as f:
        cfg = json.load(f)
    assert (cfg["use_rslora"], cfg["use_dora"]) == (variant == "rslora", variant == "dora")
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


# ---------------------------------------------------------------------- Adam without bias correction
@pytest.mark.parametrize("bias_correction", [False, True])
def test_adamw_bias_correction_matches_a_hand_written_update(bias_correction):
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.01
    params = {"w": jnp.asarray([0.5, -1.0, 2.0])}
    o = _optim_cfg(lr=lr, b1=b1, b2=b2, eps=eps, bias_correction=bias_correction)
    opt = optim.build(o, params, total_steps=10, steps_per_epoch=10)
    state, p = opt.tx.init(params), params
    want, m, v = np.asarray(params["w"], np.float64), 0.0, 0.0
    for t, g in enumerate(([0.1, -0.2, 0.3], [0.05, 0.4, -0.1], [-0.3, 0.1, 0.2]), start=1):
        g = np.asarray(g)
        updates, state = opt.tx.update({"w": jnp.asarray(g, jnp.float32)}, state, p)
        p = jax.tree_util.tree_map(jnp.add, p, updates)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        m_hat, v_hat = (m / (1 - b1**t), v / (1 - b2**t)) if bias_correction else (m, v)
        want = want - lr * m_hat / (np.sqrt(v_hat) + eps)
        np.testing.assert_allclose(p["w"], want, rtol=1e-5)
    assert ("BERTAdam" in optimizer_report.describe(opt)) != bias_correction


# ------------------------------------------------------------------------------------- EMA and SWA
def test_ema_equals_its_closed_form_and_swa_the_mean_of_the_snapshots():
    rng = np.random.default_rng(0)
    snaps = [rng.normal(size=(3,)).astype(np.float32) for _ in range(11)]  # p_0 (loaded) ... p_10
    d, start, every = 0.8, 3, 2
    avg = averaging.Averaging(ema_decay=d, swa_start=start, swa_every=every)
    params = {"w": jnp.asarray(snaps[0]), "frozen": jnp.zeros(2)}
    state = averaging.init(avg, params, frozenset({"w"}))
    assert set(state) == {"ema", "swa", "swa_count"} and set(state["ema"]) == {"w"}
    update = jax.jit(lambda s, p, t: averaging.update(avg, s, p, t))
    for k in range(1, 11):
        state = update(state, {"w": jnp.asarray(snaps[k]), "frozen": jnp.zeros(2)}, jnp.int32(k))
    n = 10
    closed = d**n * snaps[0] + (1 - d) * sum(d ** (n - k) * snaps[k] for k in range(1, n + 1))
    np.testing.assert_allclose(state["ema"]["w"], closed, rtol=1e-5, atol=1e-6)
    taken = [k for k in range(1, 11) if k >= start and (k - start) % every == 0]
    assert taken == [3, 5, 7, 9] and int(state["swa_count"]) == 4
    np.testing.assert_allclose(state["swa"]["w"], np.mean([snaps[k] for k in taken], axis=0), rtol=1e-5)
    full = averaging.params_for({"params": params, "avg": state}, "ema")
    assert set(full) == {"w", "frozen"} and np.array_equal(full["w"], state["ema"]["w"])


def test_swa_start_resolves_like_a_schedule_duration():
    t = default_config().train
    t.swa.start, t.swa.every = "2ep", 5
    assert averaging.from_config(t, 100, 10).swa_start == 20
    t.swa.start = 0.5
    assert averaging.from_config(t, 100, 10).swa_start == 50
    t.swa.start = 101
    with pytest.raises(ConfigError, match="train.swa.start"):
        averaging.from_config(t, 100, 10)


def _final_state(workdir: str, cfg) -> dict:
    run = Run(cfg, workdir)
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
    state, _ = ckpt.restore(ckpt.latest_step(), run.abstract_state())
    ckpt.close()
    return params_lib.flatten(jax.device_get({"params": state["params"], "avg": state["avg"]}))


def _val_lines(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"].startswith("val")]


@pytest.mark.slow
def test_ema_swa_resume_is_bit_identical_evaluated_and_exported(model_dir, data_dir, tmp_path):
    cfg = tiny.tiny_config(model_dir, data_dir, **{"train.checkpoint.every": 3, "train.epochs": 2.0,
                                                   "train.ema.decay": 0.9, "train.swa.start": 0.5,
                                                   "train.swa.every": 2})
    trainer.train(cfg, str(tmp_path / "straight"))
    interrupted = str(tmp_path / "interrupted")
    assert trainer.train(cfg, interrupted, stop_after=7) == {"interrupted_at": 7}
    trainer.train(cfg, interrupted)
    a, b = _final_state(str(tmp_path / "straight"), cfg), _final_state(interrupted, cfg)
    assert a.keys() == b.keys() and any(p.startswith("avg/ema/") for p in a) and "avg/swa_count" in a
    for path in a:
        assert np.array_equal(a[path], b[path]), path
    lines = _val_lines(interrupted)
    assert {r["split"] for r in lines} == {"val", "val_ema", "val_swa"}
    assert lines == _val_lines(str(tmp_path / "straight"))
    k = "bert/encoder/layer/1/output/dense/kernel"
    assert not np.array_equal(a[f"avg/ema/{k}"], a[f"params/{k}"])
    flags.FLAGS(["ftjax", "--weights=ema", f"--export_dir={tmp_path / 'export'}"])
    try:
        main._export(cfg, interrupted)
    finally:
        flags.FLAGS.unparse_flags()
    exported = models.from_pretrained(str(tmp_path / "export"), task="classification")
    got = params_lib.flatten(nnx.to_pure_dict(nnx.state(exported, nnx.Param)))
    record = json.loads((tmp_path / "export" / "ftjax_export.json").read_text())
    step = record["step"]
    assert record["weights"] == "ema"
    ckpt = checkpoint_lib.Checkpointer(os.path.join(interrupted, "checkpoints"), keep=1, async_save=False)
    state, _ = ckpt.restore(step, Run(cfg, interrupted, purpose="export").abstract_state())
    ckpt.close()
    np.testing.assert_array_equal(got[k], params_lib.flatten(jax.device_get(state["avg"]["ema"]))[k])


# ------------------------------------------------------------------------ re-initialised top layers
def test_reinit_top_layers_match_a_fresh_init_and_leave_the_rest(model_dir):
    loaded = models.from_pretrained(model_dir, task="classification", num_labels=2, seed=3)
    before = params_lib.flatten(nnx.to_pure_dict(nnx.state(loaded, nnx.Param)))
    pattern = default_config().optim.layer_pattern
    changed = set(reinit.reinit_top_layers(loaded, 1, pattern, seed=3))
    after = params_lib.flatten(nnx.to_pure_dict(nnx.state(loaded, nnx.Param)))
    fresh = models.from_config(loaded.hf_config, task="classification", seed=3)
    init = params_lib.flatten(nnx.to_pure_dict(nnx.state(fresh, nnx.Param)))
    assert changed == {p for p in after if "/layer/1/" in p or "/pooler/" in p}
    for path in after:
        if path in changed:
            np.testing.assert_array_equal(after[path], init[path], err_msg=path)  # the model's init, seeded
            leaf = path.rsplit("/", 1)[-1]
            if leaf == "kernel":
                assert not np.array_equal(after[path], before[path]) and abs(after[path].std() - 0.02) < 0.01
            elif leaf in ("bias", "scale"):
                assert np.all(after[path] == (1.0 if leaf == "scale" else 0.0)), path
        else:
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    with pytest.raises(ConfigError, match="model.reinit_layers"):
        reinit.reinit_top_layers(loaded, 3, pattern, seed=3)


def test_run_reinits_and_dry_run_prints_the_new_hyperparameters(model_dir, data_dir, tmp_path):
    cfg = tiny.tiny_config(model_dir, data_dir, **{"model.reinit_layers": 1, "train.ema.decay": 0.99,
                                                   "optim.bias_correction": False})
    run = Run(cfg, str(tmp_path), purpose="eval")
    fresh = models.from_config(run.model.hf_config, task="classification", num_labels=2, seed=0)
    k = "bert/encoder/layer/1/attention/self/query/kernel"
    want = params_lib.flatten(nnx.to_pure_dict(nnx.state(fresh, nnx.Param)))[k]
    np.testing.assert_array_equal(params_lib.flatten(jax.device_get(run.state["params"]))[k], want)
    text = "\n".join(dry_run.extras(run)) + optimizer_report.describe(run.optimizer)
    assert "model.reinit_layers=1" in text and "EMA" in text and "BERTAdam" in text
