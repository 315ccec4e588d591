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
from ftjax import params as params_lib
from ftjax import tasks as tasks_lib

# {"step": int32 scalar, "params": nested dict, "opt_state": optax state(, "avg": EMA / SWA, ftjax.averaging)}
State = dict[str, Any]

# The losses live with their tasks (ftjax/tasks/: Task.batch_loss, forward_loss, logits_loss).


# ----------------------------------------------------------------------------------------------------
# The step.


@dataclasses.dataclass(frozen=True)
class StepConfig:
    task: tasks_lib.Task | str  # an ftjax.tasks.Task (a name: one that needs no config section)
    grad_accum: int = 1
    label_smoothing: float = 0.0
    loss_chunk_tokens: int = 0  # model.loss_chunk_tokens: 0 = the loss from full logits



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
    grad_masks: dict[str, Any] | None = None,
    teacher: tuple[nnx.GraphDef, nnx.State] | None = None,
) -> Callable[..., tuple[State, dict]]:
    """A pure `train_step(state, batch, key[, teacher_params]) -> (state, metrics)`; jit it with shardings and
    donation (never of the teacher's params).

    Only params whose path is in `trainable` are differentiated; the others enter the loss as constants,
    so XLA never computes their gradients (nor the activations' gradients below the lowest trainable op).
    With `averaging` on, state["avg"] (EMA / SWA of the params, `ftjax.averaging`) is updated in the step.
    `grad_masks` ({stacked param path: per-layer flags}, `Optimizer.grad_masks_at`): the layers of a scanned
    stack that do not train at this phase get zero gradients, as their unrolled params would get none (a
    population member's: {param path: traced flags}, the params it does not train yet).
    `teacher` (graphdef, rest) of a distillation teacher (ftjax/tasks/distill.py): its params come in as the
    step's last argument, sharded like the student's, and enter the loss as constants (no gradient).
    """

    def is_trainable(path: str) -> bool:
        return path in trainable

    task = tasks_lib.resolve(step_cfg.task)

    def loss_fn(train_params, frozen_params, micro, key, teacher_params):
        model = params_lib.merge(graphdef, params_lib.combine(train_params, frozen_params), rest)
        taught = {} if teacher is None else {"teacher": params_lib.merge(teacher[0], teacher_params, teacher[1])}
        loss_sum, weight, _ = task.batch_loss(model, micro, deterministic=False, rngs=nnx.Rngs(dropout=key),
                                              label_smoothing=step_cfg.label_smoothing,
                                              loss_chunk_tokens=step_cfg.loss_chunk_tokens, **taught)
        return loss_sum, weight

    def train_step(state: State, batch: dict, key: jax.Array, teacher_params: Any = None) -> tuple[State, dict]:
        train_params, frozen_params = params_lib.partition(state["params"], is_trainable)
        step_key = jax.random.fold_in(key, state["step"])
        loss_sum_fn = lambda tp, mb, k: loss_fn(tp, frozen_params, mb, k, teacher_params)

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


def _mask_layers(g: jax.Array, flags: Any) -> jax.Array:
    """`g` with the layers (leading axis) whose flag is False zeroed; `flags` a tuple (one per layer) or an array
    that broadcasts against `g` (a population member's traced trains-now flags: a scalar or [layers, 1, ...])."""
    if flags is None:
        return g
    if isinstance(flags, tuple):
        flags = jnp.asarray(flags).reshape((len(flags),) + (1,) * (g.ndim - 1))
    return g * jnp.asarray(flags, g.dtype)


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State, task: tasks_lib.Task | str,
                   loss_chunk_tokens: int = 0, frozen: tuple[nnx.GraphDef, nnx.State] | None = None
                   ) -> Callable[..., dict]:
    """`eval_step(params, batch[, frozen_params]) -> {"loss_sum", "weight", ...the task's eval sums}` with dropout
    off and the loss unsmoothed (token tasks: the weight counts labelled tokens; preference: pairs). With
    `loss_chunk_tokens` the LM losses are computed in chunks, as in the train step. `frozen` (graphdef, rest) of
    the task's frozen model when its eval needs it (`Task.frozen_in_eval`: a preference reference)."""
    task = tasks_lib.resolve(task)

    def eval_step(params, batch, frozen_params=None):
        model = params_lib.merge(graphdef, params, rest)
        extra = {} if frozen is None else {"teacher": params_lib.merge(frozen[0], frozen_params, frozen[1])}
        loss_sum, weight, sums = task.batch_loss(model, batch, deterministic=True,
                                                 loss_chunk_tokens=loss_chunk_tokens, **extra)
        return {"loss_sum": loss_sum, "weight": weight, **sums}

    return eval_step
