"""ModernBERT in Flax NNX, with param paths that mirror HF ModernBertModel / ModernBertFor* state_dict keys.

What is particular to it, on the shared pieces (decoder.DecoderInputs' bidirectional masks, decoder.attend,
RoPE, decoder.run_decoder_layers): global and local (sliding-window) attention layers, each kind with its
own RoPE base; a fused Wqkv; a GeGLU MLP (Wi gives [input | gate]); pre-norm LayerNorms without bias
(norm_bias) and an Identity attn_norm on layer 0; no token types, no position embeddings; an embedding
norm and a final norm; heads (dense + act + norm) for classification (cls or mean pooling), token
classification and the masked LM (its decoder tied to the token embeddings).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.hf import UnsupportedModelError
from ftjax.models import common, decoder
from ftjax.models.common import Ctx, Dropout, HFModel
from ftjax.models.registry import Family, base_or_task

LAYER_TYPES = ("full_attention", "sliding_attention")
POOLINGS = ("cls", "mean")


def head_dim(cfg: Any) -> int:
    return cfg.hidden_size // cfg.num_attention_heads


def layer_windows(cfg: Any) -> list[int | None]:
    """Each layer's window in decoder.DecoderInputs' bidirectional sense (|q - k| < w): None on global
    layers; on local ones local_attention // 2 + 1, as HF's mask |q - k| <= local_attention // 2."""
    window = int(cfg.local_attention) // 2 + 1
    return [window if t == "sliding_attention" else None for t in cfg.layer_types[: cfg.num_hidden_layers]]


def _norm(cfg: Any, ctx: Ctx) -> nnx.LayerNorm:
    return common.layer_norm(cfg.hidden_size, cfg.norm_eps, ctx, use_bias=bool(cfg.norm_bias))


