"""ftjax.generate against transformers' greedy generate on tiny random decoders: token ids with left-padded
prompts and eos stopping, the string API with a real (tiny) tokenizer, the KV cache, and sampling knobs.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ftjax import models
from ftjax.generate import generate, generate_ids
from tests.tiny import MINILM

VOCAB = 64


def tiny(kind: str, vocab: int = VOCAB, **kw):
    common = dict(vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=2, **kw)
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
    return transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                                    **common)


def pair(kind: str, path: str, vocab: int = VOCAB):
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(tiny(kind, vocab)).eval()
    ref.save_pretrained(path)
    return ref, models.from_pretrained(path, task="causal_lm")


def prompts() -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.RandomState(0).randint(3, VOCAB, (3, 6))
    mask = np.ones_like(ids)
    mask[1, :2], ids[1, :2] = 0, 0  # left padding.
    mask[2, :4], ids[2, :4] = 0, 0
    return ids, mask


def hf_greedy(ref, ids, mask, max_new_tokens, eos):
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                           max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0)
    return out.numpy()


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_greedy_ids_equal_transformers_generate_including_eos_stop(kind, tmp_path):
    ref, model = pair(kind, str(tmp_path))
    ids, mask = prompts()
    free = hf_greedy(ref, ids, mask, 8, eos=VOCAB + 5)  # an eos that never comes: all 8 tokens.
    ours = generate_ids(model, ids, mask, max_new_tokens=8, eos_token_id=VOCAB + 5)
    np.testing.assert_array_equal(ours, free)
    assert ours.shape == (3, 14)
    # Stop at a token the first row produces at step 2: that row gets pads after it, the others go on.
    eos = int(free[0, 6 + 2])
    expected = hf_greedy(ref, ids, mask, 8, eos=eos)
    got = generate_ids(model, ids, mask, max_new_tokens=8, eos_token_id=eos)
    np.testing.assert_array_equal(got, expected)
    assert (got[0, 6 + 3:] == 0).all()


def test_generation_stops_when_every_row_hit_eos(tmp_path):
    ref, model = pair("gpt2", str(tmp_path))
    ids, mask = prompts()
    ids, mask = ids[:1], mask[:1]
    first = int(hf_greedy(ref, ids, mask, 4, eos=VOCAB + 5)[0, 6])
    got = generate_ids(model, ids, mask, max_new_tokens=8, eos_token_id=first)
    assert got.shape == (1, 7) and got[0, -1] == first


def test_string_api_matches_transformers_with_a_real_tokenizer(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM)
    ref, model = pair("qwen2", str(tmp_path), vocab=tokenizer.vocab_size)
    texts = ["the coffee was", "a very long prompt about the snack box and its price"]
    got = generate(model, tokenizer, texts, max_new_tokens=5)
    enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert got == expected
    assert all(g for g in got)
    assert generate(model, tokenizer, texts[0], max_new_tokens=5) == expected[0]


def test_cached_decoding_equals_a_full_forward(tmp_path):
    """Logits of a token fed through the KV cache equal those of the whole sequence run without cache."""
    _, model = pair("qwen2", str(tmp_path))
    ids, mask = prompts()
    full = np.asarray(model(input_ids=ids, attention_mask=mask,
                            position_ids=np.maximum(np.cumsum(mask, 1) - 1, 0))["logits"])
    cache = model.init_cache(3, 8)
    cache_mask = np.concatenate([mask, np.ones((3, 2), mask.dtype)], 1)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    out = model(input_ids=ids[:, :5], attention_mask=cache_mask, position_ids=positions[:, :5], cache=cache,
                cache_index=0)
    step = model(input_ids=ids[:, 5:], attention_mask=cache_mask, position_ids=positions[:, 5:], cache=out["cache"],
                 cache_index=5)
    np.testing.assert_allclose(np.asarray(step["logits"])[:, 0], full[:, 5], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["logits"])[mask[:, :5] > 0], full[:, :5][mask[:, :5] > 0], atol=1e-5)


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(tmp_path):
    _, model = pair("gpt2", str(tmp_path))
    ids, mask = prompts()
    kw = {"max_new_tokens": 6, "eos_token_id": VOCAB + 5}
    a = generate_ids(model, ids, mask, temperature=1.0, seed=1, **kw)
    assert (a == generate_ids(model, ids, mask, temperature=1.0, seed=1, **kw)).all()
    samples = {generate_ids(model, ids, mask, temperature=5.0, seed=s, **kw).tobytes() for s in range(4)}
    assert len(samples) > 1
    greedy = generate_ids(model, ids, mask, **kw)
    np.testing.assert_array_equal(generate_ids(model, ids, mask, temperature=1.0, top_p=1e-6, seed=3, **kw), greedy)


def test_bad_generation_inputs_are_explained(tmp_path):
    _, model = pair("gpt2", str(tmp_path))
    ids, mask = prompts()
    with pytest.raises(ValueError, match="left-padded"):
        generate_ids(model, ids, mask[:, ::-1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(model, ids, mask, max_new_tokens=0)
    cls = models.from_config(tiny("gpt2"), task="classification", num_labels=2)
    with pytest.raises(ValueError, match="causal_lm"):
        generate_ids(cls, ids, mask)
