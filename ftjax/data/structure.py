"""The batch structure of a run (keys, dtypes, shapes): its task declares the arrays of one batch
(`ftjax.tasks.Task.structure`), this module the lengths and rows. The batchers of ftjax.data make exactly these
arrays, and a plan (`ftjax.run.Run(purpose="plan")`, `--mode=dry_run`) compiles the step for them from the
config alone, without reading data."""

from __future__ import annotations

import dataclasses
from typing import Any

from ftjax.data import example_packing

Structure = dict  # key -> (global shape, numpy dtype); see ftjax.tasks.base.Structure

# The arrays of a batch (any task's, or a monitor's reference batch) that are model-call arguments; the others
# are targets and weights.
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values", "segment_ids",
              "segment_starts", "decoder_input_ids", "decoder_attention_mask")


def model_inputs(batch: dict) -> dict:
    """The model-call arguments of a batch (its other arrays are targets and weights)."""
    return {k: batch[k] for k in INPUT_KEYS if k in batch}


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """What one run's batches look like: the task (an ftjax.tasks.Task), the padded lengths ((source, target)
    pairs for seq2seq, (length, None) otherwise; ascending), global rows of a train / eval batch, and for packed
    classification rows the examples per row (`segments`); image tasks: the image size. `planned`: derived from
    the config alone (the longest shape is exact, the bucket lengths below it are not known without data)."""

    task: Any
    lengths: tuple[tuple[int, int | None], ...]
    train_rows: int
    eval_rows: int
    segments: int | None = None
    image_size: int | None = None
    planned: bool = False

    def structure(self, rows: int, length: tuple[int, int | None]) -> Structure:
        """The arrays of a global batch of `rows` rows at one padded length."""
        return self.task.structure(rows, length, self.segments, self.image_size)

    def structures(self, kind: str) -> list[Structure]:
        """One structure per padded length for "train" or "eval" batches (global rows)."""
        rows = self.train_rows if kind == "train" else self.eval_rows
        return [self.structure(rows, length) for length in self.lengths]

    def longest(self, kind: str) -> Structure:
        """The largest batch of `kind`: the one that sets the step's peak memory."""
        return self.structures(kind)[-1]

    @property
    def seq_len(self) -> int | None:
        return int(self.lengths[-1][0]) if self.task.has_tokens else None


def _image_size(cfg: Any, task: Any) -> int | None:
    return None if task.has_tokens else int(cfg.data.image_size)


def of_bundle(cfg: Any, bundle: Any, task: Any) -> BatchLayout:
    """The layout of a built DataBundle (the lengths and packing its data chose)."""
    pack = bundle.pack_shape
    return BatchLayout(
        task=task, lengths=task.bundle_lengths(bundle),
        train_rows=pack.rows if pack is not None else bundle.batch_size,
        eval_rows=pack.eval_rows if pack is not None else bundle.eval_batch_size,
        segments=pack.segments if pack is not None else None,
        image_size=_image_size(cfg, task),
    )


def from_config(cfg: Any, task: Any) -> BatchLayout:
    """The layout a run's data would have, from the config alone (no data read; the task's planned lengths).
    Packed classification is planned one example per row (rows = train.batch_size, an upper bound on the rows
    the data would pack into)."""
    t = cfg.train
    packed = example_packing.packs(cfg)
    return BatchLayout(task=task, lengths=task.planned_lengths(cfg, packed), train_rows=int(t.batch_size),
                       eval_rows=int(t.eval_batch_size or 2 * t.batch_size), segments=1 if packed else None,
                       image_size=_image_size(cfg, task), planned=True)
