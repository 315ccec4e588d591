"""Mixtral and Qwen3-MoE (moe.py, mixtral.py, qwen_moe.py) against transformers PyTorch on tiny random configs:
routing that differs per token, the router's load-balancing loss (with padding), Qwen3-MoE's dense layers
and un-normalised top-k, round trip to HF keys per expert, greedy generation, packing, the loss the train
step minimises, sharded experts, LoRA leaving the experts alone, and FLOPs.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open

from ftjax import flops, lora, models
from ftjax import params as params_lib
from ftjax import sharding as sharding_lib
from ftjax.generate import generate_ids
from ftjax.models import moe
from ftjax.step import StepConfig, make_train_step

VOCAB, PAD, COEF = 64, 0, 0.02
KINDS = ("mixtral", "qwen3_moe")


def hf_config(kind: str):
    """4 experts, top-2, GQA, 3 layers. mixtral: a sliding window of 5 (shorter than the sequences), jitter off;
    qwen3_moe: layer 1 dense (mlp_only_layers), norm_topk_prob False, q/k norms, expert width 16 vs dense 48."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=PAD, eos_token_id=1, bos_token_id=2, output_router_logits=True,
                  router_aux_loss_coef=COEF, tie_word_embeddings=False)
    if kind == "mixtral":
        return transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, sliding_window=5, **common)
    return transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                       decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False, **common)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            torch.manual_seed(0)
            ref = transformers.AutoModelForCausalLM.from_config(hf_config(kind), attn_implementation="eager").eval()
            with torch.no_grad():  # a sharper router, so top-k picks differ clearly between tokens
                for name, p in ref.named_parameters():
                    if name.endswith("gate.weight"):
                        p.mul_(20.0)
            path = str(tmp_path_factory.mktemp(kind))
            ref.save_pretrained(path)
            cache[kind] = (path, ref)
        return cache[kind]

    return get


def batch(side: str, length: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (2, length))
    mask = np.ones_like(ids)
    pads = slice(0, 3) if side == "left" else slice(length - 3, length)
    mask[1, pads], ids[1, pads] = 0, PAD
    return ids, mask


def torch_out(ref, ids, mask):
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_and_load_balancing_loss_match_transformers(saved, kind, side):
    path, ref = saved(kind)
    model = models.from_pretrained(path, task="causal_lm")
    assert model.load_report["initialized"] == [] and model.load_report["unused"] == []
    ids, mask = batch(side)
    want = torch_out(ref, ids, mask)
    out = model(input_ids=ids, attention_mask=mask)
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out["logits"])[keep], want.logits.numpy()[keep], atol=1e-4, rtol=1e-4)
    # HF's aux_loss counts only the real tokens (its attention_mask); ours is already times the coefficient.
    assert float(out["aux_loss"]) == pytest.approx(COEF * float(want.aux_loss), rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_the_test_configs_route_tokens_to_different_experts(saved, kind):
    path, ref = saved(kind)
    ids, mask = batch("right")
    with torch.no_grad():
        router_logits = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).router_logits
    picks = [torch.topk(r, 2, dim=-1).indices.sort(dim=-1).values for r in router_logits]
    assert all(len({tuple(t.tolist()) for t in p}) >= 3 for p in picks)  # several expert pairs per layer
    model = models.from_pretrained(path, task="causal_lm")
    sparse = [type(getattr(layer, layer.ffn)).__name__ for layer in model.model.layers]
    assert sparse == (["SparseMoeBlock"] * 3 if kind == "mixtral" else ["SparseMoeBlock", "MLP", "SparseMoeBlock"])
    assert len(router_logits) == sparse.count("SparseMoeBlock")


