"""Decoder families (gpt2, llama, mistral, qwen2, qwen3) against transformers PyTorch on tiny random configs:
logits with left and right padding, last-token classification, Llama-3 RoPE, sliding windows, packed
segments, save_pretrained round trips, param paths / logical axes / head patterns, and remat gradients.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import models
from ftjax import params as params_lib

VOCAB, PAD = 64, 0
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}


def hf_config(kind: str):
    """Tiny float32 configs; each one exercises a feature of its family."""
    common = {"vocab_size": VOCAB, "pad_token_id": PAD, "eos_token_id": 1, "bos_token_id": 2}
    llama_like = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, **common)
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       scale_attn_by_inverse_layer_idx=True, **common)
    if kind == "llama":  # GQA, untied lm_head, attention + mlp biases.
        return transformers.LlamaConfig(attention_bias=True, mlp_bias=True, tie_word_embeddings=False, **llama_like)
    if kind == "llama3":  # Llama-3.1 rope scaling, tied embeddings, a smaller original context.
        return transformers.LlamaConfig(**{**llama_like, "max_position_embeddings": 128}, tie_word_embeddings=True,
                                        rope_parameters=LLAMA3_ROPE)
    if kind == "mistral":  # a sliding window shorter than the test sequences.
        return transformers.MistralConfig(sliding_window=4, rope_theta=1000.0, **llama_like)
    if kind == "qwen2":  # q/k/v biases, tied embeddings, a sliding window on layer 1 only.
        return transformers.Qwen2Config(use_sliding_window=True, sliding_window=3, max_window_layers=1,
                                        tie_word_embeddings=True, **llama_like)
    if kind == "qwen3":  # q/k RMSNorm per head, head_dim != hidden / heads.
        return transformers.Qwen3Config(head_dim=16, tie_word_embeddings=False, **llama_like)
    raise AssertionError(kind)


KINDS = ("gpt2", "llama", "llama3", "mistral", "qwen2", "qwen3")
HF_CLASSES = {"causal_lm": transformers.AutoModelForCausalLM,
              "classification": transformers.AutoModelForSequenceClassification,
              "base": transformers.AutoModel}


def hf_model(kind: str, task: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = hf_config(kind)
    if task == "classification":
        cfg.num_labels = 3
    model = HF_CLASSES[task].from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # random norm weights and biases, so a swapped or missing one shows.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or name.startswith(("ln", "transformer.ln")) or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{(kind, task): folder} of saved random HF models, made on first use."""
    cache: dict = {}

    def get(kind: str, task: str) -> tuple[str, object]:
        if (kind, task) not in cache:
            model = hf_model(kind, task)
            path = str(tmp_path_factory.mktemp(f"{kind}_{task}"))
            model.save_pretrained(path)
            cache[kind, task] = (path, model)
        return cache[kind, task]

    return get


