"""Token-level tasks of encoders: token classification (a label per token, -100 where none, e.g. sub-words
after the first) and masked LM (labels at the masked positions): a mean cross-entropy over the labelled tokens.
Token classification reads its data with ftjax/data/tagging.py (a label on each word's first sub-word) and reports
token accuracy and, when its labels are entity tags (O, B-/I-/E-/S-TYPE), seqeval's entity precision / recall / F1
from span counts the eval step adds up on device (ftjax.metrics.entity_counts)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ftjax import losses as losses_lib
from ftjax import metrics as metrics_lib
from ftjax.data import tagging
from ftjax.tasks.base import I32, Task


def token_loss_sum(logits, labels):
    """Per-example (sum of token losses, number of labelled tokens); label -100 is ignored, as in HF."""
    return losses_lib.token_losses(logits, labels).sum(-1), (labels != losses_lib.IGNORE).sum(-1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class TokenTask(Task):
    def label_shape(self, row):
        return row, I32

    def logits_loss(self, logits, batch, label_smoothing):
        loss_sum, tokens = token_loss_sum(logits, batch["labels"])
        w = batch["weights"].astype(jnp.float32)
        return (loss_sum * w).sum(), (tokens * w).sum()

    def position_weights(self, batch):
        labelled = (self.token_targets(batch) != losses_lib.IGNORE).astype(jnp.float32)
        return labelled * batch["weights"].astype(jnp.float32)[:, None]


@dataclasses.dataclass(frozen=True)
class TokenClassification(TokenTask):
    """entity_tags: per label id (tag code, entity type), ftjax.metrics.entity_tag_table of the run's label names
    (set by with_labels); None: no entity metrics (labels that are not entity tags, or not known yet)."""

    entity_tags: tuple[tuple[int, int], ...] | None = None

    def build_data(self, cfg, tokenizer, *, process_index, process_count, data_parallel):
        return tagging.build(cfg, tokenizer, process_index=process_index, process_count=process_count)

    def with_labels(self, names):
        return dataclasses.replace(self, entity_tags=metrics_lib.entity_tag_table(list(names)) if names else None)

    def eval_sums(self, out, batch):
        labels = batch["labels"]
        labelled = labels != losses_lib.IGNORE
        pred = jnp.argmax(out["logits"], -1).astype(labels.dtype)
        w = batch["weights"].astype(jnp.float32)
        sums = {"sum_token_accuracy": (((pred == labels) & labelled).sum(-1).astype(jnp.float32) * w).sum()}
        if self.entity_tags is not None:
            sums.update(metrics_lib.entity_counts(pred, labels, labelled, w, self.entity_tags))
        return sums

    def metrics(self, loss_sum, weight, sums):
        result = super().metrics(loss_sum, weight, sums)
        if "entities_gold" in sums:
            result.update(metrics_lib.entity_metrics(sums["entities_pred"], sums["entities_gold"],
                                                     sums["entities_correct"]))
        return result


TOKEN_CLASSIFICATION = TokenClassification("token_classification", "token_classification", labelled=True)
MASKED_LM = TokenTask("masked_lm", "masked_lm")
