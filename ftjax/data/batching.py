"""Batch order, length buckets and batch assembly: few shapes, seeded order, exact resume, per-host shards.

Why a numpy-index sampler rather than grain's samplers: an epoch's order is one small int array
[steps, global_batch] computed from (seed, epoch) alone: permute, sort by length inside windows of
`length_grouping` batches, cut into batches, shuffle the batch order. Grain's MapDataset shuffle/batch
cannot sort inside windows nor pad the last batch with weight-0 rows, and resuming is just "recompute
the epoch's plan and skip `position` rows of it", so (epoch, position) is the whole iterator state.
Grain does what it is good at: it runs batch assembly (image decoding included) in prefetch threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

PAD = -1  # row index of a padding (weight-0) example in a plan.
IGNORE = -100  # a token label that takes no loss (HF's ignore index; every token-label batcher's)


def choose_buckets(lengths: np.ndarray, spec: int | tuple[int, ...], max_len: int) -> tuple[int, ...]:
    """Padded lengths: explicit `spec`, or `spec` multiples of 8 (last = max_len) that minimise padding.

    With length grouping most batches are near-uniform in length, so the padding of a batch is about
    (its bucket - its lengths); a small dynamic programme picks the lengths minimising that sum over train.
    """
    if not isinstance(spec, int):
        return tuple(int(x) for x in spec)
    candidates = sorted({min(max_len, 8 * k) for k in range(1, -(-max_len // 8) + 1)} | {max_len})
    counts = np.zeros(len(candidates), np.int64)  # examples whose smallest candidate >= length is c
    sums = np.zeros(len(candidates), np.int64)
    slot = np.searchsorted(candidates, np.minimum(lengths, max_len))
    np.add.at(counts, slot, 1)
    np.add.at(sums, slot, np.minimum(lengths, max_len))
    cum_n, cum_s = np.concatenate([[0], np.cumsum(counts)]), np.concatenate([[0], np.cumsum(sums)])

    def cost(i: int, j: int) -> int:  # padding of the examples in slots i+1..j padded to candidates[j].
        n, s = cum_n[j + 1] - cum_n[i + 1], cum_s[j + 1] - cum_s[i + 1]
        return int(n * candidates[j] - s)

    c, k = len(candidates), min(spec, len(candidates))
    best = {(j, 1): (cost(-1, j), (j,)) for j in range(c)}
    for b in range(2, k + 1):
        for j in range(c):
            options = [
                (best[(i, b - 1)][0] + cost(i, j), best[(i, b - 1)][1] + (j,))
                for i in range(j)
                if (i, b - 1) in best
            ]
            if options:
                best[(j, b)] = min(options)
    _, chosen = min(best[(c - 1, b)] for b in range(1, k + 1) if (c - 1, b) in best)
    return tuple(candidates[j] for j in chosen)


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The seeded validation split of n training rows: sorted (held, kept) indices, or None when n is too
    small to hold out at least one row and keep at least one."""
    n_val = min(n - 1, max(1, round(fraction * n)))
    if n_val < 1:
        return None
    perm = np.random.default_rng([seed, 0x7A11D]).permutation(n)
    return np.sort(perm[:n_val]), np.sort(perm[n_val:])


