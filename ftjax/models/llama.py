"""Llama and Mistral in Flax NNX (also the backbone of Qwen2/Qwen3 in qwen.py and Phi-3 in phi3.py), with param
paths that mirror HF LlamaModel / LlamaFor{CausalLM,SequenceClassification} state_dict keys: GQA, RoPE (default,
linear, llama3, longrope; partial rotary), RMSNorm, SwiGLU MLP (or Phi-3's fused gate_up_proj, and fused
qkv_proj), sliding windows, tied or untied lm_head, and an explicit KV cache for generate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.hf import UnsupportedModelError
from ftjax.models import common, decoder, decoder_family, moe
from ftjax.models.common import Ctx, Dropout
from ftjax.models.decoder import DecoderTask


@dataclasses.dataclass(frozen=True)
class Arch:
    """What differs between the Llama-like families (read from the family and its config)."""

    q_bias: bool = False  # bias on q/k/v projections.
    o_bias: bool = False  # bias on o_proj.
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE.
    fused_qkv: bool = False  # Phi-3: one qkv_proj, [q | k | v] along its output (as the checkpoint stores it).
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj, [gate | up] along its output.
    # Mixture of experts (moe.py): the sparse layers' block attribute ("block_sparse_moe": Mixtral, "mlp":
    # Qwen3-MoE) and its experts' projection names (gate, up, down); None: every layer a dense MLP.
    moe: str | None = None
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


def arch_for(cfg: Any) -> Arch:
    kind = cfg.model_type
    if kind == "phi3":
        return Arch(fused_qkv=True, fused_gate_up=True)
    if kind == "mixtral":
        return Arch(moe="block_sparse_moe", expert_names=("w1", "w3", "w2"))
    if kind == "qwen2":
        return Arch(q_bias=True)
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    if kind in ("qwen3", "qwen3_moe"):
        return Arch(q_bias=attention_bias, o_bias=attention_bias, qk_norm=True,
                    moe="mlp" if kind == "qwen3_moe" else None)
    if kind == "mistral":
        return Arch()
    return Arch(q_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(getattr(cfg, "mlp_bias", False)))


def head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


EVERY_LAYER_WINDOW = ("mistral", "phi3", "mixtral", "qwen3_moe")  # sliding_window, when set, is on every layer


def layer_windows(cfg: Any) -> list[int | None]:
    """Sliding window per layer: layer_types (Qwen2/3) pick it per layer; Mistral, Phi-3, Mixtral and Qwen3-MoE
    use it on every layer."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return [window if cfg.model_type in EVERY_LAYER_WINDOW else None] * cfg.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in types[: cfg.num_hidden_layers]]


