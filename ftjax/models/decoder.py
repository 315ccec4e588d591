"""Pieces shared by the decoder families (gpt2.py, llama.py, qwen.py): causal/padding/segment/sliding-window
masks, grouped-query attention with an optional KV cache, rotary embeddings (default, linear, llama3, longrope;
partial rotary), and
`DecoderTask`, the task models' shared call (heads, HF's last-non-pad-token pooling, LM logits).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.hf import UnsupportedModelError
from ftjax.models import common, fused_attention, moe
from ftjax.models.common import Ctx, Dropout, HFModel

ROPE_TYPES = ("default", "linear", "llama3", "longrope")


class DecoderInputs:
    """Validated inputs of one decoder call: ids, positions, which key slots are valid, and the mask
    builder for a layer's window. Without a cache, query and key slots are 0..L-1; with a cache of length T
    the queries sit at slots cache_index..cache_index+L-1 and the keys are the whole cache. causal=False:
    an encoder's bidirectional masks (ModernBERT), whose window reaches both ways."""

    def __init__(self, input_ids, attention_mask, position_ids, segment_ids, cache, cache_index, *,
                 causal: bool = True):
        self.causal = causal
        if input_ids is None:
            raise ValueError("input_ids is required for a decoder model (got None)")
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        batch, length = input_ids.shape
        self.input_ids = input_ids
        self.segments = None
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids cannot be combined with a KV cache; pass one or the other")
            if cache_index is None:
                raise ValueError("cache_index (the cache slot of the first input token) is required with cache")
            total = _cache_length(cache)
            start = jnp.asarray(cache_index, jnp.int32)
            self.q_slots = start + jnp.arange(length, dtype=jnp.int32)
            self.k_slots = jnp.arange(total, dtype=jnp.int32)
            if attention_mask is None:
                self.key_valid = None
            else:
                attention_mask = jnp.asarray(attention_mask)
                if attention_mask.shape != (batch, total):
                    raise ValueError(f"with a cache, attention_mask must cover all {total} cache slots: shape "
                                     f"{(batch, total)}, got {attention_mask.shape}")
                self.key_valid = attention_mask > 0
            if position_ids is None:
                position_ids = jnp.broadcast_to(self.q_slots, (batch, length))
        else:
            self.q_slots = self.k_slots = jnp.arange(length, dtype=jnp.int32)
            valid = None if attention_mask is None else jnp.asarray(attention_mask) > 0
            if segment_ids is not None:
                segment_ids = jnp.asarray(segment_ids)
                if segment_ids.shape != (batch, length):
                    raise ValueError(f"segment_ids must have the shape of input_ids {(batch, length)}, "
                                     f"got {segment_ids.shape}")
                self.segments = segment_ids
                valid = (segment_ids > 0) if valid is None else valid & (segment_ids > 0)
                if position_ids is None:
                    position_ids = common.segment_positions(segment_ids)
            self.key_valid = valid
            if position_ids is None:  # HF's forward: 0..L-1 whatever the padding (generate passes its own).
                position_ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        self.position_ids = jnp.asarray(position_ids, jnp.int32)
        self._masks: dict[Any, jax.Array] = {}

    def mask(self, window: int | None) -> jax.Array:
        """bool [B, 1, Lq, Lk]: key slot k is visible from query slot q (causal, valid, same segment, window).
        A window of w keys: causal, q - w < k <= q; bidirectional, |q - k| < w (flash attention's (w-1, w-1))."""
        if window not in self._masks:
            q, k = self.q_slots[:, None], self.k_slots[None, :]
            if self.causal:
                allowed = k <= q
                if window is not None:
                    allowed = allowed & (k > q - window)
            else:
                allowed = jnp.abs(q - k) < (window if window is not None else jnp.iinfo(jnp.int32).max)
            allowed = allowed[None]
            if self.key_valid is not None:
                allowed = allowed & self.key_valid[:, None, :]
            if self.segments is not None:
                allowed = allowed & (self.segments[:, :, None] == self.segments[:, None, :])
            self._masks[window] = allowed[:, None]
        return self._masks[window]


