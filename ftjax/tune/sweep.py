"""Runs a sweep: asks the study for trials, trains each (one at a time, or K at once as a vmapped
population), reports every eval for pruning, tells the study the result and keeps the report current.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from typing import Any

import ml_collections
from absl import logging

from ftjax import config as config_lib
from ftjax import trainer
from ftjax.callbacks import Pruning
from ftjax.config import ConfigError, with_overrides
from ftjax.data import DataError
from ftjax.loop import TrainingError
from ftjax.tune import population
from ftjax.tune.report import progress_line, write_report
from ftjax.tune.space import SweepError, SweepSpec, grid_values, suggest, validate_spec
from ftjax.tune.study import Heartbeat, counts, open_study, recover_orphans

# A trial that raises one of these failed (bad hyperparameters, NaN...): the sweep records it and goes on.
USER_ERRORS = (ConfigError, DataError, TrainingError, ValueError, FloatingPointError)


def trial_config(cfg, spec: SweepSpec, values: dict) -> ml_collections.ConfigDict:
    """`cfg` with the trial's values; its best checkpoint (the trial's result) is chosen by the sweep metric."""
    out = with_overrides(cfg, values)
    if "train.early_stop.metric" not in values:
        out.train.early_stop.metric = spec.metric
        out.train.early_stop.mode = spec.mode
    return out


def start_trial(study, spec: SweepSpec, workdir: str, heartbeat: Heartbeat):
    """Asks for a trial: (trial, its values, its directory); a retried trial takes over its checkpoints."""
    trial = study.ask()
    heartbeat.add(trial)
    values = {f: suggest(trial, f, d) for f, d in spec.space.items()}
    trial_dir = os.path.join(workdir, f"trial_{trial.number}")
    old = trial.user_attrs.get("resume_dir")
    if old and old != trial_dir and os.path.isdir(old) and not os.path.exists(trial_dir):
        os.rename(old, trial_dir)  # the interrupted trial's checkpoints: fit resumes from them
        logging.info("sweep: trial %d continues trial %s from %s", trial.number,
                     trial.user_attrs.get("retry_of"), old)
    for key, value in {"host": socket.gethostname(), "pid": os.getpid(), "workdir": trial_dir}.items():
        trial.set_user_attr(key, value)
    return trial, values, trial_dir


def metric_of(val: dict, spec: SweepSpec) -> float:
    if spec.metric not in val:
        raise SweepError("metric", spec.metric, f"not among this task's eval metrics {sorted(val)}")
    return float(val[spec.metric])


# ------------------------------------------------------------------------------------------------------
# Running trials: the two places that call the training loop.


def _run_one(study, cfg, spec: SweepSpec, workdir: str, heartbeat: Heartbeat) -> None:
    import optuna

    trial, values, trial_dir = start_trial(study, spec, workdir, heartbeat)
    prune = spec.pruner != "none"

    def should_prune(member: int, step: int, val: dict) -> bool:
        trial.report(metric_of(val, spec), step)
        return prune and trial.should_prune()

    try:
        summary = trainer.train(trial_config(cfg, spec, values), trial_dir, callbacks=[Pruning(should_prune)])
    except USER_ERRORS as e:
        if isinstance(e, SweepError):
            raise
        logging.error("sweep: trial %d failed: %s", trial.number, e)
        trial.set_user_attr("error", str(e)[:500])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    finally:
        heartbeat.ids.discard(trial._trial_id)
    if summary.get("stopped_by_hook"):
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, metric_of(summary["val"], spec))


def _run_population(study, cfg, spec: SweepSpec, workdir: str, heartbeat: Heartbeat, k: int) -> None:
    import optuna

    started = [start_trial(study, spec, workdir, heartbeat) for _ in range(k)]
    trials = [s[0] for s in started]
    cfgs = [trial_config(cfg, spec, s[1]) for s in started]
    prune = spec.pruner != "none"

    def should_prune(member: int, step: int, val: dict) -> bool:
        trials[member].report(metric_of(val, spec), step)
        return prune and trials[member].should_prune()

    pop_dir = os.path.join(workdir, f"population_{trials[0].number}")
    try:
        summaries = population.train_population(cfgs, pop_dir, [s[2] for s in started],
                                                callbacks=[Pruning(should_prune)], metric=spec.metric,
                                                mode=spec.mode)
    except USER_ERRORS as e:
        if isinstance(e, SweepError):
            raise
        logging.error("sweep: population of trials %s failed: %s", [t.number for t in trials], e)
        for t in trials:
            t.set_user_attr("error", str(e)[:500])
            study.tell(t, state=optuna.trial.TrialState.FAIL)
        return
    finally:
        for t in trials:
            heartbeat.ids.discard(t._trial_id)
    S = optuna.trial.TrialState
    for t, s in zip(trials, summaries):
        t.set_user_attr("population", pop_dir)
        if s["status"] == "pruned":
            study.tell(t, state=S.PRUNED)
        elif s["status"] == "failed" or spec.metric not in s["val"]:
            study.tell(t, state=S.FAIL)
        else:
            study.tell(t, float(s["val"][spec.metric]))


# ------------------------------------------------------------------------------------------------------
# The sweep.


def _open_for_worker(spec: SweepSpec, workdir: str):
    """The study, opened so that a resumed or second worker draws other random points than the first
    (same seed: same points); orphaned trials of dead workers are queued again."""
    probe = open_study(spec, workdir)
    offset = len(probe.get_trials(deepcopy=False)) + (os.getpid() if spec.storage else 0)
    study = open_study(spec, workdir, seed_offset=offset) if offset else probe
    recover_orphans(study)
    return study


def run_sweep(
    cfg: ml_collections.ConfigDict,
    spec: SweepSpec,
    workdir: str,
    *,
    command: list[str] | None = None,
    stop_after_trials: int | None = None,
) -> Any:
    """Runs trials until the study holds spec.n_trials done ones (a rerun continues); writes the report.

    `command`: the --config flags the sweep ran with (for the report's ready-to-run best-config line).
    `stop_after_trials`: this call returns after starting that many trial batches (tests: interruption).
    """
    config_lib.validate(cfg)
    validate_spec(spec, cfg)
    os.makedirs(workdir, exist_ok=True)
    n_trials = spec.n_trials
    if spec.sampler == "grid":
        n_trials = min(n_trials, math.prod(len(grid_values(d, spec.grid_points)) for d in spec.space.values()))
        spec = dataclasses.replace(spec, n_trials=n_trials)
    study = _open_for_worker(spec, workdir)
    heartbeat = Heartbeat(study, spec.heartbeat_s)
    t_start, ran = time.time(), 0
    try:
        while True:
            done, running = counts(study)
            remaining = n_trials - done - running
            if remaining <= 0 or (stop_after_trials is not None and ran >= stop_after_trials):
                break
            if spec.population:
                _run_population(study, cfg, spec, workdir, heartbeat, min(spec.population, remaining))
            else:
                _run_one(study, cfg, spec, workdir, heartbeat)
            ran += 1
            print(progress_line(study, spec, t_start, ran), flush=True)
            write_report(study, spec, workdir, command=command, plots=False)
    finally:
        heartbeat.close()
    write_report(study, spec, workdir, command=command, plots=True)
    return study
