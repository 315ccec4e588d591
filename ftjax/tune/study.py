"""The Optuna study behind a sweep: storage (SQLite or PostgreSQL), sampler, pruner, and the bookkeeping
that lets many workers share it (orphaned-trial recovery, heartbeats, trial counts).

Optuna and SQLAlchemy are the `sweep` extra, so they are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import warnings

from absl import logging

from ftjax.tune.space import SweepError, SweepSpec, dim_json, grid_values


def storage_url(spec: SweepSpec, workdir: str) -> str:
    """The SQLAlchemy URL; postgresql:// is pinned to psycopg2 (SQLAlchemy 2.1 defaults to psycopg 3)."""
    url = spec.storage or f"sqlite:///{os.path.abspath(os.path.join(workdir, 'sweep.db'))}"
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            url = "postgresql+psycopg2://" + url[len(scheme):]
    return url


def _grid_sampler_class():
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler without its study.stop() (only legal inside study.optimize, which ftjax's
        ask/tell loop does not use; the loop itself stops after the grid's size in trials)."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return GridSampler


def _rdb_storage(url: str, heartbeat_s: int):
    """Optuna's RDBStorage; retried when workers starting together race to create the schema."""
    import optuna
    import sqlalchemy.exc

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=4 * heartbeat_s,
                                              engine_kwargs=engine_kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                sqlalchemy.exc.OperationalError) as e:
            if attempt == 5 or "connect" in str(e).lower() and "refused" in str(e).lower():
                raise
            time.sleep(0.5 + random.random() * 2)  # another worker is creating the tables
    raise AssertionError("unreachable")


def _sampler(spec: SweepSpec, seed: int):
    import optuna

    if spec.sampler == "grid":
        grid = {f: grid_values(d, spec.grid_points) for f, d in spec.space.items()}
        return _grid_sampler_class()(grid, seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, spec.n_trials // 3)),
                                      constant_liar=True)


def _pruner(spec: SweepSpec):
    import optuna

    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.pruner_startup_trials)
    if spec.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def open_study(spec: SweepSpec, workdir: str, *, seed_offset: int = 0):
    """Creates or loads the study; refuses one that was started with another space, metric or mode."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # ftjax records heartbeats itself (Heartbeat) for its ask/tell loop; these warnings do not apply.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    warnings.filterwarnings("ignore", message="Argument ``heartbeat_interval`` is an experimental")
    warnings.filterwarnings("ignore", message="Argument ``grace_period`` is an experimental")
    url = storage_url(spec, workdir)
    study = optuna.create_study(
        storage=_rdb_storage(url, spec.heartbeat_s), study_name=spec.study_name,
        sampler=_sampler(spec, spec.seed + seed_offset), pruner=_pruner(spec),
        direction="minimize" if spec.mode == "min" else "maximize", load_if_exists=True,
    )
    identity = {"space": {f: dim_json(d) for f, d in spec.space.items()}, "metric": spec.metric,
                "mode": spec.mode}
    stored = study.user_attrs.get("ftjax_spec")
    if stored is None:
        study.set_user_attr("ftjax_spec", identity)
    elif stored != json.loads(json.dumps(identity)):
        raise SweepError(
            "space", identity,
            f"differs from the one study {spec.study_name!r} in {url} was started with ({stored}): "
            "use another --workdir (or sweep.study_name), or the original sweep file",
        )
    return study


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _retry(study, trial) -> None:
    """Enqueues a failed (orphaned) trial's params again; the new trial continues in its directory."""
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number,
                                                  "resume_dir": trial.user_attrs.get("workdir", "")})


def _fail_and_retry(study, trial_id: int) -> int | None:
    """Marks a running trial failed and queues it again; None if another worker got there first."""
    import optuna

    storage = study._storage
    try:
        if storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL):
            trial = storage.get_trial(trial_id)
            _retry(study, trial)
            return trial.number
    except optuna.exceptions.UpdateFinishedTrialError:
        pass
    return None


def recover_orphans(study) -> list[int]:
    """Fails and re-enqueues RUNNING trials whose worker is gone: on this host by pid, elsewhere by a stale
    heartbeat. Returns the orphaned trial numbers."""
    import optuna

    host = socket.gethostname()
    dead = [t._trial_id for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if t.user_attrs.get("host") == host and t.user_attrs.get("pid")
            and t.user_attrs["pid"] != os.getpid() and not _pid_alive(t.user_attrs["pid"])]
    found = [_fail_and_retry(study, trial_id) for trial_id in dead]
    stale = study._storage._get_stale_trial_ids(study._study_id)  # (after the above: those are FAIL now)
    found = [n for n in found + [_fail_and_retry(study, trial_id) for trial_id in stale] if n is not None]
    if found:
        logging.warning("sweep: trials %s were interrupted; they are queued again and resume from their "
                        "checkpoints", found)
    return found


def counts(study) -> tuple[int, int]:
    """(trials that count as done, trials running now); failed trials that were retried do not count."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials if "retry_of" in t.user_attrs}
    S = optuna.trial.TrialState
    done = sum(t.state in (S.COMPLETE, S.PRUNED) or (t.state == S.FAIL and t.number not in retried)
               for t in trials)
    running = sum(t.state == S.RUNNING for t in trials)
    return done, running


class Heartbeat:
    """Records heartbeats for this worker's running trials so others can tell a dead worker's trials."""

    def __init__(self, study, interval: float):
        self.study, self.interval, self.ids = study, interval, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for trial_id in list(self.ids):
                try:
                    self.study._storage.record_heartbeat(trial_id)
                except Exception as e:  # noqa: BLE001 - a missed beat must not kill the trial
                    logging.warning("sweep: heartbeat failed: %s", e)

    def add(self, trial) -> None:
        self.study._storage.record_heartbeat(trial._trial_id)
        self.ids.add(trial._trial_id)

    def close(self) -> None:
        self._stop.set()
