"""Token-level tasks of encoders: token classification (a label per token, -100 where none, e.g. sub-words
after the first) and masked LM (labels at the masked positions): a mean cross-entropy over the labelled tokens."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ftjax import losses as losses_lib
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


TOKEN_CLASSIFICATION = TokenTask("token_classification", "token_classification", labelled=True)
MASKED_LM = TokenTask("masked_lm", "masked_lm")
