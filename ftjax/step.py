"""The training and eval steps: pure functions of (state, batch, key), jit-compiled by their callers.

`make_train_step` differentiates only the trainable params (the frozen ones are closed over), sums
gradients over micro-batches with `lax.scan`, draws dropout keys from `fold_in(seed, step)` inside the
step, and applies the optax chain. `make_eval_step` returns the sums an evaluation adds up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ftjax import averaging as averaging_lib
from ftjax import losses as losses_lib
from ftjax import params as params_lib
from ftjax import preference as preference_lib

# {"step": int32 scalar, "params": nested dict, "opt_state": optax state(, "avg": EMA / SWA, ftjax.averaging)}
State = dict[str, Any]

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values", "segment_ids",
              "segment_starts", "decoder_input_ids", "decoder_attention_mask")

# ----------------------------------------------------------------------------------------------------
# Losses: (logits, batch) -> per-example loss [B] (already averaged over tokens for token tasks); packed
# classification rows give logits [B, S, C], labels and weights [B, S]: a loss per segment (example).


def classification_loss(logits: jax.Array, batch: dict, label_smoothing: float = 0.0) -> jax.Array:
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    labels = jax.nn.one_hot(batch["labels"], num_classes)
    if not isinstance(label_smoothing, (int, float)) or label_smoothing:  # a traced rate: population mode
        labels = optax.smooth_labels(labels, label_smoothing)
    return optax.softmax_cross_entropy(logits, labels)


def token_loss_sum(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example (sum of token losses, number of labelled tokens); label -100 is ignored, as in HF."""
    return losses_lib.token_losses(logits, labels).sum(-1), (labels != -100).sum(-1).astype(jnp.float32)


