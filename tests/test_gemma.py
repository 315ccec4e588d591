"""Gemma 2 and Gemma 3 (text) against transformers PyTorch on tiny random configs whose traps bite: attention
and final logit soft-caps that clip, sliding windows shorter than the sequence on some layers, (1 + w)
RMSNorms around attention and MLP, scaled embeddings, query_pre_attn_scalar, tied embeddings, Gemma 3's
q/k norms and local / global RoPE bases with linear scaling on global layers only. Logits with left and right
padding, classification, hidden states, round trips, greedy generation, packing, scanned stacks, LoRA.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import lora, models
from ftjax.generate import generate_ids
from ftjax.models import decoder, gemma

VOCAB, PAD, LENGTH, WINDOW = 64, 0, 12, 3
ATTN_CAP, FINAL_CAP = 0.5, 0.5  # initializer_range 0.2 puts most raw scores and logits beyond these
GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
               "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0}}
KINDS = ("gemma2", "gemma3")


def hf_config(kind: str, **kw):
    """gemma2: soft-caps, attention biases, alternating windows, tied embeddings (the default). gemma3: a
    local/global pattern, local base 100 vs global 5000 with linear x4 on global layers, q/k norms, an untied
    lm_head and a final soft-cap."""
    common = dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=1, bos_token_id=2, hidden_size=32,
                  intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.2,
                  query_pre_attn_scalar=12, sliding_window=WINDOW, final_logit_softcapping=FINAL_CAP)
    common.update(kw)
    if kind == "gemma2":
        return transformers.Gemma2Config(**{"attn_logit_softcapping": ATTN_CAP, "attention_bias": True, **common})
    layer_types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
    return transformers.Gemma3TextConfig(**{"layer_types": layer_types, "rope_parameters": copy.deepcopy(GEMMA3_ROPE),
                                            "tie_word_embeddings": False, **common})


HF_CLASSES = {"causal_lm": transformers.AutoModelForCausalLM,
              "classification": transformers.AutoModelForSequenceClassification,
              "base": transformers.AutoModel}


def hf_model(kind: str, task: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = hf_config(kind)
    if task == "classification":
        cfg.num_labels = 3
    model = HF_CLASSES[task].from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # HF inits the (1 + w) norms at 0 and biases at 0: random ones show a swap or a miss.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache: dict = {}

    def get(kind: str, task: str):
        if (kind, task) not in cache:
            model = hf_model(kind, task)
            path = str(tmp_path_factory.mktemp(f"{kind}_{task}"))
            model.save_pretrained(path)
            cache[kind, task] = (path, model)
        return cache[kind, task]

    return get


def batch(side: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two rows of LENGTH (> 3 windows), the second with 3 pad tokens on `side`."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (2, LENGTH))
    mask = np.ones_like(ids)
    pads = slice(0, 3) if side == "left" else slice(LENGTH - 3, LENGTH)
    mask[1, pads], ids[1, pads] = 0, PAD
    return ids, mask


def torch_run(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_lm_logits_and_hidden_states_match_transformers(saved, kind, side):
    path, ref_model = saved(kind, "causal_lm")
    model = models.from_pretrained(path, task="causal_lm")
    assert model.load_report["initialized"] == [] and model.load_report["unused"] == []
    ids, mask = batch(side)
    ref = torch_run(ref_model, ids, mask, output_hidden_states=True)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out["logits"])[keep], ref.logits.numpy()[keep], atol=1e-4, rtol=1e-4)
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 5
    for ours, theirs in zip(out["hidden_states"], ref.hidden_states):
        np.testing.assert_allclose(np.asarray(ours)[keep], theirs.numpy()[keep], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_classification_pools_last_non_pad_token_like_transformers(saved, kind, side):
    path, ref_model = saved(kind, "classification")
    model = models.from_pretrained(path, task="classification")
    assert model.head_pattern == r"score/.*" and "score/bias" not in model.logical_axes()
    ids, mask = batch(side)
    out = np.asarray(model(input_ids=ids, attention_mask=mask)["logits"])
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out, torch_run(ref_model, ids, mask).logits.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_base_hidden_states_match_transformers(saved, kind):
    path, ref_model = saved(kind, "base")
    model = models.from_pretrained(path, task="base")
    assert not any(p.startswith("model/") for p in model.logical_axes())
    ids, mask = batch("right")
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(model(input_ids=ids, attention_mask=mask)["last_hidden_state"])[keep],
                               torch_run(ref_model, ids, mask).last_hidden_state.numpy()[keep], atol=1e-4, rtol=1e-4)


def _raw_layer0_scores(model, ids):
    """Layer 0's scaled attention scores before the soft-cap, from the model's own modules."""
    bb = model.model
    x = bb.embed_tokens(ids) * bb.embed_scale
    layer = bb.layers[0]
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).reshape(*ids.shape, attn.heads, attn.head_dim)
    k = attn.k_proj(h).reshape(*ids.shape, attn.kv_heads, attn.head_dim)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    window, inv, scaling = bb.rope[0]
    cos, sin = decoder.rope_cos_sin(positions, inv, scaling, x.dtype)
    q, k = decoder.apply_rope(q, cos, sin), decoder.apply_rope(k, cos, sin)
    k = jnp.repeat(k, attn.heads // attn.kv_heads, axis=2)
    return jnp.einsum("bqhd,bkhd->bhqk", q, k) * attn.scale


def test_test_configs_exercise_every_trap(saved):
    """The soft-caps clip (most raw values lie beyond the cap), and each trap changes the logits: drop it and
    the model no longer equals transformers."""
    ids, mask = batch("right")
    for kind in KINDS:
        path, ref_model = saved(kind, "causal_lm")
        model = models.from_pretrained(path, task="causal_lm")
        hidden = model(input_ids=ids, return_hidden=True)["lm_hidden"]
        raw = np.asarray(decoder.DecoderTask._lm_logits(model, hidden))  # the head without the soft-cap
        assert (np.abs(raw) > FINAL_CAP).mean() > 0.5 and (np.abs(raw) > 2 * FINAL_CAP).mean() > 0.2, kind
        ref = np.asarray(model(input_ids=ids, attention_mask=mask)["logits"])
        assert np.abs(ref).max() <= FINAL_CAP
        variants = {"final_logit_softcapping": {"final_logit_softcapping": None},
                    "sliding_window": {"sliding_window": 64}}
        if kind == "gemma2":
            scores = np.abs(np.asarray(_raw_layer0_scores(model, ids)))
            assert (scores > ATTN_CAP).mean() > 0.5 and (scores > 2 * ATTN_CAP).mean() > 0.2
            variants["attn_logit_softcapping"] = {"attn_logit_softcapping": None}
            variants["query_pre_attn_scalar"] = {"query_pre_attn_scalar": 16}
        else:
            local = {"rope_type": "default", "rope_theta": 5000.0}
            unscaled = {"rope_type": "default", "rope_theta": 5000.0}
            variants["local rope base"] = {"rope_parameters": {**GEMMA3_ROPE, "sliding_attention": local}}
            variants["global rope scaling"] = {"rope_parameters": {**GEMMA3_ROPE, "full_attention": unscaled}}
        for name, change in variants.items():
            other = models.from_config(hf_config(kind, **change), task="causal_lm")
            nnx.update(other, nnx.state(model, nnx.Param))
            diff = np.abs(np.asarray(other(input_ids=ids, attention_mask=mask)["logits"]) - ref)
            assert diff[mask > 0].max() > 1e-3, (kind, name)


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_round_trip_loads_in_transformers(saved, kind, tmp_path):
    path, _ = saved(kind, "causal_lm")
    model = models.from_pretrained(path, task="causal_lm")
    graphdef, state = nnx.split(model, nnx.Param)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x * 1.1, state))  # the file must carry ftjax's values
    out_dir = models.save_pretrained(model, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    assert reloaded.config.tie_word_embeddings == (kind == "gemma2")
    ids, mask = batch("left")
    keep = mask.astype(bool)
    ours = np.asarray(model(input_ids=ids, attention_mask=mask)["logits"])
    np.testing.assert_allclose(torch_run(reloaded, ids, mask).logits.numpy()[keep], ours[keep], atol=1e-5, rtol=1e-5)


def test_param_paths_axes_and_zero_centred_norms(saved):
    g2 = models.from_pretrained(saved("gemma2", "causal_lm")[0], task="causal_lm")
    axes = g2.logical_axes()
    assert "lm_head/kernel" not in axes and g2.head_pattern == r"model/embed_tokens/.*"
    assert axes["model/embed_tokens/embedding"] == ("vocab", "embed")
    assert axes["model/layers/0/self_attn/q_proj/bias"] == ("heads",)
    assert axes["model/layers/3/post_feedforward_layernorm/offset_scale"] == ("embed",)
    g3 = models.from_pretrained(saved("gemma3", "causal_lm")[0], task="causal_lm")
    assert g3.logical_axes()["model/layers/1/self_attn/k_norm/offset_scale"] == ("kv",)
    assert "model/layers/0/self_attn/q_proj/bias" not in g3.logical_axes()
    # HF's init of the (1 + w) weight is 0 (the identity), for new params and re-initialised layers alike.
    fresh = models.from_config(hf_config("gemma3"), task="causal_lm")
    assert float(jnp.abs(fresh.model.norm.offset_scale[...]).max()) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_equals_transformers_token_for_token(saved, kind):
    path, ref_model = saved(kind, "causal_lm")
    model = models.from_pretrained(path, task="causal_lm")
    ids = np.random.RandomState(3).randint(3, VOCAB, (3, 6))
    mask = np.ones_like(ids)
    mask[1, :2], ids[1, :2] = 0, PAD  # left padding
    mask[2, :4], ids[2, :4] = 0, PAD
    with torch.no_grad():
        want = ref_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                  max_new_tokens=8, eos_token_id=VOCAB + 5, pad_token_id=PAD).numpy()
    got = generate_ids(model, ids, mask, max_new_tokens=8, eos_token_id=VOCAB + 5)
    assert got.shape == (3, 14)  # 6 + 8 tokens: past every window
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_segments_equal_separate_sequences(kind):
    model = models.from_config(hf_config(kind), task="causal_lm", seed=1)
    rng = np.random.RandomState(2)
    a, b = rng.randint(3, VOCAB, 6), rng.randint(3, VOCAB, 4)
    packed = np.concatenate([a, b, [PAD, PAD]])[None]
    segments = np.array([[1] * 6 + [2] * 4 + [0, 0]])
    out = np.asarray(model(input_ids=packed, segment_ids=segments)["logits"])[0]
    np.testing.assert_allclose(out[:6], np.asarray(model(input_ids=a[None])["logits"])[0], atol=1e-5)
    np.testing.assert_allclose(out[6:10], np.asarray(model(input_ids=b[None])["logits"])[0], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_scanned_stack_equals_unrolled(kind):
    """One scanned layer for all: windows and (Gemma 3) RoPE bases are picked per layer by index."""
    cfg = hf_config(kind)
    unrolled = models.from_config(cfg, task="causal_lm", seed=4)
    scanned = models.from_config(cfg, task="causal_lm", seed=4, scan_layers=True)
    assert scanned.stacks() == {"model/layers": 4} and unrolled.stacks() == {}
    ids, mask = batch("right")
    a = unrolled(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    b = scanned(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(a["logits"]), np.asarray(b["logits"]), atol=2e-6)
    for x, y in zip(a["hidden_states"], b["hidden_states"], strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=1e-5)
    ids, mask = batch("left")
    np.testing.assert_array_equal(generate_ids(unrolled, ids, mask, max_new_tokens=4, eos_token_id=VOCAB + 5),
                                  generate_ids(scanned, ids, mask, max_new_tokens=4, eos_token_id=VOCAB + 5))


def test_lora_all_linear_adapts_every_projection_but_not_the_heads():
    for kind, task in (("gemma2", "causal_lm"), ("gemma3", "classification")):
        model = models.from_config(hf_config(kind, num_labels=2), task=task, seed=0)
        ids, mask = batch("left")
        before = np.asarray(model(input_ids=ids, attention_mask=mask)["logits"])
        lora.apply_lora(model, {"rank": 2, "targets": "all-linear"})
        adapted = set(lora.lora_modules(model))
        names = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert {m.rsplit("/", 1)[-1] for m in adapted} == names and len(adapted) == 4 * len(names), kind
        np.testing.assert_allclose(np.asarray(model(input_ids=ids, attention_mask=mask)["logits"]), before, atol=1e-6)


def test_softcap_runs_xla_and_a_named_fused_kernel_is_refused():
    model = models.from_config(hf_config("gemma2"), task="causal_lm", attention="cudnn")
    ids, _ = batch("right")
    with pytest.raises(ValueError, match="soft-capping"):
        model(input_ids=ids)
    assert gemma.attn_softcap(hf_config("gemma3", attn_logit_softcapping=5.0)) is None  # as transformers 5.24


@pytest.mark.parametrize("change, field", [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"sliding_window": None}, "sliding_window"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "rope_type 'dynamic'"),
])
def test_unsupported_configs_are_named(change, field):
    cfg = hf_config("gemma2")
    for key, value in change.items():
        setattr(cfg, key, value)
    with pytest.raises(models.UnsupportedModelError, match=field):
        models.from_config(cfg, task="causal_lm")
