"""The steps every task's data shares: which splits to read, the seeded validation hold-out,
data.max_examples, and the global batch sizes with this process's rows of each batch."""

from __future__ import annotations

import dataclasses
import hashlib

import ml_collections
import numpy as np
import pandas as pd

from ftjax.config import ConfigError
from ftjax.data import batching, sources
from ftjax.data.errors import DataError
from ftjax.data.sources import RawSplit


@dataclasses.dataclass(frozen=True)
class Layout:
    """Global train / eval batch sizes and the rows of each global batch this process assembles."""

    batch: int
    eval_batch: int
    share: slice  # this process's rows of a train batch
    eval_share: slice  # ... of an eval batch

    def rows(self, role: str) -> slice:
        return self.share if role == "train" else self.eval_share


def layout(t: ml_collections.ConfigDict, process_index: int, process_count: int) -> Layout:
    """cfg.train's batch sizes (eval defaults to twice train), each split evenly over the processes."""
    batch, eval_batch = t.batch_size, t.eval_batch_size or 2 * t.batch_size
    if batch % process_count:
        raise ConfigError("train.batch_size", batch, f"must be divisible by the {process_count} processes")
    if eval_batch % process_count:
        raise ConfigError(
            "train.eval_batch_size", eval_batch, f"must divide by the {process_count} processes"
        )

    def share(size: int) -> slice:
        return slice(process_index * size // process_count, (process_index + 1) * size // process_count)

    return Layout(batch, eval_batch, share(batch), share(eval_batch))


def roles(d: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The splits to read: train, plus validation / test when data.eval_split / data.test_split name one."""
    return ("train",) + (("validation",) if d.eval_split else ()) + (("test",) if d.test_split else ())


def read(d: ml_collections.ConfigDict, wanted: tuple[str, ...], *, readers: dict[str, sources.Reader] | None = None,
         label_field: str | None = None) -> dict[str, RawSplit]:
    """Each wanted split from data.source (a task's own file `readers` and `label_field`: see
    sources.load_splits); an empty one is an error naming its field."""
    raw = sources.load_splits(d, wanted, readers=readers, label_field=label_field)
    for role, split in raw.items():
        if len(split) == 0:
            field = sources.SPLIT_FIELDS[role]
            raise DataError(f"data.{field}={d[field]!r}: {split.origin} has no examples; point it at data")
    return raw


def hold_out(
    raw: dict[str, RawSplit],
    d: ml_collections.ConfigDict,
    seed: int,
    *,
    unit: str = "example(s)",
    fix: str = "",
) -> None:
    """In place: without a validation split, a seeded data.validation_fraction of train becomes one
    (batching.holdout_indices); then train keeps its first data.max_examples rows (validation unchanged)."""
    if "validation" not in raw:
        train = raw["train"]
        split = batching.holdout_indices(len(train), d.validation_fraction, seed)
        if split is None:
            raise DataError(
                f"data.train_split: {train.origin} has {len(train)} {unit}, too few to hold out a "
                f"validation split; set data.eval_split{fix}"
            )
        held, kept = split
        raw["validation"] = train.take(held, f"{train.origin} (held-out {d.validation_fraction:g})")
        raw["train"] = train.take(kept)
    if d.max_examples:
        raw["train"] = raw["train"].take(np.arange(min(d.max_examples, len(raw["train"]))))


def fingerprint(raw: dict[str, RawSplit]) -> dict[str, dict]:
    """Per split (after the hold-out and max_examples): where its rows came from, how many, and a content
    hash (sha256 of pandas' row hashes), so a resumed run can tell that its data changed."""
    out = {}
    for role, split in raw.items():
        frame = split.frame
        digest = hashlib.sha256()
        digest.update(",".join(map(str, frame.columns)).encode())
        hashable = frame.apply(lambda col: col.map(repr) if col.dtype == object else col)
        digest.update(pd.util.hash_pandas_object(hashable, index=False).to_numpy().tobytes())
        out[role] = {"source": split.origin, "rows": len(frame), "sha256": digest.hexdigest()}
    return out