def train_plan(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, grouping: int) -> np.ndarray:
    """Rows of each global batch of `epoch`, int64 [steps, batch_size]; PAD fills the last partial batch."""
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    steps = -(-n // batch_size)
    if grouping > 0:
        window = grouping * batch_size
        for start in range(0, n, window):
            chunk = perm[start : start + window]
            perm[start : start + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
    plan = np.full(steps * batch_size, PAD, np.int64)
    plan[:n] = perm
    plan = plan.reshape(steps, batch_size)
    if grouping > 0:
        plan = plan[rng.permutation(steps)]
    return plan


def eval_plan(lengths: np.ndarray, batch_size: int) -> np.ndarray:
    """Eval order: by length (least padding), fixed; the last partial batch is PAD-filled, never dropped."""
    order = np.argsort(lengths, kind="stable")
    steps = -(-len(order) // batch_size)
    plan = np.full(steps * batch_size, PAD, np.int64)
    plan[: len(order)] = order
    return plan.reshape(steps, batch_size)


def padded_tokens(plan: np.ndarray, lengths: np.ndarray, buckets: tuple[int, ...]) -> tuple[int, int]:
    """(real tokens, padded tokens) of a plan: how much of the compute is real."""
    real = np.where(plan >= 0, lengths[np.maximum(plan, 0)], 0)
    longest = real.max(axis=1)
    padded = np.asarray(buckets)[np.searchsorted(buckets, longest)] * plan.shape[1]
    return int(real.sum()), int(padded.sum())


class TextBatcher:
    """Builds this process's share of a global batch of token rows, padded to the batch's bucket."""

    def __init__(self, tokens: Any, labels: np.ndarray, buckets: tuple[int, ...], pad_id: int, share: slice):
        self.tokens, self.labels, self.buckets, self.pad_id, self.share = (
            tokens,
            labels,
            buckets,
            pad_id,
            share,
        )
        self.lengths = tokens.lengths

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        real = rows[rows >= 0]
        longest = int(self.lengths[real].max()) if len(real) else 1
        length = self.buckets[int(np.searchsorted(self.buckets, longest))]  # same on every process.
        mine = rows[self.share]
        b = len(mine)
        ids = np.full((b, length), self.pad_id, np.int32)
        types = np.zeros((b, length), np.int32)
        mask = np.zeros((b, length), np.int32)
        labels = np.zeros(b, np.int32)
        weights = np.zeros(b, np.float32)
        flat, types_flat, offsets = self.tokens.ids, self.tokens.type_ids, self.tokens.offsets
        for j, r in enumerate(mine):
            if r < 0:
                mask[j, 0] = 1  # padding rows attend to one token: no all-masked softmax (NaN) anywhere.
                continue
            s, e = offsets[r], offsets[r + 1]
            ids[j, : e - s] = flat[s:e]
            types[j, : e - s] = types_flat[s:e]
            mask[j, : e - s] = 1
            labels[j] = self.labels[r]
            weights[j] = 1.0
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": types,
            "labels": labels,
            "weights": weights,
        }


class ImageBatcher:
    """Builds this process's share of a global batch of images: pixel_values float32 [B, 3, H, W]."""

    def __init__(
        self,
        images: list[Any],
        labels: np.ndarray,
        to_pixels: Callable[[Any], np.ndarray],
        size: int,
        share: slice,
    ):
        self.images, self.labels, self.to_pixels, self.size, self.share = (
            images,
            labels,
            to_pixels,
            size,
            share,
        )

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        mine = rows[self.share]
        pixels = np.zeros((len(mine), 3, self.size, self.size), np.float32)
        labels = np.zeros(len(mine), np.int32)
        weights = np.zeros(len(mine), np.float32)
        for j, r in enumerate(mine):
            if r >= 0:
                pixels[j] = self.to_pixels(self.images[r])
                labels[j], weights[j] = self.labels[r], 1.0
        return {"pixel_values": pixels, "labels": labels, "weights": weights}


def prefetched(plan: np.ndarray, make: Callable[[np.ndarray], dict], threads: int) -> Iterator[dict]:
    """Batches of `plan` in order, assembled ahead of use by grain's prefetch threads."""
    if len(plan) == 0:
        return iter(())
    ds = grain.MapDataset.source(list(plan)).map(make)
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    return iter(ds.to_iter_dataset(options))


class TrainIterator:
    """Endless training batches (epochs chain); `state()` = {"epoch", "position"} of the next batch."""

    def __init__(
        self,
        plan_for_epoch: Callable[[int], np.ndarray],
        make: Callable[[np.ndarray], dict],
        steps_per_epoch: int,
        epoch: int,
        position: int,
        threads: int,
    ):
        if epoch < 0 or position < 0:
            raise ValueError(f"train_iterator(epoch={epoch}, position={position}): both must be >= 0")
        epoch, position = epoch + position // steps_per_epoch, position % steps_per_epoch
        self._plan_for_epoch, self._make, self._steps = plan_for_epoch, make, steps_per_epoch
        self._epoch, self._position, self._threads = epoch, position, threads
        self._batches: Iterator[dict] | None = None

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batches is None:
            plan = self._plan_for_epoch(self._epoch)[self._position :]
            self._batches = prefetched(plan, self._make, self._threads)
        batch = next(self._batches)
        self._position += 1
        if self._position == self._steps:
            self._epoch, self._position, self._batches = self._epoch + 1, 0, None
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position}


def stack_members(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Member batches of one step stacked [members, ...], each array padded at the end of every axis to the
    largest member's: positions past a member's own padded length or segments, masked out (masks and weights
    0; token labels the ignore index, labels weighted per slot by `weights` 0). Rows come padded already
    (weight-0 rows of the plan, which attend to one token)."""
    out = {}
    for key in batches[0]:
        arrays = [np.asarray(b[key]) for b in batches]
        shape = np.max([a.shape for a in arrays], axis=0)
        per_slot = key == "labels" and np.shape(batches[0].get("weights")) == arrays[0].shape
        fill = IGNORE if key == "labels" and not per_slot else 0
        out[key] = np.stack([np.pad(a, [(0, int(n) - d) for n, d in zip(shape, a.shape)], constant_values=fill)
                             for a in arrays])
    return out


def pad_plan_rows(plan: np.ndarray, rows: int) -> np.ndarray:
    """A plan [steps, r, ...] with PAD rows appended up to `rows` per batch."""
    return np.pad(plan, ((0, 0), (0, rows - plan.shape[1])) + ((0, 0),) * (plan.ndim - 2), constant_values=PAD)


# A population member's training source at its batch size: (epoch -> its plan, rows padded to the population's
# largest batch; the batch maker; steps per epoch).
MemberSource = tuple[Callable[[int], np.ndarray], Callable[[np.ndarray], dict], int]


class MemberBatches:
    """Training batches of a population whose members differ in batch size (ftjax/tune/population.py): member
    k's batch at step s is the one its solo run takes there (batch s of its own epochs' plans at its batch
    size, so its steps per epoch follow), with weight-0 rows up to the largest batch, stacked by
    `stack_members`. `state()` counts in the shared run's `steps_per_epoch`, as a TrainIterator's."""

    def __init__(self, sources: dict[int, MemberSource], batch_sizes: list[int], steps_per_epoch: int,
                 epoch: int, position: int, threads: int):
        self._step, self._steps, self._sizes = epoch * steps_per_epoch + position, steps_per_epoch, batch_sizes
        self._iterators = {size: TrainIterator(plan, make, per_epoch, *divmod(self._step, per_epoch), threads)
                           for size, (plan, make, per_epoch) in sources.items()}

    def __iter__(self) -> MemberBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        by_size = {size: next(it) for size, it in self._iterators.items()}
        self._step += 1
        return stack_members([by_size[size] for size in self._sizes])

    def state(self) -> dict[str, int]:
        epoch, position = divmod(self._step, self._steps)
        return {"epoch": epoch, "position": position}
