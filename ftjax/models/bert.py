"""BERT in Flax NNX, with param paths that mirror HF BertModel / BertFor* state_dict keys.

RoBERTa and XLM-RoBERTa reuse the backbone (roberta.py); only positions and the classification head differ.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.hf import UnsupportedModelError
from ftjax.models import common
from ftjax.models.common import Ctx, Dropout, HFModel
from ftjax.models.encoder import EncoderTask
from ftjax.models.registry import Family, base_or_task


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        h = cfg.hidden_size
        self.word_embeddings = common.embed(cfg.vocab_size, h, ctx, ("vocab", "embed"))
        self.position_embeddings = common.embed(cfg.max_position_embeddings, h, ctx)
        self.token_type_embeddings = common.embed(cfg.type_vocab_size, h, ctx)
        self.LayerNorm = common.layer_norm(h, cfg.layer_norm_eps, ctx)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, position_ids, *, deterministic, rngs):
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x), deterministic=deterministic, rngs=rngs)


class BertSelfAttention(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.query = common.linear(h, h, ctx, ("embed", "heads"))
        self.key = common.linear(h, h, ctx, ("embed", "heads"))
        self.value = common.linear(h, h, ctx, ("embed", "heads"))
        self.dropout = Dropout(cfg.attention_probs_dropout_prob)

    def __call__(self, x, bias, *, deterministic, rngs):
        q, k, v = (common.split_heads(f(x), self.num_heads) for f in (self.query, self.key, self.value))
        out = common.attention(q, k, v, bias, self.dropout, deterministic=deterministic, rngs=rngs)
        return common.merge_heads(out)


class BertSelfOutput(nnx.Module):
    """dense -> dropout -> LayerNorm(x + residual); also BertOutput with din=intermediate_size."""

    def __init__(self, cfg: Any, ctx: Ctx, din: int, axes: tuple):
        self.dense = common.linear(din, cfg.hidden_size, ctx, axes)
        self.LayerNorm = common.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, ctx)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def __call__(self, x, residual, *, deterministic, rngs):
        x = self.dropout(self.dense(x), deterministic=deterministic, rngs=rngs)
        return self.LayerNorm(x + residual)


class BertAttention(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.self = BertSelfAttention(cfg, ctx)
        self.output = BertSelfOutput(cfg, ctx, cfg.hidden_size, ("heads", "embed"))

    def __call__(self, x, bias, *, deterministic, rngs):
        a = self.self(x, bias, deterministic=deterministic, rngs=rngs)
        return self.output(a, x, deterministic=deterministic, rngs=rngs)


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.dense = common.linear(cfg.hidden_size, cfg.intermediate_size, ctx, ("embed", "mlp"))
        self.act = common.activation(cfg.hidden_act)

    def __call__(self, x):
        return self.act(self.dense(x))


class BertLayer(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.attention = BertAttention(cfg, ctx)
        self.intermediate = BertIntermediate(cfg, ctx)
        self.output = BertSelfOutput(cfg, ctx, cfg.intermediate_size, ("mlp", "embed"))

    def __call__(self, x, bias, *, deterministic, rngs):
        a = self.attention(x, bias, deterministic=deterministic, rngs=rngs)
        return self.output(self.intermediate(a), a, deterministic=deterministic, rngs=rngs)


class BertEncoder(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.layer = nnx.List([BertLayer(cfg, ctx) for _ in range(cfg.num_hidden_layers)])
        self.remat = ctx.remat

    def __call__(self, x, bias, *, deterministic, rngs):
        return common.run_layers(self.layer, x, bias, remat=self.remat, deterministic=deterministic, rngs=rngs)


class BertPooler(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.dense = common.linear(cfg.hidden_size, cfg.hidden_size, ctx, ("embed", None))

    def __call__(self, x, segment_starts=None):
        return jnp.tanh(self.dense(common.first_tokens(x, segment_starts)))


def positions(input_ids: jax.Array, pad_id: int | None, segment_ids: jax.Array | None = None) -> jax.Array:
    """Default position ids: 0..L-1 (BERT), or RoBERTa's pad_id+1.. counting only non-pad tokens; in packed
    rows (segment_ids) both restart at each example, as if it were alone in its row."""
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids)
        pos = common.segment_positions(seg)
        return pos if pad_id is None else jnp.where(seg > 0, pos + pad_id + 1, pad_id)
    if pad_id is None:
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    mask = (input_ids != pad_id).astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask + pad_id


class BertModel(nnx.Module):
    """The backbone (HF BertModel). `pad_positions`: RoBERTa-style position ids from the pad token.

    Packed rows: `segment_ids` [B, L] (1.. per example, 0 = padding) keep attention inside each example and
    restart positions; `segment_starts` [B, S] (each example's first token) make the pooler [B, S, H]."""

    def __init__(self, cfg: Any, ctx: Ctx, *, add_pooling_layer: bool, pad_positions: bool = False):
        self.embeddings = BertEmbeddings(cfg, ctx)
        self.encoder = BertEncoder(cfg, ctx)
        self.pooler = BertPooler(cfg, ctx) if add_pooling_layer else None
        self.pad_id = int(cfg.pad_token_id) if pad_positions else None

    def __call__(self, input_ids, attention_mask, token_type_ids, position_ids, segment_ids=None,
                 segment_starts=None, *, deterministic, rngs):
        if input_ids is None:
            raise ValueError("input_ids is required for a text model (got None)")
        input_ids = jnp.asarray(input_ids)
        if position_ids is None:
            position_ids = positions(input_ids, self.pad_id, segment_ids)
        input_ids, attention_mask, token_type_ids, position_ids = common.text_inputs(
            input_ids, attention_mask, token_type_ids, position_ids
        )
        bias = common.mask_bias(attention_mask) if segment_ids is None else common.segment_bias(
            segment_ids, attention_mask)
        x = self.embeddings(input_ids, token_type_ids, position_ids, deterministic=deterministic, rngs=rngs)
        x = self.encoder(x, bias, deterministic=deterministic, rngs=rngs)
        return x, (self.pooler(x, segment_starts) if self.pooler is not None else None)


class BertBase(BertModel, HFModel):
    """task "base": HF BertModel itself (params without prefix), returns last_hidden_state + pooler_output."""

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 pixel_values=None, segment_ids=None, segment_starts=None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None, output_hidden_states: bool = False) -> dict:
        with common.collect_hidden_states(output_hidden_states) as hidden:
            x, pooled = BertModel.__call__(self, input_ids, attention_mask, token_type_ids, position_ids,
                                           segment_ids, segment_starts, deterministic=deterministic, rngs=rngs)
        out = {"last_hidden_state": x}
        if pooled is not None:
            out["pooler_output"] = pooled
        return common.with_hidden_states(out, hidden)


