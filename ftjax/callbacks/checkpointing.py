"""Checkpoints of the loop: the stepper's state plus everything a resumed run needs (data position,
member status, timing, every callback's state), saved at each eval (ranked by the validation metric), at
each after_step it gets (registered `Every(checkpoint, train.checkpoint.every, at_end=False)`), and on SIGTERM;
restored before the loop starts."""

from __future__ import annotations

import signal

import jax
from absl import logging

from ftjax import distributed
from ftjax.checkpoint import Checkpointer
from ftjax.loop import Callback, Loop


class Checkpoint(Callback):
    """Saves and restores through a `Checkpointer`; list it after the callbacks whose state it saves
    at an eval (early stopping, pruning), so the checkpoint holds their decision for that eval."""

    def __init__(self, checkpointer: Checkpointer):
        self.ckpt = checkpointer
        self._saved_step: int | None = None

    def restore(self, loop: Loop) -> None:
        step = self.ckpt.latest_step()
        if step is None:
            return
        loop.stepper.state, meta = self.ckpt.restore(step, loop.stepper.abstract_state())
        loop.load_snapshot(step, meta)
        self._saved_step = step
        logging.info("resumed from %s at step %d", self.ckpt.directory, step)

    def save(self, loop: Loop, metrics: dict | None = None) -> None:
        if self._saved_step == loop.step:
            return
        loop.publish_checkpoint()
        meta = loop.snapshot()
        self.ckpt.save(loop.step, loop.stepper.state, meta, metrics=metrics, force=True)
        self._saved_step = loop.step

    def on_eval(self, loop: Loop, split: str, results: list[dict[str, float]]) -> None:
        if split != "validation":
            return
        ranked = self.ckpt.best_metric is not None and loop.members == 1
        self.save(loop, metrics={f"val_{k}": v for k, v in results[0].items()} if ranked else None)

    def after_step(self, loop: Loop) -> None:
        self.save(loop)

    def on_end(self, loop: Loop) -> None:
        self.ckpt.wait()

    def last_good(self) -> str:
        """Where the last finished checkpoint is, for error messages."""
        self.ckpt.wait()
        step = self.ckpt.latest_step()
        return f"step {step} in {self.ckpt.directory}" if step is not None else "none was saved yet"


class Preemption(Callback):
    """On SIGTERM (TPU/GPU preemption, scancel): every process saves the same step, then exits 143;
    rerunning the same command resumes there."""

    def __init__(self, checkpoint: Checkpoint, sync_every: int = 10):
        self.checkpoint = checkpoint
        # Alone, a process reads its own flag every step; with several, agreeing on the step to save is
        # a collective, so they compare flags every `sync_every` steps instead of every step.
        self.sync_every = 1 if jax.process_count() == 1 else sync_every
        self.received = False

    def on_begin(self, loop: Loop) -> None:
        try:
            signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread (tests): no handler.
            pass

    def _handler(self, signum, frame) -> None:
        logging.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
        self.received = True

    def after_step(self, loop: Loop) -> None:
        if loop.step % self.sync_every:
            return
        if not (self.received if self.sync_every == 1 else distributed.sync_flag(self.received)):
            return
        self.checkpoint.save(loop)
        self.checkpoint.ckpt.wait()
        distributed.barrier("preempt_save")
        logging.warning("SIGTERM: saved step %d in %s; rerun the same command to resume", loop.step,
                        self.checkpoint.ckpt.directory)
        raise SystemExit(143)
