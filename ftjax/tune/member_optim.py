"""The optimizer of population members (ftjax/tune/population.py): the shared run's union of what the members
train, each member's gates at its own start steps, and its decay and LR table applied to the shared update."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import optim


NEVER = np.iinfo(np.int32).max // 2  # a member's start step for a param it never trains


def start_of(row: optim.ParamInfo) -> int:
    """The step a param starts training at in one member's run (NEVER when frozen)."""
    return NEVER if row.frozen else row.unfreeze_step or 0


def union_optimizer(template: optim.Optimizer, members: list[optim.Optimizer]
                    ) -> tuple[optim.Optimizer, dict[str, np.ndarray]]:
    """The shared run's optimizer over what any member trains, and each gated label's start step per member [K].

    A param trains in the union from the first step any member trains it; its label is the tuple of its start
    steps in the members, so the params of a label share a start in every member and so Adam's count, as each
    member's own labels would. Each member gates a label at its own start (a label it never trains: NEVER):
    zero updates and its state untouched until then, as its solo run's gate or `set_to_zero`. The union's
    rows have unit LR and no decay (members apply theirs: `member_tx`)."""
    table, starts = {}, {}
    for path, row in template.table.items():
        steps = tuple(start_of(m.table[path]) for m in members)
        first = min(steps)
        label = optim.FROZEN if first >= NEVER else "from_" + "_".join("x" if s >= NEVER else str(s) for s in steps)
        table[path] = dataclasses.replace(row, frozen=first >= NEVER, unfreeze_step=(first or None) if first < NEVER
                                          else None, label=label, lr_mult=1.0, decay=False, weight_decay=0.0)
        if any(steps) and first < NEVER:
            starts[label] = np.asarray(steps, np.int32)
    union = optim.from_table(template.config, table, list(template.groups), template.abstract_params,
                             total_steps=template.total_steps, steps_per_epoch=template.steps_per_epoch,
                             stacks=template.stacks)
    return union, starts


class LRTableState(NamedTuple):
    count: jax.Array  # updates applied so far (the step the LR table is read at)


def scale_by_lr_table(lr_table: jax.Array, lr_mult: Any, group_index: Any) -> optax.GradientTransformation:
    """Scales each param's update by lr_mult * lr_table[its group, step]: a member's LR schedules as a table
    [G, T] (per group) and its per-param multipliers (LLRD, LoRA+), all traced values."""
    last = lr_table.shape[-1] - 1

    def init(params):
        return LRTableState(jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        lrs = lr_table[:, jnp.minimum(state.count, last)]
        out = jax.tree_util.tree_map(lambda u, m, gi: (u * (m * lrs[gi]).astype(u.dtype)).astype(u.dtype),
                                     updates, lr_mult, group_index)
        return out, LRTableState(state.count + 1)

    return optax.GradientTransformation(init, update)


def member_tx(
    template_tx: optax.GradientTransformation,
    lr_table: jax.Array,
    lr_mult: Any,
    weight_decay: Any,
    group_index: Any,
    toward_pretrained: bool,
) -> optax.GradientTransformation:
    """One member's optimizer: the template's (unit LR: -precond(g)), then optim's own decoupled weight decay
    with the member's per-param coefficients (negated, as the template's update is), then its LR table.

    The solo run's label chain is precond -> + wd * p (or wd * (p - p0)) -> * -(lr_mult * lr(t)); this is
    (-precond - wd * p) * lr_mult * lr(t): the same values (negation is exact), up to the schedule's table.
    """
    negated = jax.tree_util.tree_map(lambda w: -w, weight_decay)
    return optax.chain(template_tx, optim.decoupled_weight_decay(negated, toward_pretrained),
                       scale_by_lr_table(lr_table, lr_mult, group_index))
