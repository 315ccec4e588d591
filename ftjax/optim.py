"""The optimizer from the config and the param tree: one optax chain over the param table.

`build()` checks the optim config by its declaration (`ftjax.config`), makes the param table
(`ftjax.param_table`: group, frozen / unfreeze step, decay, LR multiplier per param) and the per-group LR
schedules (`ftjax.schedules`), and chains them; `ftjax.reporting.optimizer` describes and plots the same table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import stacking
from ftjax import params as params_lib
from ftjax.config import OPTIMIZERS, ConfigError, validate
from ftjax.param_table import FROZEN, Group, ParamInfo, build_table
from ftjax.schedules import (
    SCHEDULE_FNS,
    Schedule,
    ScheduleArgs,
    schedule_args,
)

__all__ = [
    "FROZEN",
    "Group",
    "Optimizer",
    "ParamInfo",
    "build",
    "build_table",
    "decoupled_weight_decay",
    "gate",
    "scale_by_adam_uncorrected",
    "scale_by_optimizer",
]


# ---------------------------------------------------------------------------------------------------------
# Transforms: decoupled weight decay (toward zero or the pre-trained weights) and the unfreeze gate.
# ---------------------------------------------------------------------------------------------------------


class AnchorState(NamedTuple):
    """The weights that L2-SP decays toward (a copy of the params at init: the pre-trained values)."""

    anchor: Any


def decoupled_weight_decay(
    weight_decay: Any, toward_pretrained: bool = False
) -> optax.GradientTransformation:
    """Adds weight_decay * p (or weight_decay * (p - p0), L2-SP) to the updates; scaled by -lr afterwards.

    `weight_decay`: one coefficient, or a tree like the params of coefficients (a population member's, traced:
    ftjax/tune/population.py builds its members' optimizers from this same transform). The anchor p0 lives in
    the optimizer state (not a jit constant), so it is sharded, checkpointed and donated like any other state.
    """
    per_param = not isinstance(weight_decay, (int, float))
    if not toward_pretrained and not per_param:
        return optax.add_decayed_weights(weight_decay)

    def init(params):
        if not toward_pretrained:
            return optax.EmptyState()
        return AnchorState(jax.tree_util.tree_map(lambda p: jnp.array(p, copy=True), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("decoupled weight decay needs params: call tx.update(grads, state, params)")
        coefficients = weight_decay if per_param else jax.tree_util.tree_map(lambda _: weight_decay, params)
        anchor = state.anchor if toward_pretrained else coefficients  # (unused toward zero)

        def one(g, p, a, w):
            return g + (w * (p - a) if toward_pretrained else w * p).astype(g.dtype)

        return jax.tree_util.tree_map(one, updates, params, anchor, coefficients), state

    return optax.GradientTransformation(init, update)


class GateState(NamedTuple):
    """The gated transformation's state (untouched until `start`) and the number of updates seen."""

    inner: Any
    count: jax.Array


def gate(inner: optax.GradientTransformation, start: int) -> optax.GradientTransformation:
    """`inner` from update number `start` on; before that zero updates and `inner`'s state left as at init.

    So params unfrozen at step N start with fresh optimizer state (Adam moments 0, bias-correction count 0).
    A `lax.cond` on the traced count: correct under jit, and only one branch runs.
    """

    def init(params):
        return GateState(inner.init(params), jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        def run():
            new_updates, new_inner = inner.update(updates, state.inner, params)
            new_updates = jax.tree_util.tree_map(lambda u, g: u.astype(g.dtype), new_updates, updates)
            return new_updates, new_inner

        def hold():
            return jax.tree_util.tree_map(jnp.zeros_like, updates), state.inner

        new_updates, new_inner = jax.lax.cond(state.count >= start, run, hold)
        return new_updates, GateState(new_inner, optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def scale_by_adam_uncorrected(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam without bias correction ("BERTAdam", the original BERT optimizer; Mosbach et al. 2021 trace
    few-sample fine-tuning instability to it): m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
    u = m / (sqrt(v) + eps). The state is optax's ScaleByAdamState, so checkpoints look alike."""

    def init(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update(updates, state, params=None):
        mu = jax.tree_util.tree_map(lambda g, m: b1 * m + (1 - b1) * g, updates, state.mu)
        nu = jax.tree_util.tree_map(lambda g, v: b2 * v + (1 - b2) * jnp.square(g), updates, state.nu)
        new = jax.tree_util.tree_map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
        return new, optax.ScaleByAdamState(optax.safe_increment(state.count), mu, nu)

    return optax.GradientTransformation(init, update)


def _adam(o: Any) -> optax.GradientTransformation:
    if getattr(o, "bias_correction", True):
        return optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps)
    return scale_by_adam_uncorrected(o.b1, o.b2, o.eps)


PRECONDITIONERS = {  # the optimizer's preconditioning, before weight decay and the LR
    "adamw": _adam,
    # optax.adafactor's defaults: factored second moments (decay 0.8), update RMS clipped to 1.
    "adafactor": lambda o: optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0)),
    "sgd": lambda o: (
        optax.trace(decay=o.momentum, nesterov=o.nesterov) if o.momentum > 0 else optax.identity()
    ),
    "lion": lambda o: optax.scale_by_lion(b1=o.b1, b2=o.b2),
}
assert tuple(PRECONDITIONERS) == OPTIMIZERS


def scale_by_optimizer(o: Any) -> optax.GradientTransformation:
    """The optimizer's preconditioning (before weight decay and the LR): adamw, adafactor, sgd or lion."""
    return PRECONDITIONERS[o.name](o)


# ---------------------------------------------------------------------------------------------------------
# The optimizer.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Optimizer:
    """`tx` over the full params tree, the param table it was built from, and the per-group LR schedules."""

    tx: optax.GradientTransformation
    table: dict[str, ParamInfo]  # path -> ParamInfo, in tree order
    labels: Any  # the params tree with each leaf's multi_transform label
    schedules: dict[str, Schedule]  # group -> lr(step) for its lr_mult (the top layer under LLRD)
    schedule_args: dict[str, tuple[str, ScheduleArgs]]  # group -> (schedule type, resolved args)
    total_steps: int
    steps_per_epoch: int
    config: Any  # the optim ConfigDict it was built from
    abstract_params: Any  # ShapeDtypeStructs of the params, to size the optimizer state
    groups: tuple[Group, ...] = ()  # optim.groups then "default", with their merged schedules
    stacks: dict[str, int] = dataclasses.field(default_factory=dict)  # scanned stacks (ftjax.stacking)

    @property
    def phase_starts(self) -> tuple[int, ...]:
        """Sorted steps where the trainable set changes, starting with 0."""
        return tuple(
            sorted({0} | {r.unfreeze_step for r in self.table.values() if r.unfreeze_step is not None})
        )

    def trainable_at(self, step: int) -> frozenset[str]:
        """Per-layer paths (the table's) of the params that train at `step`."""
        return frozenset(p for p, r in self.table.items() if r.trainable_at(step))

    def _layers_of(self) -> dict[str, list[str]]:
        """{param path: its per-layer table paths} (one path for an unstacked param)."""
        by_index: dict[str, list[tuple[int, str]]] = {}
        for virtual in self.table:  # the table is in tree (sorted-key) order: layer 10 before layer 2
            path, index = stacking.split_layer_path(virtual, self.stacks)
            by_index.setdefault(path, []).append((index or 0, virtual))
        return {path: [v for _, v in sorted(rows)] for path, rows in by_index.items()}

    def trainable_params_at(self, step: int) -> frozenset[str]:
        """Paths in the params tree that the step differentiates at `step`: a stacked param when any of its
        layers trains (the others' gradients are masked: `grad_masks_at`)."""
        return frozenset(p for p, rows in self._layers_of().items()
                         if any(self.table[v].trainable_at(step) for v in rows))

    def per_param(self, value: Callable[[ParamInfo], Any]) -> Any:
        """A tree like the params of `value(row)`: a scalar per param, or for a stacked param whose layers
        differ an array [layers, 1, ...] that broadcasts against it (e.g. per-layer LR multipliers)."""
        layers = self._layers_of()

        def one(path, leaf):
            values = [value(self.table[v]) for v in layers[path]]
            if len(values) == 1 or all(v == values[0] for v in values):
                return values[0]
            return np.asarray(values).reshape((len(values),) + (1,) * (len(leaf.shape) - 1))

        return params_lib.map_with_path(one, self.abstract_params)

    def grad_masks_at(self, step: int) -> dict[str, tuple[bool, ...]]:
        """{stacked param path: per-layer trains-at-`step` flags} for stacked params only partly trained at
        `step`; the step zeroes the other layers' gradients (before clipping, norms and the optimizer)."""
        out = {}
        for path, rows in self._layers_of().items():
            flags = tuple(self.table[v].trainable_at(step) for v in rows)
            if len(flags) > 1 and any(flags) and not all(flags):
                out[path] = flags
        return out

    @property
    def segments(self) -> dict[str, list[tuple[int, int, str]]]:
        return _segments(self.table, self.stacks)

    def tx_with_starts(self, starts: dict[str, Any] | None = None) -> optax.GradientTransformation:
        """The chain over the table: clip -> multi_transform({label: its chain}) on the layer-segment view.
        `starts` ({label: step}, traced values allowed; a label not in it starts at 0) replaces the labels' unfreeze
        steps: a population member's own (ftjax/tune/population.py), a label it never trains starting past the run."""
        base_lr = {name: SCHEDULE_FNS[kind](a) for name, (kind, a) in self.schedule_args.items()}
        transforms: dict[str, optax.GradientTransformation] = {}
        for r in self.table.values():
            if r.label not in transforms:
                start = (r.unfreeze_step or 0) if starts is None else starts.get(r.label, 0)
                transforms[r.label] = (optax.set_to_zero() if r.frozen
                                       else _label_chain(self.config, r, base_lr[r.group], start))
        segments = self.segments
        view = LayerSegments({p: segs for p, segs in segments.items() if len(segs) > 1})
        tx = optax.multi_transform(transforms, view.labels(self.abstract_params, segments))
        # Always a 2-chain, so the state's structure does not depend on whether clipping is on.
        o = self.config
        tx = optax.chain(optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(), tx)
        return view.wrap(tx)

    def lr_at(self, step: int) -> dict[str, float]:
        """{group: its LR at `step`} (the group's lr_mult times its schedule; LLRD scales layers below it)."""
        return {g: float(fn(step)) for g, fn in self.schedules.items()}

    def state_bytes(self) -> int:
        shapes = jax.eval_shape(self.tx.init, self.abstract_params)
        return sum(
            math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(shapes)
        )

def build(
    optim_cfg: Any, params: Any, *, total_steps: int, steps_per_epoch: int, head_pattern: str | None = None,
    stacks: dict[str, int] | None = None,
) -> Optimizer:
    """The optimizer for `params` (nested dict of arrays or ShapeDtypeStructs) under `optim_cfg` (cfg.optim).

    tx = clip_by_global_norm(clip_norm) -> multi_transform({label: chain}) where each trainable label's chain
    is: optimizer preconditioning (scale_by_adam ...) -> decoupled weight decay (+ wd * p, or wd * (p - p0))
    -> scale by -lr_mult * schedule(step); labels that unfreeze at step N are gated (zeros and untouched
    state until N, the global schedule after); frozen params -> set_to_zero (no state). `stacks`
    (ftjax.stacking): the table has a row per layer of a scanned stack, and a stack whose layers get different
    labels is optimised per run of layers (`LayerSegments`), exactly as the unrolled model would be.
    """
    o = optim_cfg
    validate({"optim": o}, section="optim")  # the values, by their declaration; the rest needs the tree
    if total_steps < 1:
        raise ConfigError("train.steps", total_steps, "the run must have >= 1 optimizer step")
    steps_per_epoch = max(int(steps_per_epoch), 1)
    stacks = dict(stacks or {})
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    # The table has one row per layer of a scanned stack (the unrolled model's paths).
    per_layer = params_lib.unflatten(stacking.unstack(params_lib.flatten(abstract), stacks))
    table, groups = build_table(
        o, per_layer, total_steps=total_steps, steps_per_epoch=steps_per_epoch, head_pattern=head_pattern
    )
    return from_table(o, table, groups, abstract, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                      stacks=stacks)


def from_table(
    o: Any, table: dict[str, ParamInfo], groups: list[Group], abstract: Any, *, total_steps: int,
    steps_per_epoch: int, stacks: dict[str, int],
) -> Optimizer:
    """The optimizer of a param table (`build`'s, or a population's union of its members' tables)."""
    args = _group_schedule_args(o, groups, total_steps, steps_per_epoch)
    schedules = {g.name: _scaled(SCHEDULE_FNS[args[g.name][0]](args[g.name][1]), g.lr_mult) for g in groups}
    opt = Optimizer(None, table, None, schedules, args, total_steps, steps_per_epoch, o, abstract,
                    tuple(groups), stacks)
    opt.tx = opt.tx_with_starts()
    segments = opt.segments  # (computed from the whole table: once, not per param)
    opt.labels = params_lib.map_with_path(
        lambda p, _: segments[p][0][2] if len(segments[p]) == 1 else "per-layer", abstract)
    return opt


def _segments(table: dict[str, ParamInfo], stacks: dict[str, int]) -> dict[str, list[tuple[int, int, str]]]:
    """{param path: [(first layer, end layer, label), ...]}: the runs of consecutive layers of a stacked param
    that share a multi_transform label (one run for an unstacked param, or a stack whose layers agree)."""
    labels: dict[str, dict[int, str]] = {}
    for virtual, row in table.items():
        path, index = stacking.split_layer_path(virtual, stacks)
        labels.setdefault(path, {})[index or 0] = row.label
    out: dict[str, list[tuple[int, int, str]]] = {}
    for path, by_index in labels.items():
        runs = out.setdefault(path, [])
        for i in sorted(by_index):
            if runs and runs[-1][2] == by_index[i]:
                runs[-1] = (runs[-1][0], i + 1, by_index[i])
            else:
                runs.append((i, i + 1, by_index[i]))
    return out


SEGMENT = "segment_{}_{}"  # the key of layers [a, b) of a stacked param in the optimizer's view


class LayerSegments:
    """The optimizer's view of stacked params whose layers differ (LLRD multipliers, per-layer freezing or
    unfreezing steps): each such param is split along its layer axis into runs of layers with one label,
    {"segment_A_B": layers A..B-1}, so every run gets exactly the chain (and the state, or none when frozen)
    its layers would get unrolled. Params whose layers agree, and unstacked ones, pass unchanged."""

    def __init__(self, segments: dict[str, list[tuple[int, int, str]]]):
        self.segments = segments

    def _map(self, tree: Any, fn: Callable[[str, Any], Any], prefix: str = "") -> Any:
        if isinstance(tree, dict) and prefix.rstrip("/") not in self.segments:
            return {k: self._map(v, fn, f"{prefix}{k}/") for k, v in tree.items()}
        return fn(prefix.rstrip("/"), tree)

    def split(self, tree: Any) -> Any:
        def one(path, x):
            if path not in self.segments or x is None:
                return x
            return {SEGMENT.format(a, b): x[a:b] for a, b, _ in self.segments[path]}
        return self._map(tree, one) if self.segments else tree

    def join(self, tree: Any) -> Any:
        def one(path, x):
            if path not in self.segments:
                return x
            return jnp.concatenate([x[SEGMENT.format(a, b)] for a, b, _ in self.segments[path]], axis=0)
        return self._map(tree, one) if self.segments else tree

    def labels(self, params: Any, segments: dict[str, list[tuple[int, int, str]]]) -> Any:
        """The multi_transform labels of the view: each segment its run's label."""
        def one(path, _):
            if path in self.segments:
                return {SEGMENT.format(a, b): label for a, b, label in self.segments[path]}
            return segments[path][0][2]
        return self._map(params, one)

    def wrap(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        """`tx` applied to the view: its state is over the segments; updates come back as whole params."""
        if not self.segments:
            return tx

        def init(params):
            return tx.init(self.split(params))

        def update(updates, state, params=None):
            new, state = tx.update(self.split(updates), state, None if params is None else self.split(params))
            return self.join(new), state

        return optax.GradientTransformation(init, update)


def _group_schedule_args(
    o: Any, groups: list[Group], total_steps: int, steps_per_epoch: int
) -> dict[str, tuple[str, ScheduleArgs]]:
    """{group: (schedule type, its arguments resolved for this run)}; ConfigError naming the group's field."""
    args = {}
    for g in groups:
        field = "optim.schedule" if g.name == "default" else f"{g.field}.schedule"
        kind = g.schedule["type"]
        args[g.name] = (kind, schedule_args(g.schedule, o.lr, total_steps, steps_per_epoch, field))
    return args


def _scaled(schedule: Schedule, mult: float) -> Schedule:
    return lambda t: mult * schedule(t)


def _label_chain(o: Any, row: ParamInfo, schedule: Schedule, start: Any) -> optax.GradientTransformation:
    """A trainable label's chain; gated until `start` (an int, or a traced step: a population member's)."""
    mult = row.lr_mult

    def neg_lr(count):
        # A gated chain counts from 0 at its unfreeze step; it follows the run's (global) schedule.
        return -mult * schedule(count + start)

    parts = [scale_by_optimizer(o)]
    if row.decay:
        parts.append(decoupled_weight_decay(row.weight_decay, o.decay_toward == "pretrained"))
    parts.append(optax.scale_by_schedule(neg_lr))
    chain = optax.chain(*parts)
    return chain if isinstance(start, int) and start == 0 else gate(chain, start)
