"""Metric math: what an evaluation reports, from the sums the eval step returns, and the on-device counts
behind some of those sums (entity spans of tag sequences); no I/O here."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
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


# ---- entity-level precision / recall / F1 of tag sequences (token classification), as seqeval scores them

ENTITY_TAGS = "OBIES"  # tag codes 0..4: outside, begin, inside, end, single
_O, _B, _I, _E, _S = range(5)
_ENTITY_TAG = re.compile(r"([BIES])(?:-(.*))?", re.DOTALL)


def entity_tag_table(names: list[str]) -> tuple[tuple[int, int], ...] | None:
    """Per label id: (tag code in ENTITY_TAGS, entity type id), when every name is "O" or B/I/E/S with an optional
    "-TYPE" (IOB1, IOB2, IOE, IOBES: seqeval parses them alike); None when some name is not (e.g. POS tags), so no
    entity metrics are made."""
    types: dict[str, int] = {}
    table = []
    for name in names:
        if name == "O":
            table.append((_O, -1))
            continue
        m = _ENTITY_TAG.fullmatch(str(name))
        if m is None:
            return None
        table.append((ENTITY_TAGS.index(m.group(1)), types.setdefault(m.group(2) or "_", len(types))))
    return tuple(table)


def _chunk_ends(p, t, pt, tt):
    """seqeval's end_of_chunk(prev_tag=p, tag=t, prev_type=pt, type_=tt) over tag codes."""
    return ((p == _E) | (p == _S) | (((p == _B) | (p == _I)) & ((t == _B) | (t == _S) | (t == _O)))
            | ((p != _O) & (pt != tt)))


def _chunk_starts(p, t, pt, tt):
    """seqeval's start_of_chunk(prev_tag=p, tag=t, prev_type=pt, type_=tt) over tag codes."""
    return ((t == _B) | (t == _S) | (((p == _E) | (p == _S) | (p == _O)) & ((t == _E) | (t == _I)))
            | ((t != _O) & (pt != tt)))


def entity_counts(pred: jax.Array, gold: jax.Array, labelled: jax.Array, weights: jax.Array,
                  table: tuple[tuple[int, int], ...]) -> dict[str, jax.Array]:
    """{"entities_pred", "entities_gold", "entities_correct"}: weighted counts of the entity spans in predicted
    and gold label ids [B, L], and of the predicted spans equal to a gold one (type, first and last word).

    Each row is one sentence whose words are its `labelled` positions (first sub-words; the others are skipped),
    ended by an "O", chunked as seqeval does by default (conlleval's lenient rules, ill-formed sequences
    included: an I- after O or after another type begins a span, so does an E- or S-). `table`:
    entity_tag_table of the label names. On device, exact: a span ends at word i when seqeval's end_of_chunk
    holds between word i and the next word, and begins at the last word <= i where start_of_chunk held (with
    "O" and B/I/E/S-TYPE tags a span's words all have its type, so (end, type, begin) names it)."""
    rows, length = gold.shape
    tags = jnp.asarray([t for t, _ in table] + [_O], jnp.int32)  # id len(table): the "O" around a sentence
    types = jnp.asarray([y for _, y in table] + [-1], jnp.int32)
    outside = len(table)
    pos = jnp.broadcast_to(jnp.arange(length), (rows, length))
    after = jax.lax.cummin(jnp.where(labelled, pos, length), axis=1, reverse=True)  # next word at or after i
    after = jnp.concatenate([after[:, 1:], jnp.full((rows, 1), length)], axis=1)  # ... strictly after i
    before = jax.lax.cummax(jnp.where(labelled, pos, -1), axis=1)
    before = jnp.concatenate([jnp.full((rows, 1), -1), before[:, :-1]], axis=1)  # last word before i, or -1
    before = jnp.where(before < 0, length, before)

    def spans(ids):
        ids = jnp.concatenate([jnp.where(labelled, ids, outside), jnp.full((rows, 1), outside)], axis=1)
        tag, typ = tags[ids], types[ids]  # [B, L + 1]; column L is the closing "O"
        t, y = tag[:, :length], typ[:, :length]
        nt, ny = jnp.take_along_axis(tag, after, 1), jnp.take_along_axis(typ, after, 1)
        pt, py = jnp.take_along_axis(tag, before, 1), jnp.take_along_axis(typ, before, 1)
        end = labelled & _chunk_ends(t, nt, y, ny)
        begin = jax.lax.cummax(jnp.where(labelled & _chunk_starts(pt, t, py, y), pos, -1), axis=1)
        return end, y, begin

    (p_end, p_type, p_begin), (g_end, g_type, g_begin) = spans(pred), spans(gold)
    correct = p_end & g_end & (p_type == g_type) & (p_begin == g_begin)
    w = weights.astype(jnp.float32)

    def count(x):
        return (x.sum(-1).astype(jnp.float32) * w).sum()

    return {"entities_pred": count(p_end), "entities_gold": count(g_end), "entities_correct": count(correct)}


def entity_metrics(pred: float, gold: float, correct: float) -> dict[str, float]:
    """Micro-averaged entity precision / recall / F1 from the span counts (seqeval's: 0 where undefined)."""
    precision = float(correct) / float(pred) if pred else 0.0
    recall = float(correct) / float(gold) if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_precision": precision, "entity_recall": recall, "entity_f1": f1}
