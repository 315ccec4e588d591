"""Data for fine-tuning: `build(cfg, tokenizer)` reads the splits, tokenises them once, and hands out batches.

Batches are dicts of numpy arrays for this process's rows of a fixed-size global batch, packed (several
examples or documents per row) or padded to a few length buckets, in an order fixed by (seed, epoch) that
resumes exactly from {"epoch", "position"}. Layout: splits (shared steps) -> examples (one example per row,
or example_packing) | lm (packed documents) | seq2seq (source/target pairs) -> bundle.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from ftjax.data import examples, lm, preference, seq2seq, structure
from ftjax.data.batching import TrainIterator
from ftjax.data.bundle import DataBundle
from ftjax.data.errors import DataError, DataFileNotFoundError

__all__ = ["DataBundle", "DataError", "DataFileNotFoundError", "TrainIterator", "build"]


def build(
    cfg: ml_collections.ConfigDict,
    tokenizer: Any,
    *,
    process_index: int = 0,
    process_count: int = 1,
    data_parallel: int | None = None,
) -> DataBundle:
    """Reads cfg.data's splits, tokenises (or indexes images) once, and returns the DataBundle; causal_lm
    packs documents into rows (ftjax/data/lm.py), seq2seq batches (source, target) pairs
    (ftjax/data/seq2seq.py), classification with an encoder packs examples into rows
    (data.packing; ftjax/data/example_packing.py: `data_parallel` devices divide its rows, default: cfg.mesh
    over all devices), every other task batches one example per row."""
    if cfg.model.task == "causal_lm":
        bundle = lm.build(cfg, tokenizer, process_index=process_index, process_count=process_count)
    elif cfg.model.task == "preference":
        bundle = preference.build(cfg, tokenizer, process_index=process_index, process_count=process_count)
    elif cfg.model.task == "seq2seq":
        bundle = seq2seq.build(cfg, tokenizer, process_index=process_index, process_count=process_count)
    else:
        bundle = examples.build(
            cfg, tokenizer, process_index=process_index, process_count=process_count, data_parallel=data_parallel
        )
    bundle.batch_layout = structure.of_bundle(cfg, bundle)  # the batch structure a plan of this run uses too
    return bundle
