"""What the optimizer decided, for people: the param table as dry_run prints it, the LR schedule plot of each
group, and the LoRA settings line. Reads `ftjax.optim.Optimizer`; builds nothing."""

from __future__ import annotations

import math
from typing import Any

from ftjax import fileio
from ftjax.optim import Optimizer
from ftjax.schedules import ScheduleArgs, lr_curve


def describe(opt: Optimizer) -> str:
    """The optimizer's param table grouped by group, with counts and % trainable (what --mode=dry_run prints)."""
    o, rows = opt.config, list(opt.table.values())
    total = sum(r.size for r in rows) or 1
    wd_kind = "toward pre-trained (L2-SP)" if o.decay_toward == "pretrained" else "toward zero"
    adam = "" if o.name != "adamw" or o.bias_correction else " (no bias correction: BERTAdam)"
    lines = [
        (
            f"optimizer {o.name}{adam}: lr {o.lr:g}, clip_norm {o.clip_norm:g}, "
            f"weight_decay {o.weight_decay:g} "
            f"{wd_kind}, layer_lr_decay {o.layer_lr_decay:g}; {opt.total_steps} steps "
            f"({opt.steps_per_epoch} per epoch)"
        )
    ]
    if o.lora.rank:
        lines.append(lora_line(o.lora))
    width = max(len(r.path) for r in rows)
    mult = {g.name: g.lr_mult for g in opt.groups}
    head = (
        f"  {'path':<{width}}  {'shape':<16} {'dtype':<9} {'status':<14} {'decay':<8} "
        f"{'lr_mult':>9} {'depth':>5}"
    )
    for name in opt.schedules:
        group = [r for r in rows if r.group == name]
        if not group:
            continue
        n = sum(r.size for r in group)
        n_train = sum(r.size for r in group if not r.frozen)
        kind, a = opt.schedule_args[name]
        lines += [
            "",
            (
                f"group {name}: {len(group)} tensors, {n:,} params, {n_train:,} trained "
                f"({100 * n_train / max(n, 1):.1f}%); schedule {kind}"
                f"{_schedule_note(kind, a)} "
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
    for s in opt.phase_starts[1:]:
        n = sum(r.size for r in rows if r.unfreeze_step == s)
        lines.append(
            f"  unfreezing at step {s} (epoch {s / max(opt.steps_per_epoch, 1):.2f}): {n:,} params"
        )
    lines.append(f"optimizer state: {opt.state_bytes():,} bytes")
    return "\n".join(lines)

def _sample_steps(opt: Optimizer, n: int) -> list[int]:
    t = opt.total_steps
    return sorted({round(i * t / n) for i in range(n + 1)})

def plot_lr(opt: Optimizer, png_path: fileio.PathLike) -> None:
    """A PNG of each group's LR over the run (dashed: its lowest layer under LLRD; dotted: unfreezing)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = _sample_steps(opt, min(opt.total_steps, 1000))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, fn in opt.schedules.items():
        group = [r for r in opt.table.values() if r.group == name and not r.frozen]
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
    for s in opt.phase_starts[1:]:
        ax.axvline(s, linestyle=":", color="gray")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{opt.config.name}, {opt.config.schedule.type}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fileio.save_figure(fig, png_path)
    plt.close(fig)

def _schedule_note(kind: str, a: ScheduleArgs) -> str:
    if kind == "wsd":
        return f" ({a.cooldown} cooldown)"
    return f" (cut_frac {a.cut_frac:g}, ratio {a.ratio:g})" if kind == "stlr" else ""


def lora_line(lora: Any) -> str:
    """The LoRA settings as dry_run prints them: rank, scale, and the variants that are on."""
    scale = lora.alpha / (math.sqrt(lora.rank) if lora.rslora else lora.rank)
    on = [name for name, flag in (("rsLoRA", lora.rslora), ("DoRA", lora.dora)) if flag]
    if lora.lr_ratio != 1:
        on.append(f"LoRA+ lr_ratio {lora.lr_ratio:g}")
    return (f"LoRA: rank {lora.rank}, alpha {lora.alpha:g}, scale {scale:g}"
            f"{' (alpha/sqrt(r))' if lora.rslora else ''}, dropout {lora.dropout:g}, targets "
            f"{lora.targets!r}{'; ' + ', '.join(on) if on else ''}")
