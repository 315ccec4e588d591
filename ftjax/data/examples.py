"""Example tasks (classification, masked_lm, image_classification): tokenise texts or index images once, and
batch them one example per row padded to a few length buckets, or packed several per row (classification
with an encoder, data.packing; ftjax/data/example_packing.py)."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from ftjax.config import ConfigError
from ftjax.data import batching, image, splits, text
from ftjax.data import example_packing as packing
from ftjax.data.bundle import DataBundle, Maker, assemble
from ftjax.data.errors import DataError
from ftjax.data.sources import RawSplit
from ftjax.data.splits import Layout

LABELLED_TASKS = ("classification", "image_classification")


def build(
    cfg: ml_collections.ConfigDict,
    tokenizer: Any,
    *,
    process_index: int = 0,
    process_count: int = 1,
    data_parallel: int | None = None,
) -> DataBundle:
    """The DataBundle of a text or image task: cfg.data's splits, tokenised (or indexed) once; packed rows
    (example_packing.py) for classification with an encoder when data.packing, else length buckets."""
    d, t, task = cfg.data, cfg.train, cfg.model.task
    rows = splits.layout(t, process_index, process_count)
    is_image = task == "image_classification"
    if not is_image and tokenizer is None:
        raise DataError(f"model.task={task!r} is a text task: build() needs the model's tokenizer")

    raw = splits.read(d, splits.roles(d))
    labelled = task in LABELLED_TASKS
    # Labels: names from the full train split (so max_examples never shrinks the label set).
    names = _label_names(cfg, raw["train"]) if labelled else []
    source_names = raw["train"].label_names is not None
    splits.hold_out(raw, d, t.seed)
    labels = {r: np.zeros(len(s), np.int32) for r, s in raw.items()}
    if labelled:
        labels = {r: _labels(d, s, names, source_names) for r, s in raw.items()}
    stats: dict[str, Any] = {"examples": {r: len(s) for r, s in raw.items()}}
    if labelled:  # examples per class name and split (label imbalance: --mode=diagnose reads it)
        stats["label_counts"] = {r: {name: int(n) for name, n in zip(names, np.bincount(y, minlength=len(names)))}
                                 for r, y in labels.items()}
    shape, plans, member_sources = None, None, None
    if is_image:
        lengths, makers = _image_makers(d, raw, labels, rows)
        buckets: tuple[int, ...] = ()
        threads = min(8, os.cpu_count() or 1)
    else:
        tokens = _tokenize(d, tokenizer, raw, stats)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        lengths = {r: tok.lengths for r, tok in tokens.items()}
        if packing.packs(cfg):
            granule = packing.row_granule(cfg, process_count, data_parallel)
            shape, makers, plans, member_sources = _packed_makers(d, t.seed, tokens, labels, rows, pad_id, granule,
                                                                  stats)
            buckets = (d.max_len,)
        else:
            makers, buckets = _text_makers(d, t.seed, tokens, labels, rows, pad_id, stats)
        threads = 2
    bundle = assemble(
        fingerprint=splits.fingerprint(raw),
        lengths=lengths,
        makers=makers,
        layout=rows,
        seed=t.seed,
        grouping=d.length_grouping,
        threads=threads,
        label_names=names,
        bucket_lengths=buckets,
        stats=stats,
        plans=plans,
        pack_shape=shape,
        packed_member_sources=member_sources,
    )
    logging.info(
        "data: %s; %d steps/epoch of %d; labels %s; %s",
        stats["examples"],
        bundle.steps_per_epoch,
        rows.batch,
        names[:20],
        {k: v for k, v in stats.items() if k not in ("examples", "label_counts")},
    )
    return bundle


def _label_names(cfg: ml_collections.ConfigDict, train: RawSplit) -> list[str]:
    """id -> class name: the source's own (e.g. a tfds ClassLabel), else the labels seen in train."""
    d = cfg.data
    values = text.column(train, "label_field", d.label_field)
    if train.label_names is not None:
        names = list(train.label_names)
    else:
        names = text.label_names(values, train.origin, d.label_field)
    if cfg.model.task in ("classification", "image_classification"):
        seen = {str(v) for v in values}
        if len(seen) < 2:
            raise DataError(
                f"data.label_field={d.label_field!r}: every training example of {train.origin} has the same "
                f"label ({next(iter(seen), None)!r}); a classifier needs at least 2 classes: check "
                "data.label_field and data.train_split"
            )
    if cfg.model.num_labels is not None and cfg.model.num_labels < len(names):
        raise ConfigError(
            "model.num_labels",
            cfg.model.num_labels,
            f"the data has {len(names)} labels ({names[:10]}); use None or >= {len(names)}",
        )
    return names


def _labels(
    d: ml_collections.ConfigDict, split: RawSplit, names: list[str], source_names: bool
) -> np.ndarray:
    """Class ids of a split's labels (source_names: the labels are already the source's ids)."""
    values = text.column(split, "label_field", d.label_field)
    return text.encode_labels(values, names, split.origin, d.label_field, source_names)


def _image_makers(
    d: ml_collections.ConfigDict, raw: dict[str, RawSplit], labels: dict[str, np.ndarray], rows: Layout
) -> tuple[dict[str, np.ndarray], dict[str, Maker]]:
    mean, std = tuple(d.image_mean), tuple(d.image_std)

    def to_pixels(value: Any) -> np.ndarray:
        return image.pixel_values(value, d.image_size, mean, std, d.image_field)

    lengths = {r: np.ones(len(s), np.int32) for r, s in raw.items()}
    makers: dict[str, Maker] = {}
    for role, split in raw.items():
        images = text.column(split, "image_field", d.image_field)
        makers[role] = batching.ImageBatcher(images, labels[role], to_pixels, d.image_size, rows.rows(role))
    return lengths, makers


