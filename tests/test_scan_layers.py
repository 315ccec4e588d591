"""Scanned layer stacks (model.scan_layers) against the unrolled model: outputs, HF round trips, training with
per-layer freezing / LLRD / gradual unfreezing / LoRA / re-init, remat policies, generation, program size."""

from __future__ import annotations

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

import jax
import jax.numpy as jnp
import optax

from ftjax import generate, lora, models, optim
from ftjax import params as params_lib
from ftjax.config import REMAT_POLICIES, default_config
from ftjax.reinit import reinit_top_layers
from ftjax.step import StepConfig, make_train_step

VOCAB = 64


def llama_config(kind: str = "llama", layers: int = 3):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                  eos_token_id=1, bos_token_id=2)
    if kind == "mistral":
        return transformers.MistralConfig(sliding_window=4, **common)
    if kind == "qwen2":  # sliding windows on some layers only: one scanned stack, per-layer masks
        return transformers.Qwen2Config(use_sliding_window=True, sliding_window=3, max_window_layers=1,
                                        tie_word_embeddings=True, **common)
    if kind == "qwen3":
        return transformers.Qwen3Config(head_dim=16, **common)
    return transformers.LlamaConfig(attention_bias=True, **common)


def pair(kind: str = "llama", task: str = "causal_lm", layers: int = 3, **kw):
    cfg = llama_config(kind, layers)
    if task == "classification":
        cfg.num_labels = 3
    unrolled = models.from_config(cfg, task=task, seed=4, **kw)
    scanned = models.from_config(cfg, task=task, seed=4, scan_layers=True, **kw)
    return unrolled, scanned


def batch(rows: int = 2, length: int = 12, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (rows, length)).astype(np.int32)
    mask = np.ones((rows, length), np.int32)
    mask[1, length - 4:] = 0
    ids[mask == 0] = 0
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_scanned_stack_equals_unrolled_logits_and_hidden_states(kind):
    unrolled, scanned = pair(kind)
    assert scanned.stacks() == {"model/layers": 3} and unrolled.stacks() == {}
    a = unrolled(**batch(), output_hidden_states=True)
    b = scanned(**batch(), output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(a["logits"]), np.asarray(b["logits"]), atol=2e-6)
    assert len(a["hidden_states"]) == len(b["hidden_states"]) == 4
    for x, y in zip(a["hidden_states"], b["hidden_states"]):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6)


def test_scanned_packed_segments_and_classification_equal_unrolled():
    unrolled, scanned = pair("llama", "classification")
    np.testing.assert_allclose(np.asarray(unrolled(**batch())["logits"]), np.asarray(scanned(**batch())["logits"]),
                               atol=2e-6)
    lm_u, lm_s = pair("qwen2")
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], jnp.int32)
    ids = batch()["input_ids"]
    np.testing.assert_allclose(np.asarray(lm_u(input_ids=ids, segment_ids=seg)["logits"]),
                               np.asarray(lm_s(input_ids=ids, segment_ids=seg)["logits"]), atol=2e-6)


def test_stacked_params_have_a_layer_axis_and_a_replicated_spec():
    from jax.sharding import Mesh

    from ftjax import sharding as sharding_lib

    _, scanned = pair()
    axes = scanned.logical_axes()
    assert axes["model/layers/self_attn/q_proj/kernel"] == ("layers", "embed", "heads")
    assert axes["model/layers/input_layernorm/scale"] == ("layers", "embed")
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(1, 4, 1), ("data", "fsdp", "tensor"))
    params = params_lib.split(scanned)[1]
    specs = params_lib.flatten(sharding_lib.param_shardings(params, axes, mesh))
    assert specs["model/layers/self_attn/q_proj/kernel"].spec[0] is None  # never split along the layers
    assert "fsdp" in tuple(specs["model/layers/self_attn/q_proj/kernel"].spec)
    assert tuple(specs["model/layers/input_layernorm/scale"].spec) == ()  # a stacked vector stays a vector


def test_hf_round_trip_of_a_scanned_model(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(llama_config(), attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path / "base")
    scanned = models.from_pretrained(str(tmp_path / "base"), task="causal_lm", scan_layers=True)
    assert scanned.stacks() == {"model/layers": 3} and not scanned.load_report["initialized"]
    ids = batch()
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(np.asarray(ids["input_ids"])).long(),
                  attention_mask=torch.tensor(np.asarray(ids["attention_mask"]))).logits.numpy()
    got = np.asarray(scanned(**ids)["logits"])
    real = np.asarray(ids["attention_mask"]).astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4)
    models.save_pretrained(scanned, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, value in hf.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name].numpy(), value.numpy())


