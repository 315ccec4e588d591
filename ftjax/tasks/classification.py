"""Sequence and image classification: one label per example (packed encoder rows: one per segment), softmax
cross-entropy with optional label smoothing, and accuracy / macro-F1 from a confusion matrix the eval step adds
up on device (replicated, so every process can read it)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ftjax import metrics as metrics_lib
from ftjax.tasks.base import F32, I32, Structure, Task


def classification_loss(logits: jax.Array, batch: dict, label_smoothing: Any = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy [B] (packed rows: [B, S]); a traced smoothing rate (a population)
    always smooths."""
    logits = logits.astype(jnp.float32)
    labels = jax.nn.one_hot(batch["labels"], logits.shape[-1])
    if not isinstance(label_smoothing, (int, float)) or label_smoothing:
        labels = optax.smooth_labels(labels, label_smoothing)
    return optax.softmax_cross_entropy(logits, labels)


def confusion(logits: jax.Array, batch: dict) -> jax.Array:
    """[C, C] weighted counts (rows: label, columns: prediction); packed rows' [B, S] examples flattened."""
    num_classes = logits.shape[-1]
    w = batch["weights"].astype(jnp.float32)
    truth = jax.nn.one_hot(batch["labels"], num_classes) * w[..., None]
    pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
    return truth.reshape(-1, num_classes).T @ pred.reshape(-1, num_classes)


@dataclasses.dataclass(frozen=True)
class Classification(Task):
    def logits_loss(self, logits, batch, label_smoothing):
        w = batch["weights"].astype(jnp.float32)
        return (classification_loss(logits, batch, label_smoothing) * w).sum(), w.sum()

    def eval_sums(self, out, batch):
        return {"confusion": confusion(out["logits"], batch)}

    def position_weights(self, batch):
        return batch["weights"].astype(jnp.float32)  # [B] (packed rows: [B, S], one per example)

    def metrics(self, loss_sum, weight, sums):
        return {**super().metrics(loss_sum, weight, sums), **metrics_lib.confusion_metrics(sums["confusion"])}


@dataclasses.dataclass(frozen=True)
class ImageClassification(Classification):
    def structure(self, rows, length, segments, image_size) -> Structure:
        return {"pixel_values": ((rows, 3, image_size, image_size), F32), "labels": ((rows,), I32),
                "weights": ((rows,), F32)}

    def planned_lengths(self, cfg, packed):
        return ((0, None),)

    def bundle_lengths(self, bundle):
        return ((0, None),)


CLASSIFICATION = Classification("classification", "classification", labelled=True)
IMAGE_CLASSIFICATION = ImageClassification("image_classification", "image_classification", has_tokens=False,
                                           labelled=True)
