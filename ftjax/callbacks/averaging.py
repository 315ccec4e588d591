"""Evaluation of the averaged weights (EMA / SWA, `ftjax.averaging`) at the evaluation cadence: published as
splits "val_ema" and "val_swa" (logged to metrics.jsonl and TensorBoard; early stopping and the best
checkpoint keep following the raw weights' "validation")."""

from __future__ import annotations

from typing import Any

from ftjax import averaging
from ftjax.loop import Callback, Loop


class AveragedEvaluate(Callback):
    """List it right after `Evaluate`, registered with the same cadence (`Every(AveragedEvaluate(run),
    eval_every)`): each after_step it gets evaluates; SWA is evaluated once it has a snapshot."""

    def __init__(self, run: Any):
        self.run = run

    def after_step(self, loop: Loop) -> None:
        for kind in self.run.averaging.kinds:
            params = averaging.params_for(self.run.state, kind)
            if params is None:
                continue
            with loop.timed("eval_seconds"):
                results = [self.run.evaluate("validation", params)]
            loop.publish_eval(f"val_{kind}", results)