def _cache_length(cache: Any) -> int:
    if isinstance(cache, dict):  # a scanned stack's cache: [layers, batch, length, kv_heads, head_dim]
        return int(cache["k"].shape[2])
    return int(cache[0]["k"].shape[1])


def init_cache(num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype: Any,
               stacked: bool = False) -> list | dict:
    """An empty KV cache: one {"k", "v"} pair of zeros [batch, length, kv_heads, head_dim] per layer, or for a
    scanned stack one pair with a leading layer axis."""
    if stacked:
        zeros = jnp.zeros((num_layers, batch, length, kv_heads, head_dim), dtype)
        return {"k": zeros, "v": zeros}
    zeros = jnp.zeros((batch, length, kv_heads, head_dim), dtype)
    return [{"k": zeros, "v": zeros} for _ in range(num_layers)]


def update_cache(layer_cache: dict, k: jax.Array, v: jax.Array, index: jax.Array) -> dict:
    """Writes this chunk's keys/values at cache slot `index` (same slot for the whole batch)."""
    start = (0, jnp.asarray(index, jnp.int32), 0, 0)
    return {
        "k": jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), start),
        "v": jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), start),
    }


@dataclasses.dataclass(frozen=True)
class KernelMask:
    """What a fused attention kernel needs instead of a dense mask: causal always, the packed segments and
    valid keys [B, L] (or None), the sliding window, and the kernel (`fused_attention.resolve`)."""

    segments: Any
    key_valid: Any
    window: int | None
    implementation: str


