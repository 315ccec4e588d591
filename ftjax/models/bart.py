"""BART in Flax NNX, with param paths that mirror HF BartForConditionalGeneration keys: post-norm encoder and
decoder layers, learned positions with HF's offset of 2, layernorm_embedding, optional sqrt(d_model) embedding
scale, one `shared` embedding for both stacks and the (tied) lm_head, plus final_logits_bias.
Marian (marian.py) reuses these layers with sinusoidal positions and optionally separate embeddings.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.hf import UnsupportedModelError
from ftjax.models import common, seq2seq
from ftjax.models.common import Ctx, Dropout
from ftjax.models.registry import Family

LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm's default, which BART and Marian use.
POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding: position p reads row p + 2.


@dataclasses.dataclass(frozen=True)
class Arch:
    """What differs between BART and Marian."""

    learned_positions: bool = True  # BART: a learned table (offset 2); Marian: sinusoids, not a param.
    layernorm_embedding: bool = True  # BART normalises the embeddings; Marian does not.
    shared: bool = True  # one model.shared embedding; Marian may give each stack its own (embed_tokens).


@functools.lru_cache(maxsize=16)
def sinusoidal_table(n_pos: int, dim: int) -> np.ndarray:
    """HF MarianSinusoidalPositionalEmbedding's float32 table [n_pos, dim]: angles in float64, the sines of
    the even features in the first half, the cosines of the odd ones in the second (not interleaved)."""
    j = np.arange(dim)
    angles = np.arange(n_pos)[:, None] / np.power(10000, 2 * (j // 2) / dim)[None, :]
    sentinel = dim // 2 if dim % 2 == 0 else dim // 2 + 1
    out = np.empty((n_pos, dim), np.float32)
    out[:, :sentinel] = np.sin(angles[:, 0::2])
    out[:, sentinel:] = np.cos(angles[:, 1::2])
    return out


class BartAttention(seq2seq.Attention):
    def __init__(self, cfg: Any, heads: int, ctx: Ctx):
        head_dim = cfg.d_model // heads
        super().__init__(cfg.d_model, heads, head_dim, ctx, names=("q_proj", "k_proj", "v_proj", "out_proj"),
                         use_bias=True, scale=head_dim**-0.5, dropout=cfg.attention_dropout)


class FeedForward(nnx.Module):
    """The post-norm feed-forward of a layer: final_layer_norm(x + dropout(fc2(act_dropout(act(fc1(x))))))."""

    def __init__(self, cfg: Any, ffn_dim: int, ctx: Ctx):
        self.fc1 = common.linear(cfg.d_model, ffn_dim, ctx, ("embed", "mlp"))
        self.fc2 = common.linear(ffn_dim, cfg.d_model, ctx, ("mlp", "embed"))
        self.final_layer_norm = common.layer_norm(cfg.d_model, LAYER_NORM_EPS, ctx)
        self.act = common.activation(cfg.activation_function)
        self.dropout = Dropout(float(cfg.dropout or 0.0))
        self.activation_dropout = Dropout(float(cfg.activation_dropout or 0.0))

    def _ffn(self, x, *, deterministic, rngs):
        h = self.activation_dropout(self.act(self.fc1(x)), deterministic=deterministic, rngs=rngs)
        h = self.dropout(self.fc2(h), deterministic=deterministic, rngs=rngs)
        return self.final_layer_norm(x + h)


class BartEncoderLayer(FeedForward):
    def __init__(self, cfg: Any, ctx: Ctx):
        super().__init__(cfg, cfg.encoder_ffn_dim, ctx)
        self.self_attn = BartAttention(cfg, cfg.encoder_attention_heads, ctx)
        self.self_attn_layer_norm = common.layer_norm(cfg.d_model, LAYER_NORM_EPS, ctx)

    def __call__(self, x, allowed, bias, *, deterministic, rngs):
        a = self.self_attn(x, None, allowed, bias, deterministic=deterministic, rngs=rngs)
        x = self.self_attn_layer_norm(x + self.dropout(a, deterministic=deterministic, rngs=rngs))
        return self._ffn(x, deterministic=deterministic, rngs=rngs)


class BartDecoderLayer(FeedForward):
    def __init__(self, cfg: Any, ctx: Ctx):
        super().__init__(cfg, cfg.decoder_ffn_dim, ctx)
        self.self_attn = BartAttention(cfg, cfg.decoder_attention_heads, ctx)
        self.self_attn_layer_norm = common.layer_norm(cfg.d_model, LAYER_NORM_EPS, ctx)
        self.encoder_attn = BartAttention(cfg, cfg.decoder_attention_heads, ctx)
        self.encoder_attn_layer_norm = common.layer_norm(cfg.d_model, LAYER_NORM_EPS, ctx)

    def cross_attention(self) -> seq2seq.Attention:
        return self.encoder_attn

    def __call__(self, x, masks, encoder_hidden, layer_cache, cache_index, *, deterministic, rngs):
        self_allowed, _, cross_allowed = masks
        kv, layer_cache = seq2seq.self_kv(self.self_attn, x, layer_cache, cache_index)
        a = self.self_attn(x, kv, self_allowed, None, deterministic=deterministic, rngs=rngs)
        x = self.self_attn_layer_norm(x + self.dropout(a, deterministic=deterministic, rngs=rngs))
        kv = seq2seq.cross_kv(self.encoder_attn, encoder_hidden, layer_cache)
        a = self.encoder_attn(x, kv, cross_allowed, None, deterministic=deterministic, rngs=rngs)
        x = self.encoder_attn_layer_norm(x + self.dropout(a, deterministic=deterministic, rngs=rngs))
        return self._ffn(x, deterministic=deterministic, rngs=rngs), layer_cache


class BartStack(nnx.Module):
    """HF BartEncoder / BartDecoder (and Marian's): positions, layernorm_embedding, layers; embed_tokens only
    when the stacks do not share the model's embedding (Marian with share_encoder_decoder_embeddings=false)."""

    def __init__(self, cfg: Any, ctx: Ctx, arch: Arch, is_decoder: bool):
        d = cfg.d_model
        if not arch.shared:
            vocab = (getattr(cfg, "decoder_vocab_size", None) or cfg.vocab_size) if is_decoder else cfg.vocab_size
            self.embed_tokens = common.embed(vocab, d, ctx, ("vocab", "embed"))
        if arch.learned_positions:
            self.embed_positions = common.embed(cfg.max_position_embeddings + POSITION_OFFSET, d, ctx)
        if arch.layernorm_embedding:
            self.layernorm_embedding = common.layer_norm(d, LAYER_NORM_EPS, ctx)
        layer = BartDecoderLayer if is_decoder else BartEncoderLayer
        n = cfg.decoder_layers if is_decoder else cfg.encoder_layers
        self.layers = nnx.List([layer(cfg, ctx) for _ in range(n)])
        self.arch, self.dim = arch, d
        self.embed_scale = math.sqrt(d) if cfg.scale_embedding else 1.0
        self.dropout = Dropout(float(cfg.dropout or 0.0))
        self.remat = ctx.remat

    def _embed(self, tokens: jax.Array, positions: jax.Array, table_length: int, *, deterministic, rngs):
        """tokens [B, L, d] (looked up, unscaled) + the positions' embeddings -> layernorm_embedding, dropout."""
        x = tokens * jnp.asarray(self.embed_scale, tokens.dtype) if self.embed_scale != 1.0 else tokens
        if self.arch.learned_positions:
            pos = self.embed_positions(positions + POSITION_OFFSET)
        else:
            pos = jnp.take(jnp.asarray(sinusoidal_table(table_length, self.dim)), positions, axis=0)
        x = x + pos.astype(x.dtype)
        if self.arch.layernorm_embedding:
            x = self.layernorm_embedding(x)
        return self.dropout(x, deterministic=deterministic, rngs=rngs)

    def encode(self, tokens, allowed, *, deterministic, rngs):
        length = tokens.shape[1]
        x = self._embed(tokens, jnp.arange(length, dtype=jnp.int32), length, deterministic=deterministic, rngs=rngs)
        return seq2seq.run_encoder_layers(self.layers, x, allowed, None, remat=self.remat,
                                          deterministic=deterministic, rngs=rngs)

    def decode(self, tokens, q_slots, self_allowed, cross_allowed, encoder_hidden, cache, cache_index, *,
               deterministic, rngs):
        x = self._embed(tokens, q_slots, self_allowed.shape[-1], deterministic=deterministic, rngs=rngs)
        return seq2seq.run_decoder_layers(self.layers, x, (self_allowed, None, cross_allowed), encoder_hidden, cache,
                                          cache_index, remat=self.remat, deterministic=deterministic, rngs=rngs)


class BartModel(nnx.Module):
    """HF BartModel / MarianModel: shared (when the stacks share it), encoder, decoder."""

    def __init__(self, cfg: Any, ctx: Ctx, arch: Arch):
        if arch.shared:
            self.shared = common.embed(cfg.vocab_size, cfg.d_model, ctx, ("vocab", "embed"))
        self.encoder = BartStack(cfg, ctx, arch, is_decoder=False)
        self.decoder = BartStack(cfg, ctx, arch, is_decoder=True)
        self.arch = arch

    def embedding(self, stack: str) -> nnx.Embed:
        return self.shared if self.arch.shared else getattr(self, stack).embed_tokens


class BartForConditionalGeneration(seq2seq.Seq2SeqLM):
    """model (BartModel) and final_logits_bias; the lm_head is the decoder's token embedding (tied).

    final_logits_bias is a buffer in HF (never trained); here it is an nnx.Param (so it is saved with the
    other params): freeze it with optim.freeze=("final_logits_bias",) to train exactly as HF does."""

    def __init__(self, cfg: Any, ctx: Ctx, arch: Arch = Arch()):
        self.model = BartModel(cfg, ctx, arch)
        vocab = cfg.vocab_size if arch.shared else (getattr(cfg, "decoder_vocab_size", None) or cfg.vocab_size)
        self.final_logits_bias = common.param(ctx, (1, vocab), (None, "vocab"), nnx.initializers.zeros)
        self.decoder_kv_shape = (cfg.decoder_attention_heads, cfg.d_model // cfg.decoder_attention_heads)
        self.dtype = ctx.dtype

    def decoder_layers(self) -> nnx.List:
        return self.model.decoder.layers

    def _encode(self, input_ids, allowed, *, deterministic, rngs):
        tokens = self.model.embedding("encoder")(input_ids)
        return self.model.encoder.encode(tokens, allowed, deterministic=deterministic, rngs=rngs)

    def _decode(self, ids, q_slots, self_allowed, cross_allowed, encoder_hidden, cache, cache_index, *,
                deterministic, rngs):
        tokens = self.model.embedding("decoder")(ids)
        return self.model.decoder.decode(tokens, q_slots, self_allowed, cross_allowed, encoder_hidden, cache,
                                         cache_index, deterministic=deterministic, rngs=rngs)

    def _logits(self, x):
        logits = self.model.embedding("decoder").attend(x)
        return logits + self.final_logits_bias.get_value().astype(logits.dtype)

    def _set_info(self, family: str, task: str, head_pattern: str, hf_config: Any) -> None:
        embedding = "model/shared" if self.model.arch.shared else "model/decoder/embed_tokens"
        super()._set_info(family, task, rf"{embedding}/.*|final_logits_bias", hf_config)


def check_config(cfg: Any, task: str) -> None:
    """Rejects config features the NNX code does not implement (instead of silently differing)."""
    del task
    common.activation(cfg.activation_function)
    if not getattr(cfg, "tie_word_embeddings", True):
        raise UnsupportedModelError(f"config.json: tie_word_embeddings=false (an lm_head of its own) is not "
                                    f"supported for model_type {cfg.model_type!r}; its lm_head is the decoder's "
                                    "token embedding")
    for side in ("encoder", "decoder"):
        if cfg.d_model % getattr(cfg, f"{side}_attention_heads"):
            raise UnsupportedModelError(f"config.json: d_model={cfg.d_model} is not a multiple of "
                                        f"{side}_attention_heads={getattr(cfg, f'{side}_attention_heads')}")


def build(cfg: Any, task: str, ctx: Ctx) -> seq2seq.Seq2SeqLM:
    del task
    return BartForConditionalGeneration(cfg, ctx, Arch())


FAMILY = Family(
    name="bart",
    model_types=("bart",),
    prefix="model",
    build=build,
    head_patterns={"seq2seq": r"model/shared/.*|final_logits_bias"},
    dropout_fields={"hidden": "dropout", "attention": "attention_dropout"},
    # Tied copies of model.shared (the stacks' embed_tokens, lm_head) and fairseq version buffers.
    ignore_keys=(r"model\.(encoder|decoder)\.embed_tokens\.weight", r"lm_head\.weight",
                 r"model\.(encoder|decoder)\.version"),
    check_config=check_config,
)
