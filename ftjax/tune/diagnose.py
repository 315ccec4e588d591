"""`--mode=diagnose`: reads what a run wrote (finished, interrupted or failed; local or gs://) and says what
went wrong and which hyperparameters to change, each finding with its evidence, a plot and ready flag lines.
It only reads the workdir: no devices, no model, no data."""

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
from ftjax import forgetting as forgetting_lib
from ftjax import workdir as workdir_lib
from ftjax.callbacks.forgetting import SPLIT as FORGETTING_SPLIT
from ftjax.callbacks.metric_log import read_metrics
from ftjax.callbacks.stopping import NONFINITE_SPLIT
from ftjax.config import ConfigError, default_config
from ftjax.config.checks import parse_duration
from ftjax.errors import UserError
from ftjax.reporting.plots import series

# ---- Thresholds. Each rule reports only beyond its threshold, so a healthy run gets no finding.
MIN_EVALS = 3  # a trend (a minimum, a rise, a still-falling curve) needs at least three evaluations
# Overfitting: the val loss ends this far (relative) above its minimum; smaller rises are within the eval
# noise of typical validation sets, and the best checkpoint (kept anyway) costs nothing there.
OVERFIT_VAL_RISE = 0.10
OVERFIT_EVALS_AFTER = 2  # ... sustained for at least this many evals after the minimum (not one noisy eval)
OVERFIT_TRAIN_FALL = 0.10  # ... while the train loss fell by at least 10% after the minimum (it kept learning)
# Under-training: over the last third of the evals the val loss still fell by 5% (relative) and the train loss
# by 10%: a converged run moves less than that, a run cut short by its budget more.
UNDERTRAIN_TAIL = 1 / 3
UNDERTRAIN_VAL_GAIN = 0.05
UNDERTRAIN_TRAIN_FALL = 0.10
# Instability: a logged value against the median of the SPIKE_WINDOW logged values before it (robust to the
# spike itself and to the downward trend of a loss); SPIKE_MIN_HISTORY values are needed to judge.
SPIKE_WINDOW = 10
SPIKE_MIN_HISTORY = 3
# A train-loss line is a mean over log_every steps: doubling is far outside its noise. The rise must also be 10%
# of the first logged loss, so a loss near zero (0.01 -> 0.03 late in a run) is not a spike.
LOSS_SPIKE_RATIO = 2.0
LOSS_SPIKE_FLOOR = 0.10
# A grad norm is one step's, heavy-tailed: 2-3x swings are ordinary, and while a new head starts to fit, norms
# climb ~5x within a few log lines (the tiny BERT of tests/test_diagnose.py); the spikes of an unstable run are
# 10-100x. It must also exceed the run's median grad norm, so tiny late norms (a fitted train set) do not count.
GRAD_SPIKE_RATIO = 10.0
# LR vs the range test: its suggestion is good to a factor of a few (steepest descent and min-loss/10 differ
# by about that), so only an order of magnitude apart is reported.
LR_FAR_FACTOR = 10.0
# Forgetting, when the run set no forgetting.budget: the budget metric worse by 10% than at step 0 (the README's
# example budget; healthy fine-tunes keep CKA above ~0.9 and the pretraining loss within a few %).
FORGETTING_BUDGET = 0.10
# Label imbalance: a constant majority-class guess already scores 70% accuracy, or one class is 10x rarer than
# the largest (accuracy and the mean loss barely see it).
MAJORITY_SHARE = 0.70
MINORITY_RATIO = 10.0
# Label prior: a classifier whose best val loss is still 95% of the validation labels' entropy (the loss of
# predicting the class frequencies) has learned next to nothing from the inputs; its val loss fell by 1% to that
# best: learning, too slowly, else stuck (or collapsed). The best, not the last: overfitting ends above it too.
# A constant guess is named when its accuracy and macro-F1 are exactly one's (to this tolerance: both are ratios
# of counts).
PRIOR_LOSS_SHARE = 0.95
PRIOR_LOSS_FALL = 0.01
ONE_CLASS_TOL = 1e-6
# Truncation: above 5% of the examples cut at data.max_len, a noticeable part of the signal is lost; below, a
# longer max_len costs more compute than it recovers.
TRUNCATION_SHARE = 0.05
# Eval set size: the accuracy's standard error above 2 points (95% interval +-4 points) is too coarse to choose
# checkpoints or trials, when the best eval beats the runner-up by less than EVAL_Z standard errors.
EVAL_SE_MAX = 0.02
EVAL_Z = 2.0
EVAL_SE_TARGET = 0.01  # the validation size suggested: a standard error of 1 point
MAX_VALIDATION_FRACTION = 0.3  # of train, at most, held out for validation

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


def _plain(x: float) -> float | str:
    """A float for diagnosis.json: "nan" / "inf" as strings (JSON has no such numbers)."""
    return x if math.isfinite(x) else str(x)


def _round(x: float, digits: int = 2) -> float:
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


