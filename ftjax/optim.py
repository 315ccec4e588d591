"""The optimizer from the config and the param tree: one param table, LR schedules and one optax chain.

Every decision about a parameter (group, frozen or when it unfreezes, weight decay, LR multiplier, layer
depth) is made once, in `Optimizer.table`; the optax chain, `describe()` (dry_run) and `plot_lr()` read it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import params as params_lib
from ftjax.config import SCHEDULE_KEYS, SCHEDULES, ConfigError, duration_to_steps, parse_layer_ranges

Schedule = Callable[[Any], Any]

FROZEN = "frozen"  # the multi_transform label of params that never train in this run
# Used when a schedule dict (a group's) leaves a key out and there is no optim.schedule to inherit from.
SCHEDULE_DEFAULTS = {
    "warmup": 0,
    "decay": 1.0,
    "min_ratio": 0.0,
    "power": 1.0,
    "gamma": 0.1,
    "pct_start": 0.3,
}
ONE_CYCLE_DIV = 25.0  # one_cycle starts at lr / 25 (torch OneCycleLR's div_factor)
ONE_CYCLE_FINAL_DIV = 1e4  # ... and ends at lr / 25 / 1e4 when min_ratio is 0 (torch's final_div_factor)


# ---------------------------------------------------------------------------------------------------------
# Schedules. Each returns lr(t) for the optimizer step t = 0, 1, ... (the update at step t uses lr(t)).
# Notation: P = peak LR, E = P * min_ratio, T = total steps, W = warmup steps, D = decay steps (a
# duration: steps, epochs or a fraction of the run), R = T - W the steps after warmup, D' = min(D, R).
# Schedules with warmup ramp linearly lr(t) = P * t / W for t < W, then run their main part at s = t - W
# (composed with optax.join_schedules). constant, linear, cosine and one_cycle have no warmup.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScheduleArgs:
    """A schedule's resolved arguments, durations in steps."""

    peak: float
    total: int
    warmup: int
    decay: int
    min_ratio: float
    power: float
    gamma: float
    pct_start: float

    @property
    def end(self) -> float:
        return self.peak * self.min_ratio

    @property
    def decay_after_warmup(self) -> int:
        """D' = min(D, T - W), at least 1: a decay that follows warmup ends by the end of the run."""
        return max(1, min(self.decay, self.total - self.warmup))


def _with_warmup(a: ScheduleArgs, main: Schedule) -> Schedule:
    if a.warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, a.peak, a.warmup), main], [a.warmup])


def constant(a: ScheduleArgs) -> Schedule:
    """lr(t) = P."""
    return optax.constant_schedule(a.peak)


def linear(a: ScheduleArgs) -> Schedule:
    """lr(t) = P - (P - E) * min(t, D) / D (no warmup)."""
    return optax.linear_schedule(a.peak, a.end, max(1, a.decay))


def cosine(a: ScheduleArgs) -> Schedule:
    """lr(t) = E + (P - E) * (1 + cos(pi * min(t, D) / D)) / 2 (no warmup)."""
    return optax.cosine_decay_schedule(a.peak, max(1, a.decay), alpha=a.min_ratio)


def warmup_cosine(a: ScheduleArgs) -> Schedule:
    """t < W: P * t / W; then lr = E + (P - E) * (1 + cos(pi * min(s, D') / D')) / 2, s = t - W."""
    return _with_warmup(a, optax.cosine_decay_schedule(a.peak, a.decay_after_warmup, alpha=a.min_ratio))


def warmup_linear(a: ScheduleArgs) -> Schedule:
    """t < W: P * t / W; then lr = P - (P - E) * min(s, D') / D', s = t - W (HF's linear schedule at E=0)."""
    return _with_warmup(a, optax.linear_schedule(a.peak, a.end, a.decay_after_warmup))


def warmup_constant(a: ScheduleArgs) -> Schedule:
    """t < W: P * t / W; then lr = P."""
    return _with_warmup(a, optax.constant_schedule(a.peak))


def wsd(a: ScheduleArgs) -> Schedule:
    """Warmup-stable-decay. t < W: P * t / W; W <= t < T - D: P; then P - (P - E) * min(t - (T - D), D) / D.

    Needs W + D <= T (decay is the length of the final decay, e.g. 0.1 of the run).
    """
    stable_end = a.total - a.decay
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, a.peak, max(1, a.warmup)),
            optax.constant_schedule(a.peak),
            optax.linear_schedule(a.peak, a.end, max(1, a.decay)),
        ],
        [a.warmup, stable_end],
    )