def test_experts_without_renormalisation_weigh_by_their_softmax_probability():
    """SparseMoeBlock on its own: top-k weights are the router's probabilities (renormalised only when asked),
    and each token's output is exactly the weighted sum of its experts' SwiGLU outputs."""
    cfg = hf_config("qwen3_moe")
    block = models.from_config(cfg, task="causal_lm", seed=3).model.layers[0].mlp
    x = jax.random.normal(jax.random.key(0), (1, 6, 32))
    tokens = x.reshape(6, 32)
    probs = jax.nn.softmax(block.gate(tokens), axis=-1)
    for normalize in (False, True):
        block.normalize = normalize
        weights, chosen = jax.lax.top_k(probs, 2)
        if normalize:
            weights = weights / weights.sum(-1, keepdims=True)
        want = []
        for t in range(6):
            acc = 0.0
            for j in range(2):
                e = int(chosen[t, j])
                k = {n: getattr(block.experts, n).kernel.get_value()[e] for n in block.names}
                g, u, d = (k[n] for n in block.names)
                acc = acc + weights[t, j] * ((jax.nn.silu(tokens[t] @ g) * (tokens[t] @ u)) @ d)
            want.append(acc)
        got = block(x, None, deterministic=True, rngs=None).reshape(6, 32)
        np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.stack(want)), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_writes_one_key_per_expert_transformers_loads(saved, kind, tmp_path):
    path, _ = saved(kind)
    model = models.from_pretrained(path, task="causal_lm")
    graphdef, state = nnx.split(model, nnx.Param)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x * 1.1, state))  # the file must carry ftjax's values
    out = models.save_pretrained(model, str(tmp_path / "out"))
    with safe_open(f"{path}/model.safetensors", "np") as f:
        original = set(f.keys())
    with safe_open(f"{out}/model.safetensors", "np") as f:
        assert set(f.keys()) == original
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = batch("right")
    keep = mask.astype(bool)
    ours = np.asarray(model(input_ids=ids, attention_mask=mask)["logits"])
    np.testing.assert_allclose(torch_out(reloaded, ids, mask).logits.numpy()[keep], ours[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_equals_transformers_token_for_token(saved, kind):
    path, ref = saved(kind)
    model = models.from_pretrained(path, task="causal_lm")
    ids = np.random.RandomState(1).randint(3, VOCAB, (2, 7))
    mask = np.ones_like(ids)
    mask[1, :3], ids[1, :3] = 0, PAD
    ref.config.output_router_logits = False  # transformers 5.24's generate fails computing it over the cache
    with torch.no_grad():
        want = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                            max_new_tokens=8, eos_token_id=VOCAB + 5, pad_token_id=PAD).numpy()
    ref.config.output_router_logits = True
    np.testing.assert_array_equal(generate_ids(model, ids, mask, max_new_tokens=8, eos_token_id=VOCAB + 5), want)


def test_packed_segments_equal_separate_sequences():
    model = models.from_config(hf_config("mixtral"), task="causal_lm", seed=1)
    rng = np.random.RandomState(2)
    a, b = rng.randint(3, VOCAB, 7), rng.randint(3, VOCAB, 4)
    packed = np.concatenate([a, b, [PAD, PAD]])[None]
    segments = np.array([[1] * len(a) + [2] * len(b) + [0, 0]])
    out = np.asarray(model(input_ids=packed, segment_ids=segments)["logits"])[0]
    np.testing.assert_allclose(out[:len(a)], np.asarray(model(input_ids=a[None])["logits"])[0], atol=1e-5)
    np.testing.assert_allclose(out[len(a):len(a) + len(b)], np.asarray(model(input_ids=b[None])["logits"])[0],
                               atol=1e-5)


def _lm_batch(rows: int = 4, length: int = 8) -> dict:
    ids = np.random.RandomState(4).randint(3, VOCAB, (rows, length)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids,
            "weights": np.ones(rows, np.float32)}


@pytest.mark.parametrize("remat", ["none", "full"])
def test_the_train_step_minimises_the_lm_loss_plus_the_load_balancing_loss(remat):
    model = models.from_config(hf_config("qwen3_moe"), task="causal_lm", seed=5, remat=remat)
    graphdef, params, rest = params_lib.split(model)
    tx = optax.sgd(0.0)
    trainable = frozenset(params_lib.flatten(params))
    step = jax.jit(make_train_step(graphdef, rest, tx, trainable, StepConfig("causal_lm")))
    b = _lm_batch()
    _, metrics = step({"step": jnp.int32(0), "params": params, "opt_state": tx.init(params)}, b, jax.random.key(0))
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    logp = jax.nn.log_softmax(out["logits"][:, :-1], axis=-1)
    lm = -np.take_along_axis(np.asarray(logp), b["labels"][:, 1:, None], axis=-1).mean()
    assert float(out["aux_loss"]) > 0
    assert float(metrics["loss"]) == pytest.approx(lm + float(out["aux_loss"]), rel=1e-5)


def test_sharded_experts_compute_what_one_device_does():
    model = models.from_config(hf_config("mixtral"), task="causal_lm", seed=6)
    ids, mask = batch("right")
    want = np.asarray(model(input_ids=ids, attention_mask=mask)["logits"])
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(1, 4, 2), sharding_lib.MESH_AXES)
    graphdef, state = nnx.split(model)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    shardings = sharding_lib.param_shardings(params, model.logical_axes(), mesh)
    spec = params_lib.flatten(shardings)["model/layers/0/block_sparse_moe/experts/w1/kernel"].spec
    assert "fsdp" in tuple(spec) and tuple(spec)[0] is None  # [expert, embed, mlp]: the expert dim stays whole
    placed = jax.device_put(params, shardings)
    nnx.replace_by_pure_dict(state, placed)
    sharded = nnx.merge(graphdef, state)
    got = jax.jit(lambda m: m(input_ids=ids, attention_mask=mask)["logits"])(sharded)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_lora_all_linear_adapts_attention_and_router_but_not_the_experts():
    model = models.from_config(hf_config("mixtral"), task="causal_lm")
    lora.apply_lora(model, {"rank": 2, "targets": lora.ALL_LINEAR})
    adapted = sorted(lora.lora_modules(model))
    assert "model/layers/0/block_sparse_moe/gate" in adapted and "model/layers/0/self_attn/q_proj" in adapted
    assert not any("experts" in p for p in adapted) and "lm_head" not in adapted


