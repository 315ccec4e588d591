"""Hyperparameter sweeps: a search space over config fields, Optuna trials (grid, random, TPE) with pruning,
SQLite or PostgreSQL storage (resumable, multi-worker), population trials, and a report with plots.

    python -m ftjax.main --mode=sweep --config=configs/X.py --sweep=configs/sweeps/Y.py --workdir=DIR
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shlex
import socket
import threading
import time
import warnings
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from ftjax.config import ConfigError
from ftjax.population import check_population_fields, get_field, with_overrides

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
METRICS = ("loss", "accuracy", "macro_f1", "perplexity")
REPORT = "sweep_report.md"


class SweepError(ConfigError):
    """The sweep spec is invalid; the message names the sweep field and the fix."""

    def __init__(self, field: str, value: Any, valid: str):
        super().__init__(field, value, valid)
        self.args = (f"sweep.{field}={value!r} is invalid: {valid}",)


# ------------------------------------------------------------------------------------------------------
# The search space.


@dataclasses.dataclass(frozen=True)
class Float:
    low: float
    high: float
    log: bool = False


@dataclasses.dataclass(frozen=True)
class Int:
    low: int
    high: int
    log: bool = False


@dataclasses.dataclass(frozen=True)
class Choice:
    values: tuple


def uniform(low: float, high: float) -> Float:
    return Float(float(low), float(high))


def loguniform(low: float, high: float) -> Float:
    return Float(float(low), float(high), log=True)


def int_range(low: int, high: int, log: bool = False) -> Int:
    return Int(int(low), int(high), log)


def choice(*values: Any) -> Choice:
    """choice(16, 32) or choice([16, 32])."""
    if len(values) == 1 and isinstance(values[0], (list, tuple)):
        values = tuple(values[0])
    return Choice(tuple(values))


Dim = Float | Int | Choice


@dataclasses.dataclass
class SweepSpec:
    """What configs/sweeps/<name>.py:get_sweep() returns (as a dict or ConfigDict with these keys)."""

    space: dict[str, Dim]  # config field -> dimension
    metric: str = "loss"  # eval metric to optimise: loss | accuracy | macro_f1 | perplexity
    mode: str = "min"  # "min" or "max"
    sampler: str = "tpe"  # grid | random | tpe
    n_trials: int = 10  # trials in the whole sweep (all workers); grid: at most the grid size
    pruner: str = "none"  # none | median | successive_halving | hyperband (at each eval)
    pruner_startup_trials: int = 2  # median: trials completed before pruning starts
    population: int = 0  # K > 0: train K trials at once in one vmapped step (shape-free fields only)
    storage: str = ""  # "" = sqlite:///WORKDIR/sweep.db; or postgresql://user:pw@host/db for many workers
    study_name: str = "ftjax_sweep"
    seed: int = 0
    grid_points: int = 3  # grid sampler: points per Float/Int range (choices use their values)
    heartbeat_s: int = 30  # workers record a heartbeat; a trial silent for 4x this is failed and retried


def load_spec(path: str) -> SweepSpec:
    """Imports configs/sweeps/<name>.py[:arg] and calls get_sweep(arg)."""
    path, _, arg = path.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"sweep file {path} not found: pass --sweep=configs/sweeps/<name>.py")
    module_spec = importlib.util.spec_from_file_location("ftjax_sweep_spec", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise SweepError("file", path, "must define get_sweep(arg=None) returning the sweep spec")
    return make_spec(module.get_sweep(arg or None))


def make_spec(raw: Any) -> SweepSpec:
    if isinstance(raw, SweepSpec):
        return raw
    raw = raw.to_dict() if isinstance(raw, ml_collections.ConfigDict) else dict(raw)
    known = {f.name for f in dataclasses.fields(SweepSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SweepError(unknown[0], raw[unknown[0]], f"unknown key; valid: {sorted(known)}")
    if "space" not in raw:
        raise SweepError("space", None, "required: {config field: uniform/loguniform/int_range/choice}")
    return SweepSpec(**raw)


def validate_spec(spec: SweepSpec, cfg: ml_collections.ConfigDict) -> None:
    """Every check that needs no training: raises SweepError / ConfigError naming the field."""
    if not spec.space:
        raise SweepError("space", spec.space, "is empty: give at least one {config field: dimension}")
    for field, dim in spec.space.items():
        get_field(cfg, field)  # ConfigError: not a field of the config
        if isinstance(dim, (Float, Int)):
            if not dim.low <= dim.high:
                raise SweepError(f"space[{field!r}]", dim, f"low={dim.low} > high={dim.high}: swap them")
            if dim.log and dim.low <= 0:
                raise SweepError(f"space[{field!r}]", dim, "a log range needs low > 0")
        elif isinstance(dim, Choice):
            if not dim.values:
                raise SweepError(f"space[{field!r}]", dim, "choice() needs at least one value")
            bad = [v for v in dim.values if not (v is None or isinstance(v, (bool, int, float, str)))]
            if bad:
                raise SweepError(f"space[{field!r}]", bad[0], "choices must be None, bool, int, float or str")
        else:
            raise SweepError(f"space[{field!r}]", dim, "use uniform(), loguniform(), int_range() or choice()")
    if spec.metric not in METRICS:
        raise SweepError("metric", spec.metric, f"one of {METRICS}")
    if spec.mode not in ("min", "max"):
        raise SweepError("mode", spec.mode, '"min" or "max"')
    if spec.sampler not in SAMPLERS:
        raise SweepError("sampler", spec.sampler, f"one of {SAMPLERS}")
    if spec.pruner not in PRUNERS:
        raise SweepError("pruner", spec.pruner, f"one of {PRUNERS}")
    if spec.n_trials < 1:
        raise SweepError("n_trials", spec.n_trials, ">= 1")
    if spec.population < 0:
        raise SweepError("population", spec.population, ">= 0 (0 = one trial at a time)")
    if spec.grid_points < 1:
        raise SweepError("grid_points", spec.grid_points, ">= 1")
    if spec.population:
        check_population_fields(list(spec.space))


def grid_values(dim: Dim, points: int) -> list:
    if isinstance(dim, Choice):
        return list(dim.values)
    if isinstance(dim, Float):
        fn = np.geomspace if dim.log else np.linspace
        return [float(v) for v in fn(dim.low, dim.high, points)]
    fn = np.geomspace if dim.log else np.linspace
    return sorted({round(float(v)) for v in fn(dim.low, dim.high, points)})


def suggest(trial, field: str, dim: Dim) -> Any:
    if isinstance(dim, Float):
        return trial.suggest_float(field, dim.low, dim.high, log=dim.log)
    if isinstance(dim, Int):
        return trial.suggest_int(field, dim.low, dim.high, log=dim.log)
    return trial.suggest_categorical(field, list(dim.values))


def _dim_json(dim: Dim) -> dict:
    return {"kind": type(dim).__name__, **{k: list(v) if isinstance(v, tuple) else v
                                           for k, v in dataclasses.asdict(dim).items()}}


# ------------------------------------------------------------------------------------------------------
# The study.


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


def _GridSampler(*args, **kwargs):
    return _grid_sampler_class()(*args, **kwargs)


def _rdb_storage(url: str, heartbeat_s: int):
    """Optuna's RDBStorage; retried when workers starting together race to create the schema."""
    import random

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


