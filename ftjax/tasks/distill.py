"""A task distilled from a teacher (distill.teacher): the student's own task loss mixed with the divergence of
its output distribution from the teacher's at every position that task labels. The teacher is called in the same
jitted step on the same batch (frozen, no dropout, no gradient); evaluation reports the student's task metrics."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from ftjax import distill as distill_lib
from ftjax.tasks.base import Task, model_inputs


@dataclasses.dataclass(frozen=True)
class Distilled(Task):
    base: Task | None = None
    spec: distill_lib.Spec | None = None

    def build_data(self, cfg, tokenizer, **kwargs):
        return self.base.build_data(cfg, tokenizer, **kwargs)

    def structure(self, rows, length, segments, image_size):
        return self.base.structure(rows, length, segments, image_size)

    def planned_lengths(self, cfg, packed):
        return self.base.planned_lengths(cfg, packed)

    def bundle_lengths(self, bundle):
        return self.base.bundle_lengths(bundle)

    def batch_loss(self, model: Any, batch: dict, *, deterministic: bool, rngs: Any = None,
                   label_smoothing: Any = 0.0, loss_chunk_tokens: int = 0, teacher: Any = None):
        """The base task's (loss sum, weight, eval sums); with a `teacher` (training), the loss sum becomes
        alpha * task + (1 - alpha) * T^2 * Σ divergence over the labelled positions, whose weights are the
        task's own (so dividing by the task's weight averages both over the same positions)."""
        # full logits (no chunked loss: config rule distill_compares_logits)
        loss_sum, weight, out = self.base.forward_loss(model, batch, deterministic=deterministic, rngs=rngs,
                                                       label_smoothing=label_smoothing)
        if teacher is not None:
            s = self.spec
            taught = jax.lax.stop_gradient(teacher(**model_inputs(batch), deterministic=True)["logits"])
            div = distill_lib.divergence(taught, out["logits"], s.loss, s.temperature)
            kd_sum = (div * self.base.position_weights(batch)).sum()
            loss_sum = s.alpha * loss_sum + (1.0 - s.alpha) * s.temperature**2 * kd_sum
        return loss_sum, weight, self.base.eval_sums(out, batch)

    def metrics(self, loss_sum, weight, sums):
        return self.base.metrics(loss_sum, weight, sums)


def of_config(base: Task, cfg: Any) -> Distilled:
    """`base` distilled as cfg.distill says; one more forward pass per step (the teacher's)."""
    return Distilled(base.name, base.model_task, chunkable=False, reference_forwards=base.reference_forwards,
                     has_tokens=base.has_tokens, labelled=base.labelled, num_labels=base.num_labels, base=base,
                     spec=distill_lib.spec_of(cfg), frozen_model=cfg.distill.teacher)
