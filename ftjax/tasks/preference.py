"""Preference tuning (model.task="preference", a causal_lm model): pairs of responses to one prompt batched
together [B, 2, L], a pair loss on the responses' log-probs (ftjax/preference.py: DPO, IPO, hinge, ORPO,
SimPO), the reference model of the losses that need one run in the same step as the base with the LoRA adapters
off, and TRL's reward metrics at eval."""

from __future__ import annotations

import dataclasses
from typing import Any

from ftjax import lora as lora_lib
from ftjax import preference as preference_lib
from ftjax.data import preference as preference_data
from ftjax.tasks.base import F32, I32, Task


def adapters_off_reference(model: Any) -> Any:
    """The reference of a LoRA policy: the same model called with its adapters off (`lora.adapters_off`)."""
    if not getattr(type(model), "_lora_wrapped", False):
        raise ValueError("the DPO/IPO/hinge reference is the base with the LoRA adapters off: set optim.lora.rank")

    def call(inputs: dict) -> Any:
        with lora_lib.adapters_off():
            return model(**inputs, deterministic=True)["logits"]

    return call


@dataclasses.dataclass(frozen=True)
class PairTask(Task):
    """A task trained on (prompt, chosen, rejected) rows: their data and batches (preference, reward)."""

    def build_data(self, cfg, tokenizer, *, process_index, process_count, data_parallel):
        return preference_data.build(cfg, tokenizer, process_index=process_index, process_count=process_count)

    def structure(self, rows, length, segments, image_size):
        pair = (rows, 2, length[0])  # pairs (ftjax/data/preference.py): chosen at [:, 0], rejected at [:, 1]
        return {"input_ids": (pair, I32), "attention_mask": (pair, I32), "response_mask": (pair, I32),
                "weights": ((rows,), F32)}


@dataclasses.dataclass(frozen=True)
class Preference(PairTask):
    objective: preference_lib.Objective | None = None

    def batch_loss(self, model, batch, *, deterministic, rngs=None, label_smoothing=0.0, loss_chunk_tokens=0):
        """The pair loss per pair (weight: pairs); eval sums: each reward metric as "sum_<name>"."""
        obj = self.objective
        reference = adapters_off_reference(model) if obj.needs_reference else None
        loss_sum, pairs, sums = preference_lib.batch_loss(model, batch, obj, deterministic=deterministic, rngs=rngs,
                                                          reference=reference)
        return loss_sum, pairs, {f"sum_{k}": v for k, v in sums.items()}


def of_config(cfg: Any) -> Preference:
    """The preference task of a config (its preference.* section)."""
    objective = preference_lib.objective_of(cfg)
    return Preference("preference", "causal_lm", objective=objective,
                      reference_forwards=1 if objective.needs_reference else 0)