def open_study(spec: SweepSpec, workdir: str, *, seed_offset: int = 0):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # ftjax records heartbeats itself (_Heartbeat) for its ask/tell loop; these warnings do not apply.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    warnings.filterwarnings("ignore", message="Argument ``heartbeat_interval`` is an experimental")
    warnings.filterwarnings("ignore", message="Argument ``grace_period`` is an experimental")
    url = storage_url(spec, workdir)
    storage = _rdb_storage(url, spec.heartbeat_s)
    seed = spec.seed + seed_offset
    if spec.sampler == "grid":
        sampler = _GridSampler({f: grid_values(d, spec.grid_points) for f, d in spec.space.items()}, seed=seed)
    elif spec.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, spec.n_trials // 3)),
                                             constant_liar=True)
    if spec.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=spec.pruner_startup_trials)
    elif spec.pruner == "successive_halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner()
    elif spec.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner()
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(
        storage=storage, study_name=spec.study_name, sampler=sampler, pruner=pruner,
        direction="minimize" if spec.mode == "min" else "maximize", load_if_exists=True,
    )
    identity = {"space": {f: _dim_json(d) for f, d in spec.space.items()}, "metric": spec.metric,
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


def recover_orphans(study) -> list[int]:
    """Fails and re-enqueues RUNNING trials whose worker is gone: on this host by pid, elsewhere by a stale
    heartbeat. Returns the orphaned trial numbers."""
    import optuna

    host, found = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") == host and pid and pid != os.getpid() and not _pid_alive(pid):
            try:
                if study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL):
                    _retry(study, t)
                    found.append(t.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker got there first
    storage = study._storage
    stale_ids = storage._get_stale_trial_ids(study._study_id)
    for trial_id in stale_ids:
        try:
            if storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL):
                t = storage.get_trial(trial_id)
                _retry(study, t)
                found.append(t.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
    if found:
        logging.warning("sweep: trials %s were interrupted; they are queued again and resume from their "
                        "checkpoints", found)
    return found


def _counts(study) -> tuple[int, int]:
    """(trials that count as done, trials running now); failed trials that were retried do not count."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials if "retry_of" in t.user_attrs}
    S = optuna.trial.TrialState
    done = sum(t.state in (S.COMPLETE, S.PRUNED) or (t.state == S.FAIL and t.number not in retried)
               for t in trials)
    running = sum(t.state == S.RUNNING for t in trials)
    return done, running


class _Heartbeat:
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


# ------------------------------------------------------------------------------------------------------
# Running trials.


def _trial_config(cfg, spec: SweepSpec, values: dict) -> ml_collections.ConfigDict:
    out = with_overrides(cfg, values)
    if "train.early_stop.metric" not in values:  # the best checkpoint (the trial's result) is by the metric
        out.train.early_stop.metric = spec.metric
        out.train.early_stop.mode = spec.mode
    return out


def _start_trial(study, spec: SweepSpec, workdir: str, heartbeat: _Heartbeat):
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


def _metric_of(val: dict, spec: SweepSpec) -> float:
    if spec.metric not in val:
        raise SweepError("metric", spec.metric, f"not among this task's eval metrics {sorted(val)}")
    return float(val[spec.metric])


def _user_errors() -> tuple[type[BaseException], ...]:
    from ftjax.data import DataError
    from ftjax.train import TrainingError

    return (ConfigError, DataError, TrainingError, ValueError, FloatingPointError)


def _run_one(study, cfg, spec: SweepSpec, workdir: str, heartbeat: _Heartbeat) -> None:
    import optuna

    from ftjax import train

    trial, values, trial_dir = _start_trial(study, spec, workdir, heartbeat)
    prune = spec.pruner != "none"

    def on_eval(step: int, val: dict) -> bool:
        trial.report(_metric_of(val, spec), step)
        return prune and trial.should_prune()

    try:
        summary = train.fit(_trial_config(cfg, spec, values), trial_dir, on_eval=on_eval)
    except _user_errors() as e:
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
        study.tell(trial, _metric_of(summary["val"], spec))


def _run_population(study, cfg, spec: SweepSpec, workdir: str, heartbeat: _Heartbeat, k: int) -> None:
    import optuna

    from ftjax import population

    started = [_start_trial(study, spec, workdir, heartbeat) for _ in range(k)]
    trials = [s[0] for s in started]
    cfgs = [_trial_config(cfg, spec, s[1]) for s in started]
    prune = spec.pruner != "none"

    def on_eval(member: int, step: int, val: dict) -> bool:
        trials[member].report(_metric_of(val, spec), step)
        return prune and trials[member].should_prune()

    pop_dir = os.path.join(workdir, f"population_{trials[0].number}")
    try:
        summaries = population.fit_population(cfgs, pop_dir, [s[2] for s in started], on_eval=on_eval,
                                              metric=spec.metric, mode=spec.mode)
    except _user_errors() as e:
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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _progress_line(study, spec: SweepSpec, t_start: float, ran: int) -> str:
    import optuna

    done, running = _counts(study)
    S = optuna.trial.TrialState
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    last = max(finished, key=lambda t: t.datetime_complete or 0, default=None)
    line = f"sweep: {done}/{spec.n_trials} trials done, {running} running"
    if last is not None:
        value = f"{spec.metric}={last.value:.4f}" if last.value is not None else ""
        line += f" | last: trial {last.number} {last.state.name.lower()} {value}"
    complete = [t for t in finished if t.state == S.COMPLETE]
    if complete:
        best = study.best_trial
        line += f" | best: trial {best.number} {spec.metric}={best.value:.4f}"
    elapsed = time.time() - t_start
    if ran:
        eta = elapsed / ran * max(spec.n_trials - done, 0)
        line += f" | elapsed {elapsed / 60:.1f} min, ETA ~{eta / 60:.1f} min (this worker)"
    return line


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
    from ftjax import config as config_lib

    config_lib.validate(cfg)
    validate_spec(spec, cfg)
    os.makedirs(workdir, exist_ok=True)
    n_trials = spec.n_trials
    if spec.sampler == "grid":
        n_trials = min(n_trials, math.prod(len(grid_values(d, spec.grid_points)) for d in spec.space.values()))
        spec = dataclasses.replace(spec, n_trials=n_trials)
    # A resumed or second worker draws other random points than the first (same seed: same points).
    probe = open_study(spec, workdir)
    offset = len(probe.get_trials(deepcopy=False)) + (os.getpid() if spec.storage else 0)
    study = open_study(spec, workdir, seed_offset=offset) if offset else probe
    recover_orphans(study)
    heartbeat = _Heartbeat(study, spec.heartbeat_s)
    t_start, ran = time.time(), 0
    try:
        while True:
            done, running = _counts(study)
            remaining = n_trials - done - running
            if remaining <= 0 or (stop_after_trials is not None and ran >= stop_after_trials):
                break
            if spec.population:
                _run_population(study, cfg, spec, workdir, heartbeat, min(spec.population, remaining))
            else:
                _run_one(study, cfg, spec, workdir, heartbeat)
            ran += 1
            print(_progress_line(study, spec, t_start, ran), flush=True)
            write_report(study, spec, workdir, command=command, plots=False)
    finally:
        heartbeat.close()
    write_report(study, spec, workdir, command=command, plots=True)
    return study


# ------------------------------------------------------------------------------------------------------
# The report.


def _flag_value(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    return shlex.quote(str(v))


def best_command(study, spec: SweepSpec, workdir: str, command: list[str] | None) -> str:
    best = study.best_trial
    base = [a for a in (command or ["--config=CONFIG.py"])
            if not any(a.startswith(f"--config.{f}=") for f in best.params)]
    flags = [f"--config.{f}={_flag_value(v)}" for f, v in best.params.items()]
    return " ".join(["python -m ftjax.main --mode=train", *base, *flags,
                     f"--workdir={os.path.join(workdir, 'best')}"])


def _trial_rows(study, spec: SweepSpec) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        last_step = max(t.intermediate_values, default=None)
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
                     "last_step": last_step, "retry_of": t.user_attrs.get("retry_of"),
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                     if t.datetime_complete and t.datetime_start else None,
                     "error": t.user_attrs.get("error")})
    return rows


def importances(study) -> tuple[dict[str, float], str]:
    """Optuna's fANOVA importances (PED-ANOVA when scikit-learn is absent); ({}, reason) when impossible."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return {}, "needs at least 2 completed trials"
    try:
        import sklearn  # noqa: F401

        evaluator, name = optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
    except ImportError:
        evaluator, name = optuna.importance.PedAnovaImportanceEvaluator(), "PED-ANOVA"
    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), name
    except Exception as e:  # noqa: BLE001 - e.g. a parameter that never varied
        return {}, f"not computable ({type(e).__name__}: {e})"


