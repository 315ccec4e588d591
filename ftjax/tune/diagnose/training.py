"""Diagnosis rules on how training went: overfitting, under-training, instability (loss and grad-norm
spikes, NaN), the LR against the range test, forgetting beyond a budget."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from etils import epath

from ftjax import fileio
from ftjax import forgetting as forgetting_lib
from ftjax import workdir as workdir_lib
from ftjax.callbacks.forgetting import SPLIT as FORGETTING_SPLIT
from ftjax.tune.diagnose.evidence import (
    MIN_EVALS,
    Finding,
    RunFiles,
    at_steps,
    best_index,
    length_change,
    longer_warmup,
    make_remedy,
    plain,
    round_to,
    save_plot,
    scale_lr,
    steps_as_epochs,
    twice_as_long,
)

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
THRESHOLDS = {  # diagnosis.json records them
    "OVERFIT_VAL_RISE": OVERFIT_VAL_RISE, "OVERFIT_EVALS_AFTER": OVERFIT_EVALS_AFTER,
    "OVERFIT_TRAIN_FALL": OVERFIT_TRAIN_FALL, "UNDERTRAIN_TAIL": UNDERTRAIN_TAIL,
    "UNDERTRAIN_VAL_GAIN": UNDERTRAIN_VAL_GAIN, "UNDERTRAIN_TRAIN_FALL": UNDERTRAIN_TRAIN_FALL,
    "SPIKE_WINDOW": SPIKE_WINDOW, "SPIKE_MIN_HISTORY": SPIKE_MIN_HISTORY, "LOSS_SPIKE_RATIO": LOSS_SPIKE_RATIO,
    "LOSS_SPIKE_FLOOR": LOSS_SPIKE_FLOOR, "GRAD_SPIKE_RATIO": GRAD_SPIKE_RATIO, "LR_FAR_FACTOR": LR_FAR_FACTOR,
    "FORGETTING_BUDGET": FORGETTING_BUDGET,
}


def check_overfitting(files: RunFiles) -> Finding | str:
    val_steps, val_loss = files.series("val", "loss")
    train_steps, train_loss = files.series("train", "loss")
    if len(val_steps) < MIN_EVALS or not len(train_steps):
        return f"skipped: {len(val_steps)} evals and {len(train_steps)} train lines (needs {MIN_EVALS} evals)"
    i = best_index(val_loss, "min")
    after = len(val_steps) - 1 - i
    rise = val_loss[-1] / val_loss[i] - 1 if val_loss[i] > 0 else 0.0
    train_at = at_steps(train_steps, train_loss, val_steps)
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
    stop = length_change(files, int(val_steps[i]) + eval_gap)
    if not t.early_stop.patience:
        stop["train.early_stop.patience"] = OVERFIT_EVALS_AFTER
    hidden = 0.2 if d.hidden is None else min(0.5, round_to(d.hidden + 0.1))
    decay = 0.01 if not o.weight_decay else min(0.3, round_to(o.weight_decay * 5))
    remedies = [make_remedy(files, "stop at the val minimum (fewer epochs; early stopping)", stop),
                make_remedy(files, "regularise more (dropout, weight decay)",
                        {"model.dropout.hidden": hidden, "optim.weight_decay": decay}),
                scale_lr(files, 0.5, "a lower LR (slower fitting of the training set)")]

    def draw(axes):
        axes[0].plot(train_steps, train_loss, lw=1, label="train loss")
        axes[0].plot(val_steps, val_loss, "o-", ms=3, label="val loss")
        axes[0].axvline(val_steps[i], color="red", ls="--", label=f"val minimum (step {int(val_steps[i])})")
        axes[0].set_xlabel("step")
        axes[1].plot(val_steps, gap, "o-", ms=3, color="purple", label="val - train loss")
        axes[1].axhline(0, color="gray", lw=1)
        axes[1].axvline(val_steps[i], color="red", ls="--")
        axes[1].set_xlabel("step")

    title = (f"val loss {100 * rise:.0f}% above its minimum at {steps_as_epochs(files, val_steps[i])} while the "
             f"train loss fell {100 * fall:.0f}%")
    return Finding("overfitting", title, evidence, remedies, save_plot(files, "overfitting", title, draw, ncols=2))


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
    best = best_index(metric, es_mode)
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
    remedies = [make_remedy(files, "train longer (a resume with the longer run continues from the last checkpoint)",
                        twice_as_long(files)),
                scale_lr(files, 2.0, "a higher LR (faster progress in the same steps)")]

    def draw(ax):
        ax.plot(train_steps, train_loss, lw=1, label="train loss")
        ax.plot(val_steps, val_loss, "o-", ms=3, label="val loss")
        ax.axvspan(tail_start, val_steps[-1], color="orange", alpha=0.15, label="last third: still falling")
        ax.set_xlabel("step")

    title = (f"still improving at the end: best val {name} at the last eval (step {int(val_steps[-1])}); over "
             f"the last third val loss fell {100 * gain:.0f}%, train loss {100 * fall:.0f}%")
    return Finding("under_training", title, evidence, remedies, save_plot(files, "under_training", title, draw))


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
        evidence["nonfinite"] = {"step": int(nonfinite["step"]), "loss": plain(loss), "param_norm": plain(norm)}
        what = f"the loss became {loss}" if not math.isfinite(loss) else f"the update made the params {norm}"
        parts.append(f"{what} at step {int(nonfinite['step'])}: the NaN guard stopped the run")
    if loss_spikes:
        parts.append(f"{len(loss_spikes)} train-loss spike(s) (first at step {loss_spikes[0][0]})")
    if norm_spikes:
        parts.append(f"{len(norm_spikes)} grad-norm spike(s) (first at step {norm_spikes[0][0]})")
    o = files.cfg.optim
    lower = round_to(o.lr * (0.1 if nonfinite is not None else 0.3))
    found = find_lr_test(files)
    if found is not None and float(found[1]["suggestion"]["lr"]) < lower:
        remedies = [make_remedy(files, "a lower LR: the range test's suggestion",
                            {"optim.lr": round_to(float(found[1]["suggestion"]["lr"]))})]
    else:
        remedies = [make_remedy(files, "a lower LR" + ("" if found else " (--mode=lr_find measures a good one)"),
                            {"optim.lr": lower})]
    warmup = longer_warmup(files)
    if warmup:
        remedies.append(make_remedy(files, "a longer warmup", warmup))
    if not o.clip_norm or o.clip_norm > 0.25:
        remedies.append(make_remedy(files, "clip the gradient norm" + (" harder" if o.clip_norm else ""),
                                {"optim.clip_norm": 1.0 if not o.clip_norm else round_to(o.clip_norm / 2)}))

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
    return Finding("instability", title, evidence, remedies, save_plot(files, "instability", title, draw, ncols=2))


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
    remedies = [make_remedy(files, "the range test's suggestion", {"optim.lr": round_to(suggested)})]

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
    return Finding("lr_vs_range_test", title, evidence, remedies, save_plot(files, "lr_vs_range_test", title, draw))


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
    remedies = [scale_lr(files, 0.5, "a lower LR (smaller steps away from the loaded weights)")]
    if o.decay_toward != "pretrained":
        remedies.append(make_remedy(files, "decay toward the loaded weights (L2-SP)",
                                    {"optim.decay_toward": "pretrained"}))
    layers = sorted({int(k.rsplit("_", 1)[1]) for k in names if k.startswith(("drift/layer_", "cka/layer_"))})
    if not o.freeze_layers and len(layers) >= 2:
        half = len(layers) // 2
        remedies.append(make_remedy(files, "freeze the lower half of the layers",
                                {"optim.freeze_layers": f"embeddings,0-{half - 1}" if half > 1 else "embeddings,0"}))

    def draw(ax):
        ax.plot(steps, values, "o-", ms=3, label=metric)
        ax.axhline(base, color="gray", lw=1, label=f"step 0 {base:.4g}")
        ax.axhline(limit, color="red", ls="--", label=f"budget limit {limit:.4g}")
        ax.set_xlabel("step")

    title = (f"forgetting beyond a {100 * budget:g}% budget: {metric} {values[worst]:.4g} at step {int(steps[worst])} "
             f"against {base:.4g} at step 0")
    return Finding("forgetting", title, evidence, remedies, save_plot(files, "forgetting", title, draw))
