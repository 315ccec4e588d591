"""Cadences given where a callback is registered (levanter's `add_hook(fn, every=N)`): a callback says what it
does, `Every(callback, n)` says when. `Cadence.due` is the one rule of "every n steps (and at the last)" (in ftjax.loop, which asks it per member)."""

from __future__ import annotations

import numpy as np

from ftjax.loop import Cadence, Callback, Loop

__all__ = ["Cadence", "Every"]


class Every(Callback):
    """`callback` registered with a cadence: its `after_step` runs only at the steps `Cadence(every, at_end)` is
    due, seeing only the members it is due for active (a population member that ends before the others is
    evaluated alone at its last step); every other hook, its name and its checkpointed state are the callback's
    own. `.callback` is the handle."""

    def __init__(self, callback: Callback, every: int, *, at_end: bool = True):
        self.callback, self.cadence = callback, Cadence(every, at_end)

    @property
    def name(self) -> str:
        return self.callback.name

    def after_step(self, loop: Loop) -> None:
        due = loop.due(self.cadence)
        if not due.any():
            return
        if (due == loop.active).all():
            self.callback.after_step(loop)
            return
        loop.drain()  # the steps' metrics reach every member before the callback sees only some of them
        with loop.only(due):
            self.callback.after_step(loop)

    def restore(self, loop: Loop) -> None:
        self.callback.restore(loop)

    def on_begin(self, loop: Loop) -> None:
        self.callback.on_begin(loop)

    def on_step(self, loop: Loop, step: int, metrics: dict[str, np.ndarray]) -> None:
        self.callback.on_step(loop, step, metrics)

    def on_eval(self, loop: Loop, split: str, results: list[dict[str, float]]) -> None:
        self.callback.on_eval(loop, split, results)

    def on_checkpoint(self, loop: Loop) -> None:
        self.callback.on_checkpoint(loop)

    def on_end(self, loop: Loop) -> None:
        self.callback.on_end(loop)

    def state_dict(self) -> dict | None:
        return self.callback.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.callback.load_state_dict(state)
