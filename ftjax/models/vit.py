"""ViT in Flax NNX, with param paths that mirror the classic HF ViT state_dict keys ("vit.encoder.layer.N...").

transformers 5 renamed ViT's keys ("vit.layers.N.attention.q_proj"); both spellings load, and the classic
one is written (transformers 5 converts it on load, transformers 4 reads it as is).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.models import common
from ftjax.models.bert import BertIntermediate
from ftjax.models.common import Ctx, Dropout, HFModel
from ftjax.models.registry import Family


def _pair(x: Any) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


class PatchEmbeddings(nnx.Module):
    """projection: a stride-p conv, applied to NCHW pixels (HF layout) without transposing them."""

    def __init__(self, cfg: Any, ctx: Ctx):
        ph, pw = _pair(cfg.patch_size)
        self.patch = (ph, pw)
        self.projection = _Conv(ph, pw, cfg.num_channels, cfg.hidden_size, ctx)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        k = self.projection.kernel.get_value()
        x = jax.lax.conv_general_dilated(
            pixel_values.astype(self.projection.dtype), k.astype(self.projection.dtype), self.patch, "VALID",
            dimension_numbers=("NCHW", "HWIO", "NHWC"),
        )
        x = x + self.projection.bias.get_value().astype(x.dtype)
        return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])


class _Conv(nnx.Module):
    def __init__(self, ph: int, pw: int, cin: int, cout: int, ctx: Ctx):
        self.kernel = common.param(ctx, (ph, pw, cin, cout), (None, None, None, "embed"))
        self.bias = common.param(ctx, (cout,), ("embed",), nnx.initializers.zeros)
        self.dtype = ctx.dtype


class ViTEmbeddings(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        ih, iw = _pair(cfg.image_size)
        ph, pw = _pair(cfg.patch_size)
        self.image_size = (ih, iw)
        self.cls_token = common.param(ctx, (1, 1, cfg.hidden_size), (None, None, "embed"))
        self.patch_embeddings = PatchEmbeddings(cfg, ctx)
        n = (ih // ph) * (iw // pw) + 1
        self.position_embeddings = common.param(ctx, (1, n, cfg.hidden_size), (None, None, "embed"))
        self.dropout = Dropout(cfg.hidden_dropout_prob)
        self.dtype = ctx.dtype

    def __call__(self, pixel_values, *, deterministic, rngs):
        if pixel_values is None:
            raise ValueError("pixel_values [batch, channels, height, width] is required for a ViT model (got None)")
        pixel_values = jnp.asarray(pixel_values)
        if tuple(pixel_values.shape[2:]) != self.image_size:
            raise ValueError(
                f"pixel_values has height x width {tuple(pixel_values.shape[2:])}, but the model was trained on "
                f"{self.image_size}; resize images to the config's image_size"
            )
        x = self.patch_embeddings(pixel_values)
        cls = jnp.broadcast_to(self.cls_token.get_value().astype(x.dtype), (x.shape[0], 1, x.shape[2]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embeddings.get_value().astype(x.dtype)
        return self.dropout(x, deterministic=deterministic, rngs=rngs)


class ViTSelfAttention(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        bias = getattr(cfg, "qkv_bias", True)
        self.query = common.linear(h, h, ctx, ("embed", "heads"), use_bias=bias)
        self.key = common.linear(h, h, ctx, ("embed", "heads"), use_bias=bias)
        self.value = common.linear(h, h, ctx, ("embed", "heads"), use_bias=bias)
        self.dropout = Dropout(cfg.attention_probs_dropout_prob)

    def __call__(self, x, *, deterministic, rngs):
        q, k, v = (common.split_heads(f(x), self.num_heads) for f in (self.query, self.key, self.value))
        out = common.attention(q, k, v, None, self.dropout, deterministic=deterministic, rngs=rngs)
        return common.merge_heads(out)


class _DenseDropout(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx, din: int, dout: int, axes: tuple):
        self.dense = common.linear(din, dout, ctx, axes)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def __call__(self, x, *, deterministic, rngs):
        return self.dropout(self.dense(x), deterministic=deterministic, rngs=rngs)


class ViTAttention(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.attention = ViTSelfAttention(cfg, ctx)
        self.output = _DenseDropout(cfg, ctx, cfg.hidden_size, cfg.hidden_size, ("heads", "embed"))

    def __call__(self, x, *, deterministic, rngs):
        return self.output(self.attention(x, deterministic=deterministic, rngs=rngs),
                           deterministic=deterministic, rngs=rngs)


class ViTLayer(nnx.Module):
    """Pre-LN block: x + attention(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.attention = ViTAttention(cfg, ctx)
        self.intermediate = BertIntermediate(cfg, ctx)  # HF's ViTIntermediate is BERT's
        self.output = _DenseDropout(cfg, ctx, cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"))
        self.layernorm_before = common.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, ctx)
        self.layernorm_after = common.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, ctx)

    def __call__(self, x, bias, *, deterministic, rngs):
        del bias  # every patch is attended; there is no padding.
        x = x + self.attention(self.layernorm_before(x), deterministic=deterministic, rngs=rngs)
        h = self.intermediate(self.layernorm_after(x))
        return x + self.output(h, deterministic=deterministic, rngs=rngs)


