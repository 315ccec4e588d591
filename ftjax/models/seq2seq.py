"""Pieces shared by the encoder-decoder families (t5.py, bart.py, marian.py): padding and causal masks,
attention with an additive bias (T5's relative positions), the decoder's KV cache with the cross-attention
K/V computed once from the encoder output, and `Seq2SeqLM`, the task model's call / encode / decode.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.models import common, decoder
from ftjax.models.common import Ctx, Dropout, HFModel

MIN = float(jnp.finfo(jnp.float32).min)


def key_mask(mask: Any) -> jax.Array | None:
    """[B, L] 1/0 padding mask -> bool [B, 1, 1, L] (key k visible), or None without a mask."""
    return None if mask is None else (jnp.asarray(mask) > 0)[:, None, None, :]


def causal_mask(q_slots: jax.Array, k_length: int, key_valid: jax.Array | None) -> jax.Array:
    """bool [B or 1, 1, Lq, Lk]: key slot k is visible from query slot q when k <= q (and the key is valid)."""
    allowed = (jnp.arange(k_length, dtype=jnp.int32)[None, :] <= q_slots[:, None])[None, None]
    return allowed if key_valid is None else allowed & key_valid


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None, bias: jax.Array | None,
           scale: float, dropout: nnx.Dropout, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """q [B, Lq, H, D], k/v [B, Lk, H, D]; scores * scale + bias ([1|B, H, Lq, Lk], T5's position bias), masked
    keys set to the float32 minimum, softmax in float32, dropout on the probabilities. Returns [B, Lq, H, D]."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if scale != 1.0:
        scores = scores * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    if allowed is not None:
        scores = jnp.where(allowed, scores, MIN)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    probs = dropout(probs, deterministic=deterministic, rngs=rngs)  # (rate 0: only advances the key stream)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nnx.Module):
    """Multi-head attention (self or cross) whose four projections carry the family's HF names: T5 (q, k, v,
    o; no bias; no 1/sqrt(d) scaling, T5 folds it into the init) or BART (q_proj, k_proj, v_proj, out_proj)."""

    def __init__(self, d_model: int, heads: int, head_dim: int, ctx: Ctx, *, names: tuple[str, str, str, str],
                 use_bias: bool, scale: float, dropout: float):
        inner = heads * head_dim
        shapes = [(d_model, inner, ("embed", "heads"))] * 3 + [(inner, d_model, ("heads", "embed"))]
        for name, (din, dout, axes) in zip(names, shapes):
            setattr(self, name, common.linear(din, dout, ctx, axes, use_bias=use_bias))
        self.names = tuple(names)
        self.heads, self.head_dim, self.scale = heads, head_dim, float(scale)
        self.dropout = Dropout(float(dropout or 0.0))

    def _proj(self, i: int) -> nnx.Linear:
        return getattr(self, self.names[i])

    def project_kv(self, source: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, S, H, D] of `source` [B, S, d_model]."""
        return (common.split_heads(self._proj(1)(source), self.heads),
                common.split_heads(self._proj(2)(source), self.heads))

    def __call__(self, x, kv, allowed, bias, *, deterministic, rngs):
        """Attention of x [B, L, d_model] over kv = (k, v) (None: self-attention over x)."""
        q = common.split_heads(self._proj(0)(x), self.heads)
        k, v = kv if kv is not None else self.project_kv(x)
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), allowed, bias, self.scale, self.dropout,
                     deterministic=deterministic, rngs=rngs)
        return self._proj(3)(common.merge_heads(out))


def self_kv(attn: Attention, h: jax.Array, layer_cache: dict | None, cache_index: Any) -> tuple[tuple, dict | None]:
    """(k, v) of a decoder self-attention and the updated layer cache: the chunk's own without a cache; with
    one, the chunk is written at slot cache_index and the whole cache is attended to."""
    if layer_cache is None:
        return None, None
    k, v = attn.project_kv(h)
    new = decoder.update_cache({"k": layer_cache["k"], "v": layer_cache["v"]}, k, v, cache_index)
    return (new["k"], new["v"]), {**layer_cache, **new}


def cross_kv(attn: Attention, encoder_hidden: jax.Array | None, layer_cache: dict | None) -> tuple:
    """(k, v) of a cross-attention: from the cache (computed once by `Seq2SeqLM.init_cache`), else projected."""
    if layer_cache is not None:
        return layer_cache["cross_k"], layer_cache["cross_v"]
    return attn.project_kv(encoder_hidden)


def run_encoder_layers(layers, x, allowed, bias, *, remat: str, deterministic: bool, rngs):
    """`layer(x, allowed, bias, deterministic=, rngs=)` in order; each checkpointed with the `remat` policy."""

    def apply(layer, h, a, b, r):
        return layer(h, a, b, deterministic=deterministic, rngs=r)

    step = common.with_remat(apply, remat)
    for layer in layers:
        x = step(layer, x, allowed, bias, rngs)
    return x


def run_decoder_layers(layers, x, masks: tuple, encoder_hidden, cache, cache_index, *, remat: str,
                       deterministic: bool, rngs):
    """`layer(x, masks, encoder_hidden, layer_cache, cache_index, ...) -> (x, layer_cache)` in order; masks =
    (self allowed, self bias, cross allowed). Returns (x, the new cache or None)."""

    def apply(layer, h, m, enc, r):
        return layer(h, m, enc, None, None, deterministic=deterministic, rngs=r)[0]

    step = common.with_remat(apply, remat if cache is None else "none")
    new_cache = None if cache is None else []
    for i, layer in enumerate(layers):
        if cache is None:
            x = step(layer, x, masks, encoder_hidden, rngs)
        else:
            x, layer_cache = layer(x, masks, encoder_hidden, cache[i], cache_index, deterministic=deterministic,
                                   rngs=rngs)
            new_cache.append(layer_cache)
    return x, new_cache


class Seq2SeqLM(HFModel):
    """The encoder-decoder task model ("seq2seq"): the call of training and evaluation (teacher forcing),
    and `encode` / `init_cache` / `decode` for generation (ftjax.generate).

    A family implements `_encode(input_ids, allowed, ...)`, `_decode(ids, q_slots, self_allowed, cross_allowed,
    encoder_hidden, cache, cache_index, ...) -> (hidden, cache)`, `_logits(hidden)` and `decoder_layers()`
    (each with a `cross_attention()`)."""

    decoder_kv_shape: tuple[int, int]  # (heads, head_dim) of the decoder's attention.
    dtype: Any

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """The LM head on decoder hidden states [..., d_model] -> [..., V] (the family's `_logits`: T5's tied
        scaling, BART's final_logits_bias), for losses that apply it chunk by chunk."""
        return self._logits(hidden)

    def encode(self, input_ids, attention_mask=None, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
        """The encoder's last hidden state [B, S, d_model] of input_ids [B, S] (attention_mask 0 = padding)."""
        if input_ids is None:
            raise ValueError("input_ids is required for an encoder-decoder model (got None)")
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        return self._encode(input_ids, key_mask(attention_mask), deterministic=deterministic, rngs=rngs)

    def init_cache(self, encoder_hidden: jax.Array, length: int, dtype: Any = None) -> list:
        """The decoder cache for up to `length` decoder tokens: per layer, zeros for the self-attention K/V
        ([B, length, H, D]) and the cross-attention K/V of `encoder_hidden` [B, S, d_model], computed once."""
        heads, dim = self.decoder_kv_shape
        dtype = dtype or self.dtype
        zeros = jnp.zeros((encoder_hidden.shape[0], length, heads, dim), dtype)
        cache = []
        for layer in self.decoder_layers():
            k, v = layer.cross_attention().project_kv(encoder_hidden)
            cache.append({"k": zeros, "v": zeros, "cross_k": k.astype(dtype), "cross_v": v.astype(dtype)})
        return cache

    def decode(self, decoder_input_ids, encoder_hidden=None, attention_mask=None, decoder_attention_mask=None,
               cache: list | None = None, cache_index: Any = None, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None, return_hidden: bool = False) -> dict:
        """Decoder logits [B, T, V] of decoder_input_ids [B, T] attending to encoder_hidden (attention_mask: the
        encoder's padding). With `cache` (from init_cache; encoder_hidden may then be None) the ids sit at slots
        cache_index.., a decoder_attention_mask must cover every cache slot, and the result holds "cache".
        return_hidden: instead of "logits", "lm_hidden" (the decoder's final hidden states [B, T, d_model]) and
        "lm_head" (`lm_logits`, hidden states -> logits), so a loss need not hold [B, T, V] logits."""
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required (HF: labels shifted right after "
                             "decoder_start_token_id; see ftjax.data.seq2seq.shift_right)")
        ids = jnp.asarray(decoder_input_ids)
        if cache is None:
            if encoder_hidden is None:
                raise ValueError("decode needs encoder_hidden (from encode) when no cache is given")
            q_slots, k_length = jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape[1]
        else:
            if cache_index is None:
                raise ValueError("cache_index (the cache slot of the first decoder token) is required with cache")
            k_length = int(cache[0]["k"].shape[1])
            q_slots = jnp.asarray(cache_index, jnp.int32) + jnp.arange(ids.shape[1], dtype=jnp.int32)
        if decoder_attention_mask is not None and jnp.shape(decoder_attention_mask)[1] != k_length:
            raise ValueError(f"decoder_attention_mask must cover {k_length} decoder slots, got shape "
                             f"{jnp.shape(decoder_attention_mask)}")
        self_allowed = causal_mask(q_slots, k_length, key_mask(decoder_attention_mask))
        x, cache = self._decode(ids, q_slots, self_allowed, key_mask(attention_mask), encoder_hidden, cache,
                                cache_index, deterministic=deterministic, rngs=rngs)
        out = {"lm_hidden": x, "lm_head": self.lm_logits} if return_hidden else {"logits": self._logits(x)}
        if cache is not None:
            out["cache"] = cache
        return out

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 token_type_ids=None, segment_ids=None, cache=None, cache_index=None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None, return_hidden: bool = False) -> dict:
        """Teacher-forced logits {"logits": [B, T, V], "encoder_last_hidden_state": [B, S, d_model]} (and the
        updated "cache" when one is given). token_type_ids are accepted (the trainer's uniform call) and
        ignored; packed rows (segment_ids) are not supported by the encoder-decoder families. return_hidden: see
        `decode` ("lm_hidden" and "lm_head" instead of "logits")."""
        del token_type_ids
        if segment_ids is not None:
            raise ValueError("segment_ids (packed rows) are not supported by encoder-decoder models; "
                             "turn packing off for task seq2seq")
        encoder_hidden = self.encode(input_ids, attention_mask, deterministic=deterministic, rngs=rngs)
        out = self.decode(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask, cache,
                          cache_index, deterministic=deterministic, rngs=rngs, return_hidden=return_hidden)
        out["encoder_last_hidden_state"] = encoder_hidden
        return out
