"""Cadences given where a callback is registered (levanter's `add_hook(fn, every=N)`): a callback says what it
does, `Every(callback, n)` says when. `Cadence.due` is the one rule of "every n steps (and at the last)"."""

from __future__ import annotations

import dataclasses

import numpy as np

from ftjax.loop import Callback, Loop


@dataclasses.dataclass(frozen=True)
class Cadence:
    """Due at the multiples of `every` steps (0: never) and, with `at_end`, at the run's last step."""

    every: int
    at_end: bool = True

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, (int, np.integer)) or self.every < 0:
            raise ValueError(f"a cadence of every={self.every!r} steps: need an int >= 0 (0 = never)")

    def due(self, step: int, total_steps: int) -> bool:
        """Whether the cadence fires once `step` steps are done."""
        return bool(self.every and step % self.every == 0) or (self.at_end and step >= total_steps)


class Every(Callback):
    """`callback` registered with a cadence: its `after_step` runs only at the steps `Cadence(every, at_end)` is
    due; every other hook, its name and its checkpointed state are the callback's own. `.callback` is the handle."""

    def __init__(self, callback: Callback, every: int, *, at_end: bool = True):
        self.callback, self.cadence = callback, Cadence(every, at_end)

    @property
    def name(self) -> str:
        return self.callback.name

    def after_step(self, loop: Loop) -> None:
        if self.cadence.due(loop.step, loop.total_steps):
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
