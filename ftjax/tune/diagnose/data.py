"""Diagnosis rules on the labels and the splits: label imbalance, a model that learned only the label
frequencies, truncated inputs, an eval set too small to tell checkpoints apart."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ftjax.tune.diagnose.evidence import (
    Finding,
    RunFiles,
    best_index,
    longer_warmup,
    make_remedy,
    round_to,
    save_plot,
    scale_lr,
    twice_as_long,
)

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

THRESHOLDS = {  # diagnosis.json records them
    "MAJORITY_SHARE": MAJORITY_SHARE, "MINORITY_RATIO": MINORITY_RATIO, "PRIOR_LOSS_SHARE": PRIOR_LOSS_SHARE,
    "PRIOR_LOSS_FALL": PRIOR_LOSS_FALL, "ONE_CLASS_TOL": ONE_CLASS_TOL, "TRUNCATION_SHARE": TRUNCATION_SHARE,
    "EVAL_SE_MAX": EVAL_SE_MAX, "EVAL_Z": EVAL_Z, "EVAL_SE_TARGET": EVAL_SE_TARGET,
    "MAX_VALIDATION_FRACTION": MAX_VALIDATION_FRACTION,
}


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
    remedies = [make_remedy(files, "select checkpoints (and trials) by macro-F1, which weighs every class equally",
                        {"train.early_stop.metric": "macro_f1", "train.early_stop.mode": "max"})]

    def draw(ax):
        names = list(counts)
        ax.bar(range(len(names)), [counts[n] for n in names], color="steelblue")
        ax.set_xticks(range(len(names)), [str(n)[:12] for n in names], rotation=45 if len(names) > 6 else 0)
        ax.set_ylabel("train examples")

    title = (f"imbalanced labels: {majority!r} is {100 * share:.0f}% of train ({minority!r} {low} of {total}); "
             f"accuracy and loss favour it")
    return Finding("label_imbalance", title, evidence, remedies, save_plot(files, "label_imbalance", title, draw))


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
        remedies = [scale_lr(files, 4.0, "a higher LR: the loss falls, too slowly to leave the prior"),
                    make_remedy(files, "train longer", twice_as_long(files))]
        state = f"it fell {100 * fall:.1f}% to there: too slowly"
    else:  # stuck there, or collapsed to it
        warmup = longer_warmup(files)
        remedies = [scale_lr(files, 0.25, "a lower LR: the loss does not move (stuck or collapsed)"),
                    *([make_remedy(files, "a longer warmup", warmup)] if warmup else [])]
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
    return Finding("label_prior", title, evidence, remedies, save_plot(files, "label_prior", title, draw, ncols=2))


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
    remedies = [make_remedy(files, "longer inputs (up to the model's max_position_embeddings: ftjax refuses more)",
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
    return Finding("truncation", title, evidence, remedies, save_plot(files, "truncation", title, draw))


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
    best = best_index(acc, "max")
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
        fraction = min(MAX_VALIDATION_FRACTION, round_to(wanted / (train_n + n)))
        if fraction > d.validation_fraction:
            remedies.append(make_remedy(files, f"hold out more of train for validation (about {wanted} examples give a "
                                           f"standard error of {EVAL_SE_TARGET:g})",
                                    {"data.validation_fraction": fraction}))
    elif d.eval_split:
        evidence["note"] = (f"data.eval_split={d.eval_split!r} holds {n} examples: a larger eval split (about "
                            f"{wanted} for a standard error of {EVAL_SE_TARGET:g}) gives a steadier choice")
    if files.cfg.train.early_stop.metric == "accuracy":
        remedies.append(make_remedy(files, "count only improvements beyond the noise when choosing the best checkpoint",
                                {"train.early_stop.min_delta": round_to(EVAL_Z * se)}))
    if not remedies:
        remedies.append(make_remedy(files, "hold out a validation set from train of the size it needs",
                                {"data.eval_split": "", "data.validation_fraction":
                                 min(MAX_VALIDATION_FRACTION, max(0.1, round_to(wanted / max(train_n, 1))))}))

    def draw(ax):
        ax.errorbar(steps, acc, yerr=[accuracy_se(float(a), n) if np.isfinite(a) else 0 for a in acc], fmt="o-",
                    ms=3, capsize=3, label="val accuracy +- 1 standard error")
        ax.set_xlabel("step")

    title = (f"the eval set is too small to tell checkpoints apart: {n} examples, accuracy standard error "
             f"{se:.3f}, the best eval ahead of the runner-up by {margin:.3f}")
    return Finding("small_eval_set", title, evidence, remedies, save_plot(files, "small_eval_set", title, draw))