def write_report(study, spec: SweepSpec, workdir: str, *, command: list[str] | None = None,
                 plots: bool = True) -> str:
    """Writes WORKDIR/sweep_report.md (and its PNGs when `plots`); returns the markdown path."""
    import optuna

    S = optuna.trial.TrialState
    rows = _trial_rows(study, spec)
    fields = list(spec.space)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == S.COMPLETE]
    lines = [f"# Sweep report: {spec.study_name}", "",
             (f"Objective: {spec.mode}imise validation `{spec.metric}` (of each trial's best checkpoint); "
              f"sampler {spec.sampler}, pruner {spec.pruner}, population {spec.population or 'off'}; "
              f"storage `{storage_url(spec, workdir).split('@')[-1]}`."), ""]
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running", "waiting")}
    lines += ["Trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), ""]
    if complete:
        best = study.best_trial
        lines += ["## Best", "", f"Trial {best.number}: {spec.metric} = {best.value:.6g}", "",
                  "```", best_command(study, spec, workdir, command), "```", ""]
    lines += ["## Trials", "", "| trial | state | " + " | ".join(fields) + f" | {spec.metric} | at step | seconds |",
              "|---" * (len(fields) + 5) + "|"]
    for r in rows:
        params = " | ".join(_fmt(r["params"].get(f, "")) for f in fields)
        value = f"{r['value']:.5g}" if r["value"] is not None else "-"
        state = r["state"] + (f" (retry of {r['retry_of']})" if r["retry_of"] is not None else "")
        secs = f"{r['seconds']:.0f}" if r["seconds"] is not None else "-"
        lines.append(f"| {r['number']} | {state} | {params} | {value} | {r['last_step'] or '-'} | {secs} |")
    errors = [r for r in rows if r["error"]]
    if errors:
        lines += ["", "Errors:", *[f"- trial {r['number']}: {r['error']}" for r in errors]]
    if plots:
        imp, how = importances(study)
        lines += ["", "## Hyperparameter importance", ""]
        if imp:
            lines += [f"({how})", "", *[f"- `{f}`: {v:.3f}" for f, v in imp.items()]]
        else:
            lines.append(f"Not shown: {how}.")
        written = _plots(study, spec, workdir, imp)
        lines += ["", "## Plots", "", *[f"![{name}]({name})" for name in written]]
    path = os.path.join(workdir, REPORT)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def _axis_values(dim: Dim, values: list) -> tuple[np.ndarray, list | None]:
    """Numeric plot positions (log10 for log ranges, index for choices) and tick labels for choices."""
    if isinstance(dim, Choice):
        labels = [str(v) for v in dim.values]
        return np.array([labels.index(str(v)) for v in values], float), labels
    arr = np.asarray(values, float)
    return (np.log10(arr) if dim.log else arr), None


def _plots(study, spec: SweepSpec, workdir: str, imp: dict[str, float]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    S = optuna.trial.TrialState
    trials = [t for t in study.get_trials(deepcopy=False) if t.state == S.COMPLETE]
    fields, written = list(spec.space), []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, name), dpi=90)
        plt.close(fig)
        written.append(name)

    if not trials:
        return written
    values = np.array([t.value for t in trials])
    # Metric against each hyperparameter.
    n = len(fields)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), squeeze=False)
    for ax, f in zip(axes[0], fields):
        dim = spec.space[f]
        x, labels = _axis_values(dim, [t.params[f] for t in trials])
        ax.scatter(x, values, c="tab:blue")
        if labels:
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize="small")
        ax.set_xlabel(f + (" (log10)" if getattr(dim, "log", False) else ""))
        ax.set_ylabel(spec.metric)
    save(fig, "sweep_metric_vs_params.png")

    # Parallel coordinates: each axis scaled to [0, 1]; lines coloured by the metric.
    cols = []
    for f in fields:
        x, _ = _axis_values(spec.space[f], [t.params[f] for t in trials])
        lo, hi = float(np.min(x)), float(np.max(x))
        cols.append((x - lo) / (hi - lo) if hi > lo else np.full_like(x, 0.5))
    lo, hi = float(values.min()), float(values.max())
    cols.append((values - lo) / (hi - lo) if hi > lo else np.full_like(values, 0.5))
    data = np.stack(cols, 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * (n + 1)), 4))
    cmap = plt.get_cmap("viridis" if spec.mode == "max" else "viridis_r")
    for row, v in zip(data, values):
        ax.plot(range(n + 1), row, color=cmap((v - lo) / (hi - lo) if hi > lo else 0.5), alpha=0.8)
    ax.set_xticks(range(n + 1), fields + [spec.metric], rotation=20, fontsize="small")
    ax.set_yticks([])
    ax.set_title("parallel coordinates (each axis min..max; colour: metric, bright = better)")
    save(fig, "sweep_parallel_coordinates.png")

    if imp:
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(imp)))
        names = list(imp)[::-1]
        ax.barh(names, [imp[k] for k in names])
        ax.set_xlabel("importance")
        save(fig, "sweep_importance.png")

    # Learning curves (the metric at each eval) of the top trials.
    top = sorted(trials, key=lambda t: t.value, reverse=spec.mode == "max")[:5]
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in top:
        steps = sorted(t.intermediate_values)
        if steps:
            ax.plot(steps, [t.intermediate_values[s] for s in steps], marker="o", label=f"trial {t.number}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"val {spec.metric}")
    ax.set_title("learning curves of the top trials")
    ax.legend(fontsize="small")
    save(fig, "sweep_learning_curves.png")
    return written
