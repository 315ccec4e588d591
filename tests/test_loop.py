"""The one loop on a toy stepper: event order, eval cadence, per-member stopping, interruption, snapshots."""

from __future__ import annotations

import numpy as np
import pytest

from ftjax.callbacks import EarlyStopping, Evaluate, Every, NanGuard, Pruning, StopAfter
from ftjax.loop import COMPLETE, FAILED, PRUNED, STOPPED_EARLY, Callback, Loop, TrainingError, fit


class ToyStepper:
    """K members whose loss at step t is losses[k][t]; val loss = the last training loss."""

    def __init__(self, losses: list[list[float]], total_steps: int | None = None):
        self.losses = np.asarray(losses, np.float64)
        self.members = len(losses)
        self.total_steps = total_steps or self.losses.shape[1]
        self.state = {"steps_taken": np.zeros(self.members)}
        self.last = np.zeros(self.members)

    def step(self, step, batch, active):
        self.state["steps_taken"] = self.state["steps_taken"] + active
        self.last = np.where(active, self.losses[:, step], self.last)
        return {"loss": self.losses[:, step], "grad_norm": np.ones(self.members),
                "param_norm": np.ones(self.members), "examples": np.full(self.members, batch)}

    def evaluate(self, split):
        return [{"loss": float(v)} for v in self.last]

    def lr_at(self, step):
        return [{"all": 1.0}] * self.members


def batches(epoch=0, position=0):
    class It:
        def __init__(self):
            self.position = position

        def __next__(self):
            self.position += 1
            return 4  # "examples" per batch

        def state(self):
            return {"epoch": epoch, "position": self.position}

    return It()


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_begin(self, loop):
        self.events.append(("begin", loop.step))

    def on_step(self, loop, step, metrics):
        self.events.append(("step", step))

    def on_eval(self, loop, split, results):
        self.events.append(("eval", loop.step))

    def on_end(self, loop):
        self.events.append(("end", loop.step))


def test_steps_reach_callbacks_in_order_and_evals_follow_the_cadence():
    rec = Recorder()
    loop = fit(ToyStepper([[1.0] * 7]), batches, [Every(Evaluate(), 3), rec])
    steps = [s for kind, s in rec.events if kind == "step"]
    evals = [s for kind, s in rec.events if kind == "eval"]
    assert steps == list(range(7)) and evals == [3, 6, 7]  # and at the last step
    # Every step's metrics are read before the eval that follows it.
    assert rec.events.index(("step", 2)) < rec.events.index(("eval", 3))
    assert rec.events[0] == ("begin", 0) and rec.events[-1] == ("end", 7)
    assert loop.status == [COMPLETE] and loop.timing["train_examples"] == 28


def test_members_stop_on_their_own_and_the_loop_ends_when_none_trains():
    losses = [[1.0, 0.9, 0.8, 0.7, 0.6, 0.5],  # improves: runs to the end
              [1.0, 1.1, 1.2, 1.3, 1.4, 1.5],  # never improves after the first eval: early stop
              [1.0, 1.0, float("nan"), 1.0, 1.0, 1.0],  # NaN at step 3: failed
              [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]]  # pruned at its second eval
    stepper = ToyStepper(losses)
    cbs = [Every(Evaluate(), 1), NanGuard(raise_error=False),
           EarlyStopping("loss", "min", patience=2, min_delta=0.0, members=4),
           Pruning(lambda k, step, val: k == 3 and step == 2)]
    loop = fit(stepper, batches, cbs)
    assert loop.status == [COMPLETE, STOPPED_EARLY, FAILED, PRUNED]
    np.testing.assert_array_equal(stepper.state["steps_taken"], [6, 3, 3, 2])


def test_a_nan_loss_in_a_solo_run_is_an_error_naming_the_step():
    with pytest.raises(TrainingError, match="loss is nan at step 2.*Last good checkpoint: none"):
        fit(ToyStepper([[1.0, float("nan"), 1.0]]), batches, [NanGuard(raise_error=True)])


def test_an_interruption_skips_completion_and_a_snapshot_resumes_where_it_stopped():
    stepper = ToyStepper([[1.0] * 10])
    early = EarlyStopping("loss", "min", patience=0, min_delta=0.0)
    loop = fit(stepper, batches, [Every(Evaluate(), 2), early, StopAfter(5)])
    assert loop.interrupted and loop.step == 5 and loop.status == ["running"]
    meta = loop.snapshot()
    assert meta["data"] == {"epoch": 0, "position": 5}
    resumed = Loop(ToyStepper([[1.0] * 10]), batches, [Every(Evaluate(), 2),
                                                         EarlyStopping("loss", "min", 0, 0.0)])
    resumed.load_snapshot(5, meta)
    stopper = resumed.callbacks[1].stoppers[0]
    assert (stopper.best_step, stopper.best_value, stopper.bad_evals) == (2, 1.0, 1)  # evals at 2 and 4
    resumed.run()
    assert resumed.step == 10 and resumed.status == [COMPLETE] and resumed.batches.position == 10


def test_callback_names_must_be_unique():
    with pytest.raises(ValueError, match="unique"):
        Loop(ToyStepper([[1.0]]), batches, [Every(Evaluate(), 1), Every(Evaluate(), 2)])


def test_preemption_checks_alone_every_step_and_across_processes_every_n_steps(monkeypatch):
    from ftjax import distributed
    from ftjax.callbacks import checkpointing

    calls = []
    monkeypatch.setattr(checkpointing.jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "sync_flag", lambda flag: calls.append(flag) or False)
    fit(ToyStepper([[1.0] * 25]), batches, [checkpointing.Preemption(checkpoint=None, sync_every=10)])
    assert len(calls) == 2  # steps 10 and 20: one collective per 10 steps, not one per step
    monkeypatch.setattr(checkpointing.jax, "process_count", lambda: 1)
    calls.clear()
    fit(ToyStepper([[1.0] * 25]), batches, [checkpointing.Preemption(checkpoint=None)])
    assert calls == []  # alone, the local flag is read every step without any collective
