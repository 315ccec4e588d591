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


# preference.* fields that are plain constants of the pair losses: a population's members may differ in them.
OBJECTIVE_CONSTANTS = {"preference.beta": "beta", "preference.label_smoothing": "label_smoothing",
                       "preference.simpo_gamma": "simpo_gamma", "preference.orpo_lambda": "orpo_lambda"}


@dataclasses.dataclass(frozen=True)
class Preference(PairTask):
    objective: preference_lib.Objective | None = None
    constant_fields: tuple[str, ...] = tuple(OBJECTIVE_CONSTANTS)

    def with_constants(self, values):
        """The task with the objective's constants set (a population member's traced beta, ...)."""
        unknown = set(values) - set(OBJECTIVE_CONSTANTS)
        if unknown:
            raise ValueError(f"preference has no loss constants {sorted(unknown)}")
        return dataclasses.replace(self, objective=dataclasses.replace(
            self.objective, **{OBJECTIVE_CONSTANTS[field]: value for field, value in values.items()}))

    def batch_loss(self, model, batch, *, deterministic, rngs=None, label_smoothing=0.0, loss_chunk_tokens=0,
                   teacher=None):
        """The pair loss per pair (weight: pairs); eval sums: each reward metric as "sum_<name>". The reference:
        `teacher` (the frozen copy of the checkpoint under full fine-tuning), else the LoRA base (adapters off)."""
        obj = self.objective
        reference = None
        if obj.needs_reference:
            reference = adapters_off_reference(model) if teacher is None else (
                lambda inputs: teacher(**inputs, deterministic=True)["logits"])
        loss_sum, pairs, sums = preference_lib.batch_loss(model, batch, obj, deterministic=deterministic, rngs=rngs,
                                                          reference=reference)
        return loss_sum, pairs, {f"sum_{k}": v for k, v in sums.items()}


def of_config(cfg: Any) -> Preference:
    """The preference task of a config (its preference.* section)."""
    objective = preference_lib.objective_of(cfg)
    # The reference under LoRA is the base with the adapters off (free); under full fine-tuning a frozen copy of
    # the checkpoint, loaded beside the policy and sharded like it.
    frozen = cfg.model.name_or_path if objective.needs_reference and not cfg.optim.lora.rank else ""
    return Preference("preference", "causal_lm", objective=objective,
                      reference_forwards=1 if objective.needs_reference else 0, frozen_model=frozen,
                      frozen_in_eval=bool(frozen))
