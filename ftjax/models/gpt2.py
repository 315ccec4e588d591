"""GPT-2 in Flax NNX, with param paths that mirror HF GPT2Model / GPT2{LMHeadModel,ForSequenceClassification}
state_dict keys. HF's Conv1D weights are already [in, out], so they load and save without a transpose.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from ftjax.hf import UnsupportedModelError
from ftjax.models import common, decoder, decoder_family
from ftjax.models.common import Ctx, Dropout
from ftjax.models.decoder import DecoderTask


def _inner(cfg: Any) -> int:
    return cfg.n_inner if cfg.n_inner is not None else 4 * cfg.hidden_size


class Attention(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx, layer_idx: int):
        e = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, e // cfg.num_attention_heads
        self.c_attn = common.linear(e, 3 * e, ctx, ("embed", "heads"))
        self.c_proj = common.linear(e, e, ctx, ("heads", "embed"))
        self.attn_dropout = Dropout(cfg.attn_pdrop)
        self.resid_dropout = Dropout(cfg.resid_pdrop)
        scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale

    def __call__(self, x, mask, layer_cache, cache_index, *, deterministic, rngs):
        batch, length, e = x.shape
        qkv = self.c_attn(x)  # once: XLA would merge three forward calls but not their backward passes
        q, k, v = (qkv[..., i * e:(i + 1) * e].reshape(batch, length, self.heads, self.head_dim)
                   for i in range(3))
        if layer_cache is not None:
            layer_cache = decoder.update_cache(layer_cache, k, v, cache_index)
            k, v = layer_cache["k"].astype(q.dtype), layer_cache["v"].astype(q.dtype)
        out = decoder.attend(q, k, v, mask, self.scale, self.attn_dropout, deterministic=deterministic, rngs=rngs)
        out = self.c_proj(out.reshape(batch, length, e))
        return self.resid_dropout(out, deterministic=deterministic, rngs=rngs), layer_cache


class MLP(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.c_fc = common.linear(cfg.hidden_size, _inner(cfg), ctx, ("embed", "mlp"))
        self.c_proj = common.linear(_inner(cfg), cfg.hidden_size, ctx, ("mlp", "embed"))
        self.act = common.activation(cfg.activation_function)
        self.dropout = Dropout(cfg.resid_pdrop)

    def __call__(self, x, *, deterministic, rngs):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))), deterministic=deterministic, rngs=rngs)


class Block(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx, layer_idx: int):
        self.ln_1 = common.layer_norm(cfg.hidden_size, cfg.layer_norm_epsilon, ctx)
        self.attn = Attention(cfg, ctx, layer_idx)
        self.ln_2 = common.layer_norm(cfg.hidden_size, cfg.layer_norm_epsilon, ctx)
        self.mlp = MLP(cfg, ctx)
        self.window = None

    def __call__(self, x, mask, extra, layer_cache, cache_index, *, deterministic, rngs):
        del extra
        a, layer_cache = self.attn(self.ln_1(x), mask, layer_cache, cache_index, deterministic=deterministic,
                                   rngs=rngs)
        x = x + a
        return x + self.mlp(self.ln_2(x), deterministic=deterministic, rngs=rngs), layer_cache


class GPT2Model(nnx.Module):
    """The backbone (HF GPT2Model): wte, wpe, h, ln_f."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.wte = common.embed(cfg.vocab_size, cfg.hidden_size, ctx, ("vocab", "embed"))
        self.wpe = common.embed(cfg.n_positions, cfg.hidden_size, ctx)
        self.drop = Dropout(cfg.embd_pdrop)
        self.h = nnx.List([Block(cfg, ctx, i) for i in range(cfg.num_hidden_layers)])
        self.ln_f = common.layer_norm(cfg.hidden_size, cfg.layer_norm_epsilon, ctx)
        self.remat, self.dtype = ctx.remat, ctx.dtype
        self.kv_shape = (cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads)
        self.num_layers = cfg.num_hidden_layers

    def __call__(self, inputs: decoder.DecoderInputs, cache, *, deterministic, rngs):
        x = self.wte(inputs.input_ids) + self.wpe(inputs.position_ids)
        x = self.drop(x, deterministic=deterministic, rngs=rngs)
        x, cache = decoder.run_decoder_layers(self.h, x, inputs, cache, None, remat=self.remat,
                                              deterministic=deterministic, rngs=rngs)
        return self.ln_f(x), cache


class GPT2Base(decoder_family.BackboneTask, GPT2Model):
    """task "base": HF GPT2Model itself (params without prefix). token_type_ids are ignored (HF would add
    wte(token_type_ids); GPT-2 tokenizers never produce them and the trainer sends zeros)."""


class GPT2Task(DecoderTask):
    """GPT2LMHeadModel / GPT2ForSequenceClassification: backbone under `transformer`, plus lm_head (absent
    when tied, the default) or score (no bias)."""

    backbone_name = "transformer"
    embedding_name = "wte"

    def __init__(self, cfg: Any, task: str, ctx: Ctx):
        self.transformer = GPT2Model(cfg, ctx)
        self._init_heads(cfg, task, ctx, tied_default=True)


def check_config(cfg: Any, task: str) -> None:
    if getattr(cfg, "add_cross_attention", False):
        raise UnsupportedModelError("config.json: add_cross_attention GPT-2 models are not supported")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UnsupportedModelError(f"config.json: n_embd={cfg.hidden_size} is not a multiple of "
                                    f"n_head={cfg.num_attention_heads}")


FAMILY = decoder_family.family(
    name="gpt2",
    model_types=("gpt2",),
    base=GPT2Base,
    task_model=GPT2Task,
    dropout_fields={"hidden": "resid_pdrop", "attention": "attn_pdrop"},
    # Old checkpoints store the causal-mask buffers (attn.bias / attn.masked_bias) with the weights.
    ignore_keys=(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",),
    check_config=check_config,
    untransposed=(r"(transformer/)?h/\d+/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/kernel",),
)
