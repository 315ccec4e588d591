"""The batch structure of each task (keys, dtypes, shapes), in one place: the batchers of ftjax.data make
exactly these arrays, and a plan (`ftjax.run.Run(purpose="plan")`, `--mode=dry_run`) compiles the step for
them from the config alone, without reading data."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ftjax.config import ConfigError
from ftjax.data import example_packing

I32, F32 = np.dtype(np.int32), np.dtype(np.float32)
Structure = dict[str, tuple[tuple[int, ...], np.dtype]]  # key -> (global shape, dtype)
SUPPORTED = ("classification", "masked_lm", "causal_lm", "seq2seq", "image_classification", "preference")


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """What one run's batches look like: the task, the padded lengths ((source, target) pairs for seq2seq,
    (length, None) otherwise; ascending), global rows of a train / eval batch, and for packed classification
    rows the examples per row (`segments`); image tasks: the image size. `planned`: derived from the config
    alone (the longest shape is exact, the bucket lengths below it are not known without data)."""

    task: str
    lengths: tuple[tuple[int, int | None], ...]
    train_rows: int
    eval_rows: int
    segments: int | None = None
    image_size: int | None = None
    planned: bool = False

    def structure(self, rows: int, length: tuple[int, int | None]) -> Structure:
        """The arrays of a global batch of `rows` rows at one padded length (see the batchers: TextBatcher,
        PackedTextBatcher, PackedBatcher, Seq2SeqBatcher, ImageBatcher)."""
        source, target = length
        row = (rows, source)
        if self.task == "image_classification":
            return {"pixel_values": ((rows, 3, self.image_size, self.image_size), F32), "labels": ((rows,), I32),
                    "weights": ((rows,), F32)}
        if self.task == "causal_lm":  # packed documents (ftjax/data/packing.py)
            keys = ("input_ids", "attention_mask", "position_ids", "segment_ids", "labels")
            return {**{k: (row, I32) for k in keys}, "weights": ((rows,), F32)}
        if self.task == "preference":  # pairs (ftjax/data/preference.py): [rows, 2, length]
            pair = (rows, 2, source)
            return {"input_ids": (pair, I32), "attention_mask": (pair, I32), "response_mask": (pair, I32),
                    "weights": ((rows,), F32)}
        if self.task == "seq2seq":
            tgt = (rows, target)
            return {"input_ids": (row, I32), "attention_mask": (row, I32), "decoder_input_ids": (tgt, I32),
                    "decoder_attention_mask": (tgt, I32), "labels": (tgt, I32), "weights": ((rows,), F32)}
        if self.segments is not None:  # packed classification (ftjax/data/example_packing.py)
            seg = (rows, self.segments)
            return {"input_ids": (row, I32), "attention_mask": (row, I32), "token_type_ids": (row, I32),
                    "segment_ids": (row, I32), "segment_starts": (seg, I32), "labels": (seg, I32),
                    "weights": (seg, F32)}
        return {"input_ids": (row, I32), "attention_mask": (row, I32), "token_type_ids": (row, I32),
                "labels": ((rows,), I32), "weights": ((rows,), F32)}

    def structures(self, kind: str) -> list[Structure]:
        """One structure per padded length for "train" or "eval" batches (global rows)."""
        rows = self.train_rows if kind == "train" else self.eval_rows
        return [self.structure(rows, length) for length in self.lengths]

    def longest(self, kind: str) -> Structure:
        """The largest batch of `kind`: the one that sets the step's peak memory."""
        return self.structures(kind)[-1]

    @property
    def seq_len(self) -> int | None:
        return None if self.task == "image_classification" else int(self.lengths[-1][0])


def of_bundle(cfg: Any, bundle: Any) -> BatchLayout:
    """The layout of a built DataBundle (the lengths and packing its data chose)."""
    task, pack = cfg.model.task, bundle.pack_shape
    pairs = getattr(bundle, "seq2seq_pairs", None)
    if pairs:
        lengths = tuple((int(s), int(t)) for s, t in pairs)
    elif task == "image_classification":
        lengths = ((0, None),)
    else:
        lengths = tuple((int(n), None) for n in bundle.bucket_lengths)
    return BatchLayout(
        task=task, lengths=lengths,
        train_rows=pack.rows if pack is not None else bundle.batch_size,
        eval_rows=pack.eval_rows if pack is not None else bundle.eval_batch_size,
        segments=pack.segments if pack is not None else None,
        image_size=int(cfg.data.image_size) if task == "image_classification" else None,
    )


def from_config(cfg: Any) -> BatchLayout:
    """The layout a run's data would have, from the config alone (no data read): packed causal-LM rows of
    data.max_len; seq2seq pairs from data.seq2seq.buckets when given as pairs (else only the last,
    (max_len, max_target_len), is known); bucketed text at data.buckets' lengths (a count: only max_len is
    known). Packed classification is planned one example per row (rows = train.batch_size, an upper bound
    on the rows the data would pack into)."""
    d, t, task = cfg.data, cfg.train, cfg.model.task
    if task not in SUPPORTED:
        raise ConfigError("model.task", task, f"has no batch structure in ftjax.data; plannable: {SUPPORTED}")
    eval_rows = t.eval_batch_size or 2 * t.batch_size
    segments = None
    if task == "image_classification":
        lengths: tuple = ((0, None),)
    elif task == "causal_lm":
        lengths = ((int(d.max_len), None),)
    elif task == "seq2seq":
        spec, last = d.seq2seq.buckets, (int(d.max_len), int(d.seq2seq.max_target_len))
        lengths = tuple((int(a), int(b)) for a, b in spec) if not isinstance(spec, int) else (last,)
    else:
        spec = d.buckets
        lengths = tuple((int(n), None) for n in spec) if not isinstance(spec, int) else ((int(d.max_len), None),)
        if example_packing.packs(cfg):
            lengths, segments = ((int(d.max_len), None),), 1
    return BatchLayout(task=task, lengths=lengths, train_rows=int(t.batch_size), eval_rows=int(eval_rows),
                       segments=segments, image_size=int(d.image_size) if task == "image_classification" else None,
                       planned=True)