class BertLMPredictionHead(nnx.Module):
    """cls/predictions: transform (dense, act, LayerNorm) then the tied word embeddings + bias."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.transform = _Transform(cfg, ctx)
        self.bias = common.param(ctx, (cfg.vocab_size,), ("vocab",), nnx.initializers.zeros)

    def __call__(self, x, embedding: nnx.Embed):
        return embedding.attend(self.transform(x)) + self.bias.get_value().astype(x.dtype)


class _Transform(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.dense = common.linear(cfg.hidden_size, cfg.hidden_size, ctx, ("embed", None))
        self.act = common.activation(cfg.hidden_act)
        self.LayerNorm = common.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, ctx)

    def __call__(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class BertOnlyMLMHead(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.predictions = BertLMPredictionHead(cfg, ctx)


def classifier_rate(cfg: Any, ctx: Ctx) -> float:
    if ctx.classifier_dropout is not None:
        return ctx.classifier_dropout
    rate = getattr(cfg, "classifier_dropout", None)
    return cfg.hidden_dropout_prob if rate is None else rate


class BertTask(EncoderTask):
    """BertFor{SequenceClassification,TokenClassification,MaskedLM}: backbone under `bert` plus the head."""

    def __init__(self, cfg: Any, task: str, ctx: Ctx):
        self.bert = BertModel(cfg, ctx, add_pooling_layer=task == "classification")
        if task in ("classification", "token_classification"):
            self._init_classifier(cfg.hidden_size, classifier_rate(cfg, ctx), cfg, ctx)
        elif task == "masked_lm":
            self.cls = BertOnlyMLMHead(cfg, ctx)

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, segment_ids, segment_starts, **kw):
        return self.bert(input_ids, attention_mask, token_type_ids, position_ids, segment_ids, segment_starts, **kw)

    def _classify(self, x, pooled, segment_starts, **kw):
        return self.classifier(self.dropout(pooled, **kw))

    def _masked_lm(self, x):
        return self.cls.predictions(x, self.bert.embeddings.word_embeddings)


HEAD_PATTERNS = {
    "base": r"pooler/.*",
    "classification": r"classifier/.*|bert/pooler/.*",
    "token_classification": r"classifier/.*",
    "masked_lm": r"cls/.*",
}
DROPOUT_FIELDS = {  # also RoBERTa's (roberta.py).
    "hidden": "hidden_dropout_prob",
    "attention": "attention_probs_dropout_prob",
    "classifier": "classifier_dropout",
}


def check_config(cfg: Any, task: str) -> None:
    """Rejects BERT-style config features the NNX code does not implement (instead of silently differing)."""
    kind = getattr(cfg, "position_embedding_type", "absolute") or "absolute"
    if kind != "absolute":
        raise UnsupportedModelError(f"config.json: position_embedding_type={kind!r} is not supported; only 'absolute'")
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise UnsupportedModelError("config.json: is_decoder/add_cross_attention models are not supported")
    if task == "masked_lm" and getattr(cfg, "tie_word_embeddings", True) is False:
        raise UnsupportedModelError("config.json: masked_lm needs tie_word_embeddings=true (an untied decoder "
                                    "is not implemented)")


FAMILY = Family(
    name="bert",
    model_types=("bert",),
    prefix="bert",
    build=base_or_task(functools.partial(BertBase, add_pooling_layer=True), BertTask),
    head_patterns=HEAD_PATTERNS,
    dropout_fields=DROPOUT_FIELDS,
    ignore_keys=(r"(bert\.)?embeddings\.position_ids", r"cls\.predictions\.decoder\.(weight|bias)"),
    check_config=check_config,
)
