"""The one training loop. `fit` drives a stepper (a solo run, or a vmapped population of K members) over
training batches; everything else a run does (evaluate, log, checkpoint, stop early, prune, save on
SIGTERM, show progress) is a callback reacting to the loop's events.

Events, in the order callbacks are listed:
  restore(loop)                      once, before anything: a checkpoint callback loads the saved state
  on_begin(loop)                     once, at the (possibly restored) start step
  on_step(loop, step, metrics)       each step's metrics read back to the host, in step order; values are
                                     numpy arrays with one entry per member
  after_step(loop)                   after each step is dispatched (cadences: eval, save, preemption)
  on_eval(loop, split, results)      published by an evaluation callback: one metrics dict per member
  on_checkpoint(loop)                a checkpoint of this step is about to be saved: persist what is buffered
  on_end(loop)                       once, after the last step (also after an interruption)
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import numpy as np

from ftjax.errors import UserError

# Member status values (solo runs have one member).
RUNNING, COMPLETE, STOPPED_EARLY, PRUNED, FAILED = "running", "complete", "stopped_early", "pruned", "failed"


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (NaN loss, mismatched workdir); the message names what was kept."""


class Stepper(Protocol):
    """What the loop drives: a solo run (`ftjax.trainer.SoloStepper`) or a population
    (`ftjax.tune.population.Population`)."""

    members: int  # 1 for a solo run
    total_steps: int  # the longest member's
    # Optional `member_steps` [members]: each member's own last step (a population whose members train for
    # different epochs / steps); a member stops as complete there. Default: every member runs total_steps.
    state: Any  # the pytree a checkpoint saves

    def step(self, step: int, batch: dict, active: np.ndarray) -> dict: ...  # device metrics
    def evaluate(self, split: str) -> list[dict[str, float]]: ...  # one dict per member
    def params(self, member: int) -> Any: ...
    def lr_at(self, step: int) -> list[dict[str, float]]: ...  # per member: {group: lr}
    def abstract_state(self) -> Any: ...
    def precompile(self, step: int) -> None: ...


@dataclasses.dataclass(frozen=True)
class Cadence:
    """Due at the multiples of `every` steps (0: never) and, with `at_end`, at the run's last step (a population
    member's own last step: `Loop.due`). Given where a callback is registered (`ftjax.callbacks.Every`). `every`
    may be one count per population member (a tuple): each member fires at its own multiples, e.g. evaluations
    at quarters of each member's own length, as in its solo run."""

    every: int | tuple[int, ...]
    at_end: bool = True

    def __post_init__(self):
        counts = self.every if isinstance(self.every, tuple) else (self.every,)
        if not counts or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 for n in counts):
            raise ValueError(f"a cadence of every={self.every!r} steps: need an int >= 0 (0 = never), or one "
                             "per member")

    def due(self, step: int, total_steps: Any) -> Any:
        """Whether the cadence fires once `step` steps are done (an array when `total_steps` or `every` is one)."""
        at_end = self.at_end & (np.asarray(total_steps) <= step)
        if isinstance(self.every, tuple):
            every = np.asarray(self.every)
            return ((every > 0) & (step % np.maximum(every, 1) == 0)) | at_end
        return (bool(self.every) and step % self.every == 0) | at_end


