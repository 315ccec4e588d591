"""Reward models (model.task="reward"): a scalar head (an HF sequence classifier with num_labels=1, on a decoder's
last real token or an encoder's pooled one) trained on (chosen, rejected) pairs with the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected), as TRL's RewardTrainer; eval reports the pairwise accuracy and the mean
margin. Pairs come from the same JSONL files as preference tuning (ftjax/data/preference.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ftjax import preference as preference_lib
from ftjax.tasks.preference import PairTask


def pair_rewards(model, batch: dict, *, deterministic: bool, rngs=None) -> tuple[jax.Array, jax.Array]:
    """(r_chosen [B], r_rejected [B]): the model's scalar on each side of each pair, in one call over 2B rows."""
    scores = model(**preference_lib.pair_inputs(batch), deterministic=deterministic, rngs=rngs)["logits"]
    scores = scores.astype(jnp.float32).reshape(-1, 2)
    return scores[:, 0], scores[:, 1]


def bradley_terry(chosen: jax.Array, rejected: jax.Array) -> jax.Array:
    """Per-pair -log sigmoid(r_chosen - r_rejected)."""
    return -jax.nn.log_sigmoid(chosen - rejected)


@dataclasses.dataclass(frozen=True)
class Reward(PairTask):
    def batch_loss(self, model, batch, *, deterministic, rngs=None, label_smoothing=0.0, loss_chunk_tokens=0):
        chosen, rejected = pair_rewards(model, batch, deterministic=deterministic, rngs=rngs)
        w = batch["weights"].astype(jnp.float32)
        sums = {"sum_accuracy": ((chosen > rejected) * w).sum(), "sum_margin": ((chosen - rejected) * w).sum(),
                "sum_rewards_chosen": (chosen * w).sum(), "sum_rewards_rejected": (rejected * w).sum()}
        return (bradley_terry(chosen, rejected) * w).sum(), w.sum(), sums


REWARD = Reward("reward", "classification", num_labels=1)
