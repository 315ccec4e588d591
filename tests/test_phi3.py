"""Phi-3 (phi3.py) against transformers PyTorch on tiny random configs: fused qkv_proj / gate_up_proj loaded and
exported fused, partial rotary, longrope in both regimes (sequences within and beyond
original_max_position_embeddings), a sliding window shorter than the sequence, padding left and right,
classification, hidden states, greedy generation across the longrope switch, packing, scan, LoRA and sharding.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open

from ftjax import flops, lora, models
from ftjax import generate as generate_lib
from ftjax import params as params_lib
from ftjax import sharding as sharding_lib
from ftjax.generate import generate_ids
from ftjax.models import decoder

VOCAB, PAD, ORIGINAL = 64, 0, 8
SHORT, LONG = 8, 12  # test lengths: positions up to ORIGINAL (short factors), and past it (long factors)


def hf_config(kind: str = "longrope"):
    """longrope: head_dim 8 with partial_rotary_factor 0.5 (4 rotated dims, 2 factors each), context extended
    from 8 to 32 (attention factor sqrt(1 + ln 4 / ln 8)), a sliding window of 5, GQA, untied lm_head.
    plain: default RoPE over 6 of 8 dims, no window, tied embeddings."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=1, bos_token_id=2)
    if kind == "longrope":
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.7], "long_factor": [3.0, 11.0]}
        return transformers.Phi3Config(max_position_embeddings=32, original_max_position_embeddings=ORIGINAL,
                                       rope_parameters=rope, sliding_window=5, tie_word_embeddings=False, **common)
    rope = {"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.75}
    return transformers.Phi3Config(max_position_embeddings=32, rope_parameters=rope, tie_word_embeddings=True,
                                   **common)


HF_CLASSES = {"causal_lm": transformers.AutoModelForCausalLM,
              "classification": transformers.AutoModelForSequenceClassification, "base": transformers.AutoModel}


def hf_model(kind: str, task: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = hf_config(kind)
    if task == "classification":
        cfg.num_labels = 3
    model = HF_CLASSES[task].from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # random norm weights, so a swapped or missing one shows; sharper attention, so RoPE
        for name, p in model.named_parameters():  # decides greedy tokens
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if "qkv_proj" in name:
                p.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache: dict = {}

    def get(kind: str, task: str):
        if (kind, task) not in cache:
            model = hf_model(kind, task)
            path = str(tmp_path_factory.mktemp(f"phi3_{kind}_{task}"))
            model.save_pretrained(path)
            cache[kind, task] = (path, model)
        return cache[kind, task]

    return get


def batch(side: str, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
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
    return out


def test_checkpoint_is_fused_and_rope_parameters_are_transformers(saved):
    path, ref = saved("longrope", "causal_lm")
    with safe_open(f"{path}/model.safetensors", "np") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in keys and "model.layers.0.mlp.gate_up_proj.weight" in keys
    cfg = hf_config("longrope")
    inv, scaling = decoder.rope_parameters(cfg, 8)
    rotary = ref.model.rotary_emb
    np.testing.assert_allclose(inv, rotary.original_inv_freq.numpy(), rtol=1e-7)
    assert scaling == pytest.approx(rotary.attention_scaling) and scaling == pytest.approx(
        np.sqrt(1 + np.log(4) / np.log(8)))
    long_inv, original = decoder.rope_long(cfg, 8)
    want, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["longrope"](cfg, seq_len=ORIGINAL + 1)
    np.testing.assert_allclose(long_inv, want.numpy(), rtol=1e-7)
    assert original == ORIGINAL and decoder.longrope_switch(cfg) == ORIGINAL
    assert decoder.rope_long(hf_config("plain"), 8) is None and len(decoder.rope_parameters(hf_config("plain"), 8)[0]) == 3


@pytest.mark.parametrize("kind, length", [("longrope", SHORT), ("longrope", LONG), ("plain", LONG)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_lm_logits_match_transformers(saved, kind, length, side):
    path, ref = saved(kind, "causal_lm")
    model = models.from_pretrained(path, task="causal_lm")
    assert model.family == "phi3" and model.load_report["initialized"] == [] and model.load_report["unused"] == []
    ids, mask = batch(side, length)
    want = torch_out(ref, ids, mask).logits.numpy()
    got = np.asarray(model(input_ids=ids, attention_mask=mask)["logits"])
    keep = mask.astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-4, rtol=1e-4)


def test_longrope_switches_factors_past_the_original_length(saved):
    """The first 8 positions of a 12-token call use the long factors, of an 8-token call the short ones (the
    regime goes by the call's length, as transformers); both match transformers (test above)."""
    path, _ = saved("longrope", "causal_lm")
    model = models.from_pretrained(path, task="causal_lm")
    ids = np.random.RandomState(3).randint(3, VOCAB, (1, LONG))
    short = np.asarray(model(input_ids=ids[:, :SHORT])["logits"])
    long = np.asarray(model(input_ids=ids)["logits"])[:, :SHORT]
    assert np.abs(short - long).max() > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_classification_pools_last_non_pad_token_like_transformers(saved, side):
    path, ref = saved("plain", "classification")
    model = models.from_pretrained(path, task="classification")
    assert model.head_pattern == r"score/.*" and not model.load_report["initialized"]
    ids, mask = batch(side, LONG)
    got = np.asarray(model(input_ids=ids, attention_mask=mask)["logits"])
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, torch_out(ref, ids, mask).logits.numpy(), atol=1e-4, rtol=1e-4)


def test_base_hidden_states_match_transformers(saved):
    path, ref = saved("longrope", "base")
    model = models.from_pretrained(path, task="base")
    ids, mask = batch("right", LONG)
    want = torch_out(ref, ids, mask, output_hidden_states=True)
    got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got["last_hidden_state"])[keep], want.last_hidden_state.numpy()[keep],
                               atol=1e-4, rtol=1e-4)
    assert len(got["hidden_states"]) == len(want.hidden_states) == 3
    for ours, theirs in zip(got["hidden_states"], want.hidden_states):
        np.testing.assert_allclose(np.asarray(ours)[keep], theirs.numpy()[keep], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["longrope", "plain"])
def test_save_pretrained_writes_fused_tensors_transformers_loads(saved, kind, tmp_path):
    path, _ = saved(kind, "causal_lm")
    model = models.from_pretrained(path, task="causal_lm")
    graphdef, state = nnx.split(model, nnx.Param)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x * 1.1, state))  # the file must carry ftjax's values
    out = models.save_pretrained(model, str(tmp_path / "out"))
    with safe_open(f"{out}/model.safetensors", "np") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.self_attn.qkv_proj.weight").shape == ((4 + 2 * 2) * 8, 32)
        assert f.get_tensor("model.layers.1.mlp.gate_up_proj.weight").shape == (2 * 48, 32)
    assert not any(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") for k in keys)
    assert json.load(open(f"{out}/config.json"))["architectures"] == ["Phi3ForCausalLM"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = batch("right", LONG)
    keep = mask.astype(bool)
    ours = np.asarray(model(input_ids=ids, attention_mask=mask)["logits"])
    np.testing.assert_allclose(torch_out(reloaded, ids, mask).logits.numpy()[keep], ours[keep], atol=1e-5, rtol=1e-5)


def hf_greedy(ref, ids, mask, max_new_tokens, eos):
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                           max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=PAD)
    return out.numpy()


def prompts(length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.RandomState(0).randint(3, VOCAB, (3, length))
    mask = np.ones_like(ids)
    mask[1, :2], ids[1, :2] = 0, PAD  # left padding
    mask[2, :4], ids[2, :4] = 0, PAD
    return ids, mask


@pytest.mark.parametrize("prompt", [5, 10])
def test_greedy_generation_equals_transformers_across_the_longrope_switch(saved, prompt):
    """Prompt 5 + 9 tokens: transformers drops its cache and re-runs the sequence with the long factors once it
    outgrows 8 tokens, and so does ftjax.generate; prompt 10: long factors from the start."""
    path, ref = saved("longrope", "causal_lm")
    model = models.from_pretrained(path, task="causal_lm")
    ids, mask = prompts(prompt)
    want = hf_greedy(ref, ids, mask, 9, eos=VOCAB + 5)  # an eos that never comes
    got = generate_ids(model, ids, mask, max_new_tokens=9, eos_token_id=VOCAB + 5)
    np.testing.assert_array_equal(got, want)
    if prompt < ORIGINAL:  # without the re-prefill (the short-factor keys kept in the cache) tokens differ
        kept = generate_lib._generate_ids(model, ids, mask, 9, 0.0, 1.0, 0, (VOCAB + 5,), PAD, np.zeros(3, bool))
        assert (kept != want).any()
    # A row stopping at an eos before the switch keeps padding after it.
    eos = int(want[0, prompt + 1])
    np.testing.assert_array_equal(generate_ids(model, ids, mask, max_new_tokens=9, eos_token_id=eos),
                                  hf_greedy(ref, ids, mask, 9, eos=eos))


@pytest.mark.parametrize("lengths", [(5, 3), (10, 4)])
def test_packed_segments_equal_separate_sequences(lengths):
    """Attention stays in a segment, positions restart, and longrope picks its factors per segment (10: long,
    4: short), so each segment equals its sequence run alone."""
    model = models.from_config(hf_config("longrope"), task="causal_lm", seed=1)
    rng = np.random.RandomState(2)
    a, b = rng.randint(3, VOCAB, lengths[0]), rng.randint(3, VOCAB, lengths[1])
    packed = np.concatenate([a, b, [PAD, PAD]])[None]
    segments = np.array([[1] * len(a) + [2] * len(b) + [0, 0]])
    out = np.asarray(model(input_ids=packed, segment_ids=segments)["logits"])[0]
    np.testing.assert_allclose(out[:len(a)], np.asarray(model(input_ids=a[None])["logits"])[0], atol=1e-5)
    np.testing.assert_allclose(out[len(a):len(a) + len(b)], np.asarray(model(input_ids=b[None])["logits"])[0],
                               atol=1e-5)


def test_scanned_stack_equals_unrolled():
    cfg = hf_config("longrope")
    unrolled = models.from_config(cfg, task="causal_lm", seed=4)
    scanned = models.from_config(cfg, task="causal_lm", seed=4, scan_layers=True)
    assert scanned.stacks() == {"model/layers": 2}
    ids, mask = batch("right", LONG)
    a = unrolled(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    b = scanned(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(a["logits"]), np.asarray(b["logits"]), atol=2e-6)
    for x, y in zip(a["hidden_states"], b["hidden_states"], strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6)
    axes = scanned.logical_axes()
    assert axes["model/layers/self_attn/qkv_proj/kernel"] == ("layers", "embed", "heads")


def test_packed_projections_are_not_split_over_tensor():
    """qkv_proj [q | k | v] and gate_up_proj [gate | up]: their output dim stays whole on `tensor` (as GPT-2's
    c_attn), scanned or not, LoRA or not; o_proj / down_proj stay row-parallel."""
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), sharding_lib.MESH_AXES)
    for scan in (False, True):
        model = models.from_config(hf_config("longrope"), task="causal_lm", scan_layers=scan)
        lora.apply_lora(model, {"rank": 2, "targets": lora.ALL_LINEAR})
        for path, names in model.logical_axes().items():
            logical = sharding_lib.logical_for(path, names)
            if "qkv_proj" in path or "gate_up_proj" in path:
                assert logical[-1] is None and len(logical) == len(names), path
                if path.endswith("kernel"):
                    assert logical[-2] == "embed" and (logical[0] == "layers") == scan
            elif path.endswith(("o_proj/kernel", "down_proj/kernel")):
                assert logical[-2] in ("heads", "mlp"), path
        sharding_lib.param_shardings(params_lib.split(model)[1], model.logical_axes(), mesh, head_dim=8)
    spec = sharding_lib.spec_for((32, 64), sharding_lib.logical_for("model/layers/0/self_attn/qkv_proj/kernel",
                                                                    ("embed", "heads")),
                                 _FakeMesh({"data": 1, "fsdp": 2, "tensor": 2}), head_dim=8)
    assert tuple(spec) == (None, "fsdp")  # fsdp on the largest dim, never tensor


class _FakeMesh:
    def __init__(self, shape):
        self.shape = shape


def test_lora_all_linear_adapts_the_fused_projections_merges_and_loads_in_peft(saved, tmp_path):
    path, _ = saved("longrope", "causal_lm")
    model = models.from_pretrained(path, task="causal_lm")
    lora.apply_lora(model, {"rank": 2, "alpha": 4.0, "targets": lora.ALL_LINEAR})
    adapted = sorted(lora.lora_modules(model))
    assert "model/layers/0/self_attn/qkv_proj" in adapted and "model/layers/1/mlp/gate_up_proj" in adapted
    assert "lm_head" not in adapted and len(adapted) == 2 * 4  # qkv, o, gate_up, down per layer
    ids, mask = batch("left", SHORT)
    before = np.asarray(model(input_ids=ids, attention_mask=mask)["logits"])
    for i, m in enumerate(lora.lora_modules(model).values()):  # a non-zero update, so the merge shows
        m.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), m.lora_b[...].shape)
    after = np.asarray(model(input_ids=ids, attention_mask=mask)["logits"])
    assert np.abs(after - before).max() > 1e-3
    keep = mask.astype(bool)
    out = models.save_pretrained(model, str(tmp_path / "merged"))  # merged into the fused kernels
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_allclose(torch_out(reloaded, ids, mask).logits.numpy()[keep], after[keep], atol=1e-5)
    peft = pytest.importorskip("peft")
    adapter = lora.export_peft(model, str(tmp_path / "adapter"), base_model_name_or_path=path)
    assert "model.layers.0.self_attn.qkv_proj" in json.load(open(f"{adapter}/adapter_config.json"))["target_modules"]
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(base, adapter).eval()
    np.testing.assert_allclose(torch_out(peft_model, ids, mask).logits.numpy()[keep], after[keep], atol=1e-5)


