"""RoBERTa and XLM-RoBERTa: the BERT backbone with pad-offset positions and RoBERTa's heads.

Param paths mirror HF RobertaModel / RobertaFor* (XLMRoberta* use the same keys under "roberta").
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from flax import nnx

from ftjax.models import common
from ftjax.models.bert import (
    DROPOUT_FIELDS,
    HEAD_PATTERNS,
    BertBase,
    BertModel,
    check_config,
    classifier_rate,
)
from ftjax.models.common import Ctx, Dropout
from ftjax.models.encoder import EncoderTask
from ftjax.models.registry import Family, base_or_task


class RobertaClassificationHead(nnx.Module):
    """classifier: dropout -> dense -> tanh -> dropout -> out_proj on the first (<s>) token."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.dense = common.linear(cfg.hidden_size, cfg.hidden_size, ctx, ("embed", None))
        self.dropout = Dropout(classifier_rate(cfg, ctx))
        self.out_proj = common.linear(cfg.hidden_size, cfg.num_labels, ctx, (None, None))

    def __call__(self, x, segment_starts=None, *, deterministic, rngs):
        x = self.dropout(common.first_tokens(x, segment_starts), deterministic=deterministic, rngs=rngs)
        x = self.dropout(jnp.tanh(self.dense(x)), deterministic=deterministic, rngs=rngs)
        return self.out_proj(x)


class RobertaLMHead(nnx.Module):
    """lm_head: dense -> gelu -> layer_norm -> tied word embeddings + bias."""

    def __init__(self, cfg: Any, ctx: Ctx):
        self.dense = common.linear(cfg.hidden_size, cfg.hidden_size, ctx, ("embed", None))
        self.layer_norm = common.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, ctx)
        self.bias = common.param(ctx, (cfg.vocab_size,), ("vocab",), nnx.initializers.zeros)

    def __call__(self, x, embedding: nnx.Embed):
        x = self.layer_norm(common.ACTIVATIONS["gelu"](self.dense(x)))
        return embedding.attend(x) + self.bias.get_value().astype(x.dtype)


class RobertaTask(EncoderTask):
    """RobertaFor{SequenceClassification,TokenClassification,MaskedLM}: backbone under `roberta`."""

    def __init__(self, cfg: Any, task: str, ctx: Ctx):
        self.roberta = BertModel(cfg, ctx, add_pooling_layer=False, pad_positions=True)
        if task == "classification":
            self.classifier = RobertaClassificationHead(cfg, ctx)
        elif task == "token_classification":
            self._init_classifier(cfg.hidden_size, classifier_rate(cfg, ctx), cfg, ctx)
        elif task == "masked_lm":
            self.lm_head = RobertaLMHead(cfg, ctx)

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, segment_ids, segment_starts, **kw):
        return self.roberta(input_ids, attention_mask, token_type_ids, position_ids, segment_ids, **kw)

    def _classify(self, x, pooled, segment_starts, **kw):
        return self.classifier(x, segment_starts, **kw)

    def _masked_lm(self, x):
        return self.lm_head(x, self.roberta.embeddings.word_embeddings)


FAMILY = Family(
    name="roberta",
    model_types=("roberta", "xlm-roberta"),
    prefix="roberta",
    build=base_or_task(functools.partial(BertBase, add_pooling_layer=True, pad_positions=True), RobertaTask),
    # The base model is BERT's (pooler included); the task heads sit elsewhere than BERT's.
    head_patterns={**HEAD_PATTERNS, "classification": r"classifier/.*", "masked_lm": r"lm_head/.*"},
    dropout_fields=DROPOUT_FIELDS,
    ignore_keys=(r"(roberta\.)?embeddings\.position_ids", r"lm_head\.decoder\.(weight|bias)"),
    check_config=check_config,
)