class ViTEncoder(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.layer = nnx.List([ViTLayer(cfg, ctx) for _ in range(cfg.num_hidden_layers)])
        self.remat = ctx.remat

    def __call__(self, x, *, deterministic, rngs):
        return common.run_layers(self.layer, x, None, remat=self.remat, deterministic=deterministic, rngs=rngs)


class ViTPooler(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        out = getattr(cfg, "pooler_output_size", None) or cfg.hidden_size
        self.dense = common.linear(cfg.hidden_size, out, ctx, ("embed", None))
        self.act = common.activation(getattr(cfg, "pooler_act", "tanh"))

    def __call__(self, x):
        return self.act(self.dense(x[:, 0]))


class ViTModel(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx, *, add_pooling_layer: bool):
        self.embeddings = ViTEmbeddings(cfg, ctx)
        self.encoder = ViTEncoder(cfg, ctx)
        self.layernorm = common.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, ctx)
        self.pooler = ViTPooler(cfg, ctx) if add_pooling_layer else None

    def __call__(self, pixel_values, *, deterministic, rngs):
        x = self.embeddings(pixel_values, deterministic=deterministic, rngs=rngs)
        x = self.layernorm(self.encoder(x, deterministic=deterministic, rngs=rngs))
        return x, (self.pooler(x) if self.pooler is not None else None)


class ViTBase(ViTModel, HFModel):
    """task "base": HF ViTModel (params without prefix); returns last_hidden_state + pooler_output."""

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 pixel_values=None, *, deterministic: bool = True, rngs: nnx.Rngs | None = None,
                 output_hidden_states: bool = False) -> dict:
        with common.collect_hidden_states(output_hidden_states) as hidden:
            x, pooled = ViTModel.__call__(self, pixel_values, deterministic=deterministic, rngs=rngs)
        return common.with_hidden_states({"last_hidden_state": x, "pooler_output": pooled}, hidden)


class ViTForImageClassification(HFModel):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.vit = ViTModel(cfg, ctx, add_pooling_layer=False)
        # HF has no dropout before the classifier; a `classifier` dropout override adds one.
        self.dropout = Dropout(ctx.classifier_dropout or 0.0)
        self.classifier = common.linear(cfg.hidden_size, cfg.num_labels, ctx, ("embed", None))

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 pixel_values=None, *, deterministic: bool = True, rngs: nnx.Rngs | None = None,
                 output_hidden_states: bool = False) -> dict:
        with common.collect_hidden_states(output_hidden_states) as hidden:
            x, _ = self.vit(pixel_values, deterministic=deterministic, rngs=rngs)
        x = self.dropout(x[:, 0], deterministic=deterministic, rngs=rngs)
        return common.with_hidden_states({"logits": self.classifier(x)}, hidden)


def build(cfg: Any, task: str, ctx: Ctx) -> HFModel:
    return ViTBase(cfg, ctx, add_pooling_layer=True) if task == "base" else ViTForImageClassification(cfg, ctx)


# transformers-5 ViT key spelling -> the classic one ftjax uses (inverse of its conversion_mapping for ViT).
_NEW_TO_CLASSIC = [
    (re.compile(r"(^|\.)layers\.(\d+)\."), r"\1encoder.layer.\2."),
    (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
]


def _rename(key: str) -> str:
    if "layers." not in key:
        return key
    for pattern, repl in _NEW_TO_CLASSIC:
        key = pattern.sub(repl, key)
    return key


FAMILY = Family(
    name="vit",
    model_types=("vit",),
    prefix="vit",
    build=build,
    head_patterns={"base": r"pooler/.*", "image_classification": r"classifier/.*"},
    dropout_fields={"hidden": "hidden_dropout_prob", "attention": "attention_probs_dropout_prob"},
    rename_key=_rename,
    ignore_keys=(r"(vit\.)?embeddings\.mask_token",),
)
