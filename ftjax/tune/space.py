"""The search space of a sweep: dimensions over config fields and the spec a configs/sweeps/ file returns.

Needs no Optuna: sweep files import this module to declare their space.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import ml_collections
import numpy as np

from ftjax.config import ConfigError, get_field
from ftjax.tune.population import check_population_fields

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
METRICS = ("loss", "accuracy", "macro_f1", "perplexity", "token_accuracy", "entity_f1", "entity_precision", "entity_recall")


class SweepError(ConfigError):
    """The sweep spec is invalid; the message names the sweep field and the fix."""

    def __init__(self, field: str, value: Any, valid: str):
        super().__init__(field, value, valid)
        self.args = (f"sweep.{field}={value!r} is invalid: {valid}",)


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


def _validate_dim(field: str, dim: Any) -> None:
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


def validate_spec(spec: SweepSpec, cfg: ml_collections.ConfigDict) -> None:
    """Every check that needs no training: raises SweepError / ConfigError naming the field."""
    if not spec.space:
        raise SweepError("space", spec.space, "is empty: give at least one {config field: dimension}")
    for field, dim in spec.space.items():
        get_field(cfg, field)  # ConfigError: not a field of the config
        _validate_dim(field, dim)
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
    """The trial's value for `field` (an Optuna trial's suggest_* call for the dimension's kind)."""
    if isinstance(dim, Float):
        return trial.suggest_float(field, dim.low, dim.high, log=dim.log)
    if isinstance(dim, Int):
        return trial.suggest_int(field, dim.low, dim.high, log=dim.log)
    return trial.suggest_categorical(field, list(dim.values))


def dim_json(dim: Dim) -> dict:
    """The dimension as JSON (what a study stores to refuse a resume with another space)."""
    return {"kind": type(dim).__name__, **{k: list(v) if isinstance(v, tuple) else v
                                           for k, v in dataclasses.asdict(dim).items()}}
