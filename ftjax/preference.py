"""Preference objectives on (chosen, rejected) response pairs: DPO (sigmoid; label_smoothing = cDPO), IPO, hinge,
and the reference-free ORPO and SimPO, with the reward metrics people compare (TRL's definitions, so a loss or
a reward_accuracy here means what it means there).

Everything is a function of per-sequence response log-probs: `response_logps` turns a causal LM's logits and
a response mask into (sum, count) per row; `pair_losses` turns the policy's (and the reference's) sums into a
per-pair loss and per-pair metrics. The step sums them over pairs (`weights` = real pairs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ftjax import losses as losses_lib
from ftjax.data.structure import model_inputs

LOSSES = ("dpo", "ipo", "hinge", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")  # their loss reads the policy alone: no reference forward
# Per-pair metrics pair_losses returns (the eval step averages them over pairs).
METRICS = ("reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected")


@dataclasses.dataclass(frozen=True)
class Objective:
    """preference.*: the loss and its constants. beta: DPO/IPO/hinge/SimPO's beta (IPO: its tau); orpo_lambda:
    ORPO's weight of the odds-ratio term (TRL's ORPO beta); simpo_gamma: SimPO's target reward margin."""

    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"preference.loss={self.loss!r}: one of {LOSSES}")

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE

    @property
    def needs_chosen_nll(self) -> bool:
        return self.loss == "orpo"


@dataclasses.dataclass(frozen=True)
class LogProbs:
    """Per-row response log-probs: their sum and the number of response tokens (both [N] float32)."""

    sum: jax.Array
    count: jax.Array

    @property
    def mean(self) -> jax.Array:
        return self.sum / jnp.maximum(self.count, 1.0)


def response_targets(input_ids: jax.Array, response_mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """The next-token targets [N, L] of the response tokens only (the prompt and padding: IGNORE)."""
    labels = jnp.where(response_mask > 0, input_ids, losses_lib.IGNORE)
    return losses_lib.causal_targets(labels, segment_ids)


def response_logps(logits: jax.Array, targets: jax.Array) -> LogProbs:
    """LogProbs of each row from causal LM logits [N, L, V] and `response_targets`."""
    nll = losses_lib.token_losses(logits, targets)
    return LogProbs(-nll.sum(-1), (targets != losses_lib.IGNORE).sum(-1).astype(jnp.float32))


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012)."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _sigmoid_loss(logits: jax.Array, smoothing: float) -> jax.Array:
    """-(1 - e) log s(z) - e log s(-z): DPO's loss, conservative (cDPO, Mitchell 2023) for e > 0."""
    return -(1 - smoothing) * jax.nn.log_sigmoid(logits) - smoothing * jax.nn.log_sigmoid(-logits)


