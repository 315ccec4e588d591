"""`--mode=dry_run`: what a run would do, before it does it: the param table, shardings and memory."""

from __future__ import annotations

import os
from typing import Any

import jax

from ftjax import params as params_lib
from ftjax import sharding as sharding_lib


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def step_memory(run: Any) -> dict[str, int] | None:
    """Per-device bytes of the compiled train step at the longest bucket and the configured global batch
    (XLA's memory_analysis: exact for this program): arguments (params + optimizer state + batch), temp
    (activations kept for the backward pass, gradients, workspace). None if the backend reports nothing."""
    batch = next(run.data.train_iterator())
    longest = max(run.data.bucket_lengths or (0,))
    abstract = {}
    for key, x in batch.items():
        shape = (x.shape[0] * jax.process_count(),) + tuple(x.shape[1:])
        if longest and x.ndim >= 2 and key != "pixel_values":
            shape = shape[:1] + (longest,) + shape[2:]
        abstract[key] = jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding_lib.batch_sharding(run.mesh))
    with jax.set_mesh(run.mesh):
        compiled = run.train_step_for(0).lower(run.state, abstract, run.key).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return {"arguments": int(stats.argument_size_in_bytes), "temp": int(stats.temp_size_in_bytes),
            "output": int(stats.output_size_in_bytes), "alias": int(stats.alias_size_in_bytes),
            "length": int(longest), "batch": int(run.cfg.train.batch_size)}


def extras(run: Any) -> list[str]:
    """The hyperparameters outside the param table: re-initialised layers and weight averaging."""
    cfg, avg, lines = run.cfg, run.averaging, []
    per_copy = _mib(params_lib.nbytes(run.state["avg"].get("ema", run.state["avg"].get("swa")))) if avg.on else ""
    if cfg.model.reinit_layers:
        lines.append(f"re-initialised before fine-tuning (model.reinit_layers={cfg.model.reinit_layers}, seed "
                     f"{cfg.train.seed}): the top {cfg.model.reinit_layers} layers of each stack and any pooler")
    if avg.ema_decay > 0:
        lines.append(f"EMA of the trained params: decay {avg.ema_decay:g} "
                     f"(about the last {1 / (1 - avg.ema_decay):.0f} steps), evaluated as val_ema; {per_copy} "
                     "kept (total, with the params' sharding)")
    if avg.swa_start is not None:
        lines.append(f"SWA of the trained params: mean of the snapshots from step {avg.swa_start} every "
                     f"{avg.swa_every} steps, evaluated as val_swa; {per_copy} kept (total)")
    return lines


def report(run: Any) -> str:
    """The optimizer's param table, each param's sharding, and per-device memory of params, optimizer
    state and the train step's activations (from the compiled step)."""
    lines = [run.optimizer.describe(), ""]
    rows = sharding_lib.describe(run.state["params"], run.param_shardings)
    width = max(len(r[0]) for r in rows)
    lines.append(f"{'param':<{width}}  {'shape':<18} {'spec':<28} per-device")
    for path, shape, spec, nbytes in rows:
        lines.append(f"{path:<{width}}  {shape!s:<18} {spec:<28} {_mib(nbytes)}")
    param_bytes = sum(r[3] for r in rows)
    opt_bytes = sum(
        x.addressable_shards[0].data.nbytes for x in params_lib.flatten(run.state["opt_state"]).values()
        if hasattr(x, "addressable_shards") and x.addressable_shards
    )
    extra = extras(run)
    lines += ["", *extra] if extra else []
    lines += [
        "",
        f"mesh {dict(run.mesh.shape)}; {run.total_steps} steps, {run.steps_per_epoch} per epoch",
        f"per-device memory: params {_mib(param_bytes)}, optimizer state {_mib(opt_bytes)}",
    ]
    mem = step_memory(run)
    if mem is not None:
        # Outputs alias the donated state, so the step's peak is about arguments + temp.
        lines.append(
            f"train step (batch {mem['batch']} x length {mem['length']}, compiled): activations + gradients + "
            f"workspace (temp) {_mib(mem['temp'])}; peak about {_mib(mem['arguments'] + mem['temp'])} "
            "per device (params + optimizer state + batch + temp)"
        )
    if run.primary:
        path = os.path.join(run.workdir, "plots", "lr_schedule.png")
        run.optimizer.plot_lr(path)
        lines.append(f"LR schedule plot: {path}")
    return "\n".join(lines)
