"""Text generation with the decoder models (gpt2, llama, mistral, qwen2, qwen3): greedy or temperature/top-p
sampling under jit, with a KV cache filled by one prefill call and extended by a lax.while_loop, stopping at
eos. Prompts are left-padded and positions count real tokens only, as transformers' generate does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this many tokens (fewer compilations).


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _check_model(model: Any) -> None:
    if getattr(model, "task", None) != "causal_lm" or not hasattr(model, "init_cache"):
        raise ValueError(f"generate needs a decoder model loaded with task='causal_lm' (gpt2, llama, mistral, "
                         f"qwen2, qwen3); got family={getattr(model, 'family', None)!r} "
                         f"task={getattr(model, 'task', None)!r}")


def _pick(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, greedy: bool) -> jax.Array:
    """Next token from [B, V] logits: argmax, or a sample after temperature and HF-style top-p filtering."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    sorted_logits = jnp.sort(logits, axis=-1)  # ascending, as HF's TopPLogitsWarper.
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    removed = cumulative <= (1.0 - top_p)
    removed = removed.at[:, -1].set(False)  # always keep the most likely token.
    threshold = jnp.min(jnp.where(removed, jnp.inf, sorted_logits), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "eos"))
def _generate(graphdef, state, input_ids, prompt_mask, key, temperature, top_p, pad_id, *, max_new_tokens: int,
              greedy: bool, eos: tuple[int, ...]):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    mask = jnp.concatenate([prompt_mask, jnp.ones((batch, max_new_tokens), prompt_mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)

    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, cache_index=0,
                logits_to_keep=1)
    key, sub = jax.random.split(key)
    token = _pick(out["logits"][:, -1], sub, temperature, top_p, greedy)
    done = jnp.isin(token, eos_arr)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    next_pos = positions[:, -1] + 1

    def cond(carry):
        i, _, _, done, _, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, done, tokens, pos, key = carry
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos[:, None], cache=cache,
                    cache_index=prompt_len + i - 1)
        key, sub = jax.random.split(key)
        nxt = _pick(out["logits"][:, -1], sub, temperature, top_p, greedy)
        nxt = jnp.where(done, pad_id, nxt)  # finished sequences are padded, as transformers does.
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, i))
        return i + 1, nxt, out["cache"], done | jnp.isin(nxt, eos_arr), tokens, pos + 1, key

    carry = (jnp.int32(1), token, out["cache"], done, tokens, next_pos, key)
    steps, _, _, _, tokens, _, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, steps


def generate_ids(
    model: Any, input_ids: Any, attention_mask: Any = None, max_new_tokens: int = 32, temperature: float = 0.0,
    top_p: float = 1.0, seed: int = 0, eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> np.ndarray:
    """Token-level generation. input_ids [B, P] (left-padded when attention_mask marks pads; right padding
    is not supported). Returns [B, P + n]: the prompts followed by n <= max_new_tokens new tokens, n
    stopping early when every sequence produced an eos; after its eos a sequence gets pad_token_id.
    eos_token_id / pad_token_id default to the model config's (pad falls back to the first eos)."""
    _check_model(model)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} (>= 0; 0 = greedy) or top_p={top_p} (in (0, 1]) is invalid")
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    if (mask[:, -1] == 0).any():
        raise ValueError("prompts must be left-padded (attention_mask ends with 0 for some row); pad on the left")
    cfg = model.hf_config
    eos = _eos_ids(cfg.eos_token_id if eos_token_id is None else eos_token_id)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    batch, length = ids.shape
    bucket = -(-length // PROMPT_BUCKET) * PROMPT_BUCKET
    padded = np.full((batch, bucket), pad_token_id, np.int32)
    padded_mask = np.zeros((batch, bucket), np.int32)
    padded[:, bucket - length:], padded_mask[:, bucket - length:] = ids, mask
    graphdef, state = nnx.split(model)
    greedy = temperature == 0.0
    tokens, steps = _generate(
        graphdef, state, jnp.asarray(padded), jnp.asarray(padded_mask), jax.random.PRNGKey(seed),
        jnp.float32(temperature if not greedy else 1.0), jnp.float32(top_p), jnp.int32(pad_token_id),
        max_new_tokens=int(max_new_tokens), greedy=greedy, eos=eos,
    )
    new = np.asarray(tokens)[:, : int(steps)]
    return np.concatenate([ids, new], axis=1)


def generate(
    model: Any, tokenizer: Any, prompts: str | Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
    top_p: float = 1.0, seed: int = 0,
) -> str | list[str]:
    """Continuations of `prompts` (a string, or a list of them) decoded without special tokens: greedy when
    temperature is 0, else temperature / top-p sampling from `seed`. Stops at the model's eos token (or the
    tokenizer's when the config has none)."""
    _check_model(model)
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not texts:
        raise ValueError("prompts is empty; pass a string or a non-empty list of strings")
    encoded = [list(tokenizer(t)["input_ids"]) for t in texts]
    if any(not e for e in encoded):
        raise ValueError("a prompt tokenized to no tokens; pass non-empty prompts")
    eos = model.hf_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = _eos_ids(eos)[0] if _eos_ids(eos) else 0
    length = max(len(e) for e in encoded)
    ids = np.full((len(texts), length), pad, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for row, e in enumerate(encoded):
        ids[row, length - len(e):], mask[row, length - len(e):] = e, 1
    out = generate_ids(model, ids, mask, max_new_tokens, temperature, top_p, seed, eos_token_id=eos,
                       pad_token_id=pad)
    decoded = [tokenizer.decode(row[length:].tolist(), skip_special_tokens=True) for row in out]
    return decoded[0] if single else decoded