def inverse_sqrt(a: ScheduleArgs) -> Schedule:
    """t < W: P * t / W; then lr = P * max(min_ratio, sqrt(K / max(t, K))), K = max(W, 1)."""
    k = float(max(a.warmup, 1))

    def main(s):
        t = jnp.asarray(s, jnp.float32) + a.warmup
        return a.peak * jnp.maximum(a.min_ratio, jnp.sqrt(k / jnp.maximum(t, k)))

    return _with_warmup(a, main)


def polynomial(a: ScheduleArgs) -> Schedule:
    """t < W: P * t / W; then lr = E + (P - E) * (1 - min(s, D') / D') ** power, s = t - W."""
    return _with_warmup(a, optax.polynomial_schedule(a.peak, a.end, a.power, a.decay_after_warmup))


def step(a: ScheduleArgs) -> Schedule:
    """t < W: P * t / W; then lr = max(E, P * gamma ** floor(s / D)), s = t - W (decay is the interval)."""
    end = a.end if a.min_ratio > 0 else None
    return _with_warmup(
        a, optax.exponential_decay(a.peak, max(1, a.decay), a.gamma, staircase=True, end_value=end)
    )


def one_cycle(a: ScheduleArgs) -> Schedule:
    """One-cycle, no warmup (pct_start sets the rise): I = P / 25, F = E if min_ratio > 0 else I / 1e4,
    C = int(pct_start * T).

    t < C: I + (P - I) * (1 - cos(pi * t / C)) / 2;
    C <= t < T: P + (F - P) * (1 - cos(pi * (t - C) / (T - C))) / 2;
    t >= T: F.
    """
    final_div = ONE_CYCLE_FINAL_DIV if a.min_ratio == 0 else 1.0 / (ONE_CYCLE_DIV * a.min_ratio)
    return optax.cosine_onecycle_schedule(a.total, a.peak, a.pct_start, ONE_CYCLE_DIV, final_div)


SCHEDULE_FNS: dict[str, Callable[[ScheduleArgs], Schedule]] = {
    "constant": constant,
    "linear": linear,
    "cosine": cosine,
    "warmup_cosine": warmup_cosine,
    "warmup_linear": warmup_linear,
    "warmup_constant": warmup_constant,
    "wsd": wsd,
    "inverse_sqrt": inverse_sqrt,
    "polynomial": polynomial,
    "step": step,
    "one_cycle": one_cycle,
}
assert tuple(SCHEDULE_FNS) == SCHEDULES
USES_WARMUP = frozenset(
    {"warmup_cosine", "warmup_linear", "warmup_constant", "wsd", "inverse_sqrt", "polynomial", "step"}
)
USES_DECAY = frozenset({"linear", "cosine", "warmup_cosine", "warmup_linear", "wsd", "polynomial", "step"})


def schedule_args(
    spec: Mapping[str, Any],
    peak: float,
    total_steps: int,
    steps_per_epoch: int,
    field: str = "optim.schedule",
) -> ScheduleArgs:
    """Resolves a schedule dict's durations to steps and checks them against the run (ConfigError)."""
    kind = spec.get("type")
    if kind not in SCHEDULE_FNS:
        raise ConfigError(f"{field}.type", kind, f"one of {SCHEDULES}")
    unknown = set(spec) - set(SCHEDULE_KEYS)
    if unknown:
        raise ConfigError(field, dict(spec), f"unknown keys {sorted(unknown)}; valid: {SCHEDULE_KEYS}")
    value = {**SCHEDULE_DEFAULTS, **spec}
    warmup = duration_to_steps(value["warmup"], f"{field}.warmup", total_steps, steps_per_epoch)
    decay = duration_to_steps(value["decay"], f"{field}.decay", total_steps, steps_per_epoch)
    args = ScheduleArgs(
        peak=float(peak),
        total=int(total_steps),
        warmup=warmup if kind in USES_WARMUP else 0,
        decay=decay,
        min_ratio=float(value["min_ratio"]),
        power=float(value["power"]),
        gamma=float(value["gamma"]),
        pct_start=float(value["pct_start"]),
    )
    if not 0.0 <= args.min_ratio <= 1.0:
        raise ConfigError(f"{field}.min_ratio", args.min_ratio, "in [0, 1]")
    if args.power <= 0:
        raise ConfigError(f"{field}.power", args.power, "> 0")
    if not 0.0 < args.gamma <= 1.0:
        raise ConfigError(f"{field}.gamma", args.gamma, "in (0, 1]")
    if not 0.0 < args.pct_start < 1.0:
        raise ConfigError(f"{field}.pct_start", args.pct_start, "in (0, 1)")
    if kind in USES_WARMUP and warmup >= total_steps:
        raise ConfigError(
            f"{field}.warmup",
            value["warmup"],
            f"is {warmup} steps, not shorter than the run ({total_steps} steps)",
        )
    if kind in USES_DECAY and decay < 1:
        raise ConfigError(
            f"{field}.decay", value["decay"], f"is {decay} steps; {kind} needs a decay of >= 1 step"
        )
    if kind == "wsd" and warmup + decay > total_steps:
        raise ConfigError(
            f"{field}.decay",
            value["decay"],
            f"wsd needs warmup + decay <= the run: {warmup} + {decay} > {total_steps} steps "
            "(decay is the final phase, e.g. 0.1)",
        )
    return args