def causal_lm_loss_sum(
    logits: jax.Array, labels: jax.Array, segment_ids: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """token_loss_sum with HF's shift: logits at t predict labels[t + 1] (labels are the input ids, -100
    where no loss); with packed rows (segment_ids) never across a document boundary."""
    return token_loss_sum(logits, losses_lib.causal_targets(labels, segment_ids))


def seq2seq_loss_sum(
    logits: jax.Array, labels: jax.Array, label_smoothing: Any = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Per-example (sum of target-token losses, labelled tokens) of decoder logits [B, T, V] against labels
    [B, T] (logits at t predict labels[t]; -100 ignored). Label smoothing as HF's LabelSmoother:
    (1 - e) * nll + e * mean over the vocabulary of -log p."""
    loss = losses_lib.token_losses(logits, labels, label_smoothing)
    return loss.sum(-1), (labels != -100).sum(-1).astype(jnp.float32)


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in INPUT_KEYS if k in batch}


def loss_and_weight(logits: jax.Array, batch: dict, task: str, label_smoothing: float) -> tuple[jax.Array, jax.Array]:
    """(weighted loss sum, weight sum) of a batch; the step's loss is their ratio over all micro-batches."""
    w = batch["weights"].astype(jnp.float32)
    if task == "causal_lm":
        loss_sum, tokens = causal_lm_loss_sum(logits, batch["labels"], batch.get("segment_ids"))
        return (loss_sum * w).sum(), (tokens * w).sum()
    if task in ("token_classification", "masked_lm"):
        loss_sum, tokens = token_loss_sum(logits, batch["labels"])
        return (loss_sum * w).sum(), (tokens * w).sum()
    if task == "seq2seq":  # a token-level mean over the labelled target tokens
        loss_sum, tokens = seq2seq_loss_sum(logits, batch["labels"], label_smoothing)
        return (loss_sum * w).sum(), (tokens * w).sum()
    per_example = classification_loss(logits, batch, label_smoothing)
    return (per_example * w).sum(), w.sum()


CHUNKED_TASKS = ("causal_lm", "seq2seq")  # the LM tasks whose models can return hidden states + head.


def call_options(task: str, loss_chunk_tokens: int) -> dict:
    """Extra model-call arguments of the step: with the chunked loss on, the LM models return their final hidden
    states ("lm_hidden") and head ("lm_head") instead of [B, L, V] logits."""
    return {"return_hidden": True} if loss_chunk_tokens and task in CHUNKED_TASKS else {}


def output_loss_and_weight(out: dict, batch: dict, task: str, label_smoothing: Any,
                           loss_chunk_tokens: int = 0) -> tuple[jax.Array, jax.Array]:
    """loss_and_weight of a model call's output: from its logits, or (when the model returned "lm_hidden",
    see call_options) chunk by chunk through `ftjax.losses.chunked_token_loss_sum`, with the same targets."""
    if "lm_hidden" not in out:
        return loss_and_weight(out["logits"], batch, task, label_smoothing)
    if task == "causal_lm":
        targets = losses_lib.causal_targets(batch["labels"], batch.get("segment_ids"))
        label_smoothing = 0.0  # causal_lm_loss_sum is unsmoothed
    else:
        targets = batch["labels"]
    loss_sum, tokens = losses_lib.chunked_token_loss_sum(
        out["lm_hidden"], out["lm_head"], targets, label_smoothing=label_smoothing, chunk_tokens=loss_chunk_tokens)
    w = batch["weights"].astype(jnp.float32)
    return (loss_sum * w).sum(), (tokens * w).sum()


# ----------------------------------------------------------------------------------------------------
# The step.


@dataclasses.dataclass(frozen=True)
class StepConfig:
    task: str
    grad_accum: int = 1
    label_smoothing: float = 0.0
    loss_chunk_tokens: int = 0  # model.loss_chunk_tokens: 0 = the loss from full logits
    objective: preference_lib.Objective | None = None  # model.task="preference": the pair loss


def _split_micro(batch: dict, grad_accum: int) -> dict:
    """[B, ...] -> [A, B/A, ...] taking rows a, a+A, ... for micro-batch a, so each device keeps its rows."""
    def split(x):
        b = x.shape[0]
        return x.reshape((b // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1)

    return {k: split(v) for k, v in batch.items()}


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformation,
    trainable: frozenset[str],
    step_cfg: StepConfig,
    averaging: averaging_lib.Averaging | None = None,
    grad_masks: dict[str, tuple[bool, ...]] | None = None,
) -> Callable[[State, dict, jax.Array], tuple[State, dict]]:
    """A pure `train_step(state, batch, key) -> (state, metrics)`; jit it with shardings and donation.

    Only params whose path is in `trainable` are differentiated; the others enter the loss as constants,
    so XLA never computes their gradients (nor the activations' gradients below the lowest trainable op).
    With `averaging` on, state["avg"] (EMA / SWA of the params, `ftjax.averaging`) is updated in the step.
    `grad_masks` ({stacked param path: per-layer flags}, `Optimizer.grad_masks_at`): the layers of a scanned
    stack that do not train at this phase get zero gradients, as their unrolled params would get none.
    """

    def is_trainable(path: str) -> bool:
        return path in trainable

    options = call_options(step_cfg.task, step_cfg.loss_chunk_tokens)

    def loss_fn(train_params, frozen_params, micro, key):
        model = params_lib.merge(graphdef, params_lib.combine(train_params, frozen_params), rest)
        if step_cfg.objective is not None:
            return preference_loss(model, micro, step_cfg.objective, deterministic=False, rngs=nnx.Rngs(dropout=key))[:2]
        out = model(**model_inputs(micro), **options, deterministic=False, rngs=nnx.Rngs(dropout=key))
        loss_sum, weight = output_loss_and_weight(out, micro, step_cfg.task, step_cfg.label_smoothing,
                                                  step_cfg.loss_chunk_tokens)
        if "aux_loss" in out:  # a mixture of experts' load-balancing loss: a mean, weighted as the batch is
            loss_sum = loss_sum + out["aux_loss"] * weight
        return loss_sum, weight

    def train_step(state: State, batch: dict, key: jax.Array) -> tuple[State, dict]:
        train_params, frozen_params = params_lib.partition(state["params"], is_trainable)
        step_key = jax.random.fold_in(key, state["step"])
        loss_sum_fn = lambda tp, mb, k: loss_fn(tp, frozen_params, mb, k)

        if step_cfg.grad_accum == 1:
            (loss_sum, weight), grads = jax.value_and_grad(loss_sum_fn, has_aux=True)(train_params, batch, step_key)
        else:
            micro = _split_micro(batch, step_cfg.grad_accum)

            def body(carry, xs):
                grads_acc, loss_acc, weight_acc = carry
                index, mb = xs
                (loss_sum, weight), grads = jax.value_and_grad(loss_sum_fn, has_aux=True)(
                    train_params, mb, jax.random.fold_in(step_key, index)
                )
                grads_acc = jax.tree_util.tree_map(jnp.add, grads_acc, grads)
                return (grads_acc, loss_acc + loss_sum, weight_acc + weight), None

            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), train_params)
            init = (zeros, jnp.float32(0.0), jnp.float32(0.0))
            (grads, loss_sum, weight), _ = jax.lax.scan(
                body, init, (jnp.arange(step_cfg.grad_accum), micro)
            )
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree_util.tree_map(lambda g, p: (g / denom).astype(p.dtype), grads, train_params)
        if grad_masks:
            grads = params_lib.map_with_path(lambda path, g: _mask_layers(g, grad_masks.get(path)), grads)
        grad_norm = optax.tree.norm(grads)
        # The optimizer sees the full tree; frozen leaves get zeros, which set_to_zero / the unfreeze gate
        # never read, so XLA drops them.
        full_grads = params_lib.combine(grads, jax.tree_util.tree_map(_zero_grad, frozen_params))
        updates, opt_state = tx.update(full_grads, state["opt_state"], state["params"])
        train_updates, _ = params_lib.partition(updates, is_trainable)
        new_train = optax.apply_updates(train_params, train_updates)
        new_state = {
            "step": state["step"] + 1,
            "params": params_lib.combine(new_train, frozen_params),
            "opt_state": opt_state,
        }
        if averaging is not None and "avg" in state:
            new_state["avg"] = averaging_lib.update(averaging, state["avg"], new_state["params"], new_state["step"])
        metrics = {
            "loss": loss_sum / denom,
            "grad_norm": grad_norm,
            # Checked on the host before any later checkpoint: a saved state never holds inf/NaN params.
            "param_norm": optax.tree.norm(new_train),
            "examples": batch["weights"].sum(),
        }
        return new_state, metrics

    return train_step


def _zero_grad(p: jax.Array) -> jax.Array:
    """A frozen param's (never read) gradient: zeros, float32 for the integer leaves of a quantised base."""
    return jnp.zeros_like(p) if jnp.issubdtype(p.dtype, jnp.floating) else jnp.zeros(p.shape, jnp.float32)


def _mask_layers(g: jax.Array, flags: tuple[bool, ...] | None) -> jax.Array:
    """`g` with the layers (leading axis) whose flag is False zeroed."""
    if flags is None:
        return g
    keep = jnp.asarray(flags, g.dtype).reshape((len(flags),) + (1,) * (g.ndim - 1))
    return g * keep


def preference_loss(model: nnx.Module, batch: dict, objective: preference_lib.Objective, **call: Any) -> tuple:
    """preference_lib.batch_loss with the reference its loss needs (the base with the adapters off)."""
    reference = preference_lib.adapters_off_reference(model) if objective.needs_reference else None
    return preference_lib.batch_loss(model, batch, objective, reference=reference, **call)


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State, task: str,
                   loss_chunk_tokens: int = 0,
                   objective: preference_lib.Objective | None = None) -> Callable[[Any, dict], dict]:
    """`eval_step(params, batch) -> {"loss_sum", "weight"(, "confusion")}` with dropout off (token tasks:
    causal_lm, masked_lm, seq2seq: the weight counts labelled tokens; the loss is unsmoothed). With
    `loss_chunk_tokens` the LM losses are computed in chunks, as in the train step. With a preference
    `objective`: the weight counts pairs, and "sum_<metric>" holds each reward metric summed over them."""
    options = call_options(task, loss_chunk_tokens)

    def eval_step(params, batch):
        model = params_lib.merge(graphdef, params, rest)
        if objective is not None:
            loss_sum, weight, sums = preference_loss(model, batch, objective, deterministic=True)
            return {"loss_sum": loss_sum, "weight": weight, **{f"sum_{k}": v for k, v in sums.items()}}
        out = model(**model_inputs(batch), **options, deterministic=True)
        loss_sum, weight = output_loss_and_weight(out, batch, task, 0.0, loss_chunk_tokens)
        result = {"loss_sum": loss_sum, "weight": weight}
        if task in ("classification", "image_classification"):
            logits = out["logits"]
            # A [C, C] confusion matrix (rows: label, cols: prediction) is all the host needs for
            # accuracy and macro-F1, and being replicated it is readable on every process.
            # Packed rows: [B, S] examples, flattened.
            num_classes = logits.shape[-1]
            w = batch["weights"].astype(jnp.float32)
            truth = jax.nn.one_hot(batch["labels"], num_classes) * w[..., None]
            pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
            result["confusion"] = truth.reshape(-1, num_classes).T @ pred.reshape(-1, num_classes)
        return result

    return eval_step

