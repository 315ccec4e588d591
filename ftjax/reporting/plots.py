"""PNG plots of a run's curves (loss, eval metrics, LR per group, generalization gap), from metrics.jsonl."""

from __future__ import annotations

import matplotlib
import numpy as np
from etils import epath

matplotlib.use("Agg")  # files only, no display; before pyplot is imported
import matplotlib.pyplot as plt

from ftjax import fileio
from ftjax.callbacks.metric_log import read_metrics
from ftjax.workdir import PLOTS_DIR


def series(records: list[dict], split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of metrics.jsonl records' `name` in `split`, in record order."""
    pts = [(r["step"], r[name]) for r in records if r["split"] == split and name in r]
    steps = np.array([p[0] for p in pts], np.float64)
    values = np.array([p[1] for p in pts], np.float64)
    return steps, values


def _keys(records: list[dict], split: str) -> list[str]:
    names: dict[str, None] = {}
    for r in records:
        if r["split"] == split:
            names.update({k: None for k in r if k not in ("step", "split")})
    return list(names)


_SUMMARY_KEYS = ("total", "mean", "min", "max")  # drawn thick over the per-layer lines of a panel


def _panels(records: list[dict], split: str) -> dict[str, list[str]]:
    """A split's keys grouped into panels by what precedes their last "/" ("drift/layer_0" -> "drift");
    a key without "/" is a panel of its own (its scale is its own)."""
    panels: dict[str, list[str]] = {}
    for key in _keys(records, split):
        panels.setdefault(key.rsplit("/", 1)[0] if "/" in key else key, []).append(key)
    return panels


def plot_panels(records: list[dict], split: str, path: epath.Path, title: str) -> bool:
    """One subplot per panel of `split` (see _panels): per-layer lines thin, in depth colours; summary
    lines (total, mean, min, max) thick. Returns whether there was anything to draw."""
    panels = _panels(records, split)
    if not panels:
        return False
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    for ax, (panel, keys) in zip(axes.flat, panels.items()):
        detail = [k for k in keys if k.rsplit("/", 1)[-1] not in _SUMMARY_KEYS]
        colours = plt.cm.viridis(np.linspace(0, 0.9, max(len(detail), 1)))
        for key in keys:
            leaf = key.rsplit("/", 1)[-1]
            if leaf in _SUMMARY_KEYS or len(keys) == 1:
                ax.plot(*series(records, split, key), "o-", lw=2.2, ms=3, label=leaf)
            else:
                ax.plot(*series(records, split, key), lw=1, color=colours[detail.index(key)], label=leaf)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(keys) > 8 else 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fileio.save_figure(fig, path)
    plt.close(fig)
    return True


def plot_run(workdir: fileio.PathLike) -> list[epath.Path]:
    """Writes workdir/plots/{loss,metrics,lr,gap,forgetting}.png from metrics.jsonl; returns the files written.

    A plot whose data is absent (no val split, no lr lines) is skipped, not drawn empty.
    """
    records = read_metrics(workdir)
    out_dir = fileio.path(workdir) / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str, title: str, ylabel: str) -> None:
        ax = fig.axes[0]
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fileio.save_figure(fig, out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)

    train_steps, train_loss = series(records, "train", "loss")
    val_steps, val_loss = series(records, "val", "loss")
    test_steps, test_loss = series(records, "test", "loss")
    if train_steps.size or val_steps.size or test_steps.size:
        fig, ax = plt.subplots(figsize=(7, 4))
        if train_steps.size:
            ax.plot(train_steps, train_loss, label="train", lw=1)
        if val_steps.size:
            ax.plot(val_steps, val_loss, "o-", label="val", ms=4)
        if test_steps.size:
            ax.plot(test_steps, test_loss, "*", label="test", ms=12)
        save(fig, "loss.png", "loss", "loss")

    skip = {"loss", "count"}
    val_names = [k for k in _keys(records, "val") if k not in skip]
    if val_names:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in val_names:
            steps, values = series(records, "val", name)
            line = ax.plot(steps, values, "o-", label=f"val {name}", ms=4)[0]
            t_steps, t_values = series(records, "test", name)
            if t_steps.size:
                ax.plot(t_steps, t_values, "*", color=line.get_color(), label=f"test {name}", ms=12)
        save(fig, "metrics.png", "eval metrics", "value")

    groups = _keys(records, "lr")
    if groups:
        fig, ax = plt.subplots(figsize=(7, 4))
        for group in groups:
            ax.plot(*series(records, "lr", group), label=group)
        save(fig, "lr.png", "learning rate per param group", "lr")

    gap_steps, gap = series(records, "gap", "val_minus_train_loss")  # logged by the trainer, if so.
    if not gap_steps.size and train_steps.size and val_steps.size:
        # Train loss (logged every log_every steps) interpolated at the eval steps.
        gap_steps, gap = val_steps, val_loss - np.interp(val_steps, train_steps, train_loss)
    if gap_steps.size:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.axhline(0.0, color="gray", lw=1)
        ax.plot(gap_steps, gap, "o-", label="val loss - train loss", ms=4)
        save(fig, "gap.png", "generalization gap (rising = overfitting)", "loss gap")

    title = "forgetting (vs the loaded model): drift rising, CKA falling, pretraining loss rising = forgetting"
    if plot_panels(records, "forgetting", out_dir / "forgetting.png", title):
        written.append(out_dir / "forgetting.png")
    return written