def _optim_cfg(**overrides):
    o = default_config().optim
    o.lr = 1e-2
    o.schedule.type = "constant"
    o.schedule.warmup = 0
    for key, value in overrides.items():
        node = o
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return o


def _train(model, optim_cfg, steps: int = 4, total: int = 8):
    graphdef, params, rest = params_lib.split(model)
    opt = optim.build(optim_cfg, params, total_steps=total, steps_per_epoch=4, stacks=model.stacks(),
                      head_pattern=getattr(model, "head_pattern", None))
    state = {"step": jnp.int32(0), "params": params, "opt_state": opt.tx.init(params)}
    data = batch(4, 10)
    data = {**data, "labels": data["input_ids"], "weights": jnp.ones((4,), jnp.float32)}
    losses = []
    for s in range(steps):
        fn = jax.jit(make_train_step(graphdef, rest, opt.tx, opt.trainable_params_at(s), StepConfig("causal_lm"),
                                     grad_masks=opt.grad_masks_at(s)))
        state, metrics = fn(state, data, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    model = params_lib.merge(graphdef, state["params"], rest)
    return models.hf_state_dict(model), losses, opt, state


TRAINING = {
    "plain": {},
    "freeze_layers": {"freeze_layers": "embeddings,0-1"},
    "llrd": {"layer_lr_decay": 0.5},
    "unfreeze": {"freeze_layers": "0-2", "unfreeze": ((2, r".*layers/(1|2)/.*"),)},
    "llrd_and_unfreeze": {"layer_lr_decay": 0.7, "freeze_layers": "1", "unfreeze": ((1, r".*layers/1/.*"),)},
}


# llrd and llrd_and_unfreeze are slow: per-layer multipliers are pinned cheaply in test_optim, scanned or not.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("llrd") else n
                                  for n in TRAINING])
def test_scanned_training_equals_unrolled(name):
    unrolled, scanned = pair()
    a, loss_a, opt_a, _ = _train(unrolled, _optim_cfg(**TRAINING[name]))
    b, loss_b, opt_b, state_b = _train(scanned, _optim_cfg(**TRAINING[name]))
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    assert set(opt_a.table) == set(opt_b.table)  # the param table has per-layer rows either way
    for path, row in opt_a.table.items():
        assert (row.label, row.lr_mult, row.frozen, row.unfreeze_step) == (
            opt_b.table[path].label, opt_b.table[path].lr_mult, opt_b.table[path].frozen,
            opt_b.table[path].unfreeze_step)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-4, err_msg=key)  # 1% of an lr-1e-2 step: Adam amplifies float noise of ~0 grads
    if name == "freeze_layers":  # frozen layers of the stack are bit-equal to the start, and carry no state
        start = models.hf_state_dict(scanned)
        np.testing.assert_array_equal(b["model.layers.0.mlp.up_proj.weight"],
                                      start["model.layers.0.mlp.up_proj.weight"])
        assert not np.array_equal(b["model.layers.2.mlp.up_proj.weight"], start["model.layers.2.mlp.up_proj.weight"])
        assert opt_b.state_bytes() == opt_a.state_bytes()


def test_lora_on_a_scanned_stack_equals_unrolled_and_exports_per_layer(tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    unrolled, scanned = pair()
    cfg = _optim_cfg(**{"lora.rank": 4, "lora.targets": r".*(q_proj|v_proj)"})
    for model in (unrolled, scanned):
        lora.apply_lora(model, cfg.lora, seed=1)
    assert scanned.model.layers.self_attn.q_proj.lora_a.shape == (3, 32, 4)
    a, loss_a, _, _ = _train(unrolled, cfg)
    b, loss_b, _, state_b = _train(scanned, cfg)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-4, err_msg=key)  # 1% of an lr-1e-2 step: Adam amplifies float noise of ~0 grads
    lora.export_peft(scanned, tmp_path / "adapter", state_b["params"])
    adapter = __import__("json").loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "model.layers.2.self_attn.q_proj" in adapter["target_modules"]
    with pytest.raises(Exception, match="optim.lora.targets"):
        lora.apply_lora(pair()[1], _optim_cfg(**{"lora.rank": 4, "lora.targets": r".*layers/0/.*q_proj"}).lora)
    del peft, torch


def test_reinit_top_layers_of_a_scanned_stack_equals_unrolled():
    unrolled, scanned = pair()
    pattern = default_config().optim.layer_pattern
    chosen = reinit_top_layers(unrolled, 1, pattern, seed=7)
    assert chosen == reinit_top_layers(scanned, 1, pattern, seed=7)
    a, b = models.hf_state_dict(unrolled), models.hf_state_dict(scanned)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("scan", [False, True])
