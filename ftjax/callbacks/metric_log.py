"""Metric logging: scalars to TensorBoard (WORKDIR/tb) and metrics.jsonl, and the callback that writes a
run's train / lr / val / gap lines (one writer per population member)."""

from __future__ import annotations

import json
import tempfile
from typing import Any, Self, TextIO

import numpy as np
from etils import epath
from tensorboardX import SummaryWriter

from ftjax import fileio
from ftjax.loop import Callback, Loop

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Writes scalars to TensorBoard (workdir/tb) and appends them to workdir/metrics.jsonl.

    Each jsonl line is {"step": int, "split": "train" | "val" | "test" | "lr" | ..., **scalars} ("lr" lines
    hold {group_name: lr}). Only process 0 should pass enabled=True. With resume_step=S (or
    truncate_after(S)), lines with step > S (written after the checkpoint the run resumes from) are dropped
    and TensorBoard purges its events after S, so a resumed run's curves have no duplicates.

    On a local disk each line is appended and flushed at once. Object stores (gs://) cannot append: the
    file is rewritten whole at flush() (each eval and close), and TensorBoard writes to a local folder
    that flush() copies to WORKDIR/tb.
    """

    def __init__(self, workdir: fileio.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.workdir = fileio.path(workdir)
        self.enabled = enabled
        self.path = self.workdir / METRICS_FILE
        self.remote = fileio.is_remote(self.workdir)
        self._lines: list[str] = []  # what the file holds (remote: what flush() writes)
        self._file: TextIO | None = None
        self._tb = None
        self._tb_local = tempfile.mkdtemp(prefix="ftjax_tb_") if self.remote and enabled else None
        self._purge_step: int | None = None
        self._dirty = False
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.truncate_after(resume_step)

    def truncate_after(self, step: int | None) -> None:
        """Drops what was logged after `step` (the step a run resumes from; 0 for a fresh start; None keeps
        everything): jsonl lines with a larger step, and TensorBoard events from `step + 1` on."""
        if not self.enabled:
            return
        self.close()
        self._lines = _kept_lines(self.path, step)
        fileio.write_text(self.path, "".join(self._lines))
        self._purge_step = None if step is None else int(step) + 1
        if not self.remote:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run; close().

    def _tensorboard(self):
        if self._tb is None:
            self._tb = SummaryWriter(logdir=self._tb_local or str(self.workdir / "tb"),
                                     purge_step=self._purge_step, flush_secs=30)
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
        line = json.dumps({"step": int(step), "split": split, **values}) + "\n"
        self._lines.append(line)
        if self._file is not None:
            self._file.write(line)
            self._file.flush()  # a crash loses no line; lines are few (every log_every steps).
        self._dirty = True
        tb = self._tensorboard()
        for name, value in values.items():
            tb.add_scalar(f"{split}/{name}", value, global_step=int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        if self.remote and self._dirty:
            fileio.write_text(self.path, "".join(self._lines))
            for event_file in fileio.path(self._tb_local).glob("*"):
                event_file.copy(self.workdir / "tb" / event_file.name, overwrite=True)
        self._dirty = False

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
            self._dirty = True
            self.flush()  # remote: the closed event file's last records

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _records(path: epath.Path) -> list[dict]:
    """metrics.jsonl's records in file order, skipping lines torn by a crash."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _kept_lines(path: epath.Path, step: int | None) -> list[str]:
    return [json.dumps(r) + "\n" for r in _records(path) if step is None or r.get("step", 0) <= step]


def read_metrics(workdir: fileio.PathLike) -> list[dict[str, Any]]:
    """metrics.jsonl as records; a later line for the same (step, split) replaces an earlier one."""
    path = fileio.path(workdir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: plot a workdir that a run wrote metrics to")
    records = {(r["step"], r["split"]): r for r in _records(path)}
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
        for writer in self.writers:
            writer.flush()

    def on_checkpoint(self, loop: Loop) -> None:
        for writer in self.writers:
            writer.flush()

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
