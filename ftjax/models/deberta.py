"""DeBERTa-v2 / v3 in Flax NNX, with param paths that mirror HF DebertaV2Model / DebertaV2For* state_dict keys.

What is particular to it, on BERT's layer (bert.py) and common.attention / run_layers: disentangled attention,
whose scores add content->position (c2p) and position->content (p2c) terms read from one table of relative
position embeddings (log-bucketed, LayerNormed once per forward, projected by each layer, with its own query
and key projections under share_att_key), all scaled by 1 / sqrt(head_dim * (1 + number of those terms));
embeddings without absolute positions (position_biased_input=False) or token types (type_vocab_size=0),
multiplied by the mask after their LayerNorm; the ContextPooler (dense + activation on the first token).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.hf import UnsupportedModelError
from ftjax.models import bert, common
from ftjax.models.bert import (
    BertAttention,
    BertIntermediate,
    BertLayer,
    BertOnlyMLMHead,
    BertSelfOutput,
)
from ftjax.models.common import Ctx, Dropout, HFModel
from ftjax.models.encoder import EncoderTask
from ftjax.models.registry import Family, base_or_task

POS_ATT_TYPES = ("c2p", "p2c")  # DebertaV2's relative terms (v1's "p2p" does nothing in DebertaV2 either)


def pos_att_types(cfg: Any) -> tuple[str, ...]:
    """The relative terms the config turns on (pos_att_type: a list, or an old "p2c|c2p" string)."""
    types = getattr(cfg, "pos_att_type", None) or []
    if isinstance(types, str):
        types = [t.strip() for t in types.lower().split("|")]
    return tuple(t for t in POS_ATT_TYPES if t in types)


def relative_attention(cfg: Any) -> bool:
    return bool(getattr(cfg, "relative_attention", False))


def relative_geometry(cfg: Any) -> tuple[int, int, int]:
    """(position_buckets (<= 0: none), max_relative_positions, attention span) as HF resolves them: the span
    is the buckets, else max_relative_positions (itself max_position_embeddings when < 1); the relative
    embeddings table has 2 x span rows."""
    max_rel = int(getattr(cfg, "max_relative_positions", -1) or -1)
    if max_rel < 1:
        max_rel = int(cfg.max_position_embeddings)
    buckets = int(getattr(cfg, "position_buckets", -1) or -1)
    return buckets, max_rel, buckets if buckets > 0 else max_rel


def log_bucket_position(relative: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
    """HF's make_log_bucket_position in float32 numpy (bit-equal to torch's): |r| < bucket_size // 2 stays r,
    farther distances go to mid + ceil(log(|r| / mid) / log((max_position - 1) / mid) * (mid - 1)), signed."""
    relative = np.asarray(relative, np.int64)
    mid = bucket_size // 2
    far = np.where((relative < mid) & (relative > -mid), mid - 1, np.abs(relative))
    ratio = np.log(far.astype(np.float32) / np.float32(mid)) / np.log(np.float32((max_position - 1) / mid))
    log_pos = np.ceil(ratio * np.float32(mid - 1)) + np.float32(mid)
    return np.where(far <= mid, relative.astype(np.float32), log_pos * np.sign(relative)).astype(np.int64)


@functools.lru_cache(maxsize=64)
def relative_window(length: int, buckets: int, max_rel: int, span: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(c2p index [L, L], p2c index [L, L], first row, rows) of a length-L sequence: the relative embedding rows
    first..first+rows-1 its queries and keys use (all 2 x span of them in HF, which projects the whole table;
    the others never reach a score), and per (query i, key j) the row within that window of HF's gathers:
    c2p reads clip(delta(i, j) + span), p2c clip(span - delta(j, i)), with delta(i, j) the bucketed i - j."""
    ids = np.arange(length)
    delta = ids[:, None] - ids[None, :]
    if buckets > 0 and max_rel > 0:
        delta = log_bucket_position(delta, buckets, max_rel)
    c2p = np.clip(delta + span, 0, 2 * span - 1)
    p2c = np.clip(-delta + span, 0, 2 * span - 1)  # [key i, query j], as HF's gather before its transpose
    first = int(min(c2p.min(), p2c.min()))
    rows = int(max(c2p.max(), p2c.max())) + 1 - first
    return (c2p - first).astype(np.int32), (p2c - first).astype(np.int32), first, rows


