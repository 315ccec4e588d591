"""Evaluation at a cadence: every `every` steps and at the last step, each split is evaluated for every
member and published to the other callbacks (logging, early stopping, checkpoints, pruning...)."""

from __future__ import annotations

from ftjax.loop import Callback, Loop


class Evaluate(Callback):
    def __init__(self, every: int, splits: tuple[str, ...] = ("validation",)):
        if every < 1:
            raise ValueError(f"Evaluate every={every}: need >= 1 step")
        self.every, self.splits = every, splits

    def after_step(self, loop: Loop) -> None:
        if loop.step % self.every and not loop.at_end:
            return
        loop.drain()  # the metrics of every step up to here are read (and logged) before the eval
        for split in self.splits:
            with loop.timed("eval_seconds"):
                results = loop.stepper.evaluate(split)
            loop.publish_eval(split, results)
