"""Data for fine-tuning: `build(cfg, tokenizer)` reads the splits, tokenises them once, and hands out batches.

Batches are dicts of numpy arrays for this process's rows of a fixed-size global batch, padded to a few
length buckets, in an order fixed by (seed, epoch) that resumes exactly from {"epoch", "position"}.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from ftjax.config import ConfigError
from ftjax.data import batching, image, sources, text
from ftjax.data.batching import TrainIterator
from ftjax.data.errors import DataError, DataFileNotFoundError

__all__ = ["DataBundle", "DataError", "DataFileNotFoundError", "TrainIterator", "build"]

LABELLED_TASKS = ("classification", "image_classification")
EVAL_SPLITS = ("validation", "test")


@dataclasses.dataclass
class DataBundle:
    """Everything the trainer needs from the data; see build()."""

    label_names: list[str]  # id -> class name (the model's id2label); [] for tasks without labels.
    num_examples: dict[str, int]  # real examples per split ("train", "validation", "test").
    steps_per_epoch: int  # global batches per training epoch (the last one padded with weight-0 rows).
    batch_size: int  # global train batch.
    eval_batch_size: int  # global eval batch.
    bucket_lengths: tuple[int, ...]  # padded sequence lengths batches use (() for images).
    stats: dict[str, Any]  # truncation counts, token length summary, real-token fraction, ...
    _plans: dict[str, np.ndarray]
    _train_plan: Callable[[int], np.ndarray]
    _makers: dict[str, Callable[[np.ndarray], dict]]
    _threads: int
    sample_prompts: list[str] = dataclasses.field(default_factory=list)  # causal_lm: prompts for samples.

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def train_iterator(self, epoch: int = 0, position: int = 0) -> TrainIterator:
        """Endless batches from (epoch, position); `.state()` gives the position to resume from."""
        return TrainIterator(
            self._train_plan, self._makers["train"], self.steps_per_epoch, epoch, position, self._threads
        )

    def has_split(self, split: str) -> bool:
        return split in self._plans

    def eval_steps(self, split: str) -> int:
        return len(self._plan(split))

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        """All of `split` once, in a fixed order; the last partial batch has weight-0 padding rows."""
        return batching.prefetched(self._plan(split), self._makers[split], self._threads)

    def eval_order(self, split: str) -> np.ndarray:
        """Example indices in the order eval_batches yields them (global batch rows, PAD = -1 dropped)."""
        plan = self._plan(split).reshape(-1)
        return plan[plan >= 0]

    def _plan(self, split: str) -> np.ndarray:
        if split not in self._plans:
            field = {"validation": "data.eval_split", "test": "data.test_split"}.get(split, "split")
            raise DataError(f"no {split!r} split was loaded (have {sorted(self._plans)}); set {field}")
        return self._plans[split]


def build(
    cfg: ml_collections.ConfigDict, tokenizer: Any, *, process_index: int = 0, process_count: int = 1
) -> DataBundle:
    """Reads cfg.data's splits, tokenises (or indexes images) once, and returns the DataBundle."""
    d, t, task = cfg.data, cfg.train, cfg.model.task
    if task == "causal_lm":  # packed documents with segment ids: ftjax/data/lm.py
        from ftjax.data import lm

        return lm.build(cfg, tokenizer, process_index=process_index, process_count=process_count)
    batch, eval_batch = t.batch_size, t.eval_batch_size or 2 * t.batch_size
    if batch % process_count:
        raise ConfigError("train.batch_size", batch, f"must be divisible by the {process_count} processes")
    if eval_batch % process_count:
        raise ConfigError(
            "train.eval_batch_size", eval_batch, f"must divide by the {process_count} processes"
        )
    if task == "token_classification":
        raise DataError(
            "model.task='token_classification' needs per-token labels, which ftjax.data does not "
            "read yet; use classification, masked_lm, causal_lm or image_classification"
        )
    is_image = task == "image_classification"
    if not is_image and tokenizer is None:
        raise DataError(f"model.task={task!r} is a text task: build() needs the model's tokenizer")

    roles = ("train",) + (("validation",) if d.eval_split else ()) + (("test",) if d.test_split else ())
    raw = sources.load_splits(d, roles)
    for role, split in raw.items():
        if len(split) == 0:
            field = sources.SPLIT_FIELDS[role]
            raise DataError(f"data.{field}={d[field]!r}: {split.origin} has no examples; point it at data")

    # Labels: names from the full train split (so max_examples never shrinks the label set).
    labelled = task in LABELLED_TASKS
    names: list[str] = []
    source_names = raw["train"].label_names is not None
    if labelled:
        train_labels = text.column(raw["train"], "label_field", d.label_field)
        if source_names:
            names = list(raw["train"].label_names)
        else:
            names = text.label_names(train_labels, raw["train"].origin, d.label_field)
        if cfg.model.num_labels is not None and cfg.model.num_labels < len(names):
            raise ConfigError(
                "model.num_labels",
                cfg.model.num_labels,
                f"the data has {len(names)} labels ({names[:10]}); use None or >= {len(names)}",
            )

    if "validation" not in raw:
        train = raw["train"]
        split = batching.holdout_indices(len(train), d.validation_fraction, t.seed)
        if split is None:
            raise DataError(
                f"data.train_split: {train.origin} has {len(train)} example(s), too few to hold "
                "out a validation split; set data.eval_split"
            )
        held, kept = split
        raw["validation"] = train.take(held, f"{train.origin} (held-out {d.validation_fraction:g})")
        raw["train"] = train.take(kept)
    if d.max_examples:
        raw["train"] = raw["train"].take(np.arange(min(d.max_examples, len(raw["train"]))))

    labels = {}
    for role, split in raw.items():
        if labelled:
            values = text.column(split, "label_field", d.label_field)
            labels[role] = text.encode_labels(values, names, split.origin, d.label_field, source_names)
        else:
            labels[role] = np.zeros(len(split), np.int32)

    share = slice(process_index * batch // process_count, (process_index + 1) * batch // process_count)
    eval_share = slice(
        process_index * eval_batch // process_count, (process_index + 1) * eval_batch // process_count
    )
    stats: dict[str, Any] = {"examples": {r: len(s) for r, s in raw.items()}}
    makers: dict[str, Callable[[np.ndarray], dict]] = {}
    if is_image:
        mean, std = tuple(d.image_mean), tuple(d.image_std)

        def to_pixels(value: Any) -> np.ndarray:
            return image.pixel_values(value, d.image_size, mean, std, d.image_field)

        lengths = {r: np.ones(len(s), np.int32) for r, s in raw.items()}
        for role, split in raw.items():
            images = text.column(split, "image_field", d.image_field)
            makers[role] = batching.ImageBatcher(
                images, labels[role], to_pixels, d.image_size, share if role == "train" else eval_share
            )
        buckets: tuple[int, ...] = ()
        threads = min(8, os.cpu_count() or 1)
    else:
        tokens = {}
        for role, split in raw.items():
            texts = text.column(split, "text_field", d.text_field)
            pairs = text.column(split, "text_pair_field", d.text_pair_field) if d.text_pair_field else None
            tokens[role] = text.tokenize(tokenizer, texts, pairs, d.max_len)
        lengths = {r: tok.lengths for r, tok in tokens.items()}
        buckets = batching.choose_buckets(lengths["train"], d.buckets, d.max_len)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        for role in raw:
            makers[role] = batching.TextBatcher(
                tokens[role], labels[role], buckets, pad_id, share if role == "train" else eval_share
            )
        train_lengths = lengths["train"]
        stats.update(
            truncated={r: tok.truncated for r, tok in tokens.items()},
            truncated_tokens={r: tok.truncated_tokens for r, tok in tokens.items()},
            empty_texts={r: tok.empty_texts for r, tok in tokens.items()},
            train_tokens={
                "mean": float(train_lengths.mean()),
                "p50": int(np.percentile(train_lengths, 50)),
                "p95": int(np.percentile(train_lengths, 95)),
                "max": int(train_lengths.max()),
            },
            bucket_lengths=list(buckets),
        )
        threads = 2

    def train_plan(epoch: int) -> np.ndarray:
        return batching.train_plan(lengths["train"], batch, t.seed, epoch, d.length_grouping)

    plans = {r: batching.eval_plan(lengths[r], eval_batch) for r in raw if r != "train"}
    if not is_image:
        real, padded = batching.padded_tokens(train_plan(0), lengths["train"], buckets)
        real_r, padded_r = batching.padded_tokens(
            batching.train_plan(lengths["train"], batch, t.seed, 0, 0), lengths["train"], buckets
        )
        stats["real_token_fraction"] = real / padded
        stats["real_token_fraction_ungrouped"] = real_r / padded_r
        for role, tok in tokens.items():
            if tok.truncated:
                logging.warning(
                    "data: %d of %d %s examples (%.1f%%) are longer than data.max_len=%d and were truncated "
                    "(%d tokens cut)",
                    tok.truncated,
                    len(raw[role]),
                    role,
                    100.0 * tok.truncated / len(raw[role]),
                    d.max_len,
                    tok.truncated_tokens,
                )
            if tok.empty_texts:
                logging.warning(
                    "data: %d %s examples have an empty text cell (read as '')", tok.empty_texts, role
                )
    steps = math.ceil(len(raw["train"]) / batch)
    logging.info(
        "data: %s; %d steps/epoch of %d; labels %s; %s",
        stats["examples"],
        steps,
        batch,
        names[:20],
        {k: v for k, v in stats.items() if k != "examples"},
    )
    return DataBundle(
        label_names=names,
        num_examples={r: len(s) for r, s in raw.items()},
        steps_per_epoch=steps,
        batch_size=batch,
        eval_batch_size=eval_batch,
        bucket_lengths=buckets,
        stats=stats,
        _plans=plans,
        _train_plan=train_plan,
        _makers=makers,
        _threads=threads,
    )