def test_flops_count_top_k_expert_passes_per_token():
    cfg = hf_config("qwen3_moe")
    model = models.from_config(cfg, task="causal_lm")
    paths = frozenset(params_lib.flatten(params_lib.split(model)[1]))
    count = flops.step_flops(model, paths, flops.Shape(2, 16))
    n, h, d, heads, kv = 32, 32, 8, 4, 2
    attention = 2 * n * h * (heads + 2 * kv) * d + 2 * n * heads * d * h + 2 * 2 * (2 * 16 * 16) * heads * d
    sparse = 2 * n * h * 4 + 2 * (2 * n * h * 16 * 3)  # router + top-2 experts' three matmuls of width 16
    dense = 2 * n * h * 48 * 3
    assert count.forward == pytest.approx(3 * attention + 2 * sparse + dense + 2 * n * h * VOCAB)


def test_router_statistics_ignore_padding_and_are_read_once():
    model = models.from_config(hf_config("mixtral"), task="causal_lm", seed=7)
    ids, mask = batch("right")
    padded = float(model(input_ids=ids, attention_mask=mask)["aux_loss"])
    assert not [v for _, v in nnx.iter_graph(model) if isinstance(v, moe.RouterStats)]  # popped by the call
    short = float(model(input_ids=ids[:1], attention_mask=mask[:1])["aux_loss"])
    junk = ids.copy()
    junk[1, -3:] = 9  # what the pad slots hold must not matter
    assert float(model(input_ids=junk, attention_mask=mask)["aux_loss"]) == pytest.approx(padded, rel=1e-6)
    assert short != pytest.approx(padded)


def test_a_mixtral_fine_tune_runs_end_to_end_and_exports(tmp_path):
    """The causal-LM recipe on a tiny Mixtral folder, on two devices: trains, evaluates, keeps a checkpoint."""
    import importlib.util
    import os

    from ftjax import trainer
    from tests.test_lm_data import CORPUS, tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = hf_config("mixtral")
    cfg.vocab_size, cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = (
        len(tok), tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    folder = str(tmp_path / "mixtral")
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 10))
    spec = importlib.util.spec_from_file_location("recipe", os.path.join("configs", "causal_lm_text.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    run_cfg = recipe.get_config(f"model={folder},data={corpus},steps=3,batch=2,max_len=32")
    run_cfg.train.compilation_cache = ""
    run_cfg.train.progress = False
    run_cfg.train.checkpoint.async_save = False
    run_cfg.data.lm.num_samples = 0
    summary = trainer.train(run_cfg, str(tmp_path / "work"), devices=jax.devices()[:2])
    assert summary["steps"] == 3 and np.isfinite(summary["val"]["loss"])
