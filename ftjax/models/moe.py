"""The sparse mixture-of-experts feed-forward block of Mixtral and Qwen3-MoE: a top-k softmax router and E
SwiGLU experts whose kernels are stacked [expert, in, out] (one HF key per expert, `common.stack_layers`), run
as grouped matmuls over the tokens sorted by expert (`jax.lax.ragged_dot`: no capacity, no padded tokens, no
dropped ones), and the router statistics behind the Switch-Transformer load-balancing loss that training adds.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.models import common
from ftjax.models.common import AXES, Ctx


class RouterStats(nnx.Intermediate):
    """What one MoE layer's router did on the real tokens of a call: top-k picks and softmax mass per expert."""


class ExpertKernel(nnx.Module):
    """One projection of one expert: `kernel` [in, out] (HF `...experts.N.<name>.weight`, transposed). Not an
    nnx.Linear: the block runs all experts' kernels at once, so LoRA and QLoRA's quantisation leave it alone."""

    def __init__(self, din: int, dout: int, ctx: Ctx, axes: tuple):
        init = common.normal_init(ctx.init_range)
        self.kernel = nnx.Param(init(ctx.rngs.params(), (din, dout), ctx.param_dtype), **{AXES: tuple(axes)})


class Expert(nnx.Module):
    """One SwiGLU expert: act(x W_gate) * (x W_up), then W_down; `names` are the checkpoint's (gate, up, down):
    Mixtral's w1, w3, w2 or Qwen3-MoE's gate_proj, up_proj, down_proj."""

    def __init__(self, hidden: int, inner: int, names: tuple[str, str, str], ctx: Ctx):
        gate, up, down = names
        setattr(self, gate, ExpertKernel(hidden, inner, ctx, ("embed", "mlp")))
        setattr(self, up, ExpertKernel(hidden, inner, ctx, ("embed", "mlp")))
        setattr(self, down, ExpertKernel(inner, hidden, ctx, ("mlp", "embed")))


class SparseMoeBlock(nnx.Module):
    """HF's MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock: `gate` (the router, [hidden] -> [experts] logits),
    `experts` (stacked). Each token goes to its top_k experts by softmax probability (renormalised over the k
    when `normalize`), and its output is the probability-weighted sum of theirs. `jitter` (Mixtral's
    router_jitter_noise) multiplies the block's input by U(1 - jitter, 1 + jitter) noise in training."""

    def __init__(self, hidden: int, inner: int, experts: int, top_k: int, normalize: bool, act: str,
                 names: tuple[str, str, str], ctx: Ctx, jitter: float = 0.0):
        if not 1 <= top_k <= experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be in [1, {experts}] (the number of experts)")
        self.gate = common.linear(hidden, experts, ctx, ("embed", None), use_bias=False)
        self.experts = common.stack_layers([Expert(hidden, inner, names, ctx) for _ in range(experts)], axis="expert")
        self.names, self.num_experts, self.top_k, self.normalize = names, experts, top_k, normalize
        self.act, self.jitter = common.activation(act), float(jitter)

    def __call__(self, x: jax.Array, token_valid: jax.Array | None, *, deterministic: bool,
                 rngs: nnx.Rngs | None, record: bool = True) -> jax.Array:
        """`token_valid` [B, L] (None: all real) picks the tokens the router statistics count; record=False
        (decoding with a KV cache, inside generate's loop) keeps none."""
        batch, length, hidden = x.shape
        if self.jitter > 0 and not deterministic:
            x = x * jax.random.uniform(rngs.dropout(), x.shape, x.dtype, 1.0 - self.jitter, 1.0 + self.jitter)
        tokens = x.reshape(-1, hidden)
        logits = self.gate(tokens)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        weights, chosen = jax.lax.top_k(probs, self.top_k)  # [N, k]
        if self.normalize:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        valid = jnp.ones(tokens.shape[0], jnp.float32) if token_valid is None else token_valid.reshape(-1)
        if record:
            self.router_stats = RouterStats({
                "picks": (jax.nn.one_hot(chosen, self.num_experts, dtype=jnp.float32) * valid[:, None, None]).sum((0, 1)),
                "probs": (probs * valid[:, None]).sum(0),
                "tokens": valid.sum(),
            })
        out = self._experts(tokens, chosen, weights.astype(x.dtype))
        return out.reshape(batch, length, hidden)

    def _experts(self, tokens: jax.Array, chosen: jax.Array, weights: jax.Array) -> jax.Array:
        """Σ_k weights[:, k] * expert_{chosen[:, k]}(tokens): the N x k (token, expert) pairs sorted by expert,
        each expert's rows one group of a ragged matmul, then the weighted rows summed back per token."""
        n, k = chosen.shape
        flat = chosen.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        rows = tokens[order // k]
        sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
        gate, up, down = (getattr(self.experts, name).kernel.get_value().astype(tokens.dtype) for name in self.names)
        h = self.act(jax.lax.ragged_dot(rows, gate, sizes)) * jax.lax.ragged_dot(rows, up, sizes)
        y = jax.lax.ragged_dot(h, down, sizes) * weights.reshape(-1)[order][:, None]
        return jnp.zeros((n * k, tokens.shape[-1]), y.dtype).at[order].set(y).reshape(n, k, -1).sum(axis=1)


def load_balancing_loss(module: nnx.Module, num_experts: int, top_k: int) -> jax.Array | None:
    """HF's load_balancing_loss_func over the MoE layers called since the last read (their RouterStats, popped):
    num_experts * Σ_e f_e P_e, f_e the share of top-k picks (x top_k) and P_e the mean router probability of
    expert e over the real tokens of all layers together. None when no MoE layer ran."""
    stats = [v.get_value() for _, v in nnx.iter_graph(module) if isinstance(v, RouterStats)]
    nnx.pop(module, RouterStats)
    if not stats:
        return None
    stats = [s[0] if isinstance(s, tuple) else s for s in stats]
    tokens = jnp.maximum(sum(s["tokens"] for s in stats), 1.0)
    picks = sum(s["picks"] for s in stats) / tokens
    probs = sum(s["probs"] for s in stats) / tokens
    return num_experts * jnp.sum(picks * probs)


def expert_config(cfg: Any) -> tuple[int, int]:
    """(experts, experts per token) of a Mixtral or Qwen3-MoE config."""
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    return int(experts), int(cfg.num_experts_per_tok)
