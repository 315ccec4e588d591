"""RoBERTa and XLM-RoBERTa: the BERT backbone with pad-offset positions and RoBERTa's heads.

Param paths mirror HF RobertaModel / RobertaFor* (XLMRoberta* use the same keys under "roberta").
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from ftjax.models import common
from ftjax.models.bert import (
    DROPOUT_FIELDS,
    HEAD_PATTERNS,
    TASKS,
    BertBase,
    BertModel,
    check_config,
    classifier_rate,
)
from ftjax.models.common import Ctx, Dropout, HFModel
from ftjax.models.registry import Family


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


class RobertaTask(HFModel):
    """RobertaFor{SequenceClassification,TokenClassification,MaskedLM}: backbone under `roberta`."""

    def __init__(self, cfg: Any, task: str, ctx: Ctx):
        self.roberta = BertModel(cfg, ctx, add_pooling_layer=False, pad_positions=True)
        if task == "classification":
            self.classifier = RobertaClassificationHead(cfg, ctx)
        elif task == "token_classification":
            self.dropout = Dropout(classifier_rate(cfg, ctx))
            self.classifier = common.linear(cfg.hidden_size, cfg.num_labels, ctx, ("embed", None))
        elif task == "masked_lm":
            self.lm_head = RobertaLMHead(cfg, ctx)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 pixel_values=None, segment_ids=None, segment_starts=None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None, output_hidden_states: bool = False) -> dict:
        """As BertTask: packed rows (segment_ids, segment_starts) give classification logits [B, S, C]."""
        kw = {"deterministic": deterministic, "rngs": rngs}
        common.check_packed(self.task, segment_ids, segment_starts)
        with common.collect_hidden_states(output_hidden_states) as hidden:
            x, _ = self.roberta(input_ids, attention_mask, token_type_ids, position_ids, segment_ids, **kw)
        if self.task == "classification":
            out = {"logits": self.classifier(x, segment_starts, **kw)}
        elif self.task == "token_classification":
            out = {"logits": self.classifier(self.dropout(x, **kw))}
        else:
            out = {"logits": self.lm_head(x, self.roberta.embeddings.word_embeddings)}
        return common.with_hidden_states(out, hidden)


def build(cfg: Any, task: str, ctx: Ctx) -> HFModel:
    if task == "base":
        return BertBase(cfg, ctx, add_pooling_layer=True, pad_positions=True)
    return RobertaTask(cfg, task, ctx)


FAMILY = Family(
    name="roberta",
    model_types=("roberta", "xlm-roberta"),
    tasks=TASKS,
    prefix="roberta",
    build=build,
    # The base model is BERT's (pooler included); the task heads sit elsewhere than BERT's.
    head_patterns={**HEAD_PATTERNS, "classification": r"classifier/.*", "masked_lm": r"lm_head/.*"},
    dropout_fields=DROPOUT_FIELDS,
    ignore_keys=(r"(roberta\.)?embeddings\.position_ids", r"lm_head\.decoder\.(weight|bias)"),
    check_config=check_config,
)
