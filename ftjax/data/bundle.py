"""What the trainer gets from the data: `DataBundle` (batches, sizes, stats), assembled the same way for
every task from per-split example lengths and batch makers."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ftjax.data import batching
from ftjax.data.batching import TrainIterator
from ftjax.data.errors import DataError
from ftjax.data.splits import Layout

Maker = Callable[[np.ndarray], dict]  # global-batch plan rows -> this process's batch of numpy arrays


@dataclasses.dataclass
class DataBundle:
    """Everything the trainer needs from the data; see ftjax.tasks.build_data()."""

    label_names: list[str]  # id -> class name (the model's id2label); [] for tasks without labels.
    num_examples: dict[str, int]  # real examples per split ("train", "validation", "test").
    steps_per_epoch: int  # global batches per training epoch (the last one padded with weight-0 rows).
    batch_size: int  # global train batch (examples).
    eval_batch_size: int  # global eval batch (examples; rows of max_len tokens when packed).
    bucket_lengths: tuple[int, ...]  # padded sequence lengths batches use (() for images).
    stats: dict[str, Any]  # truncation counts, token length summary, real-token fraction, ...
    _plans: dict[str, np.ndarray]
    _train_plan: Callable[[int], np.ndarray]
    _makers: dict[str, Maker]
    _threads: int
    sample_prompts: list[str] = dataclasses.field(default_factory=list)  # causal_lm: prompts for samples.
    fingerprint: dict[str, dict] = dataclasses.field(default_factory=dict)  # per split: source, rows, sha256
    pack_shape: Any = None  # example_packing.PackShape when classification examples are packed, else None
    batch_layout: Any = None  # structure.BatchLayout: the keys, dtypes and shapes of its batches (set by build)
    seq2seq_pairs: tuple[tuple[int, int], ...] = ()  # seq2seq: (source, target) shapes of the batches (precompile)
    seq2seq_eval: Any = None  # seq2seq: seq2seq.EvalSources, the validation examples generated from at each eval
    # batch sizes -> {size: batching.MemberSource}: a population's members' own batches (None: one batch size only)
    _member_sources: Callable[[list[int]], dict[int, batching.MemberSource]] | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def train_iterator(self, epoch: int = 0, position: int = 0) -> TrainIterator:
        """Endless batches from (epoch, position); `.state()` gives the position to resume from."""
        return TrainIterator(
            self._train_plan, self._makers["train"], self.steps_per_epoch, epoch, position, self._threads
        )

    def member_sources(self, batch_sizes: list[int]) -> dict[int, batching.MemberSource]:
        """Each batch size's training source for a population whose members differ in train.batch_size."""
        if self._member_sources is None:
            raise DataError("train.batch_size: these batches are laid out for one batch size, so population "
                            "members cannot differ in it; sweep it (population=0)")
        return self._member_sources(sorted(set(batch_sizes)))

    def member_train_iterator(self, sources: dict[int, batching.MemberSource], batch_sizes: list[int],
                              epoch: int = 0, position: int = 0) -> batching.MemberBatches:
        """A population's batches when its members differ in train.batch_size: each member's solo batches,
        stacked (`batching.MemberBatches`); (epoch, position) in this bundle's steps per epoch."""
        return batching.MemberBatches(sources, batch_sizes, self.steps_per_epoch, epoch, position, self._threads)

    def has_split(self, split: str) -> bool:
        return split in self._plans

    def eval_steps(self, split: str) -> int:
        return len(self._plan(split))

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        """All of `split` once, in a fixed order; the last partial batch has weight-0 padding rows."""
        return batching.prefetched(self._plan(split), self._makers[split], self._threads)

    def eval_order(self, split: str) -> np.ndarray:
        """Example indices in the order eval_batches yields them (global batch rows, and segments of a
        packed row, in order; PAD = -1 dropped)."""
        plan = self._plan(split).reshape(-1)
        return plan[plan >= 0]

    def _plan(self, split: str) -> np.ndarray:
        if split not in self._plans:
            field = {"validation": "data.eval_split", "test": "data.test_split"}.get(split, "split")
            raise DataError(f"no {split!r} split was loaded (have {sorted(self._plans)}); set {field}")
        return self._plans[split]


def assemble(
    *,
    lengths: dict[str, np.ndarray],
    makers: dict[str, Maker],
    layout: Layout,
    seed: int,
    grouping: int,
    threads: int,
    label_names: list[str],
    bucket_lengths: tuple[int, ...],
    stats: dict[str, Any],
    sample_prompts: list[str] | None = None,
    seq2seq_pairs: tuple[tuple[int, int], ...] = (),
    seq2seq_eval: Any = None,
    fingerprint: dict[str, dict] | None = None,
    plans: tuple[Callable[[int], np.ndarray], dict[str, np.ndarray]] | None = None,
    pack_shape: Any = None,
    packed_member_sources: Callable[[list[int]], dict[int, batching.MemberSource]] | None = None,
) -> DataBundle:
    """The bundle over examples of `lengths[split]` tokens: a seeded train order per epoch (length-grouped
    in windows of `grouping` batches; 0 = off) and a fixed eval order by length; or `plans` (the train
    plan per epoch, the eval plans) when the caller lays batches out itself (packed rows)."""
    train_lengths = lengths["train"]

    def train_plan(epoch: int) -> np.ndarray:
        return batching.train_plan(train_lengths, layout.batch, seed, epoch, grouping)

    def member_sources(sizes: list[int]) -> dict[int, batching.MemberSource]:
        # The train maker builds layout.batch rows: the largest member's (the population's template batch).
        def plan(epoch: int, size: int) -> np.ndarray:
            return batching.pad_plan_rows(batching.train_plan(train_lengths, size, seed, epoch, grouping),
                                          max(sizes))

        return {size: (functools.partial(plan, size=size), makers["train"], math.ceil(len(train_lengths) / size))
                for size in sizes}

    eval_plans = {r: batching.eval_plan(x, layout.eval_batch) for r, x in lengths.items() if r != "train"}
    if plans is not None:
        train_plan, eval_plans = plans

    return DataBundle(
        label_names=label_names,
        num_examples={r: len(x) for r, x in lengths.items()},
        steps_per_epoch=math.ceil(len(train_lengths) / layout.batch),
        batch_size=layout.batch,
        eval_batch_size=layout.eval_batch,
        bucket_lengths=bucket_lengths,
        stats=stats,
        _plans=eval_plans,
        _train_plan=train_plan,
        _makers=makers,
        _threads=threads,
        sample_prompts=list(sample_prompts or []),
        seq2seq_pairs=seq2seq_pairs,
        seq2seq_eval=seq2seq_eval,
        pack_shape=pack_shape,
        fingerprint=dict(fingerprint or {}),
        _member_sources=member_sources if plans is None else packed_member_sources,
    )