jax.tree_util.register_dataclass(KernelMask, data_fields=["segments", "key_valid"],
                                 meta_fields=["window", "implementation"])


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | KernelMask, scale: float, dropout: nnx.Dropout,
    *, deterministic: bool, rngs: nnx.Rngs | None, softmax_dtype: Any = jnp.float32,
    softcap: float | None = None,
) -> jax.Array:
    """Grouped-query attention. q [B, Lq, H, D], k/v [B, Lk, KVH, D] (H a multiple of KVH; query head h
    uses kv head h // (H // KVH), as HF's repeat_kv), allowed bool [B, 1, Lq, Lk]. Returns [B, Lq, H, D].
    Masked scores are set (not added) to the float32 minimum, so fully masked rows stay finite. `softcap`
    (Gemma 2's attn_logit_softcapping): scaled scores become softcap * tanh(scores / softcap) before the mask,
    as HF's eager attention. A `KernelMask` (from `layer_masks`) runs the fused kernel it names instead
    (splash on TPU, cuDNN on GPU; never with a softcap, see `AttentionSpec.softcap`)."""
    if isinstance(allowed, KernelMask):
        if softcap is not None:
            raise ValueError("attention logit soft-capping cannot run in a fused kernel (layer_masks picks xla)")
        if not deterministic and isinstance(dropout, Dropout):
            dropout.draw_key(rngs)  # (no dropout in a kernel: the stream advances as the xla path's would)
        return fused_attention.fused_attention(q, k, v, scale=scale, implementation=allowed.implementation,
                                               segment_ids=allowed.segments, key_valid=allowed.key_valid,
                                               window=allowed.window)
    batch, lq, heads, dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, lq, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(allowed[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores.astype(softmax_dtype), axis=-1).astype(v.dtype)
    probs = dropout(probs, deterministic=deterministic, rngs=rngs)  # (rate 0: only advances the key stream)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(batch, lq, heads, dim)


def _rope_config(cfg: Any, layer_type: str | None) -> tuple[dict, str]:
    """(the RoPE parameters of `cfg` (of `layer_type`'s entry when given), rope type), the type checked."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if layer_type is not None:
        if not isinstance(params.get(layer_type), dict):
            raise UnsupportedModelError(f"config.json: rope_parameters has no entry for layer type {layer_type!r} "
                                        f"(got keys {sorted(params)})")
        params = dict(params[layer_type])
    if not params:  # configs without rope_parameters (older transformers objects).
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise UnsupportedModelError(f"config.json: rope_type {kind!r} is not implemented; supported: "
                                    f"{', '.join(ROPE_TYPES)}")
    return params, kind


def rope_parameters(cfg: Any, head_dim: int, layer_type: str | None = None, *,
                    long: bool = False) -> tuple[np.ndarray, float]:
    """(inverse frequencies float32 [rotary_dim // 2], attention scaling) exactly as transformers computes them.
    `layer_type`: of configs with RoPE per layer type (Gemma 3: rope_parameters = {"sliding_attention": {...},
    "full_attention": {...}}), that type's. partial_rotary_factor < 1 (Phi-3, GPT-NeoX style): only the first
    rotary_dim = int(head_dim * factor) dims of each head rotate (`apply_rope` passes the rest through).
    longrope (Phi-3): the short factors, or with long=True the long ones (`rope_long`); the scaling is
    attention_factor, by default sqrt(1 + ln(s) / ln(original_max_position_embeddings)) for the context
    extension s = factor or max_position_embeddings / original_max_position_embeddings (1 when s <= 1)."""
    params, kind = _rope_config(cfg, layer_type)
    partial = float(params.get("partial_rotary_factor", 1.0) or 1.0)
    dim = int(head_dim * partial)
    if not 0.0 < partial <= 1.0 or dim < 2:
        raise UnsupportedModelError(f"config.json: partial_rotary_factor={partial} is invalid: in (0, 1] and "
                                    f"rotating at least 2 of the head's {head_dim} dims")
    base = np.float32(params["rope_theta"])
    exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (base ** exponents)).astype(np.float32)
    if kind == "longrope":
        factors = np.asarray(params["long_factor" if long else "short_factor"], np.float32)
        if factors.shape != inv.shape:
            raise UnsupportedModelError(f"config.json: rope_parameters {'long' if long else 'short'}_factor has "
                                        f"{factors.size} values; rotary_dim / 2 = {inv.size} are needed")
        inv = (np.float32(1.0) / (factors * base ** exponents)).astype(np.float32)
        old = params["original_max_position_embeddings"]
        factor = params.get("factor")
        if factor is None:
            factor = cfg.max_position_embeddings / old
        scaling = params.get("attention_factor")
        if scaling is None:
            scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
        return inv, float(scaling)
    if kind == "linear":
        inv = (inv / np.float32(params["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor = np.float32(params["factor"])
        low, high = np.float32(params["low_freq_factor"]), np.float32(params["high_freq_factor"])
        old = np.float32(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv, 1.0


def check_rope(cfg: Any, head_dim: int) -> None:
    rope_parameters(cfg, head_dim)
    rope_long(cfg, head_dim)


def rope_long(cfg: Any, head_dim: int, layer_type: str | None = None) -> tuple[tuple[float, ...], int] | None:
    """longrope's second regime, for `rope_cos_sin(long=...)`: (the long factors' inverse frequencies,
    original_max_position_embeddings); None for the other rope types."""
    params, kind = _rope_config(cfg, layer_type)
    if kind != "longrope":
        return None
    inv, _ = rope_parameters(cfg, head_dim, layer_type, long=True)
    return tuple(float(f) for f in inv), int(params["original_max_position_embeddings"])


def longrope_switch(cfg: Any, layer_type: str | None = None) -> int | None:
    """The sequence length above which a longrope model uses its long factors (original_max_position_embeddings),
    or None: what generation must re-prefill at when a sequence grows past it (see ftjax.generate)."""
    params, kind = _rope_config(cfg, layer_type)
    return int(params["original_max_position_embeddings"]) if kind == "longrope" else None


def rope_cos_sin(position_ids: jax.Array, inv_freq: np.ndarray, scaling: float, dtype: Any,
                 long: tuple | None = None, segments: jax.Array | None = None) -> tuple:
    """cos, sin [B, L, 1, rotary_dim] for positions [B, L] (float32 math, then the compute dtype, as HF).
    long (from `rope_long`): (long inverse frequencies, original length) -- as transformers' longrope, the whole
    call uses the long ones when its largest position + 1 exceeds the original length, else `inv_freq`. Packed
    rows (`segments` [B, L]) choose per segment, by its last position + 1, so each equals its sequence run alone."""
    inv = jnp.asarray(inv_freq, jnp.float32)
    if long is not None:
        long_inv, original = long
        if segments is None:
            use_long = jnp.max(position_ids) + 1 > original
        else:  # a segment's last token: the next one is in another segment (segments are contiguous runs)
            idx = jnp.arange(segments.shape[1], dtype=jnp.int32)
            nxt = jnp.pad(segments[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
            end = jax.lax.cummin(jnp.where(segments != nxt, idx, segments.shape[1]), axis=1, reverse=True)
            use_long = (jnp.take_along_axis(position_ids, end, axis=1) + 1 > original)[..., None]
        inv = jnp.where(use_long, jnp.asarray(long_inv, jnp.float32), inv)
    freqs = position_ids[..., None].astype(jnp.float32) * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb) * scaling, jnp.sin(emb) * scaling
    return cos[:, :, None].astype(dtype), sin[:, :, None].astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin on the first cos.shape[-1] dims of each head; the rest (partial rotary)
    pass through unchanged, as HF's apply_rotary_pos_emb."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], axis=-1)
    half = rotary // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def last_token_logits(logits: jax.Array, input_ids: jax.Array, pad_token_id: int | None) -> jax.Array:
    """HF ForSequenceClassification pooling: the logits of the rightmost token that is not pad_token_id
    (works for left and right padding; index 0 when all are pad); without a pad token, the last token,
    and a batch larger than 1 is an error."""
    batch, length = input_ids.shape
    if pad_token_id is None:
        if batch != 1:
            raise ValueError("classification with batch size > 1 needs config.json pad_token_id (HF pools the "
                             "last non-pad token); set pad_token_id in the model config, e.g. to eos_token_id")
        return logits[:, -1]
    idx = jnp.arange(length, dtype=jnp.int32)
    last = jnp.argmax(idx * (input_ids != pad_token_id).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]


def keep_last(x: jax.Array, logits_to_keep: int) -> jax.Array:
    """HF logits_to_keep: 0 keeps every position, N keeps the last N (generation needs only the last)."""
    return x if not logits_to_keep else x[:, -logits_to_keep:]


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """A backbone's attention, for choosing its kernel: model.attention, heads, kv heads, head dim, dropout,
    and the attention logit soft-cap (Gemma 2; the fused kernels have none, so it runs xla)."""

    requested: str
    heads: int
    kv_heads: int
    head_dim: int
    dropout: float
    softcap: float | None = None


def layer_masks(inputs: DecoderInputs, windows: tuple, x: jax.Array, spec: AttentionSpec | None, cache: Any,
                scanned: bool, deterministic: bool) -> dict:
    """{window: what each layer's attention gets}: a `KernelMask` where `spec.requested` resolves to a fused
    kernel (training and eval, not cache decoding), else the dense bool mask [B, 1, Lq, Lk]. A scanned stack
    runs one kernel for all its layers, so layers with different windows there use xla (or, when a kernel was
    asked for by name, an error)."""
    distinct = sorted(set(windows), key=lambda w: w or 0)
    if spec is None or spec.requested == "xla" or cache is not None:
        return {w: inputs.mask(w) for w in distinct}
    batch, length = inputs.input_ids.shape
    args = dict(q_shape=(batch, length, spec.heads, spec.head_dim), kv_heads=spec.kv_heads, dtype=x.dtype,
                has_dropout=spec.dropout > 0 and not deterministic, packed=inputs.key_valid is not None,
                softcap=spec.softcap is not None)
    chosen = {w: fused_attention.resolve(spec.requested, window=w, **args) for w in distinct}
    if scanned and len(distinct) > 1 and set(chosen.values()) != {"xla"}:
        if spec.requested != "auto":
            raise ValueError(f"model.attention={spec.requested!r} cannot run: the scanned layers have different "
                             f"sliding windows {distinct}; fix: model.scan_layers=false, or model.attention=auto")
        chosen = dict.fromkeys(distinct, "xla")
    return {w: inputs.mask(w) if impl == "xla" else KernelMask(inputs.segments, inputs.key_valid, w, impl)
            for w, impl in chosen.items()}


@dataclasses.dataclass(frozen=True)
class ByWindow:
    """A `run_decoder_layers` extra that differs with the layers' sliding window (Gemma 3: local and global
    RoPE): {window: extra}; each layer gets its window's (a scanned stack picks it by index, as its mask)."""

    values: dict


def run_decoder_layers(layers, x, inputs: DecoderInputs, cache, extra, *, remat: str, deterministic: bool,
                       rngs: nnx.Rngs | None, windows: tuple | None = None, attention: AttentionSpec | None = None):
    """Applies each layer `layer(x, mask, extra, layer_cache, cache_index, deterministic=, rngs=)` in order:
    unrolled over an nnx.List, or scanned over a `common.stack_layers` module (one traced layer; `windows`
    gives each layer's sliding window, and a stacked cache {"k", "v": [layers, ...]} goes in and out).
    Without a cache each layer is checkpointed with the `remat` policy. Layer i's dropout draws from
    fold_in(key, i) both ways, so a scanned model trains exactly as the unrolled one. `attention`: the
    backbone's, for a fused kernel (`layer_masks`); None: the dense-mask xla path. `extra` may be a `ByWindow`."""
    stacked = getattr(layers, "stack_size", None)
    if windows is None:
        windows = tuple(layer.window for layer in layers)
    masks = layer_masks(inputs, windows, x, attention, cache, stacked is not None, deterministic)
    cache_index = None if cache is None else inputs.q_slots[0]
    rngs_of = common.layer_rngs(rngs, deterministic)
    if stacked is not None:
        return _scan_decoder_layers(layers, x, masks, windows, cache, cache_index, extra, rngs_of, remat=remat,
                                    deterministic=deterministic)
    new_cache = None if cache is None else []

    def apply(layer, h, mask, ex, r):
        out, _ = layer(h, mask, ex, None, None, deterministic=deterministic, rngs=r)
        return out

    step = common.with_remat(apply, remat if cache is None else "none")
    common.record_hidden(x)
    for i, layer in enumerate(layers):
        ex = extra.values[windows[i]] if isinstance(extra, ByWindow) else extra
        if cache is None:
            x = step(layer, x, masks[windows[i]], ex, rngs_of(i))
        else:
            x, layer_cache = layer(x, masks[windows[i]], ex, cache[i], cache_index,
                                   deterministic=deterministic, rngs=rngs_of(i))
            new_cache.append(layer_cache)
        common.record_hidden(x)
    return x, new_cache


def _scan_decoder_layers(stack, x, masks, windows, cache, cache_index, extra, rngs_of, *, remat, deterministic):
    """run_decoder_layers over a stacked module: the per-layer mask is picked by index from the distinct
    windows' masks (most models have one or two), the cache and the layer index travel as scan inputs."""
    order = list(masks)
    mask_stack = None if len(order) == 1 else jnp.stack([masks[w] for w in order])  # dense masks (xla) only
    which = jnp.asarray([order.index(w) for w in windows], jnp.int32)
    by_window = isinstance(extra, ByWindow)
    if by_window:
        extra = jax.tree.map(lambda *xs: jnp.stack(xs), *[extra.values[w] for w in order])

    def body(layer, h, i, xs):
        w, layer_cache = xs
        mask = masks[order[0]] if mask_stack is None else jax.lax.dynamic_index_in_dim(mask_stack, w, keepdims=False)
        ex = jax.tree.map(lambda e: jax.lax.dynamic_index_in_dim(e, w, keepdims=False), extra) if by_window else extra
        return layer(h, mask, ex, layer_cache, cache_index, deterministic=deterministic, rngs=rngs_of(i))

    return common.scan_layers(stack, x, (which, cache), body, remat=remat if cache is None else "none")


class DecoderTask(HFModel):
    """Shared call of the decoder task models: base (last_hidden_state), causal_lm (logits over the
    vocabulary at every position) and classification (logits of the last non-pad token)."""

    backbone_name = "model"  # attribute holding the backbone in task models (HF base_model_prefix).
    embedding_name = "embed_tokens"  # the backbone's token embedding (the lm_head when tied).

    def _backbone(self) -> nnx.Module:
        return getattr(self, self.backbone_name) if self.task != "base" else self

    def init_cache(self, batch: int, length: int, dtype: Any = None) -> list:
        """An empty KV cache for `batch` sequences of up to `length` tokens (for ftjax.generate)."""
        backbone = self._backbone()
        kv_heads, dim = backbone.kv_shape
        return init_cache(backbone.num_layers, batch, length, kv_heads, dim, dtype or backbone.dtype,
                          stacked=bool(getattr(backbone, "scanned", False)))

    def _init_heads(self, cfg: Any, task: str, ctx: Ctx, tied_default: bool) -> None:
        """HF's heads: lm_head for causal_lm (absent when the config ties it to the embedding), score (no
        bias) and the pad id that finds the last token for classification."""
        self.tied = bool(getattr(cfg, "tie_word_embeddings", tied_default))
        if task == "causal_lm" and not self.tied:
            self.lm_head = common.linear(cfg.hidden_size, cfg.vocab_size, ctx, ("embed", "vocab"), use_bias=False)
        if task == "classification":
            self.score = common.linear(cfg.hidden_size, cfg.num_labels, ctx, ("embed", None), use_bias=False)
            self.pad_token_id = None if cfg.pad_token_id is None else int(cfg.pad_token_id)

    def _forward(self, inputs, cache, *, deterministic, rngs):
        return getattr(self, self.backbone_name)(inputs, cache, deterministic=deterministic, rngs=rngs)

    def _lm_logits(self, x):
        embedding = getattr(getattr(self, self.backbone_name), self.embedding_name)
        return embedding.attend(x) if self.tied else self.lm_head(x)

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """The LM head (lm_head, or the tied embedding) on final hidden states [..., hidden] -> [..., vocab]:
        what a call with return_hidden=True hands back as "lm_head", for losses that apply it chunk by chunk."""
        return self._lm_logits(hidden)

    def _set_info(self, family: str, task: str, head_pattern: str, hf_config: Any) -> None:
        super()._set_info(family, task, head_pattern, hf_config)
        if task == "causal_lm" and getattr(self, "tied", False):  # the tied lm_head is the input embedding.
            self.head_pattern = rf"{self.backbone_name}/{self.embedding_name}/.*"

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 pixel_values=None, segment_ids=None, cache=None, cache_index=None, logits_to_keep: int = 0, *,
                 deterministic: bool = True, rngs: nnx.Rngs | None = None,
                 output_hidden_states: bool = False, return_hidden: bool = False) -> dict:
        """token_type_ids / pixel_values are accepted (the trainer's uniform call) and ignored.
        segment_ids [B, L] (0 = padding): packed sequences; attention stays inside a segment and positions
        restart per segment. cache (from init_cache) + cache_index: incremental decoding; the attention_mask
        then covers all cache slots and the result holds the updated "cache". output_hidden_states adds
        "hidden_states" as HF: the embeddings, then each layer's output (the last one after the final norm).
        return_hidden (causal_lm): instead of "logits", "lm_hidden" (the final hidden states [B, L, hidden]) and
        "lm_head" (a function of hidden states giving logits), so a loss need not hold [B, L, vocab] logits."""
        del token_type_ids, pixel_values
        if cache is not None and self.task == "classification":
            raise ValueError("a KV cache is only supported for task causal_lm or base")
        inputs = DecoderInputs(input_ids, attention_mask, position_ids, segment_ids, cache, cache_index)
        with common.collect_hidden_states(output_hidden_states) as hidden:
            x, cache = self._forward(inputs, cache, deterministic=deterministic, rngs=rngs)
        if hidden:
            hidden[-1] = x
        if self.task == "base":
            out = {"last_hidden_state": x}
        elif self.task == "causal_lm" and return_hidden:
            out = {"lm_hidden": keep_last(x, logits_to_keep), "lm_head": self.lm_logits}
        elif self.task == "causal_lm":
            out = {"logits": self._lm_logits(keep_last(x, logits_to_keep))}
        else:
            logits = self.score(x)
            out = {"logits": last_token_logits(logits, inputs.input_ids, self.pad_token_id)}
        if cache is not None:
            out["cache"] = cache
        backbone = self._backbone()
        experts = getattr(backbone, "moe", None)  # (experts, top_k, coefficient) of a mixture-of-experts model
        if experts is not None:
            aux = moe.load_balancing_loss(backbone.layers, experts[0], experts[1])
            if aux is not None:  # what training adds to the loss (HF's router_aux_loss_coef * aux_loss)
                out["aux_loss"] = experts[2] * aux
        return common.with_hidden_states(out, hidden)
