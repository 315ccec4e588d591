"""T5 (v1.0, v1.1, Flan-T5) in Flax NNX, with param paths that mirror HF T5ForConditionalGeneration keys:
relative position buckets (bidirectional in the encoder, causal in the decoder; the bias table lives in each
stack's first block and is shared by all its blocks), T5's RMS layer norm, a ReLU or gated-GELU feed-forward,
no 1/sqrt(d) attention scaling, and a tied lm_head with d_model**-0.5 logit scaling (v1.0) or an untied one.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.hf import UnsupportedModelError
from ftjax.models import common, seq2seq
from ftjax.models.common import Ctx, Dropout
from ftjax.models.llama import RMSNorm  # HF T5LayerNorm: the same math (no mean, no bias, float32 variance).
from ftjax.models.registry import Family


def relative_position_bucket(relative: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """HF T5Attention._relative_position_bucket: relative position (key - query) -> bucket in
    [0, num_buckets): exact buckets for small distances, log-spaced ones up to max_distance (float32 math)."""
    buckets = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).astype(relative.dtype) * num_buckets
        relative = jnp.abs(relative)
    else:
        relative = -jnp.minimum(relative, 0)
    max_exact = num_buckets // 2
    scaled = (jnp.log(jnp.maximum(relative, 1).astype(jnp.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
    large = jnp.minimum(max_exact + scaled.astype(relative.dtype), num_buckets - 1)
    return buckets + jnp.where(relative < max_exact, relative, large)


class T5Attention(seq2seq.Attention):
    def __init__(self, cfg: Any, ctx: Ctx, has_relative_attention_bias: bool, bidirectional: bool):
        super().__init__(cfg.d_model, cfg.num_heads, cfg.d_kv, ctx, names=("q", "k", "v", "o"), use_bias=False,
                         scale=1.0, dropout=cfg.dropout_rate)
        if has_relative_attention_bias:
            self.relative_attention_bias = common.embed(cfg.relative_attention_num_buckets, cfg.num_heads, ctx,
                                                        (None, None))
        self.num_buckets = int(cfg.relative_attention_num_buckets)
        self.max_distance = int(cfg.relative_attention_max_distance)
        self.bidirectional = bidirectional

    def position_bias(self, q_slots: jax.Array, k_length: int) -> jax.Array:
        """[1, H, Lq, Lk] bias of queries at slots q_slots over keys at slots 0..k_length-1."""
        relative = jnp.arange(k_length, dtype=jnp.int32)[None, :] - q_slots[:, None]
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]


class T5DenseActDense(nnx.Module):
    """v1.0: wo(dropout(act(wi(x))))."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.wi = common.linear(cfg.d_model, cfg.d_ff, ctx, ("embed", "mlp"), use_bias=False)
        self.wo = common.linear(cfg.d_ff, cfg.d_model, ctx, ("mlp", "embed"), use_bias=False)
        self.dropout = Dropout(cfg.dropout_rate)
        self.act = common.activation(cfg.dense_act_fn)

    def __call__(self, x, *, deterministic, rngs):
        return self.wo(self.dropout(self.act(self.wi(x)), deterministic=deterministic, rngs=rngs))


