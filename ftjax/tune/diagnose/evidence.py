"""What the diagnosis rules share: the run's files they read (`RunFiles`), what they return (`Finding`
with `Remedy` options), and the helpers for evidence, remedies and plots they have in common."""

from __future__ import annotations

import dataclasses
import math
import shlex
import textwrap
from collections.abc import Callable
from typing import Any

import matplotlib
import ml_collections
import numpy as np
from etils import epath

matplotlib.use("Agg")  # files only, no display; before pyplot is imported
import matplotlib.pyplot as plt

from ftjax import fileio
from ftjax import workdir as workdir_lib
from ftjax.callbacks.metric_log import read_metrics
from ftjax.callbacks.stopping import NONFINITE_SPLIT
from ftjax.config import ConfigError, default_config
from ftjax.config.checks import parse_duration
from ftjax.errors import UserError
from ftjax.reporting.plots import series

# ---- Thresholds (each rule module has its own; diagnosis.json records them all): a rule reports only beyond them.

MIN_EVALS = 3  # a trend (a minimum, a rise, a still-falling curve) needs at least three evaluations

_NO_WARMUP = {"constant": "warmup_constant", "linear": "warmup_linear", "cosine": "warmup_cosine"}



class DiagnoseError(UserError, FileNotFoundError):
    """The workdir holds nothing to diagnose (no metrics.jsonl, or no train / val line in it)."""


@dataclasses.dataclass
class Remedy:
    """One way to act on a finding: config fields to set (field -> new value) and why."""

    why: str
    changes: dict[str, Any]
    current: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def flags(self) -> str:
        return " ".join(shlex.quote(f"--config.{f}={flag_value(v)}") for f, v in self.changes.items())

    def to_json(self) -> dict[str, Any]:
        return {"why": self.why, "flags": self.flags,
                "changes": {f: {"from": self.current.get(f), "to": v} for f, v in self.changes.items()}}


@dataclasses.dataclass
class Finding:
    kind: str
    title: str  # one line: what is wrong
    evidence: dict[str, Any]  # the numbers behind it (steps, values)
    remedies: list[Remedy]
    plot: str = ""  # the PNG, relative to the workdir

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "title": self.title, "evidence": self.evidence, "plot": self.plot,
                "remedies": [r.to_json() for r in self.remedies]}


def flag_value(value: Any) -> str:
    """A value as a --config.FIELD= flag writes it (floats keep a '.' or an exponent: a float-or-int field such
    as a warmup would read "1" as one step)."""
    if isinstance(value, float):
        text = f"{value:.3g}"
        return text if any(c in text for c in ".enai") else text + ".0"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def plain(x: float) -> float | str:
    """A float for diagnosis.json: "nan" / "inf" as strings (JSON has no such numbers)."""
    return x if math.isfinite(x) else str(x)


def round_to(x: float, digits: int = 2) -> float:
    return float(f"{x:.{digits}g}")


# ---------------------------------------------------------------------------------------------------- reading


@dataclasses.dataclass
class RunFiles:
    """What the workdir says about its run."""

    workdir: epath.Path
    records: list[dict]
    run: dict  # run.json ({} when absent: a population member has its config.json only)
    cfg: ml_collections.ConfigDict  # the run's config (today's defaults where the workdir has none)
    summary: dict | None  # summary.json: None while running, or when interrupted or failed
    has_config: bool

    def series(self, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        return series(self.records, split, name)

    @property
    def nonfinite(self) -> dict | None:
        return next((r for r in self.records if r["split"] == NONFINITE_SPLIT), None)

    @property
    def steps_per_epoch(self) -> int:
        return int(self.run.get("steps_per_epoch") or 0)

    @property
    def planned_steps(self) -> int | None:
        t = self.cfg.train
        if t.steps:
            return int(t.steps)
        spe = self.steps_per_epoch
        return max(1, math.ceil(t.epochs * spe)) if spe else None

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.records), default=0)

    @property
    def status(self) -> str:
        if self.nonfinite is not None:
            return "failed"
        if self.summary is not None:
            return "finished"
        return "interrupted or running"

    @property
    def data_stats(self) -> dict:
        return self.run.get("data_stats") or (self.summary or {}).get("data_stats") or {}

    def value(self, field: str) -> Any:
        node = self.cfg
        for part in field.split("."):
            node = node[part]
        return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def read_run_files(workdir: fileio.PathLike) -> RunFiles:
    folder = fileio.path(workdir)
    metrics_file = folder / workdir_lib.METRICS_FILE
    if not metrics_file.exists():
        raise DiagnoseError(f"{metrics_file} not found: {workdir} holds no run metrics to diagnose "
                            "(is it the run's --workdir? a run writes them from its first eval or log line)")
    records = read_metrics(folder)
    if not any(r["split"] in ("train", "val", NONFINITE_SPLIT) for r in records):
        raise DiagnoseError(f"{metrics_file} has no train or val line yet: nothing to diagnose")
    run = workdir_lib.read_run(str(folder)) or {}
    member_config = folder / workdir_lib.MEMBER_CONFIG_FILE  # a population member's flat config only
    flat = run.get("config") or (fileio.read_json(member_config) if member_config.exists() else None)
    cfg = default_config()
    if flat:
        try:
            cfg = workdir_lib.config_from_dict(flat)
        except ConfigError:  # a config from another ftjax version: keep today's defaults
            flat = None
    summary_path = folder / workdir_lib.SUMMARY_FILE
    summary = fileio.read_json(summary_path) if summary_path.exists() else None
    return RunFiles(folder, records, run, cfg, summary, bool(flat))


