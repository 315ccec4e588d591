"""What a task is: the interface every task module fills (its data, batch structure, loss, eval sums, metrics,
FLOP extras), with the defaults most tasks share: one model call, a loss from its logits (or, for the LM tasks,
chunk by chunk from its hidden states), and a mean loss as the metric."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import losses as losses_lib
from ftjax.data import examples
from ftjax.data.structure import INPUT_KEYS, model_inputs  # noqa: F401 (ftjax.tasks exports them)

I32, F32 = np.dtype(np.int32), np.dtype(np.float32)
Structure = dict[str, tuple[tuple[int, ...], np.dtype]]  # key -> (global shape, dtype)
Lengths = tuple[tuple[int, int | None], ...]  # padded lengths: (source, target) pairs or (length, None)

@dataclasses.dataclass(frozen=True)
class Task:
    """One model.task. Subclasses override what differs; instances are immutable (a step closes over one).

    name: the model.task value. model_task: the ftjax.models head it trains (a preference run trains a
    causal_lm model, a reward model a 1-label classifier). chunkable: model.loss_chunk_tokens applies (the
    model can return hidden states + head instead of logits). reference_forwards: extra forward passes of the
    step over the same rows (DPO's reference model; counted in FLOPs / MFU)."""

    name: str
    model_task: str
    chunkable: bool = False
    reference_forwards: int = 0
    has_tokens: bool = True  # its batches have a sequence length (image tasks: pixels)
    labelled: bool = False  # a head of model.num_labels, its label names read from the data
    num_labels: int | None = None  # a head of a fixed width (reward: 1 scalar), whatever model.num_labels says
    # A frozen model the step runs beside the trained one (its params the step's last argument, sharded like the
    # student's, never differentiated, donated or checkpointed; `batch_loss(..., teacher=model)`): a distillation
    # teacher, or the reference of a preference loss under full fine-tuning. Its folder, "" for none.
    frozen_model: str = ""
    frozen_in_eval: bool = False  # the eval step takes it too (a preference reference: the reward metrics need it)

    # ---- data
    def build_data(self, cfg: Any, tokenizer: Any, *, process_index: int, process_count: int,
                   data_parallel: int | None) -> Any:
        """The DataBundle of a run of this task (ftjax/data/*: its builder)."""
        return examples.build(cfg, tokenizer, process_index=process_index, process_count=process_count,
                              data_parallel=data_parallel)

    def structure(self, rows: int, length: tuple[int, int | None], segments: int | None,
                  image_size: int | None) -> Structure:
        """The arrays of a global batch of `rows` rows at one padded length, as the task's batcher makes them:
        by default bucketed text one example per row, or packed rows of `segments` examples."""
        source = length[0]
        row = (rows, source)
        if segments is not None:  # packed classification (ftjax/data/example_packing.py)
            seg = (rows, segments)
            return {"input_ids": (row, I32), "attention_mask": (row, I32), "token_type_ids": (row, I32),
                    "segment_ids": (row, I32), "segment_starts": (seg, I32), "labels": (seg, I32),
                    "weights": (seg, F32)}
        return {"input_ids": (row, I32), "attention_mask": (row, I32), "token_type_ids": (row, I32),
                "labels": self.label_shape(row), "weights": ((rows,), F32)}

    def label_shape(self, row: tuple[int, int]) -> tuple[tuple[int, ...], np.dtype]:
        """Labels of one-example-per-row text batches: one per example (token tasks: one per token)."""
        return (row[0],), I32

    def planned_lengths(self, cfg: Any, packed: bool) -> Lengths:
        """The padded lengths of a run from its config alone (no data read): data.buckets' lengths when given
        as a tuple, else (a count) only data.max_len is known; packed rows are max_len long."""
        spec = cfg.data.buckets
        if packed or isinstance(spec, int):
            return ((int(cfg.data.max_len), None),)
        return tuple((int(n), None) for n in spec)

    def bundle_lengths(self, bundle: Any) -> Lengths:
        """The padded lengths a built DataBundle chose."""
        return tuple((int(n), None) for n in bundle.bucket_lengths)

    def with_labels(self, names: list[str]) -> Task:
        """The task as it runs on data whose label ids name `names` (the run's id2label, from its data or
        run.json): token classification reads its entity tags from them; other tasks need nothing."""
        return self

    # Config fields holding constants of the loss that may be traced values (a population member's own), and
    # `with_constants` returning the task with them set: {config field: value}.
    constant_fields: tuple[str, ...] = ()

    def with_constants(self, values: dict[str, Any]) -> Task:
        """The task with its loss constants (`constant_fields`) set to `values` (traced, per member)."""
        if values:
            raise ValueError(f"task {self.name!r} has no loss constants {sorted(values)}")
        return self

    # ---- loss
    def logits_loss(self, logits: jax.Array, batch: dict, label_smoothing: Any) -> tuple[jax.Array, jax.Array]:
        """(weighted loss sum, weight sum) of a batch from the model's logits."""
        raise NotImplementedError(f"task {self.name!r} defines no loss from logits")

    def hidden_loss(self, out: dict, batch: dict, label_smoothing: Any,
                    chunk_tokens: int) -> tuple[jax.Array, jax.Array]:
        """The loss from "lm_hidden" + "lm_head" chunk by chunk (chunkable tasks); targets as logits_loss's."""
        targets = self.token_targets(batch)
        loss_sum, tokens = losses_lib.chunked_token_loss_sum(
            out["lm_hidden"], out["lm_head"], targets, label_smoothing=label_smoothing, chunk_tokens=chunk_tokens)
        w = batch["weights"].astype(jnp.float32)
        return (loss_sum * w).sum(), (tokens * w).sum()

    def token_targets(self, batch: dict) -> jax.Array:
        return batch["labels"]

    def call_options(self, loss_chunk_tokens: int) -> dict:
        """Extra model-call arguments: with the chunked loss on, hidden states + head instead of logits."""
        return {"return_hidden": True} if loss_chunk_tokens and self.chunkable else {}

    def batch_loss(self, model: Any, batch: dict, *, deterministic: bool, rngs: Any = None,
                   label_smoothing: Any = 0.0, loss_chunk_tokens: int = 0) -> tuple[jax.Array, jax.Array, dict]:
        """(loss sum, weight, eval sums) of one batch: the train step minimises loss sum / weight (over its
        micro-batches), the eval step adds up all three."""
        loss_sum, weight, out = self.forward_loss(model, batch, deterministic=deterministic, rngs=rngs,
                                                  label_smoothing=label_smoothing, loss_chunk_tokens=loss_chunk_tokens)
        return loss_sum, weight, self.eval_sums(out, batch)

    def forward_loss(self, model: Any, batch: dict, *, deterministic: bool, rngs: Any = None,
                     label_smoothing: Any = 0.0, loss_chunk_tokens: int = 0) -> tuple[jax.Array, jax.Array, dict]:
        """(loss sum, weight, the model's output) of one model call on the batch. In training
        (deterministic=False) a model's auxiliary loss (a mixture of experts' load balancing, "aux_loss", a mean)
        joins the loss, weighted as the batch is."""
        out = model(**model_inputs(batch), **self.call_options(loss_chunk_tokens), deterministic=deterministic,
                    rngs=rngs)
        if "lm_hidden" in out:
            loss_sum, weight = self.hidden_loss(out, batch, label_smoothing, loss_chunk_tokens)
        else:
            loss_sum, weight = self.logits_loss(out["logits"], batch, label_smoothing)
        if not deterministic and "aux_loss" in out:
            loss_sum = loss_sum + out["aux_loss"] * weight
        return loss_sum, weight, out

    def position_weights(self, batch: dict) -> jax.Array:
        """The weight of each position of the logits [..., classes] in the loss (distillation compares the
        teacher's distribution there): per example, or per labelled token for the token tasks."""
        raise NotImplementedError(f"task {self.name!r} has no per-position loss weights (no distillation)")

    def eval_sums(self, out: dict, batch: dict) -> dict[str, jax.Array]:
        """What an evaluation adds up besides loss_sum and weight (classification: the confusion matrix;
        "sum_<name>" keys: a metric summed over the weight, reported as its mean)."""
        return {}

    # ---- metrics (host side)
    def metrics(self, loss_sum: float, weight: float, sums: dict[str, Any]) -> dict[str, float]:
        """The metrics of one evaluated split from its sums: the mean loss, and each "sum_<name>" as its mean."""
        result = {"loss": float(loss_sum) / float(weight)}
        result.update({k[4:]: float(v) / float(weight) for k, v in sums.items() if k.startswith("sum_")})
        return result