def window_rows(cfg: Any, length: int) -> int:
    """How many relative embedding rows a length-`length` sequence projects and scores against (ftjax.flops)."""
    return relative_window(length, *relative_geometry(cfg))[3]


class DisentangledSelfAttention(nnx.Module):
    """query_proj / key_proj / value_proj, and the relative terms: c2p = q . pos_key[c2p index], p2c =
    k . pos_query[p2c index] (transposed), pos_key / pos_query the window of relative embeddings projected by
    pos_key_proj / pos_query_proj, or by key_proj / query_proj themselves under share_att_key."""

    def __init__(self, cfg: Any, ctx: Ctx):
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.query_proj = common.linear(h, h, ctx, ("embed", "heads"))
        self.key_proj = common.linear(h, h, ctx, ("embed", "heads"))
        self.value_proj = common.linear(h, h, ctx, ("embed", "heads"))
        self.types = pos_att_types(cfg)
        self.relative = relative_attention(cfg)
        self.share_att_key = bool(getattr(cfg, "share_att_key", False))
        # HF counts the terms of pos_att_type even when relative_attention is off.
        self.scale = 1.0 / math.sqrt((h // self.num_heads) * (1 + len(self.types)))
        self.geometry = relative_geometry(cfg)
        own = self.relative and not self.share_att_key  # separate projections of the relative embeddings
        self.pos_dropout = Dropout(cfg.hidden_dropout_prob) if self.relative else None
        self.pos_key_proj = common.linear(h, h, ctx, ("embed", "heads")) if own and "c2p" in self.types else None
        self.pos_query_proj = common.linear(h, h, ctx, ("embed", "heads")) if own and "p2c" in self.types else None
        self.dropout = Dropout(cfg.attention_probs_dropout_prob)

    def __call__(self, x, extra, *, deterministic, rngs):
        """x [B, L, H]; extra = (allowed bool [B, 1, L, L] or None, relative embeddings [2 span, H] or None)."""
        allowed, rel = extra
        q, k, v = (common.split_heads(f(x), self.num_heads) for f in (self.query_proj, self.key_proj, self.value_proj))
        bias = None
        if self.relative and self.types:
            bias = self._relative_scores(q, k, rel, deterministic=deterministic, rngs=rngs)
        if allowed is not None:  # masked scores set to the float32 minimum, as HF's masked_fill
            bias = jnp.where(allowed, 0.0 if bias is None else bias, jnp.finfo(jnp.float32).min)
        out = common.attention(q, k, v, bias, self.dropout, deterministic=deterministic, rngs=rngs, scale=self.scale)
        return common.merge_heads(out)

    def _relative_scores(self, q, k, rel, *, deterministic, rngs) -> jax.Array:
        """(c2p + p2c) * scale, float32 [B, heads, L, L]."""
        c2p_index, p2c_index, first, rows = relative_window(q.shape[1], *self.geometry)
        rel = self.pos_dropout(rel[first:first + rows], deterministic=deterministic, rngs=rngs)
        score = 0.0

        def scores(x, proj, index):  # x [B, L, heads, d] . proj(rel) [rows, heads, d], gathered per (i, j)
            pos = common.split_heads(proj(rel), self.num_heads)
            full = jnp.einsum("blhd,rhd->bhlr", x, pos, preferred_element_type=jnp.float32)
            return jnp.take_along_axis(full, jnp.asarray(index)[None, None], axis=-1, mode="promise_in_bounds")

        if "c2p" in self.types:
            score = score + scores(q, self.key_proj if self.share_att_key else self.pos_key_proj, c2p_index)
        if "p2c" in self.types:
            p2c = scores(k, self.query_proj if self.share_att_key else self.pos_query_proj, p2c_index)
            score = score + jnp.swapaxes(p2c, -1, -2)
        return score * jnp.float32(self.scale)


class DebertaV2Attention(BertAttention):
    """BERT's attention block (self -> output: dense, dropout, LayerNorm(x + residual)) on disentangled self."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.self = DisentangledSelfAttention(cfg, ctx)
        self.output = BertSelfOutput(cfg, ctx, cfg.hidden_size, ("heads", "embed"))


class DebertaV2Layer(BertLayer):
    """BERT's post-LN layer; its `bias` argument carries (allowed mask, relative embeddings)."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.attention = DebertaV2Attention(cfg, ctx)
        self.intermediate = BertIntermediate(cfg, ctx)
        self.output = BertSelfOutput(cfg, ctx, cfg.intermediate_size, ("mlp", "embed"))


def embedding_size(cfg: Any) -> int:
    return int(getattr(cfg, "embedding_size", None) or cfg.hidden_size)


class DebertaV2Embeddings(nnx.Module):
    """word (+ absolute positions if position_biased_input, + token types if type_vocab_size > 0), embed_proj
    when embedding_size != hidden_size, LayerNorm, times the mask (padding zeroed), dropout."""

    def __init__(self, cfg: Any, ctx: Ctx):
        e, h = embedding_size(cfg), cfg.hidden_size
        self.word_embeddings = common.embed(cfg.vocab_size, e, ctx, ("vocab", "embed"))
        positions = bool(getattr(cfg, "position_biased_input", True))
        self.position_embeddings = common.embed(cfg.max_position_embeddings, e, ctx) if positions else None
        types = int(cfg.type_vocab_size)
        self.token_type_embeddings = common.embed(types, e, ctx) if types > 0 else None
        self.embed_proj = common.linear(e, h, ctx, (None, "embed"), use_bias=False) if e != h else None
        self.LayerNorm = common.layer_norm(h, cfg.layer_norm_eps, ctx)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, position_ids, valid, *, deterministic, rngs):
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = self.LayerNorm(x)
        if valid is not None:
            x = x * valid[..., None].astype(x.dtype)
        return self.dropout(x, deterministic=deterministic, rngs=rngs)


class DebertaV2Encoder(nnx.Module):
    """The layers, the relative embeddings (2 x span rows) and their LayerNorm (norm_rel_ebd="layer_norm"),
    applied once per forward; every layer gets the same normalised table."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.layer = nnx.List([DebertaV2Layer(cfg, ctx) for _ in range(cfg.num_hidden_layers)])
        rows = 2 * relative_geometry(cfg)[2]
        self.rel_embeddings = common.embed(rows, cfg.hidden_size, ctx) if relative_attention(cfg) else None
        norm = [x.strip() for x in str(getattr(cfg, "norm_rel_ebd", "none") or "none").lower().split("|")]
        self.LayerNorm = common.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, ctx) if "layer_norm" in norm else None
        self.remat, self.dtype = ctx.remat, ctx.dtype

    def __call__(self, x, allowed, *, deterministic, rngs):
        rel = None
        if self.rel_embeddings is not None:
            rel = self.rel_embeddings.embedding.get_value().astype(self.dtype)
            if self.LayerNorm is not None:
                rel = self.LayerNorm(rel)
        return common.run_layers(self.layer, x, (allowed, rel), remat=self.remat, deterministic=deterministic,
                                 rngs=rngs)


def attention_masks(attention_mask: Any, segment_ids: Any) -> tuple[jax.Array | None, jax.Array | None]:
    """(valid tokens bool [B, L], allowed (query, key) pairs bool [B, 1, L, L]), None without a mask. As HF, a
    pair needs both tokens valid (a padded query's scores are all masked); packed rows add the same segment."""
    if segment_ids is None:
        if attention_mask is None:
            return None, None
        valid = jnp.asarray(attention_mask) > 0
        return valid, valid[:, None, :, None] & valid[:, None, None, :]
    seg = jnp.asarray(segment_ids)
    valid = seg > 0 if attention_mask is None else (seg > 0) & (jnp.asarray(attention_mask) > 0)
    same = seg[:, None, :, None] == seg[:, None, None, :]
    return valid, same & valid[:, None, :, None] & valid[:, None, None, :]


class DebertaV2Model(nnx.Module):
    """The backbone (HF DebertaV2Model). Packed rows: `segment_ids` [B, L] (1.. per example, 0 = padding) keep
    attention inside each example (relative positions need nothing more: they are differences) and restart
    absolute positions where the config has them."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.embeddings = DebertaV2Embeddings(cfg, ctx)
        self.encoder = DebertaV2Encoder(cfg, ctx)

    def __call__(self, input_ids, attention_mask, token_type_ids, position_ids, segment_ids=None, *,
                 deterministic, rngs):
        if input_ids is None:
            raise ValueError("input_ids is required for a text model (got None)")
        input_ids = jnp.asarray(input_ids)
        if position_ids is None:
            position_ids = bert.positions(input_ids, None, segment_ids)
        input_ids, attention_mask, token_type_ids, position_ids = common.text_inputs(
            input_ids, attention_mask, token_type_ids, position_ids)
        valid, allowed = attention_masks(attention_mask, segment_ids)
        x = self.embeddings(input_ids, token_type_ids, position_ids, valid, deterministic=deterministic, rngs=rngs)
        return self.encoder(x, allowed, deterministic=deterministic, rngs=rngs)


class DebertaV2Base(DebertaV2Model, HFModel):
    """task "base": HF DebertaV2Model itself (params without prefix); returns last_hidden_state."""

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 pixel_values=None, segment_ids=None, segment_starts=None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None, output_hidden_states: bool = False) -> dict:
        with common.collect_hidden_states(output_hidden_states) as hidden:
            x = DebertaV2Model.__call__(self, input_ids, attention_mask, token_type_ids, position_ids, segment_ids,
                                        deterministic=deterministic, rngs=rngs)
        return common.with_hidden_states({"last_hidden_state": x}, hidden)


class ContextPooler(nnx.Module):
    """pooler: dropout(pooler_dropout) -> dense -> pooler_hidden_act on the first token."""

    def __init__(self, cfg: Any, ctx: Ctx):
        size = int(getattr(cfg, "pooler_hidden_size", None) or cfg.hidden_size)
        self.dense = common.linear(size, size, ctx, ("embed", None))
        self.dropout = Dropout(float(getattr(cfg, "pooler_dropout", 0.0) or 0.0))
        self.act = common.activation(getattr(cfg, "pooler_hidden_act", "gelu"))

    def __call__(self, x, segment_starts=None, *, deterministic, rngs):
        x = self.dropout(common.first_tokens(x, segment_starts), deterministic=deterministic, rngs=rngs)
        return self.act(self.dense(x))


class DebertaV2LMPredictionHead(nnx.Module):
    """lm_predictions/lm_head (legacy=false): dense -> act -> LayerNorm -> word embeddings + bias."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.dense = common.linear(cfg.hidden_size, cfg.hidden_size, ctx, ("embed", None))
        self.act = common.activation(cfg.hidden_act)
        self.LayerNorm = common.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, ctx)
        self.bias = common.param(ctx, (cfg.vocab_size,), ("vocab",), nnx.initializers.zeros)

    def __call__(self, x, embedding: nnx.Embed):
        return embedding.attend(self.LayerNorm(self.act(self.dense(x)))) + self.bias.get_value().astype(x.dtype)


class DebertaV2OnlyMLMHead(nnx.Module):
    def __init__(self, cfg: Any, ctx: Ctx):
        self.lm_head = DebertaV2LMPredictionHead(cfg, ctx)


def classifier_rate(cfg: Any, ctx: Ctx, field: str) -> float:
    """The head's dropout: the classifier override, else config `field` (cls_dropout), else hidden_dropout_prob."""
    if ctx.classifier_dropout is not None:
        return ctx.classifier_dropout
    rate = getattr(cfg, field, None)
    return cfg.hidden_dropout_prob if rate is None else float(rate)


class DebertaV2Task(EncoderTask):
    """DebertaV2For{SequenceClassification,TokenClassification,MaskedLM}: backbone under `deberta` plus the
    head: ContextPooler + classifier; classifier per token; the masked LM, cls/predictions (legacy, BERT's)
    or lm_predictions/lm_head, both tied to the word embeddings."""

    def __init__(self, cfg: Any, task: str, ctx: Ctx):
        self.deberta = DebertaV2Model(cfg, ctx)
        if task == "classification":
            self.pooler = ContextPooler(cfg, ctx)
            self._init_classifier(cfg.hidden_size, classifier_rate(cfg, ctx, "cls_dropout"), cfg, ctx)
        elif task == "token_classification":  # HF: hidden_dropout_prob (cls_dropout is the pooled head's)
            self._init_classifier(cfg.hidden_size, classifier_rate(cfg, ctx, "hidden_dropout_prob"), cfg, ctx)
        elif task == "masked_lm":
            self.legacy = bool(getattr(cfg, "legacy", True))
            if self.legacy:
                self.cls = BertOnlyMLMHead(cfg, ctx)
            else:
                self.lm_predictions = DebertaV2OnlyMLMHead(cfg, ctx)

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, segment_ids, segment_starts, **kw):
        return self.deberta(input_ids, attention_mask, token_type_ids, position_ids, segment_ids, **kw), None

    def _classify(self, x, pooled, segment_starts, **kw):
        return self.classifier(self.dropout(self.pooler(x, segment_starts, **kw), **kw))

    def _masked_lm(self, x):
        head = self.cls.predictions if self.legacy else self.lm_predictions.lm_head
        return head(x, self.deberta.embeddings.word_embeddings)


