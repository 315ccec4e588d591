"""Cadences given where a callback is registered (ftjax/callbacks/cadence.py): `Every` runs a callback's
after_step on its cadence and is otherwise the callback itself (name, state, other hooks)."""

import numpy as np
import pytest

from ftjax.callbacks.cadence import Cadence, Every
from ftjax.loop import Callback, Loop, fit


class _Stepper:
    members, total_steps, state = 1, 7, {}

    def step(self, step, batch, active):
        return {"loss": np.float32(1.0)}

    def evaluate(self, split):
        return [{"loss": 1.0}]


def _batches(**position):
    while True:
        yield {}


class _Recorder(Callback):
    def __init__(self):
        self.after, self.steps = [], []

    def after_step(self, loop: Loop) -> None:
        self.after.append(loop.step)

    def on_step(self, loop, step, metrics) -> None:
        self.steps.append(step)

    def state_dict(self):
        return {"after": list(self.after)}


class _Other(_Recorder):
    pass


class _Third(_Recorder):
    pass


def test_every_runs_after_step_on_its_cadence_and_passes_every_other_hook_through():
    at_end, no_end, never = _Recorder(), _Other(), _Third()
    every = Every(at_end, 3)
    fit(_Stepper(), _batches, [every, Every(no_end, 3, at_end=False), Every(never, 0, at_end=False)])
    assert at_end.after == [3, 6, 7] and no_end.after == [3, 6] and never.after == []
    assert at_end.steps == list(range(7)) == never.steps  # on_step is not gated
    assert every.name == "_Recorder" and every.state_dict() == {"after": [3, 6, 7]}  # the callback's own


def test_cadence_is_due_on_multiples_and_at_the_last_step():
    assert [s for s in range(1, 11) if Cadence(4).due(s, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if Cadence(4, at_end=False).due(s, 10)] == [4, 8]
    assert [s for s in range(1, 11) if Cadence(0).due(s, 10)] == [10]
    with pytest.raises(ValueError, match="every=-1"):
        Cadence(-1)


def test_a_cadence_per_member_fires_for_each_member_at_its_own_multiples_and_its_own_end():
    # members of 6 and 7 steps evaluating every 2 and every 3 steps; a 0 is "only at its end"
    cadence = Cadence((2, 3, 0))
    due = np.array([cadence.due(s, np.array([6, 7, 5])) for s in range(1, 8)])
    assert [list(np.flatnonzero(due[:, k]) + 1) for k in range(3)] == [[2, 4, 6, 7], [3, 6, 7], [5, 6, 7]]
    with pytest.raises(ValueError, match=r"every=\(2, -1\)"):
        Cadence((2, -1))
