"""DistilBERT in Flax NNX, with param paths that mirror HF DistilBertModel / DistilBertFor* state_dict keys.

It has no token types: `token_type_ids` is accepted (the trainer always sends it) and ignored.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.hf import UnsupportedModelError
from ftjax.models import common
from ftjax.models.common import Ctx, Dropout, HFModel
from ftjax.models.encoder import EncoderTask
from ftjax.models.registry import Family, base_or_task

EPS = 1e-12  # DistilBERT's LayerNorm eps is fixed in HF's code, not in the config.


class Embeddings(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.word_embeddings = common.embed(cfg.vocab_size, cfg.dim, ctx, ("vocab", "embed"))
        self.position_embeddings = common.embed(cfg.max_position_embeddings, cfg.dim, ctx)
        self.LayerNorm = common.layer_norm(cfg.dim, EPS, ctx)
        self.dropout = Dropout(cfg.dropout)

    def __call__(self, input_ids, position_ids, *, deterministic, rngs):
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x), deterministic=deterministic, rngs=rngs)


class MultiHeadSelfAttention(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        d = cfg.dim
        self.n_heads = cfg.n_heads
        self.q_lin = common.linear(d, d, ctx, ("embed", "heads"))
        self.k_lin = common.linear(d, d, ctx, ("embed", "heads"))
        self.v_lin = common.linear(d, d, ctx, ("embed", "heads"))
        self.out_lin = common.linear(d, d, ctx, ("heads", "embed"))
        self.dropout = Dropout(cfg.attention_dropout)

    def __call__(self, x, bias, *, deterministic, rngs):
        q, k, v = (common.split_heads(f(x), self.n_heads) for f in (self.q_lin, self.k_lin, self.v_lin))
        out = common.attention(q, k, v, bias, self.dropout, deterministic=deterministic, rngs=rngs)
        return self.out_lin(common.merge_heads(out))


class FFN(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.lin1 = common.linear(cfg.dim, cfg.hidden_dim, ctx, ("embed", "mlp"))
        self.lin2 = common.linear(cfg.hidden_dim, cfg.dim, ctx, ("mlp", "embed"))
        self.act = common.activation(cfg.activation)
        self.dropout = Dropout(cfg.dropout)

    def __call__(self, x, *, deterministic, rngs):
        return self.dropout(self.lin2(self.act(self.lin1(x))), deterministic=deterministic, rngs=rngs)


class TransformerBlock(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.attention = MultiHeadSelfAttention(cfg, ctx)
        self.sa_layer_norm = common.layer_norm(cfg.dim, EPS, ctx)
        self.ffn = FFN(cfg, ctx)
        self.output_layer_norm = common.layer_norm(cfg.dim, EPS, ctx)

    def __call__(self, x, bias, *, deterministic, rngs):
        a = self.sa_layer_norm(self.attention(x, bias, deterministic=deterministic, rngs=rngs) + x)
        return self.output_layer_norm(self.ffn(a, deterministic=deterministic, rngs=rngs) + a)


class Transformer(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.layer = nnx.List([TransformerBlock(cfg, ctx) for _ in range(cfg.n_layers)])
        self.remat = ctx.remat

    def __call__(self, x, bias, *, deterministic, rngs):
        return common.run_layers(self.layer, x, bias, remat=self.remat, deterministic=deterministic, rngs=rngs)


class DistilBertModel(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.embeddings = Embeddings(cfg, ctx)
        self.transformer = Transformer(cfg, ctx)

    def __call__(self, input_ids, attention_mask, position_ids, segment_ids=None, *, deterministic,
                 rngs) -> jax.Array:
        """Packed rows: segment_ids [B, L] (1.. per example, 0 = padding) restart positions and keep
        attention inside each example."""
        if segment_ids is not None and position_ids is None:
            position_ids = common.segment_positions(jnp.asarray(segment_ids))
        input_ids, attention_mask, _, position_ids = common.text_inputs(input_ids, attention_mask, None, position_ids)
        bias = common.mask_bias(attention_mask) if segment_ids is None else common.segment_bias(
            segment_ids, attention_mask)
        x = self.embeddings(input_ids, position_ids, deterministic=deterministic, rngs=rngs)
        return self.transformer(x, bias, deterministic=deterministic, rngs=rngs)


class DistilBertBase(DistilBertModel, HFModel):
    """task "base": HF DistilBertModel (params without prefix); returns last_hidden_state."""

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 pixel_values=None, segment_ids=None, segment_starts=None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None, output_hidden_states: bool = False) -> dict:
        with common.collect_hidden_states(output_hidden_states) as hidden:
            x = DistilBertModel.__call__(self, input_ids, attention_mask, position_ids, segment_ids,
                                         deterministic=deterministic, rngs=rngs)
        return common.with_hidden_states({"last_hidden_state": x}, hidden)


class VocabProjector(nnx.Module):
    """vocab_projector: its weight is tied to the word embeddings, so only its bias is a param here."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.bias = common.param(ctx, (cfg.vocab_size,), ("vocab",), nnx.initializers.zeros)

    def __call__(self, x, embedding: nnx.Embed):
        return embedding.attend(x) + self.bias.get_value().astype(x.dtype)