# ---------------------------------------------------------------------------------------------------- helpers


def at_steps(steps: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """`values` (logged at `steps`) at the steps `at`: the last logged value at or before each (the train
    loss the gap lines also use), the first one before anything was logged."""
    idx = np.clip(np.searchsorted(steps, at, side="right") - 1, 0, len(steps) - 1)
    return values[idx]


def best_index(values: np.ndarray, mode: str) -> int:
    """The first eval reaching the best value (ties: the earliest, as early stopping keeps it); NaN never wins."""
    v = np.where(np.isnan(values), np.inf if mode == "min" else -np.inf, values)
    return int(np.argmin(v) if mode == "min" else np.argmax(v))


def steps_as_epochs(files: RunFiles, step: float) -> str:
    spe = files.steps_per_epoch
    return f"step {int(step)}" + (f" (epoch {step / spe:.2f})" if spe else "")


def length_change(files: RunFiles, to_step: int) -> dict[str, Any]:
    """The run-length field set so the run ends near `to_step`."""
    if files.cfg.train.steps or not files.steps_per_epoch:
        return {"train.steps": max(1, int(to_step))}
    return {"train.epochs": max(0.1, math.ceil(10 * to_step / files.steps_per_epoch) / 10)}


def twice_as_long(files: RunFiles) -> dict[str, Any]:
    t = files.cfg.train
    return {"train.steps": int(2 * t.steps)} if t.steps else {"train.epochs": round_to(2 * t.epochs)}


def make_remedy(files: RunFiles, why: str, changes: dict[str, Any]) -> Remedy:
    return Remedy(why, changes, {f: files.value(f) for f in changes})


def scale_lr(files: RunFiles, factor: float, why: str) -> Remedy:
    return make_remedy(files, why, {"optim.lr": round_to(files.cfg.optim.lr * factor)})


def save_plot(files: RunFiles, kind: str, title: str, draw: Callable[[Any], None], ncols: int = 1) -> str:
    """Draws plots/diagnose_<kind>.png with `draw(axes)`; returns its path relative to the workdir."""
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 4), squeeze=False)
    draw(axes[0] if ncols > 1 else axes[0][0])
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 85 * ncols), fontsize=10)
    fig.tight_layout()
    rel = f"{workdir_lib.PLOTS_DIR}/diagnose_{kind}.png"
    fileio.save_figure(fig, files.workdir / rel)
    plt.close(fig)
    return rel


def longer_warmup(files: RunFiles) -> dict[str, Any]:
    """A warmup about twice as long (a schedule without warmup: its warmup_ variant), or {} when it is long."""
    s = files.cfg.optim.schedule
    if s.type in _NO_WARMUP:  # the warmup field is unused by these: the variant takes it (or 0.1 if it is 0)
        return {"optim.schedule.type": _NO_WARMUP[s.type], **({} if s.warmup else {"optim.schedule.warmup": 0.1})}
    if not s.type.startswith("warmup_") and s.type not in ("wsd", "inverse_sqrt", "polynomial", "step"):
        return {}  # one_cycle, stlr: their rise is pct_start / cut_frac
    try:
        unit, amount = parse_duration(s.warmup, "optim.schedule.warmup")
    except ConfigError:
        return {}
    if unit == "steps":
        total = files.planned_steps or 0
        new: Any = max(2 * int(amount), 10)
        return {"optim.schedule.warmup": new} if not total or new <= total // 3 else {}
    if unit == "epochs":
        return {"optim.schedule.warmup": f"{2 * amount:g}ep"}
    if amount >= 0.3:
        return {}
    return {"optim.schedule.warmup": 0.1 if amount == 0 else min(0.3, round_to(2 * amount))}
