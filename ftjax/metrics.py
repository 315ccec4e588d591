"""What a run reports: eval metric math, TensorBoard + metrics.jsonl writers, PNG plots, progress,
overfitting warnings and early stopping (with state that survives resume).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Self, TextIO

import numpy as np

METRICS_FILE = "metrics.jsonl"


# ---------------------------------------------------------------------------------------------------------
# Metric math.


class ClassificationMetrics:
    """Accumulates a weighted confusion matrix and loss over eval batches; weight 0 marks padding examples.

    macro_f1 matches sklearn's f1_score(average="macro", sample_weight=w) over the classes present (with
    weight > 0) in labels or predictions; a class with no true positive scores 0.
    """

    def __init__(self, num_labels: int):
        if num_labels < 1:
            raise ValueError(f"ClassificationMetrics num_labels={num_labels} is invalid: need >= 1")
        self.num_labels = num_labels
        self.confusion = np.zeros((num_labels, num_labels), np.float64)  # [true, pred] summed weights.
        self.loss_sum = 0.0
        self.has_loss = False

    def update(
        self,
        logits_or_preds: np.ndarray,
        labels: np.ndarray,
        weights: np.ndarray | None = None,
        loss_sum: float | None = None,
    ) -> None:
        """logits [B, K] or predicted ids [B]; labels [B]; weights [B] (default 1); loss_sum = sum(w * loss)."""
        x = np.asarray(logits_or_preds)
        preds = x.argmax(-1) if x.ndim == 2 else x
        labels = np.asarray(labels).reshape(-1)
        preds = np.asarray(preds).reshape(-1).astype(np.int64)
        w = (
            np.ones(labels.shape, np.float64)
            if weights is None
            else np.asarray(weights, np.float64).reshape(-1)
        )
        if not preds.shape == labels.shape == w.shape:
            raise ValueError(
                f"ClassificationMetrics.update: preds {preds.shape}, labels {labels.shape} and weights {w.shape} "
                "must have the same batch size"
            )
        if x.ndim == 2 and x.shape[-1] != self.num_labels:
            raise ValueError(f"logits have {x.shape[-1]} classes but num_labels={self.num_labels}")
        real = w > 0
        labels, preds, w = labels[real].astype(np.int64), preds[real], w[real]
        for name, ids in (("labels", labels), ("predictions", preds)):
            if ids.size and (ids.min() < 0 or ids.max() >= self.num_labels):
                raise ValueError(
                    f"ClassificationMetrics: {name} outside [0, {self.num_labels}) on weighted examples; "
                    "check model.num_labels against the data's label set"
                )
        np.add.at(self.confusion, (labels, preds), w)
        if loss_sum is not None:
            self.loss_sum += float(loss_sum)
            self.has_loss = True

    def merge(self, other: ClassificationMetrics) -> ClassificationMetrics:
        """Adds another accumulator (e.g. another host's) into this one; returns self."""
        self.confusion += other.confusion
        self.loss_sum += other.loss_sum
        self.has_loss |= other.has_loss
        return self

    def compute(self) -> dict[str, float]:
        """{"loss", "accuracy", "macro_f1", "count"}; loss is NaN if no loss_sum was given, all NaN if empty."""
        count = float(self.confusion.sum())
        loss = self.loss_sum / count if self.has_loss and count > 0 else math.nan
        return {"loss": loss, **confusion_metrics(self.confusion), "count": count}


def confusion_metrics(confusion: np.ndarray) -> dict[str, float]:
    """{"accuracy", "macro_f1"} of a weighted confusion matrix [label, prediction] (NaN if it is empty).

    macro_f1 averages over classes present in labels or predictions, like sklearn's average="macro".
    """
    cm = np.asarray(confusion, np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion_metrics needs a square [label, prediction] matrix, got shape {cm.shape}")
    count = cm.sum()
    if count == 0:
        return {"accuracy": math.nan, "macro_f1": math.nan}
    tp = np.diag(cm)
    true_w, pred_w = cm.sum(1), cm.sum(0)
    present = (true_w > 0) | (pred_w > 0)
    # F1 = 2tp / (2tp + fp + fn) = 2tp / (true + pred); equal to 2PR/(P+R), and 0 when tp = 0.
    f1 = 2 * tp[present] / (true_w[present] + pred_w[present])
    return {"accuracy": float(tp.sum() / count), "macro_f1": float(f1.mean())}


# ---------------------------------------------------------------------------------------------------------
# Writers.


class MetricWriter:
    """Writes scalars to TensorBoard (workdir/tb) and appends them to workdir/metrics.jsonl.

    Each jsonl line is {"step": int, "split": "train" | "val" | "test" | "lr", **scalars} ("lr" lines hold
    {group_name: lr}). Only process 0 should pass enabled=True. With resume_step=S (or truncate_after(S)),
    lines with step > S (written after the checkpoint the run resumes from) are dropped and TensorBoard
    purges its events after S, so a resumed run's curves have no duplicates.
    """

    def __init__(self, workdir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self.path = self.workdir / METRICS_FILE
        self._file: TextIO | None = None
        self._tb = None
        self._purge_step: int | None = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate_after(resume_step)
        else:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run; close().

    def truncate_after(self, step: int) -> None:
        """Drops what was logged after `step` (the step a run resumes from; 0 for a fresh start): jsonl lines
        with a larger step, and TensorBoard events from `step + 1` on. Later writes append."""
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.path.exists():
            _truncate_after(self.path, step)
        self._purge_step = int(step) + 1
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run; close().

    def _tensorboard(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(
                logdir=str(self.workdir / "tb"), purge_step=self._purge_step, flush_secs=30
            )
            self._purge_step = None
        return self._tb

    def write(self, step: int, split: str, scalars: dict[str, Any]) -> None:
        """One line of scalars for `split` at `step` (values: python/numpy/jax scalars)."""
        if not self.enabled:
            return
        if not split or not isinstance(split, str):
            raise ValueError(
                f"MetricWriter.write split={split!r} is invalid: use 'train', 'val', 'test' or 'lr'"
            )
        values = {str(k): float(np.asarray(v)) for k, v in scalars.items()}
        record = {"step": int(step), "split": split, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash loses no line; lines are few (every log_every steps).
        tb = self._tensorboard()
        for name, value in values.items():
            tb.add_scalar(f"{split}/{name}", value, global_step=int(step))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _truncate_after(path: Path, step: int) -> None:
    """Atomically rewrites metrics.jsonl without lines for steps after `step` (and without torn lines)."""
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash.
            if record.get("step", 0) <= step:
                kept.append(json.dumps(record) + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl as records; a later line for the same (step, split) replaces an earlier one."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: plot a workdir that a run wrote metrics to")
    records: dict[tuple[int, str], dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[(record["step"], record["split"])] = record
    return sorted(records.values(), key=lambda r: r["step"])


# ---------------------------------------------------------------------------------------------------------
# Plots.


def _series(records: list[dict], split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
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


def plot_run(workdir: str | Path) -> list[Path]:
    """Writes workdir/plots/{loss,metrics,lr,gap}.png from metrics.jsonl; returns the files written.

    A plot whose data is absent (no val split, no lr lines) is skipped, not drawn empty.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    out_dir = Path(workdir) / "plots"
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
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)

    train_steps, train_loss = _series(records, "train", "loss")
    val_steps, val_loss = _series(records, "val", "loss")
    test_steps, test_loss = _series(records, "test", "loss")
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
            steps, values = _series(records, "val", name)
            line = ax.plot(steps, values, "o-", label=f"val {name}", ms=4)[0]
            t_steps, t_values = _series(records, "test", name)
            if t_steps.size:
                ax.plot(t_steps, t_values, "*", color=line.get_color(), label=f"test {name}", ms=12)
        save(fig, "metrics.png", "eval metrics", "value")

    groups = _keys(records, "lr")
    if groups:
        fig, ax = plt.subplots(figsize=(7, 4))
        for group in groups:
            ax.plot(*_series(records, "lr", group), label=group)
        save(fig, "lr.png", "learning rate per param group", "lr")

    gap_steps, gap = _series(records, "gap", "val_minus_train_loss")  # logged by the trainer, if so.
    if not gap_steps.size and train_steps.size and val_steps.size:
        # Train loss (logged every log_every steps) interpolated at the eval steps.
        gap_steps, gap = val_steps, val_loss - np.interp(val_steps, train_steps, train_loss)
    if gap_steps.size:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.axhline(0.0, color="gray", lw=1)
        ax.plot(gap_steps, gap, "o-", label="val loss - train loss", ms=4)
        save(fig, "gap.png", "generalization gap (rising = overfitting)", "loss gap")
    return written


# ---------------------------------------------------------------------------------------------------------
# Progress.


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class Progress:
    """A tqdm bar on stderr (step, examples/s, loss, ETA); when stderr is not a tty (CI, log files) it
    prints one compact line every `interval_s` seconds instead. Rates exclude the first step (compile)."""

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        interval_s: float = 30.0,
        stream: TextIO | None = None,
    ):
        self.total = total_steps
        self.enabled = enabled
        self.interval_s = interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.step = initial_step
        self._start: tuple[float, int, float] | None = None  # (time, step, examples) at the first update.
        self._examples = 0.0
        self._last_print = -math.inf
        self._bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=initial_step, file=self.stream, unit="step", dynamic_ncols=True
            )

    def update(self, step: int, examples: float = 0, loss: float | None = None) -> None:
        """Reports reaching `step` after `examples` more training examples (since the last update)."""
        if not self.enabled:
            return
        now = time.monotonic()
        self._examples += examples
        if self._start is None:
            self._start = (now, step, self._examples)
        elapsed = now - self._start[0]
        ex_rate = (self._examples - self._start[2]) / elapsed if elapsed > 0 else math.nan
        step_rate = (step - self._start[1]) / elapsed if elapsed > 0 else math.nan
        eta = (self.total - step) / step_rate if step_rate > 0 else math.nan
        self.step = step
        loss_text = f"{float(loss):.4f}" if loss is not None else "-"
        rate_text = f"{ex_rate:.1f}" if math.isfinite(ex_rate) else "-"
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(f"loss {loss_text}, {rate_text} ex/s", refresh=False)
            return
        if now - self._last_print >= self.interval_s or step >= self.total:
            self._last_print = now
            pct = 100.0 * step / max(self.total, 1)
            print(
                f"step {step}/{self.total} ({pct:.0f}%) | {rate_text} ex/s | loss {loss_text} | ETA {_hms(eta)}",
                file=self.stream,
                flush=True,
            )

    def write(self, message: str) -> None:
        """Prints a message without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---------------------------------------------------------------------------------------------------------
# Overfitting and early stopping.


class OverfitMonitor:
    """Warns when val loss rose while train loss fell for `patience` consecutive evals (0 = off)."""

    def __init__(self, patience: int):
        self.patience = patience
        self.streak = 0
        self._prev: tuple[float, float] | None = None

    def update(self, train_loss: float, val_loss: float, step: int | None = None) -> str | None:
        """Feed at each eval; returns a warning once per streak when it reaches `patience`."""
        train_loss, val_loss = float(train_loss), float(val_loss)
        prev, self._prev = self._prev, (train_loss, val_loss)
        if prev is None or self.patience <= 0:
            return None
        if val_loss > prev[1] and train_loss < prev[0]:
            self.streak += 1
        else:
            self.streak = 0
        if self.streak == self.patience:
            at = f" at step {step}" if step is not None else ""
            return (
                f"possible overfitting{at}: val loss rose while train loss fell for {self.streak} evals in a "
                f"row (val {val_loss:.4f}, train {train_loss:.4f}); consider early stopping "
                "(train.early_stop.patience), more dropout/weight decay, a lower LR or fewer epochs"
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "prev": list(self._prev) if self._prev else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak = int(state["streak"])
        self._prev = tuple(state["prev"]) if state["prev"] else None


class EarlyStopper:
    """Tracks the best eval metric; stop = no improvement by more than min_delta for `patience` evals
    (patience 0 = never stop). NaN never improves."""

    def __init__(self, metric: str = "loss", mode: str = "min", patience: int = 0, min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"config.train.early_stop.mode={mode!r} is invalid: 'min' or 'max'")
        if patience < 0 or min_delta < 0:
            raise ValueError("config.train.early_stop.patience and min_delta must be >= 0")
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def update(self, step: int, metrics: dict[str, Any]) -> tuple[bool, bool]:
        """(improved, stop) after an eval at `step` with `metrics` (must contain the tracked metric)."""
        if self.metric not in metrics:
            raise ValueError(
                f"config.train.early_stop.metric={self.metric!r} is not among the eval metrics "
                f"{sorted(metrics)}: set it to one of them"
            )
        value = float(np.asarray(metrics[self.metric]))
        if math.isnan(value):
            improved = False
        elif self.best_value is None:
            improved = True
        elif self.mode == "min":
            improved = value < self.best_value - self.min_delta
        else:
            improved = value > self.best_value + self.min_delta
        if improved:
            self.best_value, self.best_step, self.bad_evals = value, int(step), 0
        else:
            self.bad_evals += 1
        return improved, self.should_stop

    @property
    def should_stop(self) -> bool:
        """True once `patience` evals in a row did not improve (also right after resuming such a state)."""
        return self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value = state["best_value"]
        self.best_step = state["best_step"]
        self.bad_evals = int(state["bad_evals"])