def _at(steps: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """`values` (logged at `steps`) at the steps `at`: the last logged value at or before each (the train
    loss the gap lines also use), the first one before anything was logged."""
    idx = np.clip(np.searchsorted(steps, at, side="right") - 1, 0, len(steps) - 1)
    return values[idx]


def _best_index(values: np.ndarray, mode: str) -> int:
    """The first eval reaching the best value (ties: the earliest, as early stopping keeps it); NaN never wins."""
    v = np.where(np.isnan(values), np.inf if mode == "min" else -np.inf, values)
    return int(np.argmin(v) if mode == "min" else np.argmax(v))


def _steps_as_epochs(files: RunFiles, step: float) -> str:
    spe = files.steps_per_epoch
    return f"step {int(step)}" + (f" (epoch {step / spe:.2f})" if spe else "")


def _length_change(files: RunFiles, to_step: int) -> dict[str, Any]:
    """The run-length field set so the run ends near `to_step`."""
    if files.cfg.train.steps or not files.steps_per_epoch:
        return {"train.steps": max(1, int(to_step))}
    return {"train.epochs": max(0.1, math.ceil(10 * to_step / files.steps_per_epoch) / 10)}


def _twice_as_long(files: RunFiles) -> dict[str, Any]:
    t = files.cfg.train
    return {"train.steps": int(2 * t.steps)} if t.steps else {"train.epochs": _round(2 * t.epochs)}


def _remedy(files: RunFiles, why: str, changes: dict[str, Any]) -> Remedy:
    return Remedy(why, changes, {f: files.value(f) for f in changes})


def _scale_lr(files: RunFiles, factor: float, why: str) -> Remedy:
    return _remedy(files, why, {"optim.lr": _round(files.cfg.optim.lr * factor)})


def _figure(files: RunFiles, kind: str, title: str, draw: Callable[[Any], None], ncols: int = 1) -> str:
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


# ---------------------------------------------------------------------------------------------------- rules
# Each rule returns a Finding, or a line saying why the run is fine in that respect or could not be checked.


def check_overfitting(files: RunFiles) -> Finding | str:
    val_steps, val_loss = files.series("val", "loss")
    train_steps, train_loss = files.series("train", "loss")
    if len(val_steps) < MIN_EVALS or not len(train_steps):
        return f"skipped: {len(val_steps)} evals and {len(train_steps)} train lines (needs {MIN_EVALS} evals)"
    i = _best_index(val_loss, "min")
    after = len(val_steps) - 1 - i
    rise = val_loss[-1] / val_loss[i] - 1 if val_loss[i] > 0 else 0.0
    train_at = _at(train_steps, train_loss, val_steps)
    fall = 1 - train_at[-1] / train_at[i] if train_at[i] > 0 else 0.0
    if after < OVERFIT_EVALS_AFTER or not rise >= OVERFIT_VAL_RISE or not fall >= OVERFIT_TRAIN_FALL:
        return (f"ok: val loss min at eval {i + 1}/{len(val_steps)}, last {100 * rise:+.1f}% above it, train loss "
                f"{-100 * fall:+.1f}% since")
    gap = val_loss - train_at
    evidence = {"val_loss_min_step": int(val_steps[i]), "val_loss_min": float(val_loss[i]),
                "last_step": int(val_steps[-1]), "val_loss_last": float(val_loss[-1]),
                "val_loss_rise": float(rise), "train_loss_at_min": float(train_at[i]),
                "train_loss_last": float(train_at[-1]), "gap_at_min": float(gap[i]), "gap_last": float(gap[-1]),
                "evals_after_min": int(after), "run_fraction_at_min": float(val_steps[i] / val_steps[-1])}
    t, d, o = files.cfg.train, files.cfg.model.dropout, files.cfg.optim
    eval_gap = int(val_steps[i] - val_steps[i - 1]) if i else int(val_steps[0])
    stop = _length_change(files, int(val_steps[i]) + eval_gap)
    if not t.early_stop.patience:
        stop["train.early_stop.patience"] = OVERFIT_EVALS_AFTER
    hidden = 0.2 if d.hidden is None else min(0.5, _round(d.hidden + 0.1))
    decay = 0.01 if not o.weight_decay else min(0.3, _round(o.weight_decay * 5))
    remedies = [_remedy(files, "stop at the val minimum (fewer epochs; early stopping)", stop),
                _remedy(files, "regularise more (dropout, weight decay)",
                        {"model.dropout.hidden": hidden, "optim.weight_decay": decay}),
                _scale_lr(files, 0.5, "a lower LR (slower fitting of the training set)")]

    def draw(axes):
        axes[0].plot(train_steps, train_loss, lw=1, label="train loss")
        axes[0].plot(val_steps, val_loss, "o-", ms=3, label="val loss")
        axes[0].axvline(val_steps[i], color="red", ls="--", label=f"val minimum (step {int(val_steps[i])})")
        axes[0].set_xlabel("step")
        axes[1].plot(val_steps, gap, "o-", ms=3, color="purple", label="val - train loss")
        axes[1].axhline(0, color="gray", lw=1)
        axes[1].axvline(val_steps[i], color="red", ls="--")
        axes[1].set_xlabel("step")

    title = (f"val loss {100 * rise:.0f}% above its minimum at {_steps_as_epochs(files, val_steps[i])} while the "
             f"train loss fell {100 * fall:.0f}%")
    return Finding("overfitting", title, evidence, remedies, _figure(files, "overfitting", title, draw, ncols=2))


def check_under_training(files: RunFiles) -> Finding | str:
    if files.status != "finished":
        return f"skipped: only a finished run can be judged too short (this one: {files.status})"
    val_steps, val_loss = files.series("val", "loss")
    train_steps, train_loss = files.series("train", "loss")
    if len(val_steps) < MIN_EVALS or len(train_steps) < 2:
        return f"skipped: {len(val_steps)} evals (needs {MIN_EVALS})"
    es = files.cfg.train.early_stop
    m_steps, metric = files.series("val", es.metric)
    if not len(m_steps):
        m_steps, metric, es_mode, name = val_steps, val_loss, "min", "loss"
    else:
        es_mode, name = es.mode, es.metric
    best = _best_index(metric, es_mode)
    k = max(0, math.floor(len(val_steps) * (1 - UNDERTRAIN_TAIL)) - 1)  # the eval a third from the end
    gain = 1 - val_loss[-1] / val_loss[k] if val_loss[k] > 0 else 0.0
    tail_start = val_steps[k]
    before = train_loss[train_steps <= tail_start]
    train_from = before[-1] if len(before) else train_loss[0]
    fall = 1 - train_loss[-1] / train_from if train_from > 0 else 0.0
    if best != len(metric) - 1 or not gain >= UNDERTRAIN_VAL_GAIN or not fall >= UNDERTRAIN_TRAIN_FALL:
        return (f"ok: best val {name} at eval {best + 1}/{len(metric)}; over the last third val loss "
                f"{-100 * gain:+.1f}%, train loss {-100 * fall:+.1f}%")
    evidence = {"best_metric": name, "best_step": int(m_steps[best]), "best_value": float(metric[best]),
                "last_step": int(val_steps[-1]), "tail_from_step": int(tail_start),
                "val_loss_tail_gain": float(gain), "train_loss_tail_fall": float(fall),
                "train_loss_from": float(train_from), "train_loss_last": float(train_loss[-1])}
    remedies = [_remedy(files, "train longer (a resume with the longer run continues from the last checkpoint)",
                        _twice_as_long(files)),
                _scale_lr(files, 2.0, "a higher LR (faster progress in the same steps)")]

    def draw(ax):
        ax.plot(train_steps, train_loss, lw=1, label="train loss")
        ax.plot(val_steps, val_loss, "o-", ms=3, label="val loss")
        ax.axvspan(tail_start, val_steps[-1], color="orange", alpha=0.15, label="last third: still falling")
        ax.set_xlabel("step")

    title = (f"still improving at the end: best val {name} at the last eval (step {int(val_steps[-1])}); over "
             f"the last third val loss fell {100 * gain:.0f}%, train loss {100 * fall:.0f}%")
    return Finding("under_training", title, evidence, remedies, _figure(files, "under_training", title, draw))


def spikes(steps: np.ndarray, values: np.ndarray, ratio: float, floor: float) -> list[tuple[int, float, float]]:
    """(step, value, rolling median of the SPIKE_WINDOW values before it) where value > ratio x that median
    and value - median > floor; non-finite values always count."""
    out = []
    for j in range(len(values)):
        x = values[j]
        if not math.isfinite(x):
            out.append((int(steps[j]), float(x), math.nan))
            continue
        prev = values[max(0, j - SPIKE_WINDOW):j]
        prev = prev[np.isfinite(prev)]
        if len(prev) < SPIKE_MIN_HISTORY:
            continue
        median = float(np.median(prev))
        if x > ratio * median and x - median > floor:
            out.append((int(steps[j]), float(x), median))
    return out


def check_instability(files: RunFiles) -> Finding | str:
    train_steps, train_loss = files.series("train", "loss")
    norm_steps, norms = files.series("train", "grad_norm")
    nonfinite = files.nonfinite
    finite_loss = train_loss[np.isfinite(train_loss)]
    loss_floor = LOSS_SPIKE_FLOOR * float(finite_loss[0]) if len(finite_loss) else 0.0
    loss_spikes = spikes(train_steps, train_loss, LOSS_SPIKE_RATIO, loss_floor)
    finite_norms = norms[np.isfinite(norms)]
    norm_floor = float(np.median(finite_norms)) if len(finite_norms) else 0.0
    norm_spikes = [s for s in spikes(norm_steps, norms, GRAD_SPIKE_RATIO, 0.0) if not s[1] <= norm_floor]
    if nonfinite is None and not loss_spikes and not norm_spikes:
        return f"ok: no loss or grad-norm spike in {len(train_steps)} train lines, no non-finite loss"
    evidence: dict[str, Any] = {
        "loss_spikes": [{"step": s, "loss": v, "rolling_median": m} for s, v, m in loss_spikes[:10]],
        "grad_norm_spikes": [{"step": s, "grad_norm": v, "rolling_median": m} for s, v, m in norm_spikes[:10]]}
    parts = []
    if nonfinite is not None:
        loss, norm = float(nonfinite.get("loss", math.nan)), float(nonfinite.get("param_norm", math.nan))
        evidence["nonfinite"] = {"step": int(nonfinite["step"]), "loss": _plain(loss), "param_norm": _plain(norm)}
        what = f"the loss became {loss}" if not math.isfinite(loss) else f"the update made the params {norm}"
        parts.append(f"{what} at step {int(nonfinite['step'])}: the NaN guard stopped the run")
    if loss_spikes:
        parts.append(f"{len(loss_spikes)} train-loss spike(s) (first at step {loss_spikes[0][0]})")
    if norm_spikes:
        parts.append(f"{len(norm_spikes)} grad-norm spike(s) (first at step {norm_spikes[0][0]})")
    o = files.cfg.optim
    lower = _round(o.lr * (0.1 if nonfinite is not None else 0.3))
    found = find_lr_test(files)
    if found is not None and float(found[1]["suggestion"]["lr"]) < lower:
        remedies = [_remedy(files, "a lower LR: the range test's suggestion",
                            {"optim.lr": _round(float(found[1]["suggestion"]["lr"]))})]
    else:
        remedies = [_remedy(files, "a lower LR" + ("" if found else " (--mode=lr_find measures a good one)"),
                            {"optim.lr": lower})]
    warmup = _longer_warmup(files)
    if warmup:
        remedies.append(_remedy(files, "a longer warmup", warmup))
    if not o.clip_norm or o.clip_norm > 0.25:
        remedies.append(_remedy(files, "clip the gradient norm" + (" harder" if o.clip_norm else ""),
                                {"optim.clip_norm": 1.0 if not o.clip_norm else _round(o.clip_norm / 2)}))

    def draw(axes):
        axes[0].plot(train_steps, train_loss, lw=1, label="train loss")
        for s, v, _ in loss_spikes:
            axes[0].plot([s], [v if math.isfinite(v) else np.nanmax(finite_loss, initial=1.0)], "rx", ms=9)
        axes[1].plot(norm_steps, norms, lw=1, color="green", label="grad norm")
        for s, v, _ in norm_spikes:
            if math.isfinite(v):
                axes[1].plot([s], [v], "rx", ms=9)
        if len(finite_norms) and finite_norms.min() > 0:
            axes[1].set_yscale("log")
        for ax in axes:
            ax.set_xlabel("step")
            if nonfinite is not None:
                ax.axvline(nonfinite["step"], color="red", ls="--", label=f"non-finite loss (step {nonfinite['step']})")

    title = "unstable training: " + "; ".join(parts)
    return Finding("instability", title, evidence, remedies, _figure(files, "instability", title, draw, ncols=2))


def _longer_warmup(files: RunFiles) -> dict[str, Any]:
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
    return {"optim.schedule.warmup": 0.1 if amount == 0 else min(0.3, _round(2 * amount))}


def find_lr_test(files: RunFiles) -> tuple[epath.Path, dict] | None:
    """The lr_find result of this run: in its workdir, else in a sibling folder whose run.json has the same model
    and train data (the latest by run.json's time)."""
    own = files.workdir / workdir_lib.LR_FIND_FILE
    if own.exists():
        return own, fileio.read_json(own)
    model = (files.run.get("model") or {}).get("name_or_path")
    train = (files.run.get("data") or {}).get("train") or {}
    if not model or not files.workdir.parent.exists():
        return None
    found = []
    for sibling in files.workdir.parent.iterdir():
        path = sibling / workdir_lib.LR_FIND_FILE
        if sibling == files.workdir or not path.exists():
            continue
        other = workdir_lib.read_run(str(sibling)) or {}
        other_train = (other.get("data") or {}).get("train") or {}
        if (other.get("model") or {}).get("name_or_path") == model and (
                other_train.get("sha256") == train.get("sha256") or not train):
            found.append((other.get("written", ""), path))
    if not found:
        return None
    path = max(found)[1]
    return path, fileio.read_json(path)


def check_lr(files: RunFiles) -> Finding | str:
    found = find_lr_test(files)
    if found is None:
        return f"skipped: no {workdir_lib.LR_FIND_FILE} in the workdir or a sibling with the same model and data"
    path, result = found
    suggested = float(result["suggestion"]["lr"])
    lr = float(files.cfg.optim.lr)
    factor = lr / suggested
    where = path.parent.name if path.parent != files.workdir else "this workdir"
    if 1 / LR_FAR_FACTOR < factor < LR_FAR_FACTOR:
        return f"ok: optim.lr={lr:.3g} is within {LR_FAR_FACTOR:g}x of the range test's {suggested:.3g} ({where})"
    evidence = {"lr": lr, "suggested_lr": suggested, "method": result["suggestion"].get("method"),
                "ratio": factor, "lr_find": str(path)}
    lr_find_batch = None
    if path.parent != files.workdir:
        other = workdir_lib.read_run(str(path.parent)) or {}
        lr_find_batch = (other.get("config") or {}).get("train.batch_size")
        if lr_find_batch is not None and lr_find_batch != files.cfg.train.batch_size:
            evidence["note"] = (f"the range test used batch size {lr_find_batch}, this run "
                                f"{files.cfg.train.batch_size}")
    remedies = [_remedy(files, "the range test's suggestion", {"optim.lr": _round(suggested)})]

    def draw(ax):
        lrs = np.asarray(result.get("lrs", []), float)
        losses = np.asarray([np.nan if x is None else x for x in result.get("losses", [])], float)
        if len(lrs) and len(losses):
            ax.plot(lrs[:len(losses)], losses, lw=1, label="range test loss")
        ax.axvline(suggested, color="green", ls="--", label=f"suggested {suggested:.2e}")
        ax.axvline(lr, color="red", ls="--", label=f"this run's optim.lr {lr:.2e}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")

    side = "above" if factor > 1 else "below"
    title = f"optim.lr={lr:.3g} is {max(factor, 1 / factor):.0f}x {side} the range test's suggestion {suggested:.3g}"
    return Finding("lr_vs_range_test", title, evidence, remedies, _figure(files, "lr_vs_range_test", title, draw))


def _budget_metric(f: Any, names: set[str]) -> str:
    """forgetting.budget_metric, "auto" resolved as the Forgetting callback does."""
    if f.budget_metric != "auto":
        return f.budget_metric if f.budget_metric in names else ""
    return next((m for m in ("mlm_loss", "lm_perplexity", "cka/mean", "drift/total") if m in names), "")


def check_forgetting(files: RunFiles) -> Finding | str:
    lines = [r for r in files.records if r["split"] == FORGETTING_SPLIT]
    if not lines:
        return "skipped: no forgetting monitor lines (forgetting.monitors off, or no eval yet)"
    f = files.cfg.forgetting
    names = {k for r in lines for k in r if k not in ("step", "split")}
    metric = _budget_metric(f, names)
    if not metric:
        return f"skipped: no forgetting metric to watch among {sorted(names)[:6]}"
    steps, values = files.series(FORGETTING_SPLIT, metric)
    if steps[0] != 0:
        return "skipped: no step-0 (loaded model) value to compare with"
    budget = float(f.budget) or FORGETTING_BUDGET
    base, higher = values[0], forgetting_lib.worse_when_higher(metric)
    if higher:
        limit = base * (1 + budget) if base > 0 else budget
        over = ~(values <= limit)
    else:
        limit = base * (1 - budget)
        over = ~(values >= limit)
    worst = int(np.nanargmax(values) if higher else np.nanargmin(values))
    if not over.any():
        return f"ok: {metric} stayed within {100 * budget:g}% of step 0 (worst {values[worst]:.4g}, limit {limit:.4g})"
    first = int(np.argmax(over))
    evidence = {"metric": metric, "step0": float(base), "limit": float(limit), "budget": budget,
                "budget_source": "forgetting.budget" if f.budget else f"diagnose default {FORGETTING_BUDGET:g}",
                "first_over_step": int(steps[first]), "worst_step": int(steps[worst]),
                "worst": float(values[worst]), "last": float(values[-1])}
    o = files.cfg.optim
    remedies = [_scale_lr(files, 0.5, "a lower LR (smaller steps away from the loaded weights)")]
    if o.decay_toward != "pretrained":
        remedies.append(_remedy(files, "decay toward the loaded weights (L2-SP)", {"optim.decay_toward": "pretrained"}))
    layers = sorted({int(k.rsplit("_", 1)[1]) for k in names if k.startswith(("drift/layer_", "cka/layer_"))})
    if not o.freeze_layers and len(layers) >= 2:
        half = len(layers) // 2
        remedies.append(_remedy(files, "freeze the lower half of the layers",
                                {"optim.freeze_layers": f"embeddings,0-{half - 1}" if half > 1 else "embeddings,0"}))

    def draw(ax):
        ax.plot(steps, values, "o-", ms=3, label=metric)
        ax.axhline(base, color="gray", lw=1, label=f"step 0 {base:.4g}")
        ax.axhline(limit, color="red", ls="--", label=f"budget limit {limit:.4g}")
        ax.set_xlabel("step")

    title = (f"forgetting beyond a {100 * budget:g}% budget: {metric} {values[worst]:.4g} at step {int(steps[worst])} "
             f"against {base:.4g} at step 0")
    return Finding("forgetting", title, evidence, remedies, _figure(files, "forgetting", title, draw))


def check_label_imbalance(files: RunFiles) -> Finding | str:
    counts = (files.data_stats.get("label_counts") or {}).get("train")
    if not counts:
        return "skipped: no label counts recorded (not a classification run, or written by an older ftjax)"
    total = sum(counts.values())
    majority, top = max(counts.items(), key=lambda kv: kv[1])
    minority, low = min(counts.items(), key=lambda kv: kv[1])
    share, ratio = top / max(total, 1), top / max(low, 1)
    if share < MAJORITY_SHARE and ratio < MINORITY_RATIO:
        return f"ok: majority class {majority!r} is {100 * share:.0f}% of train, the rarest {ratio:.1f}x rarer"
    es = files.cfg.train.early_stop
    if es.metric == "macro_f1":
        return (f"ok: imbalanced ({majority!r} {100 * share:.0f}% of train), and train.early_stop.metric is "
                "already macro_f1")
    evidence = {"train_label_counts": counts, "majority": majority, "majority_share": share,
                "minority": minority, "majority_to_minority": ratio,
                "class_weights": "ftjax has no class weights; macro-F1 weighs every class equally"}
    acc = files.series("val", "accuracy")[1]
    if len(acc):
        evidence["val_accuracy_best"] = float(np.nanmax(acc))
        evidence["majority_guess_accuracy"] = share
    remedies = [_remedy(files, "select checkpoints (and trials) by macro-F1, which weighs every class equally",
                        {"train.early_stop.metric": "macro_f1", "train.early_stop.mode": "max"})]

    def draw(ax):
        names = list(counts)
        ax.bar(range(len(names)), [counts[n] for n in names], color="steelblue")
        ax.set_xticks(range(len(names)), [str(n)[:12] for n in names], rotation=45 if len(names) > 6 else 0)
        ax.set_ylabel("train examples")

    title = (f"imbalanced labels: {majority!r} is {100 * share:.0f}% of train ({minority!r} {low} of {total}); "
             f"accuracy and loss favour it")
    return Finding("label_imbalance", title, evidence, remedies, _figure(files, "label_imbalance", title, draw))


def constant_guess(counts: dict[str, int], accuracy: float, macro_f1: float) -> str | None:
    """The class a classifier answers for every example when its accuracy and macro-F1 on a split with these
    label counts are exactly a constant guess's (F1 2n/(n + N) for that class, 0 for the others, averaged over
    the classes present, as ftjax.metrics does), else None."""
    present = {name: n for name, n in counts.items() if n > 0}
    total = sum(present.values())
    for name, n in present.items():
        if (abs(accuracy - n / total) < ONE_CLASS_TOL
                and abs(macro_f1 - 2 * n / (n + total) / len(present)) < ONE_CLASS_TOL):
            return name
    return None


def check_label_prior(files: RunFiles) -> Finding | str:
    counts = {k: n for k, n in ((files.data_stats.get("label_counts") or {}).get("validation") or {}).items() if n}
    val_steps, val_loss = files.series("val", "loss")
    if len(counts) < 2 or not len(val_loss):
        return "skipped: no validation label counts and val loss (a classification run records them)"
    shares = np.array(list(counts.values()), float) / sum(counts.values())
    entropy = float(-(shares * np.log(shares)).sum())
    best = float(np.nanmin(val_loss))  # the best eval: an overfit run's last loss can be above the prior's
    share = best / entropy
    fall = 1 - best / val_loss[0] if val_loss[0] > 0 else 0.0
    if not share >= PRIOR_LOSS_SHARE:
        return (f"ok: best val loss {best:.3g} is {100 * share:.0f}% of the validation labels' entropy "
                f"{entropy:.3g}")
    acc_steps, acc = files.series("val", "accuracy")
    _, f1 = files.series("val", "macro_f1")
    guess = constant_guess(counts, acc[-1], f1[-1]) if len(acc) and len(f1) == len(acc) else None
    evidence = {"val_loss_best": best, "label_entropy": entropy, "share_of_entropy": float(share),
                "val_loss_fall": float(fall), "evals": int(len(val_loss)), "validation_label_counts": counts,
                "constant_guess": guess}
    if fall >= PRIOR_LOSS_FALL:  # on its way out of the prior, slowly: more progress per run
        remedies = [_scale_lr(files, 4.0, "a higher LR: the loss falls, too slowly to leave the prior"),
                    _remedy(files, "train longer", _twice_as_long(files))]
        state = f"it fell {100 * fall:.1f}% to there: too slowly"
    else:  # stuck there, or collapsed to it
        warmup = _longer_warmup(files)
        remedies = [_scale_lr(files, 0.25, "a lower LR: the loss does not move (stuck or collapsed)"),
                    *([_remedy(files, "a longer warmup", warmup)] if warmup else [])]
        state = f"it moved {-100 * fall:+.1f}% to there: stuck"

    def draw(axes):
        axes[0].plot(val_steps, val_loss, "o-", ms=3, label="val loss")
        axes[0].axhline(entropy, color="red", ls="--", label="label entropy (predicting the class frequencies)")
        axes[0].set_xlabel("step")
        if len(acc):
            axes[1].plot(acc_steps, acc, "o-", ms=3, label="val accuracy")
            axes[1].axhline(shares.max(), color="red", ls="--", label="always the largest class")
            axes[1].set_xlabel("step")

    title = (f"the model has learned next to nothing beyond the label frequencies: its best val loss "
             f"{best:.3f} is {100 * share:.0f}% of their entropy {entropy:.3f}; {state}"
             + (f"; it answers {guess!r} for every validation example" if guess else ""))
    return Finding("label_prior", title, evidence, remedies, _figure(files, "label_prior", title, draw, ncols=2))


def _truncation_counts(stats: dict) -> list[tuple[str, str, dict]]:
    """(what, length field, {split: truncated}) per kind of input the data stats count."""
    out = []
    for key, what, field in (("truncated", "examples", "data.max_len"),
                             ("truncated_sources", "sources", "data.max_len"),
                             ("truncated_targets", "targets", "data.seq2seq.max_target_len"),
                             ("truncated_sequences", "pairs", "data.max_len")):
        if isinstance(stats.get(key), dict):
            out.append((what, field, stats[key]))
    return out


def _split_sizes(files: RunFiles) -> dict[str, int]:
    stats = files.data_stats
    for key in ("examples", "documents", "pairs"):
        if isinstance(stats.get(key), dict):
            return {k: int(v) for k, v in stats[key].items()}
    return {k: int(v.get("rows", 0)) for k, v in (files.run.get("data") or {}).items()}


def check_truncation(files: RunFiles) -> Finding | str:
    stats = files.data_stats
    kinds = _truncation_counts(stats)
    if not kinds:
        return "skipped: no truncation counts recorded"
    if stats.get("format") == "text":
        return "ok: plain-text LM data is split across rows, not truncated"
    sizes = _split_sizes(files)
    over = []
    for what, field, counts in kinds:
        n = sizes.get("train", 0)
        if n and counts.get("train", 0) / n >= TRUNCATION_SHARE:
            over.append((what, field, counts, counts["train"] / n))
    if not over:
        return "ok: " + ", ".join(f"{c.get('train', 0)} of {sizes.get('train', '?')} train {w} truncated"
                                  for w, _, c in kinds)
    evidence = {"train_examples": sizes.get("train"),
                "truncated": {what: {"field": field, "counts": counts, "train_share": share}
                              for what, field, counts, share in over}}
    if isinstance(stats.get("train_tokens"), dict):
        evidence["train_tokens"] = stats["train_tokens"]
    changes: dict[str, Any] = {}
    for _, field, _, _ in over:
        current = int(files.value(field))
        changes[field] = 2 * current
    d = files.cfg.data
    if "data.max_len" in changes and isinstance(d.buckets, (tuple, list)):
        changes["data.buckets"] = tuple(d.buckets) + (changes["data.max_len"],)
    pairs = d.seq2seq.buckets if "seq2seq" in d else None
    if isinstance(pairs, (tuple, list)) and pairs and set(changes) & {"data.max_len", "data.seq2seq.max_target_len"}:
        last = (changes.get("data.max_len", d.max_len), changes.get("data.seq2seq.max_target_len",
                                                                     d.seq2seq.max_target_len))
        changes["data.seq2seq.buckets"] = tuple(tuple(p) for p in pairs) + (last,)
    remedies = [_remedy(files, "longer inputs (up to the model's max_position_embeddings: ftjax refuses more)",
                        changes)]

    def draw(ax):
        labels, shares = [], []
        for what, _, counts in kinds:
            for split, c in counts.items():
                if sizes.get(split):
                    labels.append(f"{split} {what}")
                    shares.append(c / sizes[split])
        ax.bar(range(len(shares)), shares, color="indianred")
        ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.axhline(TRUNCATION_SHARE, color="gray", ls="--", label=f"threshold {TRUNCATION_SHARE:.0%}")
        ax.set_ylabel("share truncated")

    what, field, _, share = over[0]
    title = (f"{100 * share:.0f}% of the train {what} are truncated at {field}={files.value(field)}")
    return Finding("truncation", title, evidence, remedies, _figure(files, "truncation", title, draw))


def accuracy_se(p: float, n: int) -> float:
    """Standard error of an accuracy p on n examples, sqrt(p(1-p)/n), with p taken as (k+2)/(n+4) (Agresti-Coull)
    so that an accuracy of 0 or 1 on few examples still shows its uncertainty."""
    p = (p * n + 2) / (n + 4)
    return math.sqrt(p * (1 - p) / n)


def check_eval_size(files: RunFiles) -> Finding | str:
    steps, acc = files.series("val", "accuracy")
    if not len(steps):
        return "skipped: no val accuracy (its standard error is what this rule measures)"
    n = _split_sizes(files).get("validation", 0)
    if not n:
        return "skipped: the validation size is not recorded"
    best = _best_index(acc, "max")
    se = accuracy_se(float(acc[best]), n)
    others = np.delete(acc, best)
    others = others[np.isfinite(others)]
    margin = float(acc[best] - others.max()) if len(others) else math.inf
    if se <= EVAL_SE_MAX or margin >= EVAL_Z * se:
        return (f"ok: {n} validation examples, accuracy standard error {se:.3f}"
                + (f", best eval ahead by {margin:.3f}" if math.isfinite(margin) else ""))
    rest = [j for j in range(len(acc)) if j != best and np.isfinite(acc[j])]
    runner_up = int(steps[max(rest, key=lambda j: acc[j])]) if rest else None
    evidence = {"validation_examples": n, "best_accuracy": float(acc[best]), "best_step": int(steps[best]),
                "standard_error": se, "runner_up_step": runner_up, "margin_over_runner_up": margin,
                "spread_of_evals": float(np.nanmax(acc) - np.nanmin(acc))}
    d = files.cfg.data
    p = (acc[best] * n + 2) / (n + 4)
    wanted = math.ceil(p * (1 - p) / EVAL_SE_TARGET ** 2)
    remedies = []
    train_n = _split_sizes(files).get("train", 0)
    if d.eval_split == "" and train_n:
        fraction = min(MAX_VALIDATION_FRACTION, _round(wanted / (train_n + n)))
        if fraction > d.validation_fraction:
            remedies.append(_remedy(files, f"hold out more of train for validation (about {wanted} examples give a "
                                           f"standard error of {EVAL_SE_TARGET:g})",
                                    {"data.validation_fraction": fraction}))
    elif d.eval_split:
        evidence["note"] = (f"data.eval_split={d.eval_split!r} holds {n} examples: a larger eval split (about "
                            f"{wanted} for a standard error of {EVAL_SE_TARGET:g}) gives a steadier choice")
    if files.cfg.train.early_stop.metric == "accuracy":
        remedies.append(_remedy(files, "count only improvements beyond the noise when choosing the best checkpoint",
                                {"train.early_stop.min_delta": _round(EVAL_Z * se)}))
    if not remedies:
        remedies.append(_remedy(files, "hold out a validation set from train of the size it needs",
                                {"data.eval_split": "", "data.validation_fraction":
                                 min(MAX_VALIDATION_FRACTION, max(0.1, _round(wanted / max(train_n, 1))))}))

    def draw(ax):
        ax.errorbar(steps, acc, yerr=[accuracy_se(float(a), n) if np.isfinite(a) else 0 for a in acc], fmt="o-",
                    ms=3, capsize=3, label="val accuracy +- 1 standard error")
        ax.set_xlabel("step")

    title = (f"the eval set is too small to tell checkpoints apart: {n} examples, accuracy standard error "
             f"{se:.3f}, the best eval ahead of the runner-up by {margin:.3f}")
    return Finding("small_eval_set", title, evidence, remedies, _figure(files, "small_eval_set", title, draw))


RULES: dict[str, Callable[[RunFiles], Finding | str]] = {
    "overfitting": check_overfitting, "under_training": check_under_training, "instability": check_instability,
    "lr_vs_range_test": check_lr, "forgetting": check_forgetting, "label_imbalance": check_label_imbalance,
    "label_prior": check_label_prior, "truncation": check_truncation, "small_eval_set": check_eval_size,
}
THRESHOLDS = {
    "MIN_EVALS": MIN_EVALS, "OVERFIT_VAL_RISE": OVERFIT_VAL_RISE, "OVERFIT_EVALS_AFTER": OVERFIT_EVALS_AFTER,
    "OVERFIT_TRAIN_FALL": OVERFIT_TRAIN_FALL, "UNDERTRAIN_TAIL": UNDERTRAIN_TAIL,
    "UNDERTRAIN_VAL_GAIN": UNDERTRAIN_VAL_GAIN, "UNDERTRAIN_TRAIN_FALL": UNDERTRAIN_TRAIN_FALL,
    "SPIKE_WINDOW": SPIKE_WINDOW, "SPIKE_MIN_HISTORY": SPIKE_MIN_HISTORY, "LOSS_SPIKE_RATIO": LOSS_SPIKE_RATIO,
    "LOSS_SPIKE_FLOOR": LOSS_SPIKE_FLOOR, "GRAD_SPIKE_RATIO": GRAD_SPIKE_RATIO, "LR_FAR_FACTOR": LR_FAR_FACTOR,
    "FORGETTING_BUDGET": FORGETTING_BUDGET, "MAJORITY_SHARE": MAJORITY_SHARE, "MINORITY_RATIO": MINORITY_RATIO,
    "PRIOR_LOSS_SHARE": PRIOR_LOSS_SHARE, "PRIOR_LOSS_FALL": PRIOR_LOSS_FALL, "ONE_CLASS_TOL": ONE_CLASS_TOL,
    "TRUNCATION_SHARE": TRUNCATION_SHARE, "EVAL_SE_MAX": EVAL_SE_MAX, "EVAL_Z": EVAL_Z,
    "EVAL_SE_TARGET": EVAL_SE_TARGET, "MAX_VALIDATION_FRACTION": MAX_VALIDATION_FRACTION,
}


# ---------------------------------------------------------------------------------------------------- report


def diagnose(workdir: fileio.PathLike) -> dict[str, Any]:
    """Runs every rule on the run in `workdir`; writes WORKDIR/diagnosis.md, diagnosis.json and a PNG per
    finding under WORKDIR/plots/; returns what diagnosis.json holds."""
    files = read_run_files(workdir)
    findings, checks = [], {}
    for kind, rule in RULES.items():
        outcome = rule(files)
        if isinstance(outcome, Finding):
            findings.append(outcome)
            checks[kind] = "finding"
        else:
            checks[kind] = outcome
    result = {"workdir": str(files.workdir), "status": files.status, "last_step": files.last_step,
              "planned_steps": files.planned_steps, "config_found": files.has_config,
              "findings": [f.to_json() for f in findings], "checks": checks, "thresholds": THRESHOLDS}
    fileio.write_json(files.workdir / workdir_lib.DIAGNOSIS_JSON, result)
    fileio.write_text(files.workdir / workdir_lib.DIAGNOSIS_FILE, markdown(result))
    return result


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "; ".join(_fmt(v) for v in value) or "none"
    return str(value)


def markdown(result: dict[str, Any]) -> str:
    findings = result["findings"]
    lines = [f"# Diagnosis of {result['workdir']}", "",
             f"Run {result['status']} at step {result['last_step']}"
             + (f" of {result['planned_steps']}" if result["planned_steps"] else "") + "."
             + ("" if result["config_found"] else " No run.json: flags below start from today's defaults."), ""]
    if not findings:
        lines += ["No problems found: every check below is within its threshold or could not run.", ""]
    for n, f in enumerate(findings, 1):
        lines += [f"## {n}. {f['kind'].replace('_', ' ')}: {f['title']}", "", "Evidence:", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in f["evidence"].items()]
        lines += ["", f"![{f['kind']}]({f['plot']})", "", "What to change (one line per option):", ""]
        for r in f["remedies"]:
            moves = ", ".join(f"{k} {_fmt(c['from'])} -> {_fmt(c['to'])}" for k, c in r["changes"].items())
            lines += [f"- {r['why']} ({moves}):", "", "  ```", f"  {r['flags']}", "  ```"]
        lines.append("")
    lines += ["## Checks", "", "| check | result |", "|---|---|"]
    lines += [f"| {kind} | {outcome} |" for kind, outcome in result["checks"].items()]
    return "\n".join(lines) + "\n"


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The short printout of --mode=diagnose."""
    findings = result["findings"]
    head = f"{result['workdir']}: run {result['status']} at step {result['last_step']}; "
    if not findings:
        return [head + "no problems found"]
    lines = [head + f"{len(findings)} finding(s):"]
    for f in findings:
        lines.append(f"  {f['kind']}: {f['title']}")
        if f["remedies"]:
            lines.append(f"    try: {f['remedies'][0]['flags']}")
    return lines
