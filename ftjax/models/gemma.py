"""Gemma 2 and Gemma 3 (text: Gemma3ForCausalLM, model_type gemma3_text) in Flax NNX on the Llama pieces
(llama.py): (1 + w) RMSNorms before and after attention and MLP, embeddings scaled by sqrt(hidden),
query_pre_attn_scalar, attention and final logit soft-capping, sliding-window / global layers (layer_types),
and Gemma 3's q/k norms with local and global RoPE. Param paths mirror HF Gemma2/Gemma3 state_dict keys.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.hf import UnsupportedModelError
from ftjax.models import common, decoder, decoder_family, llama
from ftjax.models.common import Ctx
from ftjax.models.decoder import DecoderTask

LAYER_TYPES = ("sliding_attention", "full_attention")
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")

head_dim = llama.head_dim


def rope_per_layer_type(cfg: Any) -> bool:
    """Gemma 3 keeps rope_parameters per layer type (local and global bases, scaling on global layers only)."""
    return cfg.model_type == "gemma3_text"


def layer_types(cfg: Any) -> list[str]:
    return list(cfg.layer_types[: cfg.num_hidden_layers])


def layer_windows(cfg: Any) -> list[int | None]:
    """The sliding window of each layer: config.sliding_window on "sliding_attention" layers, else None."""
    return [cfg.sliding_window if t == "sliding_attention" else None for t in layer_types(cfg)]


def attn_softcap(cfg: Any) -> float | None:
    """Gemma 2's attn_logit_softcapping. transformers 5.24's Gemma3Attention never passes the field to its
    attention functions, so a Gemma 3 config's value changes nothing there, nor here."""
    if cfg.model_type != "gemma2":
        return None
    cap = getattr(cfg, "attn_logit_softcapping", None)
    return None if cap is None else float(cap)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap), as HF's logit soft-capping (None: x)."""
    return x if cap is None else jnp.tanh(x / cap) * cap


class RMSNorm(nnx.Module):
    """HF Gemma2RMSNorm / Gemma3RMSNorm: (x * rsqrt(mean(x^2) + eps)) * (1 + w), all in float32, then cast
    back (Llama casts before the weight). w is "offset_scale" (HF "weight"): 0 is the identity, HF's init."""

    def __init__(self, dim: int, eps: float, ctx: Ctx, axes: tuple = ("embed",)):
        self.offset_scale = common.param(ctx, (dim,), axes, nnx.initializers.zeros)
        self.eps = float(eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (h * (1.0 + self.offset_scale.get_value().astype(jnp.float32))).astype(x.dtype)


class Attention(llama.Attention):
    """Llama's attention with scale query_pre_attn_scalar**-0.5, Gemma 2's score soft-cap and Gemma 3's
    (1 + w) q/k norms over head_dim (before RoPE)."""

    def __init__(self, cfg: Any, ctx: Ctx):
        bias = bool(getattr(cfg, "attention_bias", False))
        super().__init__(cfg, llama.Arch(q_bias=bias, o_bias=bias), ctx)
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        self.softcap = attn_softcap(cfg)
        if cfg.model_type == "gemma3_text":
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ctx, ("kv",))
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ctx, ("kv",))
            self.qk_norm = True