HEAD_PATTERNS = {
    "base": common.NO_HEAD,
    "classification": r"classifier/.*|pooler/.*",
    "token_classification": r"classifier/.*",
    "masked_lm": r"cls/.*|lm_predictions/.*",
}
DROPOUT_FIELDS = {"hidden": "hidden_dropout_prob", "attention": "attention_probs_dropout_prob",
                  "classifier": "cls_dropout"}


def check_config(cfg: Any, task: str) -> None:
    """Rejects DeBERTa-v2 config features the NNX code does not implement (instead of silently differing)."""
    if int(getattr(cfg, "conv_kernel_size", 0) or 0) > 0:
        raise UnsupportedModelError(
            f"config.json: conv_kernel_size={cfg.conv_kernel_size} (DeBERTa-v2's convolution after the first layer, "
            "as in deberta-v2-xlarge) is not implemented; supported: 0 (DeBERTa-v3 configs)")
    if task == "masked_lm" and embedding_size(cfg) != cfg.hidden_size:
        raise UnsupportedModelError(f"config.json: masked_lm needs embedding_size == hidden_size (got "
                                    f"{embedding_size(cfg)} and {cfg.hidden_size})")
    if task == "masked_lm" and getattr(cfg, "legacy", True) and getattr(cfg, "tie_word_embeddings", True) is False:
        raise UnsupportedModelError("config.json: masked_lm with legacy=true needs tie_word_embeddings=true (an "
                                    "untied decoder is not implemented)")


FAMILY = Family(
    name="deberta",
    model_types=("deberta-v2",),
    prefix="deberta",
    build=base_or_task(DebertaV2Base, DebertaV2Task),
    head_patterns=HEAD_PATTERNS,
    dropout_fields=DROPOUT_FIELDS,
    # position_ids: a buffer; cls.predictions.decoder: tied copies; mask_predictions: the ELECTRA-style
    # pretraining discriminator in DeBERTa-v3 checkpoints (HF's DebertaV2ForMaskedLM drops it too).
    ignore_keys=(r"(deberta\.)?embeddings\.position_ids", r"cls\.predictions\.decoder\.(weight|bias)",
                 r"mask_predictions\..*"),
    check_config=check_config,
)
