"""Evaluation: each split is evaluated and published to the other callbacks (logging, early stopping,
checkpoints, pruning...) for the active members; its cadence is given where it is registered (`Every`)."""

from __future__ import annotations

from ftjax.loop import Callback, Loop


class Evaluate(Callback):
    """Evaluates each split and publishes the results; register it with its cadence:
    `Every(Evaluate(), eval_every)` (due at the multiples and at each member's last step)."""

    def __init__(self, splits: tuple[str, ...] = ("validation",)):
        self.splits = splits

    def after_step(self, loop: Loop) -> None:
        loop.drain()  # the metrics of every step up to here are read (and logged) before the eval
        for split in self.splits:
            with loop.timed("eval_seconds"):
                results = loop.stepper.evaluate(split)
            loop.publish_eval(split, results)