class T5DenseGatedActDense(nnx.Module):
    """v1.1 / Flan (feed_forward_proj="gated-gelu"): wo(dropout(act(wi_0(x)) * wi_1(x)))."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.wi_0 = common.linear(cfg.d_model, cfg.d_ff, ctx, ("embed", "mlp"), use_bias=False)
        self.wi_1 = common.linear(cfg.d_model, cfg.d_ff, ctx, ("embed", "mlp"), use_bias=False)
        self.wo = common.linear(cfg.d_ff, cfg.d_model, ctx, ("mlp", "embed"), use_bias=False)
        self.dropout = Dropout(cfg.dropout_rate)
        self.act = common.activation(cfg.dense_act_fn)

    def __call__(self, x, *, deterministic, rngs):
        h = self.act(self.wi_0(x)) * self.wi_1(x)
        return self.wo(self.dropout(h, deterministic=deterministic, rngs=rngs))


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        gated = bool(getattr(cfg, "is_gated_act", False))
        self.DenseReluDense = T5DenseGatedActDense(cfg, ctx) if gated else T5DenseActDense(cfg, ctx)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, ctx)
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(self, x, *, deterministic, rngs):
        h = self.DenseReluDense(self.layer_norm(x), deterministic=deterministic, rngs=rngs)
        return x + self.dropout(h, deterministic=deterministic, rngs=rngs)


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx, has_relative_attention_bias: bool, bidirectional: bool):
        self.SelfAttention = T5Attention(cfg, ctx, has_relative_attention_bias, bidirectional)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, ctx)
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(self, x, allowed, bias, layer_cache, cache_index, *, deterministic, rngs):
        h = self.layer_norm(x)
        kv, layer_cache = seq2seq.self_kv(self.SelfAttention, h, layer_cache, cache_index)
        a = self.SelfAttention(h, kv, allowed, bias, deterministic=deterministic, rngs=rngs)
        return x + self.dropout(a, deterministic=deterministic, rngs=rngs), layer_cache


class T5LayerCrossAttention(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.EncDecAttention = T5Attention(cfg, ctx, False, True)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, ctx)
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(self, x, allowed, encoder_hidden, layer_cache, *, deterministic, rngs):
        h = self.layer_norm(x)
        kv = seq2seq.cross_kv(self.EncDecAttention, encoder_hidden, layer_cache)
        a = self.EncDecAttention(h, kv, allowed, None, deterministic=deterministic, rngs=rngs)
        return x + self.dropout(a, deterministic=deterministic, rngs=rngs)


class T5Block(nnx.Module):
    """An encoder block: layer = [self-attention, feed-forward]."""

    def __init__(self, cfg: Any, ctx: Ctx, first: bool):
        self.layer = nnx.List([T5LayerSelfAttention(cfg, ctx, first, True), T5LayerFF(cfg, ctx)])

    def __call__(self, x, allowed, bias, *, deterministic, rngs):
        x, _ = self.layer[0](x, allowed, bias, None, None, deterministic=deterministic, rngs=rngs)
        return self.layer[1](x, deterministic=deterministic, rngs=rngs)


class T5DecoderBlock(nnx.Module):
    """A decoder block: layer = [causal self-attention, cross-attention, feed-forward]."""

    def __init__(self, cfg: Any, ctx: Ctx, first: bool):
        self.layer = nnx.List([T5LayerSelfAttention(cfg, ctx, first, False), T5LayerCrossAttention(cfg, ctx),
                               T5LayerFF(cfg, ctx)])

    def cross_attention(self) -> seq2seq.Attention:
        return self.layer[1].EncDecAttention

    def __call__(self, x, masks, encoder_hidden, layer_cache, cache_index, *, deterministic, rngs):
        self_allowed, bias, cross_allowed = masks
        x, layer_cache = self.layer[0](x, self_allowed, bias, layer_cache, cache_index, deterministic=deterministic,
                                       rngs=rngs)
        x = self.layer[1](x, cross_allowed, encoder_hidden, layer_cache, deterministic=deterministic, rngs=rngs)
        return self.layer[2](x, deterministic=deterministic, rngs=rngs), layer_cache


class T5Stack(nnx.Module):
    """HF T5Stack without its embed_tokens (the model's `shared`): block, final_layer_norm, dropout."""

    def __init__(self, cfg: Any, ctx: Ctx, is_decoder: bool):
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        block = T5DecoderBlock if is_decoder else T5Block
        self.block = nnx.List([block(cfg, ctx, i == 0) for i in range(n)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, ctx)
        self.dropout = Dropout(cfg.dropout_rate)
        self.remat = ctx.remat

    def _position_bias(self, q_slots: jax.Array, k_length: int) -> jax.Array:
        return self.block[0].layer[0].SelfAttention.position_bias(q_slots, k_length)

    def encode(self, x, allowed, *, deterministic, rngs):
        length = x.shape[1]
        bias = self._position_bias(jnp.arange(length, dtype=jnp.int32), length)
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        x = seq2seq.run_encoder_layers(self.block, x, allowed, bias, remat=self.remat, deterministic=deterministic,
                                       rngs=rngs)
        return self.dropout(self.final_layer_norm(x), deterministic=deterministic, rngs=rngs)

    def decode(self, x, q_slots, self_allowed, cross_allowed, encoder_hidden, cache, cache_index, *, deterministic,
               rngs):
        bias = self._position_bias(q_slots, self_allowed.shape[-1])
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        x, cache = seq2seq.run_decoder_layers(self.block, x, (self_allowed, bias, cross_allowed), encoder_hidden,
                                              cache, cache_index, remat=self.remat, deterministic=deterministic,
                                              rngs=rngs)
        return self.dropout(self.final_layer_norm(x), deterministic=deterministic, rngs=rngs), cache


def scale_decoder_outputs(cfg: Any) -> bool:
    """Whether the decoder output is scaled by d_model**-0.5 before the lm_head: v1.0 (tied) yes; v1.1 / Flan
    no. transformers >= 5 records it as config.scale_decoder_outputs (and reads an older config.json's
    tie_word_embeddings=false as tie_word_embeddings=true, scale_decoder_outputs=false); before that,
    tie_word_embeddings meant both."""
    value = getattr(cfg, "scale_decoder_outputs", None)
    return bool(getattr(cfg, "tie_word_embeddings", True) if value is None else value)


def from_weights(cfg: Any, names: frozenset) -> Any:
    """Tied or not as the file says, like transformers: a checkpoint holding lm_head.weight has its own head
    (Flan-T5 folders written before transformers 5 say tie_word_embeddings=false and hold one), one without
    it ties the head to `shared` (transformers 5 writes T5 v1.1 that way, unscaled). The scaling stays the
    config's (scale_decoder_outputs, recorded explicitly so that changing the tie does not change it)."""
    out = copy.deepcopy(cfg)
    out.scale_decoder_outputs = scale_decoder_outputs(cfg)
    out.tie_word_embeddings = "lm_head.weight" not in names
    return out


class T5ForConditionalGeneration(seq2seq.Seq2SeqLM):
    """shared (the token embedding of both stacks), encoder, decoder, and lm_head when untied (v1.1)."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.shared = common.embed(cfg.vocab_size, cfg.d_model, ctx, ("vocab", "embed"))
        self.encoder = T5Stack(cfg, ctx, is_decoder=False)
        self.decoder = T5Stack(cfg, ctx, is_decoder=True)
        # v1.0: tied and scaled; Flan-T5 from before transformers 5: its own lm_head, unscaled; T5 v1.1 saved by
        # transformers 5: tied, unscaled (from_weights settles the tie from the checkpoint).
        self.tied = bool(getattr(cfg, "tie_word_embeddings", True))
        if not self.tied:
            self.lm_head = common.linear(cfg.d_model, cfg.vocab_size, ctx, ("embed", "vocab"), use_bias=False)
        self.logit_scale = float(cfg.d_model) ** -0.5 if scale_decoder_outputs(cfg) else 1.0
        self.decoder_kv_shape = (cfg.num_heads, cfg.d_kv)
        self.dtype = ctx.dtype

    def decoder_layers(self) -> nnx.List:
        return self.decoder.block

    def _encode(self, input_ids, allowed, *, deterministic, rngs):
        return self.encoder.encode(self.shared(input_ids), allowed, deterministic=deterministic, rngs=rngs)

    def _decode(self, ids, q_slots, self_allowed, cross_allowed, encoder_hidden, cache, cache_index, *,
                deterministic, rngs):
        return self.decoder.decode(self.shared(ids), q_slots, self_allowed, cross_allowed, encoder_hidden, cache,
                                   cache_index, deterministic=deterministic, rngs=rngs)

    def _logits(self, x):
        if not self.tied:
            return self.lm_head(x)
        return self.shared.attend(x * jnp.asarray(self.logit_scale, x.dtype))

    def _set_info(self, family: str, task: str, head_pattern: str, hf_config: Any) -> None:
        super()._set_info(family, task, r"shared/.*" if self.tied else head_pattern, hf_config)


def check_config(cfg: Any, task: str) -> None:
    """Rejects config features the NNX code does not implement (instead of silently differing)."""
    del task
    common.activation(getattr(cfg, "dense_act_fn", "relu"))
    if not getattr(cfg, "is_encoder_decoder", True):
        raise UnsupportedModelError("config.json: is_encoder_decoder=false (a T5 encoder alone) is not supported")


def build(cfg: Any, task: str, ctx: Ctx) -> seq2seq.Seq2SeqLM:
    del task
    return T5ForConditionalGeneration(cfg, ctx)


FAMILY = Family(
    name="t5",
    model_types=("t5",),
    prefix="transformer",
    build=build,
    head_patterns={"seq2seq": r"lm_head/.*"},
    dropout_fields={"hidden": "dropout_rate"},  # T5 has one rate for all its dropouts.
    # Tied copies of `shared`, and a table HF keeps in the first cross-attention but never uses.
    ignore_keys=(r"(encoder|decoder)\.embed_tokens\.weight",
                 r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"),
    check_config=check_config,
    from_weights=from_weights,
)
