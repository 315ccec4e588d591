"""Metric logging: scalars to TensorBoard (WORKDIR/tb) and metrics.jsonl, and the callback that writes a
run's train / lr / val / gap lines (one writer per population member)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Self, TextIO

import numpy as np

from ftjax.loop import Callback, Loop

METRICS_FILE = "metrics.jsonl"


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



class MetricLogger(Callback):
    """Writes each member's mean training loss and grad norm every `log_every` steps, its LR per param
    group, its eval metrics, and the generalization gap (val loss - recent train loss) at each eval."""

    def __init__(self, member_dirs: list[str], log_every: int, enabled: bool = True):
        self.writers = [MetricWriter(d, enabled=enabled) for d in member_dirs]
        self.log_every = log_every
        self.window_loss = np.zeros(len(member_dirs))
        self.window_steps = 0
        self.last_train_loss: list[float | None] = [None] * len(member_dirs)

    def on_begin(self, loop: Loop) -> None:
        for writer in self.writers:
            writer.truncate_after(loop.step)  # drops lines a crashed run wrote after its last checkpoint

    def on_step(self, loop: Loop, step: int, metrics: dict[str, np.ndarray]) -> None:
        loss = metrics["loss"]
        self.window_loss += np.where(np.isfinite(loss), loss, 0.0)
        self.window_steps += 1
        done = step + 1
        if done % self.log_every and done != loop.total_steps:
            return
        lrs = loop.stepper.lr_at(step)
        for k in np.flatnonzero(loop.active):
            self.last_train_loss[k] = float(self.window_loss[k] / self.window_steps)
            self.writers[k].write(done, "train", {"loss": self.last_train_loss[k],
                                                  "grad_norm": float(metrics["grad_norm"][k])})
            self.writers[k].write(done, "lr", lrs[k])
        self.window_loss[:], self.window_steps = 0.0, 0

    def on_eval(self, loop: Loop, split: str, results: list[dict[str, float]]) -> None:
        name = "val" if split == "validation" else split
        for k in np.flatnonzero(loop.active):
            self.writers[k].write(loop.step, name, results[k])
            if split == "validation" and self.last_train_loss[k] is not None:
                gap = results[k]["loss"] - self.last_train_loss[k]
                self.writers[k].write(loop.step, "gap", {"val_minus_train_loss": gap})

    def on_end(self, loop: Loop) -> None:
        for writer in self.writers:
            writer.close()

    def state_dict(self) -> dict:
        return {"window_loss": self.window_loss.tolist(), "window_steps": self.window_steps,
                "last_train_loss": self.last_train_loss}

    def load_state_dict(self, state: dict) -> None:
        self.window_loss = np.asarray(state["window_loss"], np.float64)
        self.window_steps = int(state["window_steps"])
        self.last_train_loss = list(state["last_train_loss"])
