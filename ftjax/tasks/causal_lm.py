"""Causal language modelling: packed documents (or prompt/completion pairs with the loss on the completion),
next-token cross-entropy that never crosses a document boundary, and perplexity."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ftjax import losses as losses_lib
from ftjax import metrics as metrics_lib
from ftjax.data import lm
from ftjax.tasks.base import F32, I32, Task
from ftjax.tasks.tokens import token_loss_sum


def causal_lm_loss_sum(logits, labels, segment_ids=None):
    """token_loss_sum with HF's shift: logits at t predict labels[t + 1] (labels are the input ids, -100 where no
    loss); with packed rows (segment_ids) never across a document boundary."""
    return token_loss_sum(logits, losses_lib.causal_targets(labels, segment_ids))


@dataclasses.dataclass(frozen=True)
class CausalLM(Task):
    def build_data(self, cfg, tokenizer, *, process_index, process_count, data_parallel):
        return lm.build(cfg, tokenizer, process_index=process_index, process_count=process_count)

    def structure(self, rows, length, segments, image_size):
        row = (rows, length[0])  # packed documents (ftjax/data/document_packing.py)
        keys = ("input_ids", "attention_mask", "position_ids", "segment_ids", "labels")
        return {**{k: (row, I32) for k in keys}, "weights": ((rows,), F32)}

    def planned_lengths(self, cfg, packed):
        return ((int(cfg.data.max_len), None),)

    def token_targets(self, batch):
        return losses_lib.causal_targets(batch["labels"], batch.get("segment_ids"))

    def position_weights(self, batch):  # the positions whose next token is labelled
        labelled = (self.token_targets(batch) != losses_lib.IGNORE).astype(jnp.float32)
        return labelled * batch["weights"].astype(jnp.float32)[:, None]

    def logits_loss(self, logits, batch, label_smoothing):
        loss_sum, tokens = causal_lm_loss_sum(logits, batch["labels"], batch.get("segment_ids"))
        w = batch["weights"].astype(jnp.float32)
        return (loss_sum * w).sum(), (tokens * w).sum()

    def hidden_loss(self, out, batch, label_smoothing, chunk_tokens):
        return super().hidden_loss(out, batch, 0.0, chunk_tokens)  # the causal-LM loss is unsmoothed

    def metrics(self, loss_sum, weight, sums):
        result = super().metrics(loss_sum, weight, sums)
        return {**result, "perplexity": metrics_lib.perplexity(result["loss"])}


CAUSAL_LM = CausalLM("causal_lm", "causal_lm", chunkable=True)