def test_every_remat_policy_gives_the_same_loss_and_gradients(scan):
    cfg = llama_config()
    data = batch(2, 10)

    def loss_and_grads(policy):
        model = models.from_config(cfg, task="causal_lm", seed=4, remat=policy, scan_layers=scan)
        graphdef, params, rest = params_lib.split(model)

        def loss(p):
            logits = params_lib.merge(graphdef, p, rest)(**data)["logits"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, data["input_ids"]).mean()

        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref_grads = loss_and_grads("none")
    for policy in REMAT_POLICIES[1:]:
        value, grads = loss_and_grads(policy)
        np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-6)
        for x, y in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_scanned_generation_equals_unrolled():
    """Left-padded prompts, greedy, with the KV cache (stacked [layers, ...] when scanned)."""
    unrolled, scanned = pair()
    ids = np.array(batch()["input_ids"])
    mask = np.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    a = generate.generate_ids(unrolled, ids, mask, max_new_tokens=5, eos_token_id=63)
    b = generate.generate_ids(scanned, ids, mask, max_new_tokens=5, eos_token_id=63)
    np.testing.assert_array_equal(a, b)
    assert a.shape[1] > ids.shape[1]


def _train_step_hlo_size(layers: int, scan: bool) -> int:
    model = models.from_config(llama_config("llama", layers), task="causal_lm", seed=0, scan_layers=scan)
    graphdef, params, rest = params_lib.split(model)
    opt = optim.build(_optim_cfg(), params, total_steps=4, steps_per_epoch=4, stacks=model.stacks())
    state = {"step": jnp.int32(0), "params": params, "opt_state": opt.tx.init(params)}
    data = batch(2, 8)
    data = {**data, "labels": data["input_ids"], "weights": jnp.ones((2,), jnp.float32)}
    fn = jax.jit(make_train_step(graphdef, rest, opt.tx, opt.trainable_params_at(0), StepConfig("causal_lm")))
    return len(fn.lower(state, data, jax.random.key(0)).as_text())


def test_scanned_program_does_not_grow_with_depth():
    """What makes compile time flat in depth: the scanned step's program is about the same size at 2 and 16
    layers, while the unrolled one grows with every layer."""
    scanned_2, scanned_16 = _train_step_hlo_size(2, True), _train_step_hlo_size(16, True)
    unrolled_2, unrolled_16 = _train_step_hlo_size(2, False), _train_step_hlo_size(16, False)
    assert scanned_16 < 1.2 * scanned_2, (scanned_2, scanned_16)
    assert unrolled_16 > 3 * unrolled_2, (unrolled_2, unrolled_16)


def test_scanned_llama_step_compiles_for_a_tpu_topology_with_the_splash_kernel():
    """AOT for 4 abstract v5e chips (libtpu's compiler on this CPU): the scanned train step with
    model.attention=auto runs the Pallas splash kernel inside the scan, fsdp-sharded."""
    topologies = pytest.importorskip("jax.experimental.topologies")
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from ftjax import sharding as sharding_lib

    key_type = jax.random.key(0).dtype
    try:
        topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    except Exception as e:  # noqa: BLE001 - no libtpu here
        pytest.skip(f"no TPU compiler: {e}")
    mesh = Mesh(np.asarray(topo.devices).reshape(1, 4, 1), ("data", "fsdp", "tensor"))
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    from flax import nnx

    abstract = nnx.eval_shape(lambda: models.from_config(cfg, task="causal_lm", scan_layers=True, dtype="bfloat16",
                                                         remat="full"))
    graphdef, params, rest = params_lib.split(abstract)
    opt = optim.build(_optim_cfg(), params, total_steps=4, steps_per_epoch=4, stacks=abstract.stacks())
    shardings = sharding_lib.param_shardings(params, abstract.logical_axes(), mesh)
    opt_state = jax.eval_shape(opt.tx.init, params)
    opt_shardings = sharding_lib.like_params(opt_state, params, shardings, mesh)
    struct = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(("data", "fsdp")))
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
             "params": jax.tree.map(struct, params, shardings), "opt_state": jax.tree.map(struct, opt_state, opt_shardings)}
    data = {k: jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=rows) for k in ("input_ids", "attention_mask", "labels")}
    data["weights"] = jax.ShapeDtypeStruct((8,), jnp.float32, sharding=rows)
    fn = jax.jit(make_train_step(graphdef, rest, opt.tx, opt.trainable_params_at(0), StepConfig("causal_lm")))
    with jax.set_mesh(mesh):
        compiled = fn.lower(state, data, jax.ShapeDtypeStruct((), key_type, sharding=rep)).compile()
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo  # the splash kernel (forward and backward)
    assert " while(" in hlo or "while" in hlo  # the layer scan
    assert compiled.memory_analysis().temp_size_in_bytes > 0
