"""Weight averaging of the trained params, updated inside the jitted train step and kept in the train state
(sharded like the params, saved by every checkpoint, restored exactly on resume).

EMA (`train.ema.decay` = d > 0): after each optimizer step, p_ema = d * p_ema + (1 - d) * p, starting from
the loaded params; after n steps p_ema = d^n p_0 + (1 - d) * sum_k d^(n-k) p_k.
SWA (`train.swa.start`, Izmailov et al. 2018): the running mean of the params after the steps s >= start
with (s - start) % train.swa.every == 0: p_swa += (p - p_swa) / n at the n-th snapshot.
Only the params that train at some step are averaged (a frozen param's average is itself); `params_for`
puts an average back into the full tree for evaluation (`val_ema` / `val_swa`) and export (`--weights`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ftjax import params as params_lib
from ftjax.config import ConfigError, duration_to_steps

KINDS = ("ema", "swa")


@dataclasses.dataclass(frozen=True)
class Averaging:
    """What the train step averages: EMA decay (0 = off) and SWA's first step and interval (None = off)."""

    ema_decay: float = 0.0
    swa_start: int | None = None
    swa_every: int = 1

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k, on in zip(KINDS, (self.ema_decay > 0, self.swa_start is not None)) if on)

    @property
    def on(self) -> bool:
        return bool(self.kinds)


def from_config(train_cfg: Any, total_steps: int, steps_per_epoch: int) -> Averaging:
    """train.ema / train.swa resolved for a run; ConfigError when SWA would take no snapshot."""
    start, every = train_cfg.swa.start, int(train_cfg.swa.every)
    swa_start = None
    if start is not None:
        swa_start = duration_to_steps(start, "train.swa.start", total_steps, steps_per_epoch)
        first = swa_start if swa_start > 0 else every
        if first > total_steps:
            raise ConfigError("train.swa.start", start, f"takes its first snapshot at step {first}, after the "
                              f"run's {total_steps} steps")
    return Averaging(float(train_cfg.ema.decay), swa_start, every)


def init(avg: Averaging, params: Any, averaged: frozenset[str]) -> dict:
    """The averages' state: copies of the averaged params (and the SWA snapshot count)."""
    sub, _ = params_lib.partition(params, lambda p: p in averaged)
    state: dict[str, Any] = {}
    for kind in avg.kinds:
        state[kind] = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), sub)
    if avg.swa_start is not None:
        state["swa_count"] = jnp.zeros([], jnp.int32)
    return state


def shardings(avg: Averaging, param_shardings: Any, averaged: frozenset[str], replicated: Any) -> dict:
    """The averages' shardings: each like its param's; the snapshot count replicated."""
    sub, _ = params_lib.partition(param_shardings, lambda p: p in averaged)
    out: dict[str, Any] = {kind: sub for kind in avg.kinds}
    if avg.swa_start is not None:
        out["swa_count"] = replicated
    return out


def like(tree: dict, params: dict) -> dict:
    """The leaves of `params` at the paths of the (sparse) nested dict `tree`."""
    return {k: like(v, params[k]) if isinstance(v, dict) else params[k] for k, v in tree.items()}


def update(avg: Averaging, state: dict, params: Any, step: jax.Array) -> dict:
    """The averages after optimizer step number `step` (1 for the first update) gave `params`."""
    new = dict(state)
    if "ema" in state:
        d = avg.ema_decay
        new["ema"] = jax.tree_util.tree_map(
            lambda e, p: (d * e.astype(jnp.float32) + (1 - d) * p.astype(jnp.float32)).astype(e.dtype),
            state["ema"], like(state["ema"], params))
    if "swa" in state:
        take = (step >= avg.swa_start) & ((step - avg.swa_start) % avg.swa_every == 0)
        count = state["swa_count"] + take.astype(jnp.int32)
        n = jnp.maximum(count, 1).astype(jnp.float32)
        new["swa"] = jax.tree_util.tree_map(
            lambda s, p: jnp.where(take, s + (p.astype(jnp.float32) - s) / n, s).astype(s.dtype),
            state["swa"], like(state["swa"], params))
        new["swa_count"] = count
    return new


def params_for(state: dict, kind: str) -> Any:
    """The full params with the `kind` average ("raw", "ema", "swa") in place of the averaged ones; None when
    the run keeps no such average, or SWA has no snapshot yet."""
    if kind == "raw":
        return state["params"]
    avg = state.get("avg", {})
    if kind not in avg or (kind == "swa" and int(jax.device_get(avg["swa_count"])) == 0):
        return None
    _, rest = params_lib.partition(state["params"], set(params_lib.flatten(avg[kind])).__contains__)
    return params_lib.combine(avg[kind], rest)
