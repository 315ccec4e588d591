"""Data for fine-tuning: each task's builder (`ftjax.tasks.build_data(cfg, tokenizer)` picks it) reads the splits,
tokenises them once, and hands out batches.

Batches are dicts of numpy arrays for this process's rows of a fixed-size global batch, packed (several
examples or documents per row) or padded to a few length buckets, in an order fixed by (seed, epoch) that
resumes exactly from {"epoch", "position"}. Layout: splits (shared steps) -> examples (one example per row,
or several: example_packing) | lm (documents, packed by document_packing) | seq2seq (source/target pairs) |
tagging (words with tags, token classification) -> bundle.
"""

from __future__ import annotations

from ftjax.data.batching import TrainIterator
from ftjax.data.bundle import DataBundle
from ftjax.data.errors import DataError, DataFileNotFoundError

__all__ = ["DataBundle", "DataError", "DataFileNotFoundError", "TrainIterator"]