def _tokenize(
    d: ml_collections.ConfigDict, tokenizer: Any, raw: dict[str, RawSplit], stats: dict[str, Any]
) -> dict[str, text.Tokens]:
    """Tokenises every split once; adds truncation and length figures to `stats`."""
    tokens = {}
    for role, split in raw.items():
        texts = text.column(split, "text_field", d.text_field)
        pairs = text.column(split, "text_pair_field", d.text_pair_field) if d.text_pair_field else None
        tokens[role] = text.tokenize(tokenizer, texts, pairs, d.max_len)
    train_lengths = tokens["train"].lengths
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
    )
    for role, tok in tokens.items():
        _warn_text(role, tok, len(raw[role]), d.max_len)
    return tokens


def _text_makers(
    d: ml_collections.ConfigDict,
    seed: int,
    tokens: dict[str, text.Tokens],
    labels: dict[str, np.ndarray],
    rows: Layout,
    pad_id: int,
    stats: dict[str, Any],
) -> tuple[dict[str, Maker], tuple[int, ...]]:
    """One example per row, padded to a few length buckets; adds the padding figures to `stats`."""
    train_lengths = tokens["train"].lengths
    buckets = batching.choose_buckets(train_lengths, d.buckets, d.max_len)
    makers: dict[str, Maker] = {
        role: batching.TextBatcher(tokens[role], labels[role], buckets, pad_id, rows.rows(role))
        for role in tokens
    }
    real, padded = batching.padded_tokens(
        batching.train_plan(train_lengths, rows.batch, seed, 0, d.length_grouping), train_lengths, buckets
    )
    real_r, padded_r = batching.padded_tokens(
        batching.train_plan(train_lengths, rows.batch, seed, 0, 0), train_lengths, buckets
    )
    stats.update(
        bucket_lengths=list(buckets),
        real_token_fraction=real / padded,
        real_token_fraction_ungrouped=real_r / padded_r,
    )
    return makers, buckets


def _packed_makers(
    d: ml_collections.ConfigDict,
    seed: int,
    tokens: dict[str, text.Tokens],
    labels: dict[str, np.ndarray],
    rows: Layout,
    pad_id: int,
    granule: int,
    stats: dict[str, Any],
) -> tuple[packing.PackShape, dict[str, Maker], tuple, Callable]:
    """Several examples per row of max_len (example_packing.py): the shape, batch makers, plans and the
    population's member sources (`DataBundle.member_sources`)."""
    lengths = {r: tok.lengths for r, tok in tokens.items()}
    shape = packing.choose_shape(lengths["train"], rows.batch, rows.eval_batch, d.max_len, granule)
    process = rows.share.start * shape.rows // rows.batch, rows.share.stop * shape.rows // rows.batch
    makers: dict[str, Maker] = {
        role: packing.PackedTextBatcher(
            tok, labels[role], shape, pad_id, slice(*process) if role == "train" else rows.eval_share
        )
        for role, tok in tokens.items()
    }
    train_plan = functools.lru_cache(maxsize=2)(
        functools.partial(packing.train_plan, lengths["train"], rows.batch, shape, seed)
    )
    eval_plans = {r: packing.eval_plan(x, shape) for r, x in lengths.items() if r != "train"}
    first = train_plan(0)
    stats.update(
        bucket_lengths=[d.max_len],
        packed={"rows": shape.rows, "segments": shape.segments, "eval_rows": shape.eval_rows},
        real_token_fraction=packing.real_fraction(first, lengths["train"], d.max_len),
        examples_per_row=float((first >= 0).sum() / max(1, (first >= 0).any(-1).sum())),
    )

    def member_sources(sizes: list[int]) -> dict[int, batching.MemberSource]:
        """A population's members' own packed batches: each batch size packed as its solo run packs it (its own
        rows and segments), plans padded with PAD rows to the most rows (single process: makers build them all)."""
        shapes = {b: packing.choose_shape(lengths["train"], b, rows.eval_batch, d.max_len, granule) for b in sizes}
        most = max(sh.rows for sh in shapes.values())
        out = {}
        for b, sh in shapes.items():
            plan = functools.lru_cache(maxsize=2)(
                functools.partial(packing.train_plan, lengths["train"], b, sh, seed))
            out[b] = (lambda epoch, plan=plan: batching.pad_plan_rows(plan(epoch), most),
                      packing.PackedTextBatcher(tokens["train"], labels["train"], sh, pad_id, slice(0, most)),
                      math.ceil(len(lengths["train"]) / b))
        return out

    return shape, makers, (train_plan, eval_plans), member_sources


def _warn_text(role: str, tok: text.Tokens, n: int, max_len: int) -> None:
    if tok.truncated:
        logging.warning(
            "data: %d of %d %s examples (%.1f%%) are longer than data.max_len=%d and were truncated "
            "(%d tokens cut)",
            tok.truncated,
            n,
            role,
            100.0 * tok.truncated / n,
            max_len,
            tok.truncated_tokens,
        )
    if tok.empty_texts:
        logging.warning("data: %d %s examples have an empty text cell (read as '')", tok.empty_texts, role)