class ModernBertEmbeddings(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.tok_embeddings = common.embed(cfg.vocab_size, cfg.hidden_size, ctx, ("vocab", "embed"))
        self.norm = _norm(cfg, ctx)
        self.drop = Dropout(float(cfg.embedding_dropout))

    def __call__(self, input_ids, *, deterministic, rngs):
        return self.drop(self.norm(self.tok_embeddings(input_ids)), deterministic=deterministic, rngs=rngs)


class ModernBertAttention(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        h = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, head_dim(cfg)
        bias = bool(cfg.attention_bias)
        # [q | k | v] on one output dim: sharding.PACKED_OUTPUTS keeps `tensor` off it (it would cut across them).
        self.Wqkv = common.linear(h, 3 * h, ctx, ("embed", "heads"), use_bias=bias)
        self.Wo = common.linear(h, h, ctx, ("heads", "embed"), use_bias=bias)
        self.dropout = Dropout(float(cfg.attention_dropout))  # on the probabilities and after Wo, as HF

    def __call__(self, x, mask, rope, *, deterministic, rngs):
        batch, length = x.shape[:2]
        qkv = self.Wqkv(x).reshape(batch, length, 3, self.heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        cos, sin = rope
        q, k = decoder.apply_rope(q, cos, sin), decoder.apply_rope(k, cos, sin)
        out = decoder.attend(q, k, v, mask, self.head_dim**-0.5, self.dropout, deterministic=deterministic,
                             rngs=rngs)
        out = self.Wo(out.reshape(batch, length, self.heads * self.head_dim))
        return self.dropout(out, deterministic=deterministic, rngs=rngs)


class ModernBertMLP(nnx.Module):
    """GeGLU: Wi projects to [input | gate] (2 x intermediate), act(input) * gate, then Wo."""

    def __init__(self, cfg: Any, ctx: Ctx):
        h, m = cfg.hidden_size, int(cfg.intermediate_size)
        bias = bool(cfg.mlp_bias)
        self.Wi = common.linear(h, 2 * m, ctx, ("embed", "mlp"), use_bias=bias)  # [input | gate]: as Wqkv
        self.Wo = common.linear(m, h, ctx, ("mlp", "embed"), use_bias=bias)
        self.act = common.activation(cfg.hidden_activation)
        self.drop = Dropout(float(cfg.mlp_dropout))

    def __call__(self, x, *, deterministic, rngs):
        inner, gate = jnp.split(self.Wi(x), 2, axis=-1)
        return self.Wo(self.drop(self.act(inner) * gate, deterministic=deterministic, rngs=rngs))


class ModernBertEncoderLayer(nnx.Module):
    """Pre-norm: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x)); layer 0 has no attn_norm (HF's Identity:
    the embedding norm precedes it)."""

    def __init__(self, cfg: Any, ctx: Ctx, index: int, window: int | None):
        self.attn_norm = _norm(cfg, ctx) if index > 0 else None
        self.attn = ModernBertAttention(cfg, ctx)
        self.mlp_norm = _norm(cfg, ctx)
        self.mlp = ModernBertMLP(cfg, ctx)
        self.window = window

    def __call__(self, x, mask, rope, layer_cache, cache_index, *, deterministic, rngs):
        del layer_cache, cache_index  # an encoder: no KV cache
        kw = {"deterministic": deterministic, "rngs": rngs}
        h = x if self.attn_norm is None else self.attn_norm(x)
        x = x + self.attn(h, mask, rope, **kw)
        return x + self.mlp(self.mlp_norm(x), **kw), None


class ModernBertModel(nnx.Module):
    """The backbone (HF ModernBertModel): embeddings, layers, final_norm. Not scannable: layer 0 lacks the
    attn_norm every other layer has, so the layers differ in structure."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.embeddings = ModernBertEmbeddings(cfg, ctx)
        self.windows = tuple(layer_windows(cfg))
        self.layers = nnx.List([ModernBertEncoderLayer(cfg, ctx, i, w) for i, w in enumerate(self.windows)])
        self.final_norm = _norm(cfg, ctx)
        ropes = []  # (window, RoPE): global layers (None) and local ones each have their own base
        for window in sorted(set(self.windows), key=lambda w: w or 0):
            kind = "full_attention" if window is None else "sliding_attention"
            inv_freq, scaling = decoder.rope_parameters(cfg, head_dim(cfg), kind)
            ropes.append((window, tuple(float(f) for f in inv_freq), scaling))  # static: tuples, not arrays
        self.ropes = tuple(ropes)
        self.remat = ctx.remat

    def __call__(self, input_ids, attention_mask, position_ids, segment_ids, *, deterministic, rngs):
        """(final hidden states [B, L, H], the decoder.DecoderInputs). Positions 0..L-1 whatever the padding
        (HF's default), restarting per segment in packed rows."""
        inputs = decoder.DecoderInputs(input_ids, attention_mask, position_ids, segment_ids, None, None,
                                       causal=False)
        x = self.embeddings(inputs.input_ids, deterministic=deterministic, rngs=rngs)
        rope = decoder.ByWindow({w: decoder.rope_cos_sin(inputs.position_ids, f, s, x.dtype)
                                 for w, f, s in self.ropes})
        x, _ = decoder.run_decoder_layers(self.layers, x, inputs, None, rope, remat=self.remat,
                                          deterministic=deterministic, rngs=rngs, windows=self.windows)
        return self.final_norm(x), inputs


class ModernBertPredictionHead(nnx.Module):
    """head: dense (classifier_bias) -> classifier_activation -> norm; before the classifier and the decoder."""

    def __init__(self, cfg: Any, ctx: Ctx):
        h = cfg.hidden_size
        self.dense = common.linear(h, h, ctx, ("embed", None), use_bias=bool(cfg.classifier_bias))
        self.act = common.activation(cfg.classifier_activation)
        self.norm = _norm(cfg, ctx)

    def __call__(self, x):
        return self.norm(self.act(self.dense(x)))


class DecoderBias(nnx.Module):
    """The masked LM's decoder with its weight tied to the token embeddings: only its bias is its own."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.bias = common.param(ctx, (cfg.vocab_size,), ("vocab",), nnx.initializers.zeros)


def mean_pool(x: jax.Array, inputs: decoder.DecoderInputs, attention_mask: Any, segment_starts: Any) -> jax.Array:
    """classifier_pooling="mean": the mean over real tokens ([B, H]; HF: over attention_mask, all tokens
    without one), or for packed rows each example's own mean ([B, S, H], the segment at each start)."""
    if segment_starts is None:
        if attention_mask is None:
            return x.mean(axis=1)
        m = jnp.asarray(attention_mask).astype(x.dtype)
        return (x * m[..., None]).sum(axis=1) / m.sum(axis=1, keepdims=True)
    seg = inputs.segments if inputs.key_valid is None else jnp.where(inputs.key_valid, inputs.segments, 0)
    ids = jnp.take_along_axis(seg, jnp.asarray(segment_starts, jnp.int32), axis=1)  # [B, S]
    member = ((seg[:, None, :] == ids[:, :, None]) & (ids[:, :, None] > 0)).astype(x.dtype)  # [B, S, L]
    return jnp.einsum("bsl,blh->bsh", member, x) / jnp.maximum(member.sum(-1, keepdims=True), 1)


class ModernBertBase(ModernBertModel, HFModel):
    """task "base": HF ModernBertModel itself (params without prefix), returns last_hidden_state."""

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 pixel_values=None, segment_ids=None, segment_starts=None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None, output_hidden_states: bool = False) -> dict:
        del token_type_ids, pixel_values, segment_starts  # the trainer's uniform call; ModernBERT has no types
        with common.collect_hidden_states(output_hidden_states) as hidden:
            x, _ = ModernBertModel.__call__(self, input_ids, attention_mask, position_ids, segment_ids,
                                            deterministic=deterministic, rngs=rngs)
        if hidden:
            hidden[-1] = x  # HF: the last hidden state is after final_norm
        return common.with_hidden_states({"last_hidden_state": x}, hidden)


class ModernBertTask(HFModel):
    """ModernBertFor{SequenceClassification,TokenClassification,MaskedLM}: backbone under `model`, `head`,
    then `classifier` (after `drop`) or the tied `decoder`."""

    def __init__(self, cfg: Any, task: str, ctx: Ctx):
        self.model = ModernBertModel(cfg, ctx)
        self.head = ModernBertPredictionHead(cfg, ctx)
        if task == "masked_lm":
            self.decoder = DecoderBias(cfg, ctx) if cfg.decoder_bias else None
        else:
            rate = ctx.classifier_dropout if ctx.classifier_dropout is not None else float(cfg.classifier_dropout)
            self.drop = Dropout(rate)
            self.classifier = common.linear(cfg.hidden_size, cfg.num_labels, ctx, ("embed", None))
            self.pooling = cfg.classifier_pooling

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 pixel_values=None, segment_ids=None, segment_starts=None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None, output_hidden_states: bool = False) -> dict:
        """logits [B, C] (classification; [B, S, C] for packed rows), [B, L, C] or [B, L, V] per token;
        output_hidden_states adds "hidden_states" (embeddings + each layer's output, the last normed)."""
        del token_type_ids, pixel_values
        kw = {"deterministic": deterministic, "rngs": rngs}
        common.check_packed(self.task, segment_ids, segment_starts)
        with common.collect_hidden_states(output_hidden_states) as hidden:
            x, inputs = self.model(input_ids, attention_mask, position_ids, segment_ids, **kw)
        if hidden:
            hidden[-1] = x
        if self.task == "classification":
            if self.pooling == "cls":
                pooled = common.first_tokens(x, segment_starts)
            else:
                pooled = mean_pool(x, inputs, attention_mask, segment_starts)
            out = {"logits": self.classifier(self.drop(self.head(pooled), **kw))}
        elif self.task == "token_classification":
            out = {"logits": self.classifier(self.drop(self.head(x), **kw))}
        else:
            logits = self.model.embeddings.tok_embeddings.attend(self.head(x))
            if self.decoder is not None:
                logits = logits + self.decoder.bias.get_value().astype(logits.dtype)
            out = {"logits": logits}
        return common.with_hidden_states(out, hidden)


HEAD_PATTERNS = {
    "base": common.NO_HEAD,
    "classification": r"head/.*|classifier/.*",
    "token_classification": r"head/.*|classifier/.*",
    "masked_lm": r"head/.*|decoder/.*",
}
DROPOUT_FIELDS = {  # "hidden": the feed-forward's dropout (embedding_dropout stays the config's).
    "hidden": "mlp_dropout",
    "attention": "attention_dropout",
    "classifier": "classifier_dropout",
}


def check_config(cfg: Any, task: str) -> None:
    """Rejects ModernBERT config features the NNX code does not implement (instead of silently differing)."""
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UnsupportedModelError(f"config.json: hidden_size={cfg.hidden_size} is not a multiple of "
                                    f"num_attention_heads={cfg.num_attention_heads}")
    types = list(cfg.layer_types or [])
    if len(types) < cfg.num_hidden_layers or set(types) - set(LAYER_TYPES):
        raise UnsupportedModelError(f"config.json: layer_types={types} must name one of {', '.join(LAYER_TYPES)} "
                                    f"for each of the {cfg.num_hidden_layers} layers")
    for kind in set(types[: cfg.num_hidden_layers]):
        decoder.rope_parameters(cfg, head_dim(cfg), kind)
    common.activation(cfg.hidden_activation)
    common.activation(cfg.classifier_activation)
    if task == "classification" and cfg.classifier_pooling not in POOLINGS:
        raise UnsupportedModelError(f"config.json: classifier_pooling={cfg.classifier_pooling!r} is not supported; "
                                    f"one of {', '.join(POOLINGS)}")
    if task == "masked_lm" and getattr(cfg, "tie_word_embeddings", True) is False:
        raise UnsupportedModelError("config.json: masked_lm needs tie_word_embeddings=true (an untied decoder "
                                    "is not implemented)")


FAMILY = Family(
    name="modernbert",
    model_types=("modernbert",),
    prefix="model",
    build=base_or_task(ModernBertBase, ModernBertTask),
    head_patterns=HEAD_PATTERNS,
    dropout_fields=DROPOUT_FIELDS,
    ignore_keys=(r"decoder\.weight",),  # tied to model.embeddings.tok_embeddings (HF does not save it)
    check_config=check_config,
)