class Callback:
    """A behaviour of the loop. Every hook is optional; a callback with state that a resumed run needs
    returns it from state_dict() (JSON-able) and gets it back in load_state_dict()."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def restore(self, loop: Loop) -> None: ...
    def on_begin(self, loop: Loop) -> None: ...
    def on_step(self, loop: Loop, step: int, metrics: dict[str, np.ndarray]) -> None: ...
    def after_step(self, loop: Loop) -> None: ...
    def on_eval(self, loop: Loop, split: str, results: list[dict[str, float]]) -> None: ...
    def on_checkpoint(self, loop: Loop) -> None: ...
    def on_end(self, loop: Loop) -> None: ...

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None: ...


class Loop:
    """The loop's state as callbacks see it: the step, which members still train and why others
    stopped, timing, and the few actions callbacks may take (stop a member, stop, drain, publish)."""

    def __init__(self, stepper: Stepper, make_batches: Callable[..., Iterator], callbacks: list[Callback]):
        names = [cb.name for cb in callbacks]
        if len(set(names)) != len(names):
            raise ValueError(f"callback names must be unique (they key the checkpointed state): {names}")
        self.stepper, self.callbacks = stepper, list(callbacks)
        self._make_batches = make_batches
        self.step = self.start_step = 0
        self.total_steps = stepper.total_steps
        self.members = stepper.members
        ends = getattr(stepper, "member_steps", None)
        self.member_steps = np.asarray([self.total_steps] * self.members if ends is None else ends)
        self.active = np.ones(self.members, bool)
        self.status = [RUNNING] * self.members
        self.data_position: dict = {}
        self.batches: Any = None
        self.interrupted = False
        self.stop_reason: str | None = None
        self.timing = {"train_seconds": 0.0, "train_examples": 0.0, "eval_seconds": 0.0}
        self._pending: list[tuple[int, dict]] = []  # dispatched steps whose metrics are not read back yet
        self._t_begin: float | None = None
        self._train_at_begin = self._eval_at_begin = 0.0

    # -- actions for callbacks
    def stop_member(self, member: int, status: str) -> None:
        if self.active[member]:
            self.active[member] = False
            self.status[member] = status

    def request_stop(self, reason: str) -> None:
        """Ends the loop after this step; the members keep their status (a completed run stops here)."""
        self.stop_reason = reason

    def interrupt(self) -> None:
        """Ends the loop now as if the process died (tests; preemption): no final evaluation follows."""
        self.interrupted = True
        self.stop_reason = "interrupted"

    def drain(self, keep_last: int = 0) -> None:
        """Reads back dispatched steps' metrics (oldest first) and hands them to on_step. keep_last=1 leaves
        the newest in flight, so the host never waits for the step the device is still running."""
        while len(self._pending) > keep_last:
            step, device_metrics = self._pending.pop(0)
            metrics = {k: np.reshape(np.asarray(v, np.float64), (self.members,))
                       for k, v in jax.device_get(device_metrics).items()}
            self.timing["train_examples"] += float(metrics["examples"][0]) if "examples" in metrics else 0.0
            self._dispatch("on_step", step, metrics)

    def publish_eval(self, split: str, results: list[dict[str, float]]) -> None:
        self._dispatch("on_eval", split, results)

    def publish_checkpoint(self) -> None:
        """Before a checkpoint is saved: what callbacks buffered up to this step reaches storage, so a
        run resumed from the checkpoint finds it (e.g. metrics on gs://, which cannot append)."""
        self.drain()
        self._dispatch("on_checkpoint")

    @contextlib.contextmanager
    def timed(self, key: str):
        """Adds the block's wall time to timing[key] (eval time is not training time)."""
        t0 = time.time()
        try:
            yield
        finally:
            self.timing[key] = self.timing.get(key, 0.0) + time.time() - t0

    @property
    def at_end(self) -> bool:
        return self.step >= self.total_steps

    def due(self, cadence: Cadence) -> np.ndarray:
        """The active members `cadence` fires for at this step: all of them on its multiples, a member alone at its
        own last step (members of different lengths)."""
        return self.active & cadence.due(self.step, self.member_steps)

    @contextlib.contextmanager
    def only(self, members: np.ndarray):
        """Inside the block callbacks see only `members` active (e.g. an evaluation due for some members
        only); a member stopped inside the block stays stopped after it."""
        outside = self.active
        inside = outside & members
        self.active = inside.copy()
        try:
            yield
        finally:
            self.active = outside & ~(inside & ~self.active)

    # -- what a checkpoint holds besides the stepper's state
    def snapshot(self) -> dict:
        self.drain()
        timing = dict(self.timing)
        timing["train_seconds"] = self._train_seconds()
        return {
            "data": self.batches.state() if self.batches is not None else self.data_position,
            "loop": {"active": self.active.tolist(), "status": list(self.status), "timing": timing},
            "callbacks": {cb.name: s for cb in self.callbacks if (s := cb.state_dict()) is not None},
        }

    def load_snapshot(self, step: int, meta: dict) -> None:
        self.step = self.start_step = int(step)
        self.data_position = dict(meta["data"])
        self.active = np.asarray(meta["loop"]["active"], bool)
        self.status = list(meta["loop"]["status"])
        self.timing.update(meta["loop"]["timing"])
        saved = meta.get("callbacks", {})
        for cb in self.callbacks:
            if cb.name in saved:
                cb.load_state_dict(saved[cb.name])

    def _train_seconds(self) -> float:
        """Seconds in the training loop (this process and the runs it resumed), evaluation excluded."""
        if self._t_begin is None:
            return self.timing["train_seconds"]
        evaluating = self.timing["eval_seconds"] - self._eval_at_begin
        return self._train_at_begin + (time.time() - self._t_begin) - evaluating

    def _dispatch(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # -- the loop
    def run(self) -> Loop:
        self._dispatch("restore")
        self._dispatch("on_begin")
        self.batches = self._make_batches(**self.data_position)
        self._t_begin, self._train_at_begin = time.time(), self.timing["train_seconds"]
        self._eval_at_begin = self.timing["eval_seconds"]
        while self.step < self.total_steps and self.active.any() and self.stop_reason is None:
            metrics = self.stepper.step(self.step, next(self.batches), self.active)
            self._pending.append((self.step, metrics))
            self.step += 1
            self.drain(keep_last=1)
            self._dispatch("after_step")
            for k in np.flatnonzero(self.active & (self.step >= self.member_steps)):
                self.stop_member(int(k), COMPLETE)  # its own last step (members of different lengths)
        self.drain()
        self.timing["train_seconds"] = self._train_seconds()
        if not self.interrupted:
            self.status = [COMPLETE if s == RUNNING else s for s in self.status]
        self._dispatch("on_end")
        return self

    def examples_per_second(self) -> float:
        return self.timing["train_examples"] / max(self.timing["train_seconds"], 1e-9)


def fit(stepper: Stepper, make_batches: Callable[..., Iterator], callbacks: list[Callback]) -> Loop:
    """Trains `stepper` on batches from make_batches(**data_position) until its total_steps, every member
    stopped, or a callback stopped the loop; returns the finished Loop (status, timing, step)."""
    return Loop(stepper, make_batches, callbacks).run()