def lr_curve(schedule: Schedule, steps: Any) -> np.ndarray:
    """The schedule at many steps at once (vmapped; some optax schedules don't broadcast over arrays)."""
    steps = jnp.asarray(steps, jnp.int32)
    return np.asarray(jax.vmap(lambda t: jnp.asarray(schedule(t), jnp.float32))(steps))


def make_schedule(
    spec: Mapping[str, Any],
    peak: float,
    total_steps: int,
    steps_per_epoch: int,
    field: str = "optim.schedule",
) -> Schedule:
    """An optax schedule lr(step) from a schedule dict (see each schedule function for its formula)."""
    args = schedule_args(spec, peak, total_steps, steps_per_epoch, field)
    return SCHEDULE_FNS[spec["type"]](args)


# ---------------------------------------------------------------------------------------------------------
# Transforms: decoupled weight decay (toward zero or the pre-trained weights) and the unfreeze gate.
# ---------------------------------------------------------------------------------------------------------


class AnchorState(NamedTuple):
    """The weights that L2-SP decays toward (a copy of the params at init: the pre-trained values)."""

    anchor: Any


def decoupled_weight_decay(
    weight_decay: float, toward_pretrained: bool = False
) -> optax.GradientTransformation:
    """Adds weight_decay * p (or weight_decay * (p - p0), L2-SP) to the updates; scaled by -lr afterwards.

    The anchor p0 lives in the optimizer state (not a jit constant), so it is sharded, checkpointed and
    donated like any other state.
    """
    if not toward_pretrained:
        return optax.add_decayed_weights(weight_decay)

    def init(params):
        return AnchorState(jax.tree_util.tree_map(lambda p: jnp.array(p, copy=True), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(
                "decay toward the pre-trained weights needs params: call tx.update(grads, state, params)"
            )
        updates = jax.tree_util.tree_map(
            lambda g, p, a: g + (weight_decay * (p - a)).astype(g.dtype), updates, params, state.anchor
        )
        return updates, state

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


def scale_by_optimizer(o: Any) -> optax.GradientTransformation:
    """The optimizer's preconditioning (before weight decay and the LR): adamw, adafactor, sgd or lion."""
    if o.name == "adamw":
        return optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps)
    if o.name == "adafactor":
        # optax.adafactor's defaults: factored second moments (decay 0.8), update RMS clipped to 1.
        return optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0))
    if o.name == "sgd":
        return optax.trace(decay=o.momentum, nesterov=o.nesterov) if o.momentum > 0 else optax.identity()
    if o.name == "lion":
        return optax.scale_by_lion(b1=o.b1, b2=o.b2)
    raise ConfigError("optim.name", o.name, "one of adamw, adafactor, sgd, lion")


# ---------------------------------------------------------------------------------------------------------
# The param table.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One row of the param table: everything the optimizer (and dry_run) decides about a param."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    group: str  # "default" or the name of the first optim.groups entry whose regex matches
    frozen: bool  # never trains in this run
    unfreeze_step: int | None  # frozen before this step, trains from it; None: no unfreezing
    decay: bool  # gets decoupled weight decay
    weight_decay: float  # its coefficient (0.0 when decay is False)
    lr_mult: float  # group lr_mult * layer_lr_decay ** (top depth - depth)
    depth: int  # 0 embeddings, i + 1 layer i, num_layers + 1 everything else (head, pooler)
    label: str  # its optax.multi_transform label

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def trainable_at(self, step: int) -> bool:
        return not self.frozen and (self.unfreeze_step is None or step >= self.unfreeze_step)

    @property
    def status(self) -> str:
        if self.frozen:
            return "frozen"
        return "train" if self.unfreeze_step is None else f"from step {self.unfreeze_step}"


