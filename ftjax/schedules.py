"""LR schedules: one function per `optim.schedule.type`, each lr(t) in closed form (its docstring), built
from optax schedules; and the resolution of a schedule dict's durations to steps for one run.

Each returns lr(t) for the optimizer step t = 0, 1, ... (the update at step t uses lr(t)).
Notation: P = peak LR, E = P * min_ratio, T = total steps, W = warmup steps, D = decay steps (a
duration: steps, epochs or a fraction of the run), R = T - W the steps after warmup, D' = min(D, R).
Schedules with warmup ramp linearly lr(t) = P * t / W for t < W, then run their main part at s = t - W
(composed with optax.join_schedules). constant, linear, cosine and one_cycle have no warmup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax.config import (
    SCHEDULE_DEFAULTS,
    SCHEDULES,
    ConfigError,
    duration_to_steps,
    validate_schedule,
)

Schedule = Callable[[Any], Any]

ONE_CYCLE_DIV = 25.0  # one_cycle starts at lr / 25 (torch OneCycleLR's div_factor)
ONE_CYCLE_FINAL_DIV = 1e4  # ... and ends at lr / 25 / 1e4 when min_ratio is 0 (torch's final_div_factor)


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
    cooldown: str = "linear"
    cut_frac: float = 0.1
    ratio: float = 32.0

    @property
    def end(self) -> float:
        return self.peak * self.min_ratio

    @property
    def decay_after_warmup(self) -> int:
        """D' = min(D, T - W), at least 1: a decay that follows warmup ends by the end of the run."""
        return max(1, min(self.decay, self.total - self.warmup))


def with_warmup(a: ScheduleArgs, main: Schedule) -> Schedule:
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
    return with_warmup(a, optax.cosine_decay_schedule(a.peak, a.decay_after_warmup, alpha=a.min_ratio))


def warmup_linear(a: ScheduleArgs) -> Schedule:
    """t < W: P * t / W; then lr = P - (P - E) * min(s, D') / D', s = t - W (HF's linear schedule at E=0)."""
    return with_warmup(a, optax.linear_schedule(a.peak, a.end, a.decay_after_warmup))


def warmup_constant(a: ScheduleArgs) -> Schedule:
    """t < W: P * t / W; then lr = P."""
    return with_warmup(a, optax.constant_schedule(a.peak))


def wsd(a: ScheduleArgs) -> Schedule:
    """Warmup-stable-decay. t < W: P * t / W; W <= t < T - D: P; then, with s = min(t - (T - D), D):
    cooldown "linear": P - (P - E) * s / D; "1-sqrt" (Hägele et al. 2024): P - (P - E) * sqrt(s / D).

    Needs W + D <= T (decay is the length of the final decay, e.g. 0.1 of the run).
    """
    stable_end, decay = a.total - a.decay, max(1, a.decay)

    def one_minus_sqrt(s):
        frac = jnp.minimum(jnp.asarray(s, jnp.float32), decay) / decay
        return a.peak - (a.peak - a.end) * jnp.sqrt(frac)

    cooldown = optax.linear_schedule(a.peak, a.end, decay) if a.cooldown == "linear" else one_minus_sqrt
    return optax.join_schedules(
        [optax.linear_schedule(0.0, a.peak, max(1, a.warmup)), optax.constant_schedule(a.peak), cooldown],
        [a.warmup, stable_end],
    )


def stlr_cut(a: ScheduleArgs) -> int:
    """The step where the slanted triangle peaks: floor(T * cut_frac)."""
    return int(a.total * a.cut_frac)