class DistilBertTask(EncoderTask):
    """DistilBertFor{SequenceClassification,TokenClassification,MaskedLM}: backbone under `distilbert`."""

    def __init__(self, cfg: Any, task: str, ctx: Ctx):
        self.distilbert = DistilBertModel(cfg, ctx)
        if task == "classification":
            self.pre_classifier = common.linear(cfg.dim, cfg.dim, ctx, ("embed", None))
            rate = cfg.seq_classif_dropout if ctx.classifier_dropout is None else ctx.classifier_dropout
            self.dropout = Dropout(rate)
            self.classifier = common.linear(cfg.dim, cfg.num_labels, ctx, (None, None))
        elif task == "token_classification":
            self._init_classifier(cfg.dim, cfg.dropout if ctx.classifier_dropout is None else ctx.classifier_dropout,
                                  cfg, ctx)
        elif task == "masked_lm":
            self.vocab_transform = common.linear(cfg.dim, cfg.dim, ctx, ("embed", None))
            self.act = common.activation(cfg.activation)
            self.vocab_layer_norm = common.layer_norm(cfg.dim, EPS, ctx)
            self.vocab_projector = VocabProjector(cfg, ctx)

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, segment_ids, segment_starts, **kw):
        return self.distilbert(input_ids, attention_mask, position_ids, segment_ids, **kw), None

    def _classify(self, x, pooled, segment_starts, **kw):
        pooled = jax.nn.relu(self.pre_classifier(common.first_tokens(x, segment_starts)))
        return self.classifier(self.dropout(pooled, **kw))

    def _masked_lm(self, x):
        x = self.vocab_layer_norm(self.act(self.vocab_transform(x)))
        return self.vocab_projector(x, self.distilbert.embeddings.word_embeddings)


def check_config(cfg: Any, task: str) -> None:
    if task == "masked_lm" and getattr(cfg, "tie_word_embeddings", True) is False:
        raise UnsupportedModelError("config.json: masked_lm needs tie_word_embeddings=true (an untied "
                                    "vocab_projector is not implemented)")


FAMILY = Family(
    name="distilbert",
    model_types=("distilbert",),
    prefix="distilbert",
    build=base_or_task(DistilBertBase, DistilBertTask),
    head_patterns={
        "base": common.NO_HEAD,
        "classification": r"pre_classifier/.*|classifier/.*",
        "token_classification": r"classifier/.*",
        "masked_lm": r"vocab_transform/.*|vocab_layer_norm/.*|vocab_projector/bias",
    },
    dropout_fields={"hidden": "dropout", "attention": "attention_dropout", "classifier": "seq_classif_dropout"},
    ignore_keys=(r"(distilbert\.)?embeddings\.position_ids", r"vocab_projector\.weight"),
    check_config=check_config,
)
