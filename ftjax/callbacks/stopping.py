"""Callbacks that stop members or the loop: early stopping, the overfitting warning, non-finite losses,
sweep pruning, and a step budget (tests simulate a crash with it)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from ftjax.callbacks.metric_log import MetricLogger
from ftjax.loop import FAILED, PRUNED, STOPPED_EARLY, Callback, Loop, TrainingError

# metrics.jsonl's split for the step whose loss (or updated params) was not finite: the NanGuard stop, as a
# later reader (--mode=diagnose) finds it; the error message itself only reaches the console.
NONFINITE_SPLIT = "nonfinite"


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


class EarlyStopping(Callback):
    """Per member: tracks the best validation `metric` (and the metrics at that eval); stops a member
    after `patience` evals without improvement (0 = never)."""

    def __init__(self, metric: str, mode: str, patience: int, min_delta: float, members: int = 1):
        self.stoppers = [EarlyStopper(metric, mode, patience, min_delta) for _ in range(members)]
        self.best_results: list[dict | None] = [None] * members

    def on_eval(self, loop: Loop, split: str, results: list[dict[str, float]]) -> None:
        if split != "validation":
            return
        for k in np.flatnonzero(loop.active):
            stopper = self.stoppers[k]
            improved, stop = stopper.update(loop.step, results[k])
            if improved:
                self.best_results[k] = dict(results[k])
            if stop:
                loop.stop_member(k, STOPPED_EARLY)
                logging.info("early stopping%s at step %d: best %s=%.4f at step %d",
                             f" member {k}" if loop.members > 1 else "", loop.step, stopper.metric,
                             stopper.best_value, stopper.best_step)

    def state_dict(self) -> dict:
        return {"stoppers": [s.state_dict() for s in self.stoppers], "best_results": self.best_results}

    def load_state_dict(self, state: dict) -> None:
        for stopper, saved in zip(self.stoppers, state["stoppers"]):
            stopper.load_state_dict(saved)
        self.best_results = list(state["best_results"])


class OverfitWarning(Callback):
    """Warns when a member's val loss rose while its train loss (as the metric logger last logged it)
    fell for `patience` evals in a row."""

    def __init__(self, logger: Any, patience: int, members: int = 1):
        self.logger = logger  # a MetricLogger: its last_train_loss
        self.monitors = [OverfitMonitor(patience) for _ in range(members)]

    def on_eval(self, loop: Loop, split: str, results: list[dict[str, float]]) -> None:
        if split != "validation":
            return
        for k in np.flatnonzero(loop.active):
            train_loss = self.logger.last_train_loss[k]
            if train_loss is not None:
                warning = self.monitors[k].update(train_loss, results[k]["loss"], loop.step)
                if warning:
                    logging.warning("%s%s", f"member {k}: " if loop.members > 1 else "", warning)

    def state_dict(self) -> dict:
        return {"monitors": [m.state_dict() for m in self.monitors]}

    def load_state_dict(self, state: dict) -> None:
        for monitor, saved in zip(self.monitors, state["monitors"]):
            monitor.load_state_dict(saved)


class NanGuard(Callback):
    """A non-finite loss (or params made inf/NaN by the update) ends a solo run with an error naming the
    step and the last good checkpoint; in a population, only that member stops ("failed"). The stop is also a
    NONFINITE_SPLIT line (loss, param_norm) in the member's metrics.jsonl, through `logger` (the run's
    MetricLogger; None: no line)."""

    def __init__(self, raise_error: bool, last_checkpoint: Callable[[], str] | None = None,
                 logger: MetricLogger | None = None):
        self.raise_error = raise_error
        self.last_checkpoint = last_checkpoint or (lambda: "none was saved")
        self.logger = logger

    def on_step(self, loop: Loop, step: int, metrics: dict[str, np.ndarray]) -> None:
        for k in np.flatnonzero(loop.active):
            loss, norm = float(metrics["loss"][k]), float(metrics["param_norm"][k])
            if math.isfinite(loss) and math.isfinite(norm):
                continue
            what = f"loss is {loss}" if not math.isfinite(loss) else "the update made params inf/nan"
            self._record(int(k), step + 1, loss, norm)
            if self.raise_error:
                raise TrainingError(
                    f"{what} at step {step + 1}; stopping. Last good checkpoint: {self.last_checkpoint()}. "
                    "Lower optim.lr, lengthen optim.schedule.warmup, or set optim.clip_norm."
                )
            loop.stop_member(k, FAILED)
            logging.warning("population member %d: %s at step %d; it stops", k, what, step + 1)

    def _record(self, member: int, step: int, loss: float, norm: float) -> None:
        if self.logger is not None:
            self.logger.writers[member].write(step, NONFINITE_SPLIT, {"loss": loss, "param_norm": norm})
            self.logger.writers[member].flush()


class Pruning(Callback):
    """Sweep pruning: `should_prune(member, step, val_metrics) -> bool` is asked at each validation eval
    (it reports the value to the sweep); a pruned member stops with status "pruned"."""

    def __init__(self, should_prune: Callable[[int, int, dict], bool]):
        self.should_prune = should_prune

    def on_eval(self, loop: Loop, split: str, results: list[dict[str, float]]) -> None:
        if split != "validation":
            return
        for k in np.flatnonzero(loop.active):
            if self.should_prune(int(k), loop.step, results[k]):
                loop.stop_member(k, PRUNED)


class StopAfter(Callback):
    """Ends the loop after `steps` steps of this process, as a crash would (tests of resume)."""

    def __init__(self, steps: int):
        self.steps = steps

    def after_step(self, loop: Loop) -> None:
        if loop.step - loop.start_step >= self.steps:
            loop.interrupt()