def stlr(a: ScheduleArgs) -> Schedule:
    """Slanted triangular LR (ULMFiT, Howard & Ruder 2018), no warmup: C = floor(T * cut_frac),
    p = t / C for t < C, else 1 - (t - C) / (C * (1 / cut_frac - 1)) (clipped to >= 0 past the end);
    lr(t) = P * (1 + p * (ratio - 1)) / ratio.
    """
    cut = max(1, stlr_cut(a))
    down = cut * (1.0 / a.cut_frac - 1.0)

    def fn(t):
        t = jnp.asarray(t, jnp.float32)
        p = jnp.where(t < cut, t / cut, jnp.maximum(0.0, 1.0 - (t - cut) / down))
        return a.peak * (1.0 + p * (a.ratio - 1.0)) / a.ratio

    return fn


def inverse_sqrt(a: ScheduleArgs) -> Schedule:
    """t < W: P * t / W; then lr = P * max(min_ratio, sqrt(K / max(t, K))), K = max(W, 1)."""
    k = float(max(a.warmup, 1))

    def main(s):
        t = jnp.asarray(s, jnp.float32) + a.warmup
        return a.peak * jnp.maximum(a.min_ratio, jnp.sqrt(k / jnp.maximum(t, k)))

    return with_warmup(a, main)


def polynomial(a: ScheduleArgs) -> Schedule:
    """t < W: P * t / W; then lr = E + (P - E) * (1 - min(s, D') / D') ** power, s = t - W."""
    return with_warmup(a, optax.polynomial_schedule(a.peak, a.end, a.power, a.decay_after_warmup))


def step(a: ScheduleArgs) -> Schedule:
    """t < W: P * t / W; then lr = max(E, P * gamma ** floor(s / D)), s = t - W (decay is the interval)."""
    end = a.end if a.min_ratio > 0 else None
    return with_warmup(
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
    "stlr": stlr,
}
assert tuple(SCHEDULE_FNS) == SCHEDULES
USES_WARMUP = frozenset(
    {"warmup_cosine", "warmup_linear", "warmup_constant", "wsd", "inverse_sqrt", "polynomial", "step"}
)
USES_DECAY = frozenset({"linear", "cosine", "warmup_cosine", "warmup_linear", "wsd", "polynomial", "step"})


def _check_run_length(kind: str, spec: Mapping[str, Any], a: ScheduleArgs, field: str) -> None:
    """The checks that need the run's length (the values themselves were checked by the declaration)."""
    if kind in USES_WARMUP and a.warmup >= a.total:
        raise ConfigError(
            f"{field}.warmup",
            spec["warmup"],
            f"is {a.warmup} steps, not shorter than the run ({a.total} steps)",
        )
    if kind in USES_DECAY and a.decay < 1:
        raise ConfigError(
            f"{field}.decay", spec["decay"], f"is {a.decay} steps; {kind} needs a decay of >= 1 step"
        )
    if kind == "wsd" and a.warmup + a.decay > a.total:
        raise ConfigError(
            f"{field}.decay",
            spec["decay"],
            f"wsd needs warmup + decay <= the run: {a.warmup} + {a.decay} > {a.total} steps "
            "(decay is the final phase, e.g. 0.1)",
        )
    if kind == "stlr" and stlr_cut(a) < 1:
        raise ConfigError(
            f"{field}.cut_frac", spec["cut_frac"], f"stlr needs floor(steps * cut_frac) >= 1 ({a.total} steps)"
        )


def schedule_args(
    spec: Mapping[str, Any],
    peak: float,
    total_steps: int,
    steps_per_epoch: int,
    field: str = "optim.schedule",
) -> ScheduleArgs:
    """Resolves a schedule dict's durations to steps and checks them against the run (ConfigError).

    `spec` must be valid by the declaration (`ftjax.config.validate_schedule`; `make_schedule` checks it);
    keys it leaves out take SCHEDULE_DEFAULTS.
    """
    kind = spec["type"]
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
        cooldown=str(value["cooldown"]),
        cut_frac=float(value["cut_frac"]),
        ratio=float(value["ratio"]),
    )
    _check_run_length(kind, value, args, field)
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
    validate_schedule(spec, field)
    return SCHEDULE_FNS[spec["type"]](schedule_args(spec, peak, total_steps, steps_per_epoch, field))
