"""Token losses of the LM tasks, plain (from [B, L, V] logits) and chunked (from the final hidden states and the
head as a function), so that a large vocabulary never materialises [B, L, V] logits or their gradient in the step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

IGNORE = -100  # HF's ignore index: no loss at that position.


def causal_targets(labels: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """HF's causal shift: position t predicts labels[t + 1] (the last position predicts nothing); with packed
    rows (segment_ids) never across a document boundary. Returns targets [B, L] with IGNORE where no loss."""
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)
    if segment_ids is not None:
        same = segment_ids[:, 1:] == segment_ids[:, :-1]
        same = jnp.concatenate([same, jnp.zeros_like(same[:, :1])], axis=1)
        targets = jnp.where(same, targets, IGNORE)
    return targets


def token_losses(logits: jax.Array, targets: jax.Array, label_smoothing: Any = 0.0) -> jax.Array:
    """Per-token float32 loss [...] of logits [..., V] against targets [...] (0 where IGNORE). With label
    smoothing as HF's LabelSmoother: (1 - e) * nll + e * mean over the vocabulary of -log p; a traced rate
    (population mode) always takes that branch."""
    logits = logits.astype(jnp.float32)
    valid = targets != IGNORE
    safe = jnp.where(valid, targets, 0)
    if isinstance(label_smoothing, (int, float)) and not label_smoothing:
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    else:
        lse = jax.nn.logsumexp(logits, axis=-1)
        nll = lse - jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
        smooth = lse - logits.mean(-1)
        loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    return jnp.where(valid, loss, 0.0)


def chunked_token_loss_sum(
    hidden: jax.Array, head: Callable[[jax.Array], jax.Array], targets: jax.Array, *,
    label_smoothing: Any = 0.0, chunk_tokens: int,
) -> tuple[jax.Array, jax.Array]:
    """Per-example (sum of token losses [B], labelled tokens [B]) of `head(hidden)` against targets [B, L]
    (IGNORE skipped), computed `chunk_tokens` tokens at a time so no [B, L, V] array exists.

    A chunk is all B rows at L_c = max(1, chunk_tokens // B) consecutive positions: the batch axis stays whole,
    so a batch sharded over data/fsdp keeps each row's logits on its own device. The positions are padded to a
    multiple of L_c with ignored targets. `lax.scan` runs the chunks; each chunk's head + log-softmax + NLL is
    under `jax.checkpoint`, so the backward recomputes its logits [B, L_c, V] instead of saving them (one more
    head matmul per step). Per-token values are those of `token_losses` on the full logits; the per-example sums
    add the same L values in the same order, so the loss equals the plain one and gradients agree to rounding.
    `head` may close over the model's params (the gradient of the closed-over head weights sums over chunks).
    """
    if chunk_tokens < 1:
        raise ValueError(f"model.loss_chunk_tokens must be >= 1 for the chunked loss, got {chunk_tokens}")
    batch, length = targets.shape
    if hidden.shape[:2] != (batch, length):
        raise ValueError(f"hidden {hidden.shape} and targets {targets.shape} must share [batch, length]")
    step = max(1, min(length, chunk_tokens // batch))
    chunks = -(-length // step)
    pad = chunks * step - length
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE)
    # [B, n * L_c, ...] -> [n, B, L_c, ...]: the scan's leading axis.
    hs = hidden.reshape(batch, chunks, step, hidden.shape[-1]).swapaxes(0, 1)
    ts = targets.reshape(batch, chunks, step).swapaxes(0, 1)

    @functools.partial(jax.checkpoint, prevent_cse=False)  # inside a scan, CSE cannot undo the remat.
    def chunk_loss(h, t):
        return token_losses(head(h), t, label_smoothing)

    def body(carry, xs):
        return carry, chunk_loss(*xs)

    _, losses = jax.lax.scan(body, None, (hs, ts))
    losses = losses.swapaxes(0, 1).reshape(batch, chunks * step)[:, :length]
    tokens = (targets[:, :length] != IGNORE).sum(-1).astype(jnp.float32)
    return losses.sum(-1), tokens
