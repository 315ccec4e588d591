"""Metric logging: each scalar to metrics.jsonl and to the run's trackers (TensorBoard in WORKDIR/tb here;
MLflow, W&B in `trackers.py`), and the callback that writes a run's train / lr / val / gap lines (one writer
per population member)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from typing import Any, Self, TextIO

import numpy as np
from absl import logging
from etils import epath
from tensorboardX import SummaryWriter

from ftjax import fileio
from ftjax.callbacks.cadence import Cadence
from ftjax.loop import Callback, Loop
from ftjax.reporting.hparams import write_hparams
from ftjax.workdir import METRICS_FILE, TB_DIR

# How a tracker's run ended (MLflow's names; W&B gets the exit code).
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


class Tracker:
    """Where a run's scalars go besides metrics.jsonl: one per name in `train.trackers`. A MetricWriter calls
    truncate_after (the points after that step will be written again: a resume), begin (once, before the
    first point), write, flush, close (files released; a later write reopens them) and end (once: the final
    summary, the run's files, how it ended). Keys are "split/name", e.g. "val/loss"."""

    name = ""

    def truncate_after(self, step: int | None) -> None: ...

    def begin(self, records: list[dict[str, Any]], logged: dict[str, int]) -> None:
        """Opens (or resumes) the tracker's run. `records`: metrics.jsonl's lines kept for this run (up to the
        step it resumes from); `logged`: the last step of each key in the file before truncation, i.e. what
        earlier attempts of this run wrote."""

    def write(self, step: int, scalars: dict[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def end(self, summary: dict[str, Any] | None, artifacts: Sequence[epath.Path], status: str) -> None: ...


class TensorBoard(Tracker):
    """Scalars as TensorBoard events in WORKDIR/tb; at the end, the HParams view of the run (`hparams.py`) when
    given the run's flat config. truncate_after(S) purges the events after S, so a resumed run's curves have no
    duplicates. On an object store (gs://) the events are written to a local folder that flush() copies."""

    name = "tensorboard"

    def __init__(self, workdir: fileio.PathLike, params: dict[str, Any] | None = None):
        self.workdir, self.params = fileio.path(workdir), params
        self.remote = fileio.is_remote(self.workdir)
        self._local = tempfile.mkdtemp(prefix="ftjax_tb_") if self.remote else None
        self._tb: SummaryWriter | None = None
        self._purge_step: int | None = None
        self._dirty = False

    def truncate_after(self, step: int | None) -> None:
        self.close()
        self._purge_step = None if step is None else int(step) + 1

    def _writer(self) -> SummaryWriter:
        if self._tb is None:
            self._tb = SummaryWriter(logdir=self._local or str(self.workdir / TB_DIR), purge_step=self._purge_step,
                                     flush_secs=30)
            self._purge_step = None
        return self._tb

    def write(self, step: int, scalars: dict[str, float]) -> None:
        tb = self._writer()
        for key, value in scalars.items():
            tb.add_scalar(key, value, global_step=step)
        self._dirty = True

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        if self.remote and self._dirty:
            for event_file in fileio.path(self._local).glob("*"):
                event_file.copy(self.workdir / TB_DIR / event_file.name, overwrite=True)
        self._dirty = False

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
            self._dirty = True
        self.flush()  # remote: the closed event file's last records

    def end(self, summary: dict[str, Any] | None, artifacts: Sequence[epath.Path], status: str) -> None:
        self.close()
        if summary is not None and self.params is not None:
            write_hparams(self.workdir, self.params, summary)  # TensorBoard's HParams view of this run


class MetricWriter:
    """Appends scalars to workdir/metrics.jsonl and hands them to the run's trackers (default: TensorBoard).

    Each jsonl line is {"step": int, "split": "train" | "val" | "test" | "lr" | ..., **scalars} ("lr" lines
    hold {group_name: lr}). Only process 0 should pass enabled=True. With resume_step=S (or
    truncate_after(S)), lines with step > S (written after the checkpoint the run resumes from) are dropped
    and the trackers are told (TensorBoard purges its events after S; MLflow and W&B, which cannot forget a
    point, skip the steps they already hold), so a resumed run's curves have no duplicates.

    On a local disk each line is appended and flushed at once. Object stores (gs://) cannot append: the
    file is rewritten whole at flush() (each eval and close). end() is the end of the run: the trackers get the
    final summary and the run's files (plots, summary.json, run.json) and close their runs.
    """

    def __init__(self, workdir: fileio.PathLike, enabled: bool = True, resume_step: int | None = None,
                 trackers: Sequence[Tracker] | None = None):
        self.workdir = fileio.path(workdir)
        self.enabled = enabled
        self.path = self.workdir / METRICS_FILE
        self.remote = fileio.is_remote(self.workdir)
        self.trackers: list[Tracker] = []
        self._lines: list[str] = []  # what the file holds (remote: what flush() writes)
        self._logged: dict[str, int] = {}  # last step per key in the file before truncation
        self._file: TextIO | None = None
        self._dirty = False
        self._begun = self._ended = False
        if not enabled:
            return
        self.trackers = [TensorBoard(self.workdir)] if trackers is None else list(trackers)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.truncate_after(resume_step)

    def truncate_after(self, step: int | None) -> None:
        """Drops what was logged after `step` (the step a run resumes from; 0 for a fresh start; None keeps
        everything): jsonl lines with a larger step, and the trackers' points from `step + 1` on."""
        if not self.enabled:
            return
        self.close()
        records = _records(self.path)
        for r in records:
            for key in scalars_of(r):
                self._logged[key] = max(self._logged.get(key, r["step"]), r["step"])
        self._lines = [json.dumps(r) + "\n" for r in records if step is None or r.get("step", 0) <= step]
        fileio.write_text(self.path, "".join(self._lines))
        for tracker in self.trackers:
            tracker.truncate_after(step)
        self._open()

    def _open(self) -> None:
        if not self.remote and self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run; close().

    def begin(self) -> None:
        """Opens the trackers' runs (or resumes them) and hands them metrics.jsonl's kept lines. The
        MetricLogger calls it before the first step, so a tracker that cannot start stops the run before
        any training; else the first write does."""
        if not self.enabled or self._begun:
            return
        self._begun = True
        records = [json.loads(line) for line in self._lines]
        for tracker in self.trackers:
            tracker.begin(records, dict(self._logged))

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
        self._open()  # after close(), e.g. the test metrics of the run's end
        if self._file is not None:
            self._file.write(line)
            self._file.flush()  # a crash loses no line; lines are few (every log_every steps).
        self._dirty = True
        self.begin()
        for tracker in self.trackers:
            tracker.write(int(step), scalars_of({"split": split, **values}))

    def flush(self) -> None:
        for tracker in self.trackers:
            tracker.flush()
        if self.remote and self._dirty:
            fileio.write_text(self.path, "".join(self._lines))
        self._dirty = False

    def close(self) -> None:
        """Writes out what is buffered and releases the files; the trackers' runs stay open for end()."""
        if not self.enabled:
            return
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        for tracker in self.trackers:
            tracker.close()

    def end(self, summary: dict[str, Any] | None = None, artifacts: Sequence[fileio.PathLike] = (),
            status: str = FINISHED) -> None:
        """The end of the run (once; later calls do nothing): closes, then each tracker gets the final
        `summary` (summary.json's contents), the `artifacts` (files of the run) and the `status` (FINISHED,
        FAILED, KILLED) and closes its run."""
        if not self.enabled or self._ended:
            return
        self.close()
        self._ended = True
        if summary is not None:
            self.begin()
        if self._begun:
            for tracker in self.trackers:
                tracker.end(summary, [fileio.path(a) for a in artifacts], status)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as trackers get it: {"split/name": value}."""
    return {f"{record['split']}/{k}": float(v) for k, v in record.items() if k not in ("step", "split")}


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

    def __init__(self, member_dirs: list[str], log_every: int, enabled: bool = True,
                 trackers: Sequence[Sequence[Tracker]] | None = None):
        """`trackers[k]`: member k's trackers (default: TensorBoard)."""
        self.writers = [MetricWriter(d, enabled=enabled, trackers=None if trackers is None else trackers[k])
                        for k, d in enumerate(member_dirs)]
        self.cadence = Cadence(log_every)  # a line every log_every steps and at the last step
        self.window_loss = np.zeros(len(member_dirs))
        self.window_steps = 0
        self.last_train_loss: list[float | None] = [None] * len(member_dirs)

    def on_begin(self, loop: Loop) -> None:
        for writer in self.writers:
            writer.truncate_after(loop.step)  # drops lines a crashed run wrote after its last checkpoint
            writer.begin()  # a tracker that cannot start (server down) stops the run before it trains

    def on_step(self, loop: Loop, step: int, metrics: dict[str, np.ndarray]) -> None:
        loss = metrics["loss"]
        self.window_loss += np.where(np.isfinite(loss), loss, 0.0)
        self.window_steps += 1
        done = step + 1
        if not self.cadence.due(done, loop.total_steps):
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
        """Closes the writers; their trackers' runs stay open for the summary of the run's end (end()), unless
        the loop was interrupted (preemption: no summary comes)."""
        for writer in self.writers:
            if loop.interrupted:
                writer.end(status=KILLED)
            else:
                writer.close()

    def end(self, status: str) -> None:
        """Ends the trackers' runs that are still open with `status` (a run that failed: no summary). A
        tracker's own error here is a warning: it must not hide the error that ended the run."""
        for writer in self.writers:
            try:
                writer.end(status=status)
            except Exception as e:  # noqa: BLE001
                logging.warning("ending the trackers of %s: %s", writer.workdir, e)

    def state_dict(self) -> dict:
        return {"window_loss": self.window_loss.tolist(), "window_steps": self.window_steps,
                "last_train_loss": self.last_train_loss}

    def load_state_dict(self, state: dict) -> None:
        self.window_loss = np.asarray(state["window_loss"], np.float64)
        self.window_steps = int(state["window_steps"])
        self.last_train_loss = list(state["last_train_loss"])