def batch(side: str, length: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two rows, the second with 3 pad tokens on `side`."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (2, length))
    mask = np.ones_like(ids)
    pads = slice(0, 3) if side == "left" else slice(length - 3, length)
    mask[1, pads], ids[1, pads] = 0, PAD
    return ids, mask


def torch_out(model, ids, mask, **kw):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_lm_logits_match_transformers(saved, kind, side):
    path, ref_model = saved(kind, "causal_lm")
    model = models.from_pretrained(path, task="causal_lm")
    assert model.load_report["initialized"] == [] and model.load_report["unused"] == []
    ids, mask = batch(side)
    ref = torch_out(ref_model, ids, mask)
    out = np.asarray(model(input_ids=ids, attention_mask=mask)["logits"])
    keep = mask.astype(bool)
    np.testing.assert_allclose(out[keep], ref[keep], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_classification_pools_last_non_pad_token_like_transformers(saved, kind, side):
    path, ref_model = saved(kind, "classification")
    model = models.from_pretrained(path, task="classification")
    assert model.head_pattern == r"score/.*" and "score/kernel" in model.logical_axes()
    assert "score/bias" not in model.logical_axes()
    ids, mask = batch(side)
    ref = torch_out(ref_model, ids, mask)
    out = np.asarray(model(input_ids=ids, attention_mask=mask)["logits"])
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_base_hidden_states_match_transformers(saved, kind):
    path, ref_model = saved(kind, "base")
    model = models.from_pretrained(path, task="base")
    ids, mask = batch("right")
    ref = torch_out(ref_model, ids, mask)
    out = np.asarray(model(input_ids=ids, attention_mask=mask)["last_hidden_state"])
    keep = mask.astype(bool)
    np.testing.assert_allclose(out[keep], ref[keep], atol=1e-4, rtol=1e-4)


def test_llama3_rope_scaling_changes_logits_and_matches_transformers(saved):
    """Positions beyond the original context, where llama3 scaling differs from plain RoPE."""
    path, ref_model = saved("llama3", "causal_lm")
    model = models.from_pretrained(path, task="causal_lm")
    ids = np.random.RandomState(1).randint(3, VOCAB, (1, 40))
    mask = np.ones_like(ids)
    np.testing.assert_allclose(np.asarray(model(input_ids=ids)["logits"]), torch_out(ref_model, ids, mask),
                               atol=1e-4, rtol=1e-4)
    plain = hf_config("llama3")
    plain.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    other = models.from_config(plain, task="causal_lm")
    nnx.update(other, nnx.state(model, nnx.Param))
    diff = np.abs(np.asarray(other(input_ids=ids)["logits"]) - np.asarray(model(input_ids=ids)["logits"]))
    assert diff.max() > 1e-3


def test_unsupported_rope_type_is_rejected():
    cfg = hf_config("llama")
    cfg.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(models.UnsupportedModelError, match="rope_type 'dynamic'"):
        models.from_config(cfg, task="causal_lm")


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_packed_segments_equal_separate_sequences(kind):
    """segment_ids: no attention across segments and positions restart, so each segment's logits equal
    the logits of that segment run alone."""
    model = models.from_config(hf_config(kind), task="causal_lm", seed=1)
    rng = np.random.RandomState(2)
    a, b = rng.randint(3, VOCAB, 5), rng.randint(3, VOCAB, 3)
    packed = np.concatenate([a, b, [PAD, PAD]])[None]
    segments = np.array([[1] * 5 + [2] * 3 + [0, 0]])
    out = np.asarray(model(input_ids=packed, segment_ids=segments)["logits"])[0]
    alone_a = np.asarray(model(input_ids=a[None])["logits"])[0]
    alone_b = np.asarray(model(input_ids=b[None])["logits"])[0]
    np.testing.assert_allclose(out[:5], alone_a, atol=1e-5)
    np.testing.assert_allclose(out[5:8], alone_b, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_round_trip_loads_in_transformers(saved, kind, tmp_path):
    path, _ = saved(kind, "causal_lm")
    model = models.from_pretrained(path, task="causal_lm")
    # Change the params, so the test shows the saved file carries ftjax's values (not the original ones).
    graphdef, state = nnx.split(model, nnx.Param)
    state = jax.tree.map(lambda x: x * 1.1, state)
    model = nnx.merge(graphdef, state)
    out_dir = models.save_pretrained(model, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    ids, mask = batch("right")
    keep = mask.astype(bool)
    ours = np.asarray(model(input_ids=ids, attention_mask=mask)["logits"])
    np.testing.assert_allclose(torch_out(reloaded, ids, mask)[keep], ours[keep], atol=1e-5, rtol=1e-5)


def test_param_paths_axes_and_head_patterns(saved):
    gpt2 = models.from_pretrained(saved("gpt2", "causal_lm")[0], task="causal_lm")
    axes = gpt2.logical_axes()
    assert axes["transformer/h/1/attn/c_attn/kernel"] == ("embed", "heads")
    assert axes["transformer/wte/embedding"] == ("vocab", "embed")
    assert "lm_head/kernel" not in axes  # tied (GPT-2's default): the head is the token embedding.
    assert gpt2.head_pattern == r"transformer/wte/.*"
    # HF Conv1D weights are [in, out] already: c_fc maps 32 -> 128.
    assert gpt2.transformer.h[0].mlp.c_fc.kernel.get_value().shape == (32, 128)

    llama = models.from_pretrained(saved("llama", "causal_lm")[0], task="causal_lm")
    axes = llama.logical_axes()
    assert axes["model/layers/0/self_attn/q_proj/kernel"] == ("embed", "heads")
    assert axes["model/layers/0/self_attn/k_proj/kernel"] == ("embed", "heads")
    assert axes["model/layers/0/mlp/down_proj/kernel"] == ("mlp", "embed")
    assert axes["model/layers/0/input_layernorm/scale"] == ("embed",)
    assert axes["lm_head/kernel"] == ("embed", "vocab")
    assert llama.head_pattern == r"lm_head/.*"
    assert llama.model.layers[0].self_attn.k_proj.kernel.get_value().shape == (32, 16)  # 2 kv heads x 8.
    flat = params_lib.flatten(nnx.state(llama, nnx.Param).to_pure_dict())
    assert set(flat) == set(axes)

    qwen3 = models.from_pretrained(saved("qwen3", "causal_lm")[0], task="causal_lm")
    assert qwen3.logical_axes()["model/layers/1/self_attn/q_norm/scale"] == ("kv",)
    assert qwen3.family == "qwen" and llama.family == "llama"


def test_classification_without_pad_token_needs_batch_of_one():
    cfg = hf_config("llama")
    cfg.pad_token_id = None
    model = models.from_config(cfg, task="classification", num_labels=2)
    ids = np.random.RandomState(0).randint(3, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="pad_token_id"):
        model(input_ids=ids)
    assert model(input_ids=ids[:1])["logits"].shape == (1, 2)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_remat_gives_the_same_gradients(kind):
    ids, mask = batch("right", length=6)
    grads = []
    for remat in (False, True):
        model = models.from_config(hf_config(kind), task="causal_lm", remat=remat, seed=3)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p, graphdef=graphdef, rest=rest):
            logits = nnx.merge(graphdef, p, rest)(input_ids=ids, attention_mask=mask)["logits"]
            return jnp.mean(jax.nn.log_softmax(logits)[..., 5] * mask)

        grads.append(jax.jit(jax.grad(loss))(params))
    flat = [params_lib.flatten(g.to_pure_dict()) for g in grads]
    assert set(flat[0]) == set(flat[1])
    for path in flat[0]:
        np.testing.assert_allclose(flat[0][path], flat[1][path], atol=1e-6, err_msg=path)
    assert max(float(jnp.abs(v).max()) for v in flat[0].values()) > 0
