"""Packed classification: packed rows give the unpacked logits; plans hold every example once, in one shape."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models, tasks
from ftjax.data import example_packing as packing
from ftjax.data.text import Tokens
from ftjax.tasks import classification as classification_task
from tests.test_models import save_tiny, tiny_config

LENGTHS = (9, 5, 2, 7, 3, 11, 4, 16, 10, 6)  # example lengths; rows of 16 tokens below
PLAN = np.array([  # [rows, segments]: 1, 2, 3 segments with padding, a full row, a 2-segment full row, empty
    [0, -1, -1],
    [1, 2, -1],
    [4, 6, 3],
    [5, -1, -1],
    [7, -1, -1],
    [8, 9, -1],
    [-1, -1, -1],
])
LABELS = np.arange(len(LENGTHS)) % 3


def examples(family: str, seed: int = 0) -> Tokens:
    """Random ids (never the pad id) of LENGTHS tokens; token types 0 then 1 (second half), as pairs."""
    rng = np.random.default_rng(seed)
    ids, types = [], []
    for n in LENGTHS:
        ids.append(rng.integers(3, 100, n))
        types.append((np.arange(n) >= n // 2).astype(np.int8) if family == "bert" else np.zeros(n, np.int8))
    offsets = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int64)
    return Tokens(np.concatenate(ids).astype(np.int32), np.concatenate(types), offsets, 0, 0, 0)


def unpacked(tokens: Tokens, pad: int, length: int = 16) -> dict:
    n = len(LENGTHS)
    ids = np.full((n, length), pad, np.int32)
    types = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length), np.int32)
    for i in range(n):
        a, b = tokens.offsets[i], tokens.offsets[i + 1]
        ids[i, : b - a], types[i, : b - a], mask[i, : b - a] = tokens.ids[a:b], tokens.type_ids[a:b], 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def packed_batch(tokens: Tokens, pad: int) -> dict:
    shape = packing.PackShape(rows=len(PLAN), eval_rows=len(PLAN), length=16, segments=3)
    return packing.PackedTextBatcher(tokens, LABELS, shape, pad, slice(None))(PLAN)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_packed_logits_equal_unpacked_logits(tmp_path, family):
    folder = save_tiny(tmp_path, family, "classification", num_labels=3)
    model = models.from_pretrained(folder, task="classification")
    pad = tiny_config(family).pad_token_id or 0
    tokens = examples(family)
    alone = np.asarray(model(**unpacked(tokens, pad))["logits"])  # [examples, C]
    batch = packed_batch(tokens, pad)
    out = np.asarray(model(**tasks.model_inputs(batch))["logits"])  # [rows, S, C]
    assert out.shape == (len(PLAN), 3, 3)
    real = PLAN >= 0
    np.testing.assert_array_equal(batch["weights"], real.astype(np.float32))
    np.testing.assert_array_equal(batch["labels"][real], LABELS[PLAN[real]])
    np.testing.assert_allclose(out[real], alone[PLAN[real]], atol=1e-5, rtol=1e-5)
    assert np.isfinite(out).all()  # empty slots and the empty row too


def test_packed_token_logits_equal_unpacked_at_real_tokens(tmp_path):
    folder = save_tiny(tmp_path, "bert", "token_classification", num_labels=3)
    model = models.from_pretrained(folder, task="token_classification")
    tokens = examples("bert")
    alone = np.asarray(model(**unpacked(tokens, 0))["logits"])  # [examples, 16, C]
    batch = packed_batch(tokens, 0)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "segment_ids")}
    out = np.asarray(model(**inputs)["logits"])  # [rows, 16, C]
    for row, segments in enumerate(PLAN):
        for k, e in enumerate(segments[segments >= 0]):
            start, n = batch["segment_starts"][row, k], LENGTHS[e]
            np.testing.assert_allclose(out[row, start : start + n], alone[e, :n], atol=1e-5, rtol=1e-5)


def test_packed_loss_and_confusion_count_each_example_once(tmp_path):
    folder = save_tiny(tmp_path, "bert", "classification", num_labels=3)
    model = models.from_pretrained(folder, task="classification")
    tokens = examples("bert")
    batch = packed_batch(tokens, 0)
    logits = model(**tasks.model_inputs(batch))["logits"]
    loss_sum, weight = tasks.get("classification").logits_loss(logits, {k: jnp.asarray(v) for k, v in batch.items()},
                                                               0.0)
    alone = model(**unpacked(tokens, 0))["logits"]
    per_example = classification_task.classification_loss(alone, {"labels": jnp.asarray(LABELS)})
    assert float(weight) == len(LENGTHS)
    np.testing.assert_allclose(float(loss_sum), float(per_example.sum()), rtol=1e-5)


def test_classification_with_segments_needs_their_starts(tmp_path):
    folder = save_tiny(tmp_path, "distilbert", "classification", num_labels=3)
    model = models.from_pretrained(folder, task="classification")
    batch = packed_batch(examples("distilbert"), 0)
    with pytest.raises(ValueError, match="segment_starts"):
        model(input_ids=batch["input_ids"], segment_ids=batch["segment_ids"])


# ---------------------------------------------------------------- plans


def _check_epoch(plan: np.ndarray, n: int, batch: int) -> None:
    ids = plan[plan >= 0]
    assert sorted(ids.tolist()) == list(range(n))  # every example exactly once
    per_batch = (plan >= 0).sum(axis=(1, 2))
    assert per_batch.sum() == n and per_batch.max() <= batch + batch // 2


def test_shape_is_chosen_from_lengths_and_every_epoch_holds_each_example_once():
    lengths = np.random.default_rng(0).integers(4, 129, 500)
    shape = packing.choose_shape(lengths, 32, 64, 128, granule=2)
    assert shape.rows % 2 == 0 and shape.rows < 32 and shape.segments >= 2
    for epoch in range(3):
        plan = packing.train_plan(lengths, 32, shape, seed=0, epoch=epoch)
        assert plan.shape == (16, shape.rows, shape.segments)
        _check_epoch(plan, 500, 32)
    np.testing.assert_array_equal(packing.train_plan(lengths, 32, shape, 0, 1),
                                  packing.train_plan(lengths, 32, shape, 0, 1))
    assert not np.array_equal(packing.train_plan(lengths, 32, shape, 0, 1),
                              packing.train_plan(lengths, 32, shape, 0, 2))


def test_examples_that_do_not_fit_are_carried_and_swapped_not_dropped():
    lengths = np.random.default_rng(1).integers(20, 129, 200)
    plan, carried, swapped = packing._plan(lengths, 16, packing.PackShape(10, 10, 128, 4), 0, 0)
    assert carried > 0  # 10 rows: below what some batches need
    _check_epoch(plan, 200, 16)
    assert (plan >= 0).sum(axis=(1, 2))[:-1].min() >= 15
    rng = np.random.default_rng(17)  # a case whose last batch overflows and swaps with an earlier one
    n, lengths = int(rng.integers(8, 40)), None
    batch, lengths = int(rng.choice([4, 8])), rng.integers(2, 33, n)
    shape = packing.PackShape(int(rng.integers(1, batch)), 1, 32, int(rng.integers(1, 5)))
    plan, carried, swapped = packing._plan(lengths, batch, shape, 0, 0)
    assert swapped > 0
    _check_epoch(plan, n, batch)
    with pytest.raises(packing.DataError, match="data.packing"):  # 8 full-length examples a step, 4 rows
        packing.train_plan(np.full(40, 128), 8, packing.PackShape(4, 4, 128, 4), 0, 0)


def test_eval_plan_packs_the_whole_split_once():
    lengths = np.random.default_rng(2).integers(2, 65, 300)
    shape = packing.PackShape(rows=8, eval_rows=16, length=64, segments=5)
    plan = packing.eval_plan(lengths, shape)
    assert plan.shape[1:] == (16, 5)
    assert sorted(plan[plan >= 0].tolist()) == list(range(300))
    used = (plan >= 0).any(-1).sum()
    assert lengths.sum() / (used * 64) > 0.95 and len(plan) == -(-used // 16)  # best fit wastes little