def sparse_layers(cfg: Any) -> list[bool]:
    """Which layers are mixture-of-experts: Mixtral's all; Qwen3-MoE's those not in mlp_only_layers whose
    (index + 1) is a multiple of decoder_sparse_step (HF's Qwen3MoeDecoderLayer); none for dense families."""
    n = cfg.num_hidden_layers
    if arch_for(cfg).moe is None:
        return [False] * n
    if cfg.model_type == "mixtral":
        return [True] * n
    dense, step = set(getattr(cfg, "mlp_only_layers", None) or ()), int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    experts = moe.expert_config(cfg)[0]
    return [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n)]


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) in float32, cast back, times the weight ("scale")."""

    def __init__(self, dim: int, eps: float, ctx: Ctx, axes: tuple = ("embed",)):
        self.scale = common.param(ctx, (dim,), axes, nnx.initializers.ones)
        self.eps = float(eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.scale.get_value().astype(x.dtype) * h.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: Any, arch: Arch, ctx: Ctx):
        h, d = cfg.hidden_size, head_dim(cfg)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.fused_qkv = arch.fused_qkv
        if arch.fused_qkv:  # one matmul; its packed output dim is never split over `tensor` (ftjax.sharding)
            self.qkv_proj = common.linear(h, (self.heads + 2 * self.kv_heads) * d, ctx, ("embed", "heads"),
                                          use_bias=arch.q_bias)
        else:
            self.q_proj = common.linear(h, self.heads * d, ctx, ("embed", "heads"), use_bias=arch.q_bias)
            self.k_proj = common.linear(h, self.kv_heads * d, ctx, ("embed", "heads"), use_bias=arch.q_bias)
            self.v_proj = common.linear(h, self.kv_heads * d, ctx, ("embed", "heads"), use_bias=arch.q_bias)
        self.o_proj = common.linear(self.heads * d, h, ctx, ("heads", "embed"), use_bias=arch.o_bias)
        if arch.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, ctx, ("kv",))
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, ctx, ("kv",))
        self.qk_norm = arch.qk_norm
        self.dropout = Dropout(float(getattr(cfg, "attention_dropout", 0.0) or 0.0))
        self.scale, self.softcap = d**-0.5, None  # Gemma: query_pre_attn_scalar**-0.5, attn_logit_softcapping

    def __call__(self, x, mask, rope, layer_cache, cache_index, *, deterministic, rngs):
        batch, length = x.shape[:2]
        if self.fused_qkv:
            qkv = self.qkv_proj(x)
            q_end, k_end = self.heads * self.head_dim, (self.heads + self.kv_heads) * self.head_dim
            q, k, v = qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(batch, length, self.heads, self.head_dim)
        k = k.reshape(batch, length, self.kv_heads, self.head_dim)
        v = v.reshape(batch, length, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope[:2]
        q, k = decoder.apply_rope(q, cos, sin), decoder.apply_rope(k, cos, sin)
        if layer_cache is not None:
            layer_cache = decoder.update_cache(layer_cache, k, v, cache_index)
            k, v = layer_cache["k"].astype(q.dtype), layer_cache["v"].astype(q.dtype)
        out = decoder.attend(q, k, v, mask, self.scale, self.dropout, deterministic=deterministic, rngs=rngs,
                             softcap=self.softcap)
        return self.o_proj(out.reshape(batch, length, self.heads * self.head_dim)), layer_cache


class MLP(nnx.Module):
    def __init__(self, cfg: Any, arch: Arch, ctx: Ctx, act: str | None = None):  # act: default cfg.hidden_act
        h, m = cfg.hidden_size, cfg.intermediate_size
        self.fused = arch.fused_gate_up
        if self.fused:  # [gate | up]: HF's gate_up_proj(x).chunk(2)
            self.gate_up_proj = common.linear(h, 2 * m, ctx, ("embed", "mlp"), use_bias=arch.mlp_bias)
        else:
            self.gate_proj = common.linear(h, m, ctx, ("embed", "mlp"), use_bias=arch.mlp_bias)
            self.up_proj = common.linear(h, m, ctx, ("embed", "mlp"), use_bias=arch.mlp_bias)
        self.down_proj = common.linear(m, h, ctx, ("mlp", "embed"), use_bias=arch.mlp_bias)
        self.act = common.activation(act or cfg.hidden_act)

    def __call__(self, x):
        if self.fused:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Any, arch: Arch, ctx: Ctx, window: int | None, sparse: bool = False):
        self.self_attn = Attention(cfg, arch, ctx)
        self.ffn = arch.moe if sparse else "mlp"  # the attribute of its feed-forward block (HF's name)
        if sparse:
            experts, top_k = moe.expert_config(cfg)
            inner = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
            setattr(self, arch.moe, moe.SparseMoeBlock(
                cfg.hidden_size, inner, experts, top_k, bool(getattr(cfg, "norm_topk_prob", True)), cfg.hidden_act,
                arch.expert_names, ctx, jitter=float(getattr(cfg, "router_jitter_noise", 0.0) or 0.0)))
        else:
            self.mlp = MLP(cfg, arch, ctx)
        self.sparse = sparse
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        # Phi-3's resid_pdrop: dropout on the attention and MLP outputs before each residual add (0 for the rest).
        self.resid_dropout = Dropout(float(getattr(cfg, "resid_pdrop", 0.0) or 0.0))
        self.window = window

    def __call__(self, x, mask, rope, layer_cache, cache_index, *, deterministic, rngs):
        a, layer_cache = self.self_attn(self.input_layernorm(x), mask, rope, layer_cache, cache_index,
                                        deterministic=deterministic, rngs=rngs)
        x = x + self.resid_dropout(a, deterministic=deterministic, rngs=rngs)
        h = self.post_attention_layernorm(x)
        if self.sparse:  # rope[2]: which tokens are real (the router's statistics count only those)
            m = getattr(self, self.ffn)(h, rope[2], deterministic=deterministic, rngs=rngs,
                                        record=layer_cache is None)
        else:
            m = getattr(self, self.ffn)(h)
        return x + self.resid_dropout(m, deterministic=deterministic, rngs=rngs), layer_cache


class LlamaModel(nnx.Module):
    """The backbone (HF LlamaModel): embed_tokens, layers, norm."""

    def __init__(self, cfg: Any, ctx: Ctx):
        arch = arch_for(cfg)
        self.embed_tokens = common.embed(cfg.vocab_size, cfg.hidden_size, ctx, ("vocab", "embed"))
        self.windows = tuple(layer_windows(cfg))
        self.scanned = bool(ctx.scan_layers)
        sparse = sparse_layers(cfg)
        if self.scanned:  # one layer's program over params stacked [layers, ...]; the windows stay outside
            self.layers = common.stack_layers([DecoderLayer(cfg, arch, ctx, None) for _ in self.windows])
        else:
            self.layers = nnx.List([DecoderLayer(cfg, arch, ctx, w, s) for w, s in zip(self.windows, sparse)])
        # Mixture of experts: (experts, top_k, router_aux_loss_coef) for the load-balancing loss; None: dense.
        self.moe = (*moe.expert_config(cfg), float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0)) \
            if any(sparse) else None
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        inv_freq, scaling = decoder.rope_parameters(cfg, head_dim(cfg))
        # static: tuples, not array attributes; the third is longrope's long regime (None for other types).
        self.rope = (tuple(float(f) for f in inv_freq), scaling, decoder.rope_long(cfg, head_dim(cfg)))
        self.remat, self.dtype = ctx.remat, ctx.dtype
        self.attention = decoder.AttentionSpec(ctx.attention, cfg.num_attention_heads, cfg.num_key_value_heads,
                                               head_dim(cfg), float(getattr(cfg, "attention_dropout", 0.0) or 0.0))
        self.kv_shape = (cfg.num_key_value_heads, head_dim(cfg))
        self.num_layers = cfg.num_hidden_layers

    def __call__(self, inputs: decoder.DecoderInputs, cache, *, deterministic, rngs):
        x = self.embed_tokens(inputs.input_ids)
        rope = decoder.rope_cos_sin(inputs.position_ids, self.rope[0], self.rope[1], x.dtype, long=self.rope[2],
                                    segments=inputs.segments)
        if self.moe is not None:  # the real tokens (the router's statistics skip padding, as HF's)
            rope = (*rope, inputs.key_valid if cache is None else None)
        x, cache = decoder.run_decoder_layers(self.layers, x, inputs, cache, rope, remat=self.remat,
                                              deterministic=deterministic, rngs=rngs, windows=self.windows,
                                              attention=self.attention)
        return self.norm(x), cache


class LlamaBase(decoder_family.BackboneTask, LlamaModel):
    """task "base": HF LlamaModel itself (params without prefix)."""


class LlamaTask(DecoderTask):
    """LlamaFor{CausalLM,SequenceClassification}: backbone under `model`, plus lm_head (absent when tied)
    or score (no bias)."""

    def __init__(self, cfg: Any, task: str, ctx: Ctx):
        self.model = LlamaModel(cfg, ctx)
        self._init_heads(cfg, task, ctx, tied_default=False)


def check_config(cfg: Any, task: str) -> None:
    """Rejects config features the NNX code does not implement (instead of silently differing)."""
    decoder.check_rope(cfg, head_dim(cfg))
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise UnsupportedModelError(f"config.json: num_attention_heads={cfg.num_attention_heads} is not a multiple "
                                    f"of num_key_value_heads={cfg.num_key_value_heads}")
    if getattr(cfg, "pretraining_tp", 1) not in (1, None):
        raise UnsupportedModelError("config.json: pretraining_tp > 1 is not supported; set it to 1")


FAMILY = decoder_family.family(
    name="llama",
    model_types=("llama", "mistral"),
    base=LlamaBase,
    task_model=LlamaTask,
    dropout_fields={"attention": "attention_dropout"},
    ignore_keys=(r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"(model\.)?rotary_emb\.inv_freq"),
    check_config=check_config,
    scannable=True,
)