class DecoderLayer(nnx.Module):
    """x + post_attn_norm(attn(input_norm(x))), then + post_ffw_norm(mlp(pre_ffw_norm(x)))."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.self_attn = Attention(cfg, ctx)
        act = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
        self.mlp = llama.MLP(cfg, llama.Arch(), ctx, act=act)
        for name in NORMS:
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx))

    def __call__(self, x, mask, rope, layer_cache, cache_index, *, deterministic, rngs):
        a, layer_cache = self.self_attn(self.input_layernorm(x), mask, rope, layer_cache, cache_index,
                                        deterministic=deterministic, rngs=rngs)
        x = x + self.post_attention_layernorm(a)
        m = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x + m, layer_cache


class GemmaModel(nnx.Module):
    """The backbone (HF Gemma2Model / Gemma3TextModel): embed_tokens (scaled), layers, norm."""

    def __init__(self, cfg: Any, ctx: Ctx):
        d = head_dim(cfg)
        self.embed_tokens = common.embed(cfg.vocab_size, cfg.hidden_size, ctx, ("vocab", "embed"))
        self.embed_scale = float(np.float32(cfg.hidden_size**0.5))  # HF: a float32 buffer, cast to the dtype
        types = layer_types(cfg)
        self.windows = tuple(layer_windows(cfg))
        self.scanned = bool(ctx.scan_layers)
        if self.scanned:  # one layer's program; windows and RoPE bases differ by window, outside the layer
            self.layers = common.stack_layers([DecoderLayer(cfg, ctx) for _ in types])
        else:
            self.layers = nnx.List([DecoderLayer(cfg, ctx) for _ in types])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        ropes = {}
        for kind, window in zip(types, self.windows):
            inv, scaling = decoder.rope_parameters(cfg, d, kind if rope_per_layer_type(cfg) else None)
            ropes[window] = (tuple(float(f) for f in inv), float(scaling))
        # static: tuples, not array attributes. One entry when every layer has the same RoPE (Gemma 2).
        self.rope = tuple((w, *r) for w, r in ropes.items())
        if len(set(ropes.values())) == 1:
            self.rope = self.rope[:1]
        self.remat, self.dtype = ctx.remat, ctx.dtype
        self.attention = decoder.AttentionSpec(ctx.attention, cfg.num_attention_heads, cfg.num_key_value_heads, d,
                                               float(getattr(cfg, "attention_dropout", 0.0) or 0.0),
                                               softcap=attn_softcap(cfg))
        self.kv_shape = (cfg.num_key_value_heads, d)
        self.num_layers = cfg.num_hidden_layers

    def __call__(self, inputs: decoder.DecoderInputs, cache, *, deterministic, rngs):
        x = self.embed_tokens(inputs.input_ids)
        x = x * jnp.asarray(self.embed_scale, jnp.float32).astype(x.dtype)
        ropes = {w: decoder.rope_cos_sin(inputs.position_ids, inv, scaling, x.dtype) for w, inv, scaling in self.rope}
        extra = decoder.ByWindow(ropes) if len(ropes) > 1 else next(iter(ropes.values()))
        x, cache = decoder.run_decoder_layers(self.layers, x, inputs, cache, extra, remat=self.remat,
                                              deterministic=deterministic, rngs=rngs, windows=self.windows,
                                              attention=self.attention)
        return self.norm(x), cache


class GemmaBase(decoder_family.BackboneTask, GemmaModel):
    """task "base": HF Gemma2Model / Gemma3TextModel itself (params without prefix)."""


class GemmaTask(DecoderTask):
    """Gemma2/Gemma3 For{CausalLM,SequenceClassification}: backbone under `model`, plus lm_head (absent when
    tied, the default) with final_logit_softcapping, or score (no bias, no soft-cap, as HF)."""

    def __init__(self, cfg: Any, task: str, ctx: Ctx):
        self.model = GemmaModel(cfg, ctx)
        self._init_heads(cfg, task, ctx, tied_default=True)
        cap = getattr(cfg, "final_logit_softcapping", None)
        self.final_softcap = None if cap is None else float(cap)

    def _lm_logits(self, x):
        return softcap(super()._lm_logits(x), self.final_softcap)


def check_config(cfg: Any, task: str) -> None:
    """Rejects config features the NNX code does not implement (instead of silently differing)."""
    del task
    d = head_dim(cfg)
    types = layer_types(cfg)
    if len(types) != cfg.num_hidden_layers or set(types) - set(LAYER_TYPES):
        raise UnsupportedModelError(f"config.json: layer_types must give one of {', '.join(LAYER_TYPES)} for each "
                                    f"of the {cfg.num_hidden_layers} layers, got {types}")
    if rope_per_layer_type(cfg):
        for kind in sorted(set(types)):
            decoder.rope_parameters(cfg, d, kind)
    else:
        decoder.rope_parameters(cfg, d)
    window = getattr(cfg, "sliding_window", None)
    if "sliding_attention" in types and not (isinstance(window, int) and window >= 1):
        raise UnsupportedModelError(f"config.json: sliding_window={window!r} with sliding_attention layers; "
                                    "supported: an int >= 1")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UnsupportedModelError("config.json: use_bidirectional_attention=true is not supported (causal only)")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise UnsupportedModelError(f"config.json: num_attention_heads={cfg.num_attention_heads} is not a multiple "
                                    f"of num_key_value_heads={cfg.num_key_value_heads}")
    common.activation(getattr(cfg, "hidden_activation", None) or cfg.hidden_act)


FAMILY = decoder_family.family(
    name="gemma",
    model_types=("gemma2", "gemma3_text"),
    base=GemmaBase,
    task_model=GemmaTask,
    dropout_fields={"attention": "attention_dropout"},
    ignore_keys=(r"(model\.)?rotary_emb\..*inv_freq", r"(model\.)?embed_tokens\.embed_scale"),
    check_config=check_config,
    scannable=True,
)
