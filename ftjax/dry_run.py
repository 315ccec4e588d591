"""`--mode=dry_run`: what a run would do, before it does it: the param table, shardings and memory."""

from __future__ import annotations

import os
from typing import Any

from ftjax import params as params_lib
from ftjax import sharding as sharding_lib


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def report(run: Any) -> str:
    """The optimizer's param table, each param's sharding, and per-device memory of params and state."""
    lines = [run.optimizer.describe(), ""]
    rows = sharding_lib.describe(run.state["params"], run.param_shardings)
    width = max(len(r[0]) for r in rows)
    lines.append(f"{'param':<{width}}  {'shape':<18} {'spec':<28} per-device")
    for path, shape, spec, nbytes in rows:
        lines.append(f"{path:<{width}}  {str(shape):<18} {spec:<28} {_mib(nbytes)}")
    param_bytes = sum(r[3] for r in rows)
    opt_bytes = sum(
        x.addressable_shards[0].data.nbytes for x in params_lib.flatten(run.state["opt_state"]).values()
        if hasattr(x, "addressable_shards") and x.addressable_shards
    )
    lines += [
        "",
        f"mesh {dict(run.mesh.shape)}; {run.total_steps} steps, {run.steps_per_epoch} per epoch",
        f"per-device memory: params {_mib(param_bytes)}, optimizer state {_mib(opt_bytes)}",
    ]
    if run.primary:
        path = os.path.join(run.workdir, "plots", "lr_schedule.png")
        run.optimizer.plot_lr(path)
        lines.append(f"LR schedule plot: {path}")
    return "\n".join(lines)
