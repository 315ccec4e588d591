"""Sequence to sequence (T5, BART, Marian): (source, target) pairs bucketed by both lengths, a token-level
cross-entropy over the labelled target tokens with HF's label smoothing, and perplexity (generation metrics
come from callbacks/seq2seq_eval.py)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ftjax import losses as losses_lib
from ftjax import metrics as metrics_lib
from ftjax.data import seq2seq
from ftjax.tasks.base import F32, I32, Task


def seq2seq_loss_sum(logits, labels, label_smoothing=0.0):
    """Per-example (sum of target-token losses, labelled tokens) of decoder logits [B, T, V] against labels
    [B, T] (logits at t predict labels[t]; -100 ignored). Label smoothing as HF's LabelSmoother:
    (1 - e) * nll + e * mean over the vocabulary of -log p."""
    loss = losses_lib.token_losses(logits, labels, label_smoothing)
    return loss.sum(-1), (labels != losses_lib.IGNORE).sum(-1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Seq2Seq(Task):
    def build_data(self, cfg, tokenizer, *, process_index, process_count, data_parallel):
        return seq2seq.build(cfg, tokenizer, process_index=process_index, process_count=process_count)

    def structure(self, rows, length, segments, image_size):
        source, target = length
        row, tgt = (rows, source), (rows, target)
        return {"input_ids": (row, I32), "attention_mask": (row, I32), "decoder_input_ids": (tgt, I32),
                "decoder_attention_mask": (tgt, I32), "labels": (tgt, I32), "weights": ((rows,), F32)}

    def planned_lengths(self, cfg, packed):
        """(source, target) pairs from data.seq2seq.buckets when given as pairs, else only the last one,
        (max_len, max_target_len), is known."""
        d = cfg.data
        spec, last = d.seq2seq.buckets, (int(d.max_len), int(d.seq2seq.max_target_len))
        return tuple((int(a), int(b)) for a, b in spec) if not isinstance(spec, int) else (last,)

    def bundle_lengths(self, bundle):
        return tuple((int(s), int(t)) for s, t in bundle.seq2seq_pairs)

    def position_weights(self, batch):
        labelled = (batch["labels"] != losses_lib.IGNORE).astype(jnp.float32)
        return labelled * batch["weights"].astype(jnp.float32)[:, None]

    def logits_loss(self, logits, batch, label_smoothing):
        loss_sum, tokens = seq2seq_loss_sum(logits, batch["labels"], label_smoothing)
        w = batch["weights"].astype(jnp.float32)
        return (loss_sum * w).sum(), (tokens * w).sum()

    def metrics(self, loss_sum, weight, sums):
        result = super().metrics(loss_sum, weight, sums)
        return {**result, "perplexity": metrics_lib.perplexity(result["loss"])}


SEQ2SEQ = Seq2Seq("seq2seq", "seq2seq", chunkable=True)
