"""Packed classification batches: several examples per row of max_len tokens, so a run has one train and one
eval shape instead of one per length bucket.

A packed plan is an int array [steps, rows, segments] of example indices (PAD = -1): row r of a batch holds
its examples in segment order 1, 2, ... A training batch holds `batch_size` examples (the optimizer's
batch keeps its meaning), drawn at random inside length strata so all batches pack alike; `rows` and
`segments` come from the training lengths: a high quantile of the rows best-fit-decreasing needs for them.
An example that does not fit its batch is carried to the next batch of the epoch (whose shortest examples
take its place), and a last batch that still overflows swaps its longest examples for shorter ones of
earlier batches, so every example is seen exactly once per epoch and an epoch's plan is a function of
(seed, epoch) alone: resume stays (epoch, position).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ftjax import hf
from ftjax.data.errors import DataError

PAD = -1
# encoders that read segment_ids
PACKED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "modernbert", "deberta-v2")
QUANTILE, EPOCHS = 0.99, 2  # rows: the 99th percentile of the rows the batches of 2 simulated epochs need


@dataclasses.dataclass(frozen=True)
class PackShape:
    """The one shape of packed batches: global rows of a train / eval batch, tokens and examples per row."""

    rows: int
    eval_rows: int
    length: int
    segments: int


def packs(cfg: Any) -> bool:
    """data.packing applies: a classification run of an encoder family that reads segment_ids."""
    if not cfg.data.packing or cfg.model.task != "classification":
        return False
    try:
        model_type = hf.read_config_json(hf.resolve(cfg.model.name_or_path))["model_type"]
    except hf.ModelLoadError:  # no model folder (data-only use): one example per row
        return False
    return model_type in PACKED_MODEL_TYPES


def row_granule(cfg: Any, process_count: int, data_parallel: int | None) -> int:
    """What a train batch's row count must be a multiple of: data-parallel devices (`data_parallel`, or
    cfg.mesh over all devices) x micro-batches x processes; train.batch_size itself if that does not divide it."""
    if data_parallel is None:
        m = cfg.mesh
        fixed = math.prod(v for v in (m.data, m.fsdp, m.tensor) if v != -1)
        rest = max(1, jax.device_count() // max(1, fixed))
        data_parallel = math.prod(rest if v == -1 else v for v in (m.data, m.fsdp))
    granule = math.lcm(int(data_parallel), int(cfg.train.grad_accum), int(process_count))
    batch = int(cfg.train.batch_size)
    return granule if batch % granule == 0 else batch


def best_fit(
    items: Sequence[int], lengths: np.ndarray, length: int, segments: int, rows: int | None
) -> tuple[list[list[int]], list[int]]:
    """Best-fit decreasing of examples `items` (longest first, ties in the given order) into at most `rows`
    rows (None: as many as needed) of `length` tokens and `segments` examples: (rows, examples left over)."""
    order = sorted(items, key=lambda i: -int(lengths[i]))
    placed: list[list[int]] = []
    free: list[int] = []
    by_free: list[list[int]] = [[] for _ in range(length + 1)]  # free room -> open rows (LIFO)
    left: list[int] = []
    for i in order:
        need = min(int(lengths[i]), length)
        room = next((f for f in range(need, length + 1) if by_free[f]), None)
        if room is None:
            if rows is not None and len(placed) >= rows:
                left.append(i)
                continue
            placed.append([])
            free.append(length)
            r = len(placed) - 1
        else:
            r = by_free[room].pop()
        placed[r].append(i)
        free[r] -= need
        if len(placed[r]) < segments:
            by_free[free[r]].append(r)
    return placed, left


def balanced_batches(lengths: np.ndarray, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The examples of each step of `epoch`: `batch` each (the last step the rest), drawn at random inside
    length strata so every batch holds about the same mix of long and short examples (and so packs into
    the same number of rows): the examples sorted by length (random ties) are cut into `batch` strata and
    each stratum is dealt to the steps in a seeded random order."""
    n = len(lengths)
    steps = -(-n // batch)
    rest = n - (steps - 1) * batch  # examples of the last step
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    order = perm[np.argsort(-lengths[perm], kind="stable")]
    in_last = np.zeros(batch, bool)  # the strata that also give the (short) last step an example
    in_last[np.round(np.linspace(0, batch - 1, rest)).astype(int)] = True
    out: list[list[int]] = [[] for _ in range(steps)]
    pos = 0
    for stratum in range(batch):
        size = steps if in_last[stratum] else steps - 1
        for example, step in zip(order[pos : pos + size], rng.permutation(size)):
            out[step].append(int(example))
        pos += size
    return out


def choose_shape(
    lengths: np.ndarray, batch: int, eval_batch: int, length: int, granule: int, seed: int = 0
) -> PackShape:
    """Rows and segments per row from the training lengths (a fixed seed: a function of the data alone):
    the QUANTILE of the rows best-fit needs for the balanced batches of EPOCHS simulated epochs, rounded up to
    a multiple of `granule` (data-parallel devices x micro-batches x processes, a divisor of `batch`), then
    raised until those epochs' plans need no swap at the end; segments: the most a simulated row
    held. Eval batches have `eval_batch` rows (the memory of an unpacked eval batch at max_len)."""
    need, most = [], 1
    for epoch in range(EPOCHS):
        groups = balanced_batches(lengths, batch, seed, epoch)
        for members in groups[:-1] or groups:
            placed, _ = best_fit(members, lengths, length, length, None)
            need.append(len(placed))
            most = max(most, max(len(r) for r in placed))
    rows = min(batch, granule * math.ceil(math.ceil(np.quantile(need, QUANTILE)) / granule))
    while True:
        shape = PackShape(rows=rows, eval_rows=eval_batch, length=length, segments=most)
        if rows >= batch or all(_swaps(lengths, batch, shape, seed, e) == 0 for e in range(EPOCHS)):
            return shape
        rows = min(batch, rows + granule)


def _swaps(lengths: np.ndarray, batch: int, shape: PackShape, seed: int, epoch: int) -> int:
    """Examples `epoch`'s plan swaps at the end to hold them all (-1: no swap helps)."""
    try:
        return _plan(lengths, batch, shape, seed, epoch)[2]
    except DataError:
        return -1


def _fill(out: np.ndarray, placed: list[list[int]]) -> None:
    for r, row in enumerate(placed):
        out[r, : len(row)] = row


def train_plan(lengths: np.ndarray, batch: int, shape: PackShape, seed: int, epoch: int) -> np.ndarray:
    """The packed plan of `epoch` [steps, rows, segments] of the balanced batches (see the module docstring)."""
    return _plan(lengths, batch, shape, seed, epoch)[0]


def _plan(
    lengths: np.ndarray, batch: int, shape: PackShape, seed: int, epoch: int
) -> tuple[np.ndarray, int, int]:
    """(plan, examples carried to a next batch, examples swapped at the end): each batch is best-fit into
    the rows; what does not fit goes on to the next batch, whose shortest examples that fit fill the gap.
    A last batch that still overflows raises DataError when no swap helps."""
    groups = balanced_batches(lengths, batch, seed, epoch)
    steps = len(groups)
    out = np.full((steps, shape.rows, shape.segments), PAD, np.int64)
    fit = lambda items: best_fit(items, lengths, shape.length, shape.segments, shape.rows)
    members: list[list[int]] = []
    moved = 0
    for t in range(steps - 1):
        placed, left = fit(groups[t])
        moved += len(left)
        for y in sorted(groups[t + 1], key=lambda i: int(lengths[i])) if left else ():
            trial, miss = fit([i for row in placed for i in row] + [y])
            if miss:
                break
            placed = trial
            groups[t + 1].remove(y)
            if sum(map(len, placed)) == batch:
                break
        groups[t + 1] = left + groups[t + 1]
        members.append([i for row in placed for i in row])
        _fill(out[t], placed)
    placed, left = fit(groups[-1])
    if left:
        placed = _repair(out, members, groups[-1], fit, lengths, epoch)
    _fill(out[steps - 1], placed)
    return out, moved, len(left)


def _repair(
    out: np.ndarray,
    members: list[list[int]],
    last: list[int],
    fit: Callable[[list[int]], tuple[list[list[int]], list[int]]],
    lengths: np.ndarray,
    epoch: int,
) -> list[list[int]]:
    """Swaps the last batch's examples that do not fit for shorter ones of earlier batches (latest first)
    that leave those batches packable; returns the last batch's rows, or raises DataError."""
    last = list(last)
    placed, left = fit(last)
    for x in sorted(left, key=lambda i: -int(lengths[i])):
        for t in reversed(range(len(members))):
            swapped = False
            for y in sorted(members[t], key=lambda i: int(lengths[i])):
                if lengths[y] >= lengths[x]:
                    break
                trial, miss = fit([i for i in members[t] if i != y] + [x])
                if not miss:
                    members[t] = [i for row in trial for i in row]
                    out[t] = PAD
                    _fill(out[t], trial)
                    last[last.index(x)] = y
                    swapped = True
                    break
            if swapped:
                break
        placed, left = fit(last)
        if not left:
            return placed
    raise DataError(
        f"data.packing: {len(left)} examples of epoch {epoch} fit in no packed batch of this shape; "
        "set data.packing=False (length buckets) for this data"
    )


def eval_plan(lengths: np.ndarray, shape: PackShape) -> np.ndarray:
    """Eval order [steps, eval_rows, segments]: the whole split best-fit into rows (fixed), eval_rows per
    batch; the last batch's spare rows are empty."""
    if len(lengths) == 0:
        return np.full((0, shape.eval_rows, shape.segments), PAD, np.int64)
    placed, _ = best_fit(list(range(len(lengths))), lengths, shape.length, shape.segments, None)
    steps = -(-len(placed) // shape.eval_rows)
    out = np.full((steps * shape.eval_rows, shape.segments), PAD, np.int64)
    _fill(out, placed)
    return out.reshape(steps, shape.eval_rows, shape.segments)


def real_fraction(plan: np.ndarray, lengths: np.ndarray, length: int) -> float:
    """Real tokens / row tokens of a packed plan."""
    real = np.where(plan >= 0, lengths[np.maximum(plan, 0)], 0).sum()
    return float(real / (plan.shape[0] * plan.shape[1] * length))


class PackedTextBatcher:
    """This process's rows of a packed batch: input_ids, token_type_ids, attention_mask, segment_ids [r, L]
    (1.. per example, 0 = padding), segment_starts [r, S] (each example's first token), labels and weights
    [r, S] (weight 1 on real examples)."""

    def __init__(self, tokens: Any, labels: np.ndarray, shape: PackShape, pad_id: int, share: slice):
        self.tokens, self.labels, self.shape, self.pad_id, self.share = tokens, labels, shape, pad_id, share

    def __call__(self, plan: np.ndarray) -> dict[str, np.ndarray]:
        mine = np.asarray(plan)[self.share]
        r, s, length = len(mine), mine.shape[1], self.shape.length
        ids = np.full((r, length), self.pad_id, np.int32)
        types = np.zeros((r, length), np.int32)
        segment_ids = np.zeros((r, length), np.int32)
        starts = np.zeros((r, s), np.int32)
        labels = np.zeros((r, s), np.int32)
        flat, types_flat, offsets = self.tokens.ids, self.tokens.type_ids, self.tokens.offsets
        for j, row in enumerate(mine):
            start = 0
            for k, e in enumerate(row[row >= 0]):  # a plan row's examples come first, then PAD
                a, b = offsets[e], offsets[e + 1]
                end = start + b - a
                ids[j, start:end], types[j, start:end] = flat[a:b], types_flat[a:b]
                segment_ids[j, start:end] = k + 1
                starts[j, k], labels[j, k] = start, self.labels[e]
                start = end
        return {
            "input_ids": ids,
            "attention_mask": (segment_ids > 0).astype(np.int32),
            "token_type_ids": types,
            "segment_ids": segment_ids,
            "segment_starts": starts,
            "labels": labels,
            "weights": (mine >= 0).astype(np.float32),
        }