def pair_losses(obj: Objective, chosen: LogProbs, rejected: LogProbs, ref_chosen: jax.Array | None = None,
                ref_rejected: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss [B], {metric: [B]}) of B pairs. ref_chosen / ref_rejected: the reference's response log-prob sums
    (needed unless the loss is reference-free). ORPO's loss here is its odds-ratio term only; the chosen
    responses' NLL it adds is a token mean over the batch (`orpo_nll`), as TRL computes it."""
    if obj.needs_reference and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"preference.loss={obj.loss!r} needs the reference model's log-probs")
    beta = obj.beta
    if obj.loss in ("dpo", "ipo", "hinge"):
        chosen_ratio, rejected_ratio = chosen.sum - ref_chosen, rejected.sum - ref_rejected
        if obj.loss == "dpo":
            loss = _sigmoid_loss(beta * (chosen_ratio - rejected_ratio), obj.label_smoothing)
        elif obj.loss == "hinge":
            loss = jax.nn.relu(1 - beta * (chosen_ratio - rejected_ratio))
        else:  # IPO (Azar et al. 2023, eq. 17) on per-token averages, as TRL (confirmed with the IPO authors)
            delta = chosen_ratio / jnp.maximum(chosen.count, 1.0) - rejected_ratio / jnp.maximum(rejected.count, 1.0)
            loss = (delta - 1 / (2 * beta)) ** 2
        r_chosen, r_rejected = beta * chosen_ratio, beta * rejected_ratio
        shown_chosen, shown_rejected = chosen.sum, rejected.sum
    elif obj.loss == "orpo":  # Hong et al. 2024, eqs. 4 and 7, on average log-probs
        # A padding pair (no response tokens) would give log(1 - exp(0)) = -inf, and NaN gradients even masked.
        c = jnp.where(chosen.count > 0, chosen.mean, -1.0)
        r = jnp.where(rejected.count > 0, rejected.mean, -1.0)
        log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
        loss = -obj.orpo_lambda * jax.nn.log_sigmoid(log_odds)
        r_chosen, r_rejected = obj.orpo_lambda * c, obj.orpo_lambda * r
        shown_chosen, shown_rejected = c, r
    else:  # SimPO (Meng et al. 2024): length-normalised margin minus gamma / beta
        c, r = chosen.mean, rejected.mean
        loss = _sigmoid_loss(beta * ((c - r) - obj.simpo_gamma / beta), obj.label_smoothing)
        r_chosen, r_rejected = beta * c, beta * r
        shown_chosen, shown_rejected = c, r
    metrics = {
        "reward_accuracy": (r_chosen > r_rejected).astype(jnp.float32),
        "reward_margin": r_chosen - r_rejected,
        "rewards_chosen": r_chosen,
        "rewards_rejected": r_rejected,
        "logps_chosen": shown_chosen,
        "logps_rejected": shown_rejected,
    }
    return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)


def orpo_nll(chosen: LogProbs, weights: jax.Array) -> jax.Array:
    """ORPO's supervised term: the chosen responses' NLL, a mean over all their tokens in the batch."""
    return -(chosen.sum * weights).sum() / jnp.maximum((chosen.count * weights).sum(), 1.0)


def objective_of(cfg: Any) -> Objective:
    """The Objective of a config's preference section."""
    p = cfg.preference
    return Objective(str(p.loss), float(p.beta), float(p.label_smoothing), float(p.simpo_gamma), float(p.orpo_lambda))


def pair_inputs(batch: dict) -> dict:
    """The model inputs of a batch of pairs: [B, 2, L] -> [2B, L] rows (pair b's chosen at 2b, rejected at 2b+1)."""
    return {k: v.reshape(-1, v.shape[-1]) for k, v in model_inputs(batch).items()}


def _split(lp: LogProbs) -> tuple[LogProbs, LogProbs]:
    s, c = lp.sum.reshape(-1, 2), lp.count.reshape(-1, 2)
    return LogProbs(s[:, 0], c[:, 0]), LogProbs(s[:, 1], c[:, 1])


def batch_loss(model: Any, batch: dict, obj: Objective, *, deterministic: bool, rngs: Any = None,
               reference: Any = None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(loss sum, pairs, {metric: sum over pairs}) of a batch of pairs: the policy's response log-probs and, for
    the losses that need one, the reference's (`reference(inputs) -> logits`, no gradient, no dropout); ORPO
    adds the chosen responses' token-mean NLL once per pair."""
    inputs = pair_inputs(batch)
    targets = response_targets(inputs["input_ids"], batch["response_mask"].reshape(inputs["input_ids"].shape))
    logits = model(**inputs, deterministic=deterministic, rngs=rngs)["logits"]
    chosen, rejected = _split(response_logps(logits, targets))
    ref_chosen = ref_rejected = None
    if obj.needs_reference:
        ref = _split(response_logps(jax.lax.stop_gradient(reference(inputs)), targets))
        ref_chosen, ref_rejected = ref[0].sum, ref[1].sum
    w = batch["weights"].astype(jnp.float32)
    loss, metrics = pair_losses(obj, chosen, rejected, ref_chosen, ref_rejected)
    loss_sum = (loss * w).sum()
    if obj.needs_chosen_nll:
        loss_sum = loss_sum + orpo_nll(chosen, w) * w.sum()
    return loss_sum, w.sum(), {k: (v * w).sum() for k, v in metrics.items()}
