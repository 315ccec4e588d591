"""Metric math: what an evaluation reports, from the sums the eval step returns (no I/O here)."""

from __future__ import annotations

import math

import numpy as np

# exp(loss) overflows float64 past ~709; a diverged LM reports a huge but finite perplexity.
MAX_LOG_PERPLEXITY = 50.0


def confusion_metrics(confusion: np.ndarray) -> dict[str, float]:
    """{"accuracy", "macro_f1"} of a weighted confusion matrix [label, prediction] (NaN if it is empty).

    macro_f1 averages over classes present in labels or predictions, like sklearn's average="macro"
    (a class with no true positive scores 0).
    """
    cm = np.asarray(confusion, np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion_metrics needs a square [label, prediction] matrix, got shape {cm.shape}")
    count = cm.sum()
    if count == 0:
        return {"accuracy": math.nan, "macro_f1": math.nan}
    tp = np.diag(cm)
    true_w, pred_w = cm.sum(1), cm.sum(0)
    present = (true_w > 0) | (pred_w > 0)
    # F1 = 2tp / (2tp + fp + fn) = 2tp / (true + pred); equal to 2PR/(P+R), and 0 when tp = 0.
    f1 = 2 * tp[present] / (true_w[present] + pred_w[present])
    return {"accuracy": float(tp.sum() / count), "macro_f1": float(f1.mean())}


def perplexity(loss: float) -> float:
    """exp(mean token loss), capped at exp(MAX_LOG_PERPLEXITY) so a diverged run still reports a number."""
    return float(math.exp(min(float(loss), MAX_LOG_PERPLEXITY)))