@dataclasses.dataclass(frozen=True)
class Group:
    name: str
    pattern: str
    lr_mult: float
    weight_decay: float
    schedule: dict[str, Any]
    frozen: bool
    field: str


def _examples(paths: list[str], n: int = 4) -> str:
    shown = ", ".join(paths[:n])
    return f"{shown}{', ...' if len(paths) > n else ''} ({len(paths)} params)"


def _match(pattern: str, paths: list[str], field: str, what: str = "no parameter") -> list[str]:
    """Paths the regex fullmatches; ConfigError naming the field (with example paths) when there are none."""
    regex = re.compile(pattern)
    hits = [p for p in paths if regex.fullmatch(p)]
    if not hits:
        raise ConfigError(
            field, pattern, f"matches {what} (fullmatch on '/'-joined paths, e.g. {_examples(paths)})"
        )
    return hits


def _groups(o: Any) -> list[Group]:
    base = o.schedule.to_dict() if hasattr(o.schedule, "to_dict") else dict(o.schedule)
    groups, names = [], {"default", FROZEN}
    for i, (pattern, spec) in enumerate(o.groups):
        spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
        name = spec.get("name", f"group{i}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in names:
            raise ConfigError(
                f"optim.groups[{i}].name", name, "a unique identifier, not 'default' or 'frozen'"
            )
        names.add(name)
        weight_decay = float(spec.get("weight_decay", o.weight_decay))
        if weight_decay < 0:
            raise ConfigError(f"optim.groups[{i}].weight_decay", weight_decay, ">= 0")
        groups.append(
            Group(
                name=name,
                pattern=pattern,
                lr_mult=float(spec.get("lr_mult", 1.0)),
                weight_decay=weight_decay,
                schedule={**base, **dict(spec.get("schedule", {}))},
                frozen=bool(spec.get("frozen", False)),
                field=f"optim.groups[{i}]",
            )
        )
    groups.append(Group("default", ".*", 1.0, float(o.weight_decay), base, False, "optim"))
    return groups


def _as_tuple(value: Any) -> tuple:
    return (value,) if isinstance(value, str) else tuple(value or ())


def build_table(
    o: Any, params: Any, *, total_steps: int, steps_per_epoch: int, head_pattern: str | None = None
) -> tuple[dict[str, ParamInfo], list[Group]]:
    """The param table (path -> ParamInfo, in tree order) and the groups; ConfigError on unmatched regexes."""
    flat = params_lib.flatten(params)
    paths = list(flat)
    if not paths:
        raise ConfigError("optim", "<empty param tree>", "the model has no parameters")
    groups = _groups(o)

    # Groups: the first entry whose regex matches wins; an entry every match of which is taken is an error.
    group_of: dict[str, Group] = {}
    for g in groups[:-1]:
        hits = _match(g.pattern, paths, f"{g.field}[0]")
        new = [p for p in hits if p not in group_of]
        if not new:
            raise ConfigError(
                f"{g.field}[0]", g.pattern, "every param it matches is taken by an earlier group"
            )
        group_of.update({p: g for p in new})
    for p in paths:
        group_of.setdefault(p, groups[-1])

    # Depth for layer-wise LR decay.
    layer_re, emb_re = re.compile(o.layer_pattern), re.compile(o.embedding_pattern)
    layer_of = {}
    for p in paths:
        m = layer_re.fullmatch(p)
        if m:
            if m.re.groups < 1 or m.group(1) is None or not m.group(1).isdigit():
                raise ConfigError(
                    "optim.layer_pattern", o.layer_pattern, "group(1) must capture the layer index"
                )
            layer_of[p] = int(m.group(1))
    num_layers = max(layer_of.values()) + 1 if layer_of else 0
    top = num_layers + 1
    depth = {p: layer_of[p] + 1 if p in layer_of else 0 if emb_re.fullmatch(p) else top for p in paths}
    if o.layer_lr_decay < 1.0 and not layer_of:
        raise ConfigError(
            "optim.layer_lr_decay",
            o.layer_lr_decay,
            f"< 1 needs params whose path matches optim.layer_pattern={o.layer_pattern!r}; none does "
            f"(e.g. {_examples(paths)}): fix layer_pattern or set layer_lr_decay=1.0",
        )

    # Freezing.
    frozen: set[str] = set()
    for i, pattern in enumerate(_as_tuple(o.freeze)):
        frozen.update(_match(pattern, paths, f"optim.freeze[{i}]"))
    if o.freeze_layers:
        embeddings, layers = parse_layer_ranges(o.freeze_layers, "optim.freeze_layers")
        missing = sorted(set(layers) - set(layer_of.values()))
        if missing:
            have = f"layers 0-{num_layers - 1}" if num_layers else "no layers"
            raise ConfigError(
                "optim.freeze_layers",
                o.freeze_layers,
                f"layers {missing} do not exist: the model has {have} "
                f"(by optim.layer_pattern={o.layer_pattern!r})",
            )
        if embeddings and not any(d == 0 for d in depth.values()):
            raise ConfigError(
                "optim.freeze_layers",
                o.freeze_layers,
                f"names embeddings but no param matches optim.embedding_pattern={o.embedding_pattern!r} "
                f"(e.g. {_examples(paths)})",
            )
        frozen.update(
            p for p in paths if (embeddings and depth[p] == 0) or (p in layer_of and layer_of[p] in layers)
        )
    if o.train_only:
        if o.train_only == "head":
            if not head_pattern:
                raise ConfigError(
                    "optim.train_only", "head", "this model has no head_pattern: give a regex instead"
                )
            pattern, what = head_pattern, f"no parameter (the model's head_pattern {head_pattern!r})"
        else:
            pattern, what = o.train_only, "no parameter"
        keep = set(_match(pattern, paths, "optim.train_only", what))
        frozen.update(p for p in paths if p not in keep)
    frozen.update(p for p in paths if group_of[p].frozen)
    lora = o.get("lora")
    if lora is not None and lora.rank > 0:  # LoRA: only the adapters (and optim.lora.also_train) train.
        keep = set(_match(r"(?:.*/)?lora_[ab]", paths, "optim.lora.rank",
                          "no lora_a/lora_b param (apply ftjax.lora.apply_lora to the model first)"))
        also = (head_pattern or "") if lora.also_train == "auto" else lora.also_train
        if also:
            keep.update(_match(also, paths, "optim.lora.also_train"))
        frozen.update(p for p in paths if p not in keep)

    # Gradual unfreezing: a frozen param matching an entry trains from the earliest step any such entry names.
    unfreeze: dict[str, int] = {}
    for i, item in enumerate(_as_tuple(o.unfreeze)):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ConfigError(
                f"optim.unfreeze[{i}]", item, 'a (when, regex) pair; when = step (int) or "Nep"'
            )
        when, pattern = item
        field = f"optim.unfreeze[{i}]"
        at = duration_to_steps(when, f"{field}[0]", total_steps, steps_per_epoch)
        if at >= total_steps:
            raise ConfigError(
                f"{field}[0]", when, f"is step {at}, not inside the run (steps 0-{total_steps - 1})"
            )
        hits = [p for p in _match(pattern, paths, f"{field}[1]") if p in frozen]
        if not hits:
            raise ConfigError(
                f"{field}[1]",
                pattern,
                "matches no frozen parameter: unfreezing applies to params frozen by optim.freeze, "
                "optim.freeze_layers, optim.train_only or a frozen group",
            )
        for p in hits:
            unfreeze[p] = min(at, unfreeze.get(p, at))
    if len(frozen) == len(paths) and not unfreeze:
        raise ConfigError(
            "optim.freeze", _as_tuple(o.freeze), "every parameter is frozen: nothing would train"
        )

    # Weight decay.
    exclude = re.compile(o.decay_exclude) if o.decay_exclude else None
    if o.decay_exclude:
        _match(o.decay_exclude, paths, "optim.decay_exclude")

    def decays(p: str) -> bool:
        if exclude is not None and exclude.fullmatch(p):
            return False
        return o.decay_embeddings or not emb_re.fullmatch(p)

    llrd = o.layer_lr_decay < 1.0
    table = {}
    for p, leaf in flat.items():
        g = group_of[p]
        is_frozen = p in frozen and p not in unfreeze
        start = unfreeze[p] if unfreeze.get(p, 0) > 0 else None
        wd = g.weight_decay if decays(p) and not is_frozen else 0.0
        if is_frozen:
            label = FROZEN
        else:
            label = g.name + (f"_d{depth[p]}" if llrd else "") + ("_wd" if wd > 0 else "_nowd")
            label += f"_from{start}" if start else ""
        table[p] = ParamInfo(
            path=p,
            shape=tuple(int(d) for d in leaf.shape),
            dtype=str(jnp.dtype(leaf.dtype)),
            group=g.name,
            frozen=is_frozen,
            unfreeze_step=start,
            decay=wd > 0,
            weight_decay=wd,
            lr_mult=g.lr_mult * o.layer_lr_decay ** (top - depth[p]),
            depth=depth[p],
            label=label,
        )
    return table, groups


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

    @property
    def phase_starts(self) -> tuple[int, ...]:
        """Sorted steps where the trainable set changes, starting with 0."""
        return tuple(
            sorted({0} | {r.unfreeze_step for r in self.table.values() if r.unfreeze_step is not None})
        )

    def trainable_at(self, step: int) -> frozenset[str]:
        """Paths of the params that train at `step`."""
        return frozenset(p for p, r in self.table.items() if r.trainable_at(step))

    def lr_at(self, step: int) -> dict[str, float]:
        """{group: its LR at `step`} (the group's lr_mult times its schedule; LLRD scales layers below it)."""
        return {g: float(fn(step)) for g, fn in self.schedules.items()}

    def state_bytes(self) -> int:
        shapes = jax.eval_shape(self.tx.init, self.abstract_params)
        return sum(
            math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(shapes)
        )

    def describe(self) -> str:
        """The param table grouped by group, with counts and % trainable (what --mode=dry_run prints)."""
        o, rows = self.config, list(self.table.values())
        total = sum(r.size for r in rows) or 1
        wd_kind = "toward pre-trained (L2-SP)" if o.decay_toward == "pretrained" else "toward zero"
        lines = [
            (
                f"optimizer {o.name}: lr {o.lr:g}, clip_norm {o.clip_norm:g}, "
                f"weight_decay {o.weight_decay:g} "
                f"{wd_kind}, layer_lr_decay {o.layer_lr_decay:g}; {self.total_steps} steps "
                f"({self.steps_per_epoch} per epoch)"
            )
        ]
        width = max(len(r.path) for r in rows)
        mult = {g.name: g.lr_mult for g in _groups(o)}
        head = (
            f"  {'path':<{width}}  {'shape':<16} {'dtype':<9} {'status':<14} {'decay':<8} "
            f"{'lr_mult':>9} {'depth':>5}"
        )
        for name in self.schedules:
            group = [r for r in rows if r.group == name]
            if not group:
                continue
            n = sum(r.size for r in group)
            n_train = sum(r.size for r in group if not r.frozen)
            kind, a = self.schedule_args[name]
            lines += [
                "",
                (
                    f"group {name}: {len(group)} tensors, {n:,} params, {n_train:,} trained "
                    f"({100 * n_train / max(n, 1):.1f}%); schedule {kind} "
                    f"(lr {a.peak * mult[name]:g}, warmup "
                    f"{a.warmup}, decay {a.decay} steps, min_ratio {a.min_ratio:g})"
                ),
                head,
            ]
            for r in group:
                decay = f"{r.weight_decay:g}" if r.decay else "no"
                lines.append(
                    f"  {r.path:<{width}}  {r.shape!s:<16} {r.dtype:<9} {r.status:<14} {decay:<8} "
                    f"{r.lr_mult:>9.4g} {r.depth:>5}"
                )
        at0 = sum(r.size for r in rows if r.trainable_at(0))
        ever = sum(r.size for r in rows if not r.frozen)
        lines += [
            "",
            (
                f"total: {len(rows)} tensors, {total:,} params; trainable at step 0: {at0:,} "
                f"({100 * at0 / total:.1f}%); trained at some step: {ever:,} ({100 * ever / total:.1f}%); "
                f"frozen: {total - ever:,}"
            ),
        ]
        for s in self.phase_starts[1:]:
            n = sum(r.size for r in rows if r.unfreeze_step == s)
            lines.append(
                f"  unfreezing at step {s} (epoch {s / max(self.steps_per_epoch, 1):.2f}): {n:,} params"
            )
        lines.append(f"optimizer state: {self.state_bytes():,} bytes")
        return "\n".join(lines)

    def _sample_steps(self, n: int) -> list[int]:
        t = self.total_steps
        return sorted({round(i * t / n) for i in range(n + 1)})

    def plot_lr(self, png_path: str) -> None:
        """A PNG of each group's LR over the run (dashed: its lowest layer under LLRD; dotted: unfreezing)."""
        import os

        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        steps = self._sample_steps(min(self.total_steps, 1000))
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, fn in self.schedules.items():
            group = [r for r in self.table.values() if r.group == name and not r.frozen]
            if not group:
                continue
            lrs = lr_curve(fn, steps).tolist()
            (line,) = ax.plot(steps, lrs, label=name)
            top = max(r.lr_mult for r in group)
            low = min(r.lr_mult for r in group)
            if low < top and top > 0:
                ax.plot(
                    steps,
                    [x * low / top for x in lrs],
                    "--",
                    color=line.get_color(),
                    label=f"{name} (lowest layer)",
                )
        for s in self.phase_starts[1:]:
            ax.axvline(s, linestyle=":", color="gray")
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.set_title(f"{self.config.name}, {self.config.schedule.type}")
        ax.legend(fontsize="small")
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
        fig.savefig(png_path, dpi=100)
        plt.close(fig)


def build(
    optim_cfg: Any, params: Any, *, total_steps: int, steps_per_epoch: int, head_pattern: str | None = None
) -> Optimizer:
    """The optimizer for `params` (nested dict of arrays or ShapeDtypeStructs) under `optim_cfg` (cfg.optim).

    tx = clip_by_global_norm(clip_norm) -> multi_transform({label: chain}) where each trainable label's chain
    is: optimizer preconditioning (scale_by_adam ...) -> decoupled weight decay (+ wd * p, or wd * (p - p0))
    -> scale by -lr_mult * schedule(step); labels that unfreeze at step N are gated (zeros and untouched
    state until N, the global schedule after); frozen params -> set_to_zero (no state).
    """
    o = optim_cfg
    if total_steps < 1:
        raise ConfigError("train.steps", total_steps, "the run must have >= 1 optimizer step")
    steps_per_epoch = max(int(steps_per_epoch), 1)
    table, groups = build_table(
        o, params, total_steps=total_steps, steps_per_epoch=steps_per_epoch, head_pattern=head_pattern
    )
    schedules, args = {}, {}
    base_lr: dict[str, Schedule] = {}
    for g in groups:
        field = "optim.schedule" if g.name == "default" else f"{g.field}.schedule"
        args[g.name] = (
            g.schedule["type"],
            schedule_args(g.schedule, o.lr, total_steps, steps_per_epoch, field),
        )
        fn = SCHEDULE_FNS[g.schedule["type"]](args[g.name][1])
        base_lr[g.name] = fn
        schedules[g.name] = _scaled(fn, g.lr_mult)

    transforms: dict[str, optax.GradientTransformation] = {}
    for r in table.values():
        if r.label in transforms:
            continue
        if r.frozen:
            transforms[r.label] = optax.set_to_zero()
            continue
        transforms[r.label] = _label_chain(o, r, base_lr[r.group])
    labels = params_lib.map_with_path(lambda p, _: table[p].label, params)
    tx = optax.multi_transform(transforms, labels)
    # Always a 2-chain, so the state's structure does not depend on whether clipping is on.
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(), tx)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return Optimizer(tx, table, labels, schedules, args, total_steps, steps_per_epoch, o, abstract)


def _scaled(schedule: Schedule, mult: float) -> Schedule:
    return lambda t: mult * schedule(t)


def _label_chain(o: Any, row: ParamInfo, schedule: Schedule) -> optax.GradientTransformation:
    start = row.unfreeze_step or 0
    mult = row.lr_mult

    def neg_lr(count):
        # A gated chain counts from 0 at its unfreeze step; it follows the run's (global) schedule.
        return -mult * schedule(count + start)

    parts = [scale_by_optimizer(o)]
    if row.decay:
        parts.append(decoupled_weight_decay(row.weight_decay, o.decay_toward == "pretrained"))
    parts.append(optax.scale_by_schedule(neg_lr))
    chain = optax.chain(*parts)
    return gate(chain, start) if start else chain