def test_flops_count_the_fused_projections_once():
    model = models.from_config(hf_config("plain"), task="causal_lm")
    paths = frozenset(params_lib.flatten(params_lib.split(model)[1]))
    count = flops.step_flops(model, paths, flops.Shape(2, 16))
    n, h, d, inner = 32, 32, 8, 48
    per_layer = 2 * n * h * (4 + 2 * 2) * d + 2 * n * 4 * d * h + 2 * n * h * 2 * inner + 2 * n * inner * h
    attention = 2 * 2 * (2 * 16 * 16) * 4 * d
    assert count.forward == 2 * (per_layer + attention) + 2 * n * h * VOCAB
    assert count.train == pytest.approx(3 * count.forward)


def test_dropout_fields_and_resid_dropout():
    model = models.from_config(hf_config("plain"), task="causal_lm", dropout={"hidden": 0.5, "attention": 0.1})
    assert model.hf_config.resid_pdrop == 0.5 and model.hf_config.attention_dropout == 0.1
    ids, mask = batch("right", SHORT)
    eval_a = model(input_ids=ids, attention_mask=mask)["logits"]
    train = model(input_ids=ids, attention_mask=mask, deterministic=False, rngs=nnx.Rngs(dropout=0))["logits"]
    assert np.abs(np.asarray(train) - np.asarray(eval_a)).max() > 1e-3
