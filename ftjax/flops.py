"""Model FLOPs per training step, counted from the architecture (the device peaks behind MFU: ftjax.peaks),
and the matmul FLOPs of an HLO module (to compare the two: --mode=dry_run).

Only matmuls count (2 x m x n x k each): projections, MLPs, attention scores and their weighted sum, patch
embeddings, and the heads where they are computed. Elementwise work (norms, softmax, activations, the
optimizer update) is left out, as in the usual MFU definitions (PaLM appendix B, Megatron-LM).

The backward pass is trainable-aware, as `ftjax.step` makes XLA compute it: a matmul y = x @ W costs one
more forward-sized matmul for dL/dx when anything below it (in the dataflow) is trainable, and one more for
dL/dW when W is trainable; an activation-activation matmul (attention) one per operand that depends on a
trainable param. Frozen embeddings and lower layers thus drop their weight gradients and every input
gradient below the lowest trainable op; LoRA adds x @ A and (x A) @ B and leaves its base kernel without a
weight gradient. A fully trainable model costs 3x its forward pass.

Attention scores count one (query, key) pair per query and visible key, non-causally (the dense L x L
that XLA computes): L^2 per row, L x min(L, window) under a sliding window (Mistral, Qwen windows), and
per packed segment sum(len_i x min(len_i, window)) when the segment lengths are known.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ftjax import lora as lora_lib
from ftjax import stacking
from ftjax.models import deberta, gemma, llama, modernbert, moe


@dataclasses.dataclass(frozen=True)
class Shape:
    """One training batch: `rows` x `seq_len` tokens. `segment_lengths` (every packed segment's or every
    row's real length, all rows together) or `tokens_per_row` (their mean) leave padding out of the count."""

    rows: int
    seq_len: int
    segment_lengths: tuple[int, ...] | None = None
    tokens_per_row: float | None = None

    @property
    def tokens(self) -> float:
        if self.segment_lengths is not None:
            return float(sum(self.segment_lengths))
        return self.rows * (self.seq_len if self.tokens_per_row is None else float(self.tokens_per_row))

    def pairs(self, window: int | None = None) -> float:
        """(query, visible key) pairs over the batch; a key window caps each query's keys."""
        cap = math.inf if window is None else window
        if self.segment_lengths is not None:
            lengths = np.asarray(self.segment_lengths, np.float64)
            return float((lengths * np.minimum(lengths, cap)).sum())
        per_row = self.seq_len if self.tokens_per_row is None else float(self.tokens_per_row)
        return self.rows * per_row * min(per_row, cap)


def batch_shape(batch: dict) -> Shape:
    """The Shape of a batch as the data pipeline makes it: rows and length from `input_ids` (or the ViT
    patches of `pixel_values`: the model knows those), real lengths from `segment_ids` (packed rows) or
    `attention_mask`."""
    ids = batch.get("input_ids")
    if ids is None:
        rows = int(np.shape(batch["pixel_values"])[0]) if "pixel_values" in batch else 0
        return Shape(rows, 0)
    if np.ndim(ids) == 3:  # preference pairs [B, 2, L]: the model runs 2B rows
        batch = {k: np.reshape(v, (-1, np.shape(v)[-1])) for k, v in batch.items() if np.ndim(v) == 3}
        ids = batch["input_ids"]
    rows, length = (int(d) for d in np.shape(ids)[:2])
    if "segment_ids" in batch:
        seg = np.asarray(batch["segment_ids"])
        starts = np.ones(seg.shape, bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        ids_flat, flat_starts = seg.reshape(-1), starts.reshape(-1)
        run_id = np.cumsum(flat_starts) - 1
        counts = np.bincount(run_id, weights=(ids_flat > 0).astype(np.float64))
        return Shape(rows, length, segment_lengths=tuple(int(c) for c in counts if c > 0))
    if "attention_mask" in batch:
        lengths = np.asarray(batch["attention_mask"]).sum(axis=1)
        return Shape(rows, length, segment_lengths=tuple(int(n) for n in lengths))
    return Shape(rows, length)


@dataclasses.dataclass(frozen=True)
class StepFlops:
    forward: float
    backward: float

    @property
    def train(self) -> float:
        return self.forward + self.backward


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the count needs to know about a model: its HF config, task, tying and LoRA adapters."""

    hf_config: Any
    task: str
    tied: bool | None = None  # decoders' lm_head (None: the config's tie_word_embeddings)
    lora_ranks: tuple[tuple[str, int], ...] = ()  # (module path, rank) of each LoRALinear


def spec_of(model: Any) -> Spec:
    """The Spec of an ftjax model (an HFModel, possibly with LoRA adapters applied). Adapters of a scanned
    stack are named per layer, as the walkers and `Optimizer.trainable_at` name params."""
    stacks = model.stacks() if hasattr(model, "stacks") else {}
    ranks = []
    for path, m in lora_lib.lora_modules(model).items():
        prefix = stacking.stack_of(path, stacks)
        paths = [stacking.layer_path(path, prefix, i) for i in range(stacks[prefix])] if prefix else [path]
        ranks += [(p, m.rank) for p in paths]
    ranks = tuple(ranks)
    return Spec(model.hf_config, model.task, getattr(model, "tied", None), ranks)


class _Counter:
    """Adds up forward and backward matmul FLOPs while a family's forward is walked symbolically. Each
    walker passes a flag per tensor: does it depend on a trainable param (does its gradient get computed)?"""

    def __init__(self, trainable: frozenset[str], lora_ranks: dict[str, int]):
        self.trainable, self.lora = trainable, lora_ranks
        self.forward = self.backward = 0.0

    def trains(self, *paths: str) -> bool:
        return any(p in self.trainable for p in paths)

    def matmul(self, flops: float, *operand_grads: bool) -> bool:
        """An activation-activation matmul; returns whether its output needs a gradient."""
        self.forward += flops
        self.backward += flops * sum(operand_grads)
        return any(operand_grads)

    def linear(self, x: bool, path: str, n: float, din: int, dout: int, weight: str = "kernel") -> bool:
        """x [n, din] @ path/weight [din, dout] (+ bias, + a LoRA adapter when path has one)."""
        flops = 2.0 * n * din * dout
        w = self.trains(f"{path}/{weight}")
        self.forward += flops
        self.backward += flops * (x + w)
        out = x or w or self.trains(f"{path}/bias")
        rank = self.lora.get(path)
        if rank:
            a, b = self.trains(f"{path}/lora_a"), self.trains(f"{path}/lora_b")
            xa = self.matmul(2.0 * n * din * rank, x, a)
            out = self.matmul(2.0 * n * rank * dout, xa, b) or out
        return out

    def norm(self, x: bool, path: str) -> bool:
        return x or self.trains(f"{path}/scale", f"{path}/offset_scale", f"{path}/bias")

    def attention(self, q: bool, k: bool, v: bool, pairs: float, heads: int, head_dim: int) -> bool:
        """softmax(q k^T) v over `pairs` (query, key) pairs: scores, then the weighted sum of values."""
        probs = self.matmul(2.0 * pairs * heads * head_dim, q, k)
        return self.matmul(2.0 * pairs * heads * head_dim, probs, v)


def _prefix(spec: Spec, name: str) -> str:
    return "" if spec.task == "base" else f"{name}/"


def _encoder_layer(c: _Counter, x: bool, names: dict, n: float, pairs: float, post_ln: bool) -> bool:
    """One BERT/DistilBERT/ViT layer; `names` maps the roles to param paths (post_ln: BERT's LN placement)."""
    h, inner = names["hidden"], names["inner"]
    a = x if post_ln else c.norm(x, names["ln_before"])
    q, k, v = (c.linear(a, names[r], n, h, h) for r in ("q", "k", "v"))
    att = c.attention(q, k, v, pairs, names["heads"], h // names["heads"])
    x = c.linear(att, names["o"], n, h, h) or x
    x = c.norm(x, names["ln_attn"]) if post_ln else x
    m = x if post_ln else c.norm(x, names["ln_after"])
    m = c.linear(c.linear(m, names["up"], n, h, inner), names["down"], n, inner, h)
    return c.norm(m or x, names["ln_out"]) if post_ln else (m or x)


def _bert_layer_names(cfg: Any, base: str, self_attention: str) -> dict:
    """`_encoder_layer`'s names shared by BERT (RoBERTa) and ViT, whose HF layer is BERT's: q/k/v under
    attention/`self_attention`; the LayerNorms (BERT's post-LN, ViT's pre-LN) are the caller's."""
    a = f"{base}/attention"
    return {"hidden": cfg.hidden_size, "inner": cfg.intermediate_size, "heads": cfg.num_attention_heads,
            "q": f"{a}/{self_attention}/query", "k": f"{a}/{self_attention}/key", "v": f"{a}/{self_attention}/value",
            "o": f"{a}/output/dense", "up": f"{base}/intermediate/dense", "down": f"{base}/output/dense"}


def _bert(c: _Counter, spec: Spec, shape: Shape) -> None:
    cfg, task = spec.hf_config, spec.task
    kind = "roberta" if cfg.model_type in ("roberta", "xlm-roberta") else "bert"
    p = _prefix(spec, kind)
    emb = f"{p}embeddings"
    x = c.trains(*(f"{emb}/{e}_embeddings/embedding" for e in ("word", "position", "token_type")))
    x = c.norm(x, f"{emb}/LayerNorm")
    h, n, rows = cfg.hidden_size, shape.tokens, shape.rows
    for i in range(cfg.num_hidden_layers):
        base = f"{p}encoder/layer/{i}"
        names = {**_bert_layer_names(cfg, base, "self"), "ln_attn": f"{base}/attention/output/LayerNorm",
                 "ln_out": f"{base}/output/LayerNorm"}
        x = _encoder_layer(c, x, names, n, shape.pairs(), post_ln=True)
    labels = getattr(cfg, "num_labels", 2)
    if task == "base" or (task == "classification" and kind == "bert"):
        pooled = c.linear(x, f"{p}pooler/dense", rows, h, h)
        if task == "classification":
            c.linear(pooled, "classifier", rows, h, labels)
    elif task == "classification":
        c.linear(c.linear(x, "classifier/dense", rows, h, h), "classifier/out_proj", rows, h, labels)
    elif task == "token_classification":
        c.linear(x, "classifier", n, h, labels)
    elif task == "masked_lm":
        head = "cls/predictions/transform" if kind == "bert" else "lm_head"
        t = c.linear(x, f"{head}/dense", n, h, h)
        t = c.norm(t, f"{head}/LayerNorm" if kind == "bert" else f"{head}/layer_norm")
        c.linear(t, f"{emb}/word_embeddings", n, h, cfg.vocab_size, weight="embedding")


def _encoder_head(c: _Counter, x: bool, cfg: Any, task: str, shape: Shape, h: int, pooler: str,
                  transform: tuple[str, str], embedding: str) -> None:
    """DistilBERT's and DeBERTa's heads: classification `pooler` then classifier on the first tokens,
    token_classification classifier on every token, masked_lm the `transform` (dense, norm) then the tied
    `embedding`."""
    n, rows, labels = shape.tokens, shape.rows, getattr(cfg, "num_labels", 2)
    if task == "classification":
        c.linear(c.linear(x, pooler, rows, h, h), "classifier", rows, h, labels)
    elif task == "token_classification":
        c.linear(x, "classifier", n, h, labels)
    elif task == "masked_lm":
        t = c.norm(c.linear(x, transform[0], n, h, h), transform[1])
        c.linear(t, embedding, n, h, cfg.vocab_size, weight="embedding")


def _distilbert(c: _Counter, spec: Spec, shape: Shape) -> None:
    cfg, task = spec.hf_config, spec.task
    p = _prefix(spec, "distilbert")
    emb = f"{p}embeddings"
    x = c.norm(c.trains(f"{emb}/word_embeddings/embedding", f"{emb}/position_embeddings/embedding"),
               f"{emb}/LayerNorm")
    h, n = cfg.dim, shape.tokens
    for i in range(cfg.n_layers):
        base = f"{p}transformer/layer/{i}"
        names = {"hidden": h, "inner": cfg.hidden_dim, "heads": cfg.n_heads,
                 "q": f"{base}/attention/q_lin", "k": f"{base}/attention/k_lin", "v": f"{base}/attention/v_lin",
                 "o": f"{base}/attention/out_lin", "ln_attn": f"{base}/sa_layer_norm", "up": f"{base}/ffn/lin1",
                 "down": f"{base}/ffn/lin2", "ln_out": f"{base}/output_layer_norm"}
        x = _encoder_layer(c, x, names, n, shape.pairs(), post_ln=True)
    _encoder_head(c, x, cfg, task, shape, h, "pre_classifier", ("vocab_transform", "vocab_layer_norm"),
                  f"{emb}/word_embeddings")


def vit_patches(cfg: Any) -> tuple[int, int]:
    """(patches per image, values per patch) of a ViT config."""
    pair = lambda v: (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))
    (ih, iw), (ph, pw) = pair(cfg.image_size), pair(cfg.patch_size)
    return (ih // ph) * (iw // pw), ph * pw * cfg.num_channels


def _vit(c: _Counter, spec: Spec, shape: Shape) -> None:
    cfg, task = spec.hf_config, spec.task
    p = _prefix(spec, "vit")
    patches, per_patch = vit_patches(cfg)
    rows, h = shape.rows, cfg.hidden_size
    n = rows * (patches + 1)  # the [CLS] token joins the patches
    x = c.linear(False, f"{p}embeddings/patch_embeddings/projection", rows * patches, per_patch, h)
    x = x or c.trains(f"{p}embeddings/cls_token", f"{p}embeddings/position_embeddings")
    for i in range(cfg.num_hidden_layers):
        base = f"{p}encoder/layer/{i}"
        names = {**_bert_layer_names(cfg, base, "attention"), "ln_before": f"{base}/layernorm_before",
                 "ln_after": f"{base}/layernorm_after"}
        x = _encoder_layer(c, x, names, n, rows * (patches + 1) ** 2, post_ln=False)
    x = c.norm(x, f"{p}layernorm")
    if task == "base":
        c.linear(x, "pooler/dense", rows, h, getattr(cfg, "pooler_output_size", None) or h)
    else:
        c.linear(x, "classifier", rows, h, cfg.num_labels)


def _decoder_head(c: _Counter, x: bool, spec: Spec, shape: Shape, backbone: str, embedding: str) -> None:
    cfg, h = spec.hf_config, spec.hf_config.hidden_size
    if spec.task == "causal_lm":
        tied = spec.tied if spec.tied is not None else bool(getattr(cfg, "tie_word_embeddings", False))
        if tied:
            c.linear(x, f"{backbone}{embedding}", shape.tokens, h, cfg.vocab_size, weight="embedding")
        else:
            c.linear(x, "lm_head", shape.tokens, h, cfg.vocab_size)
    elif spec.task == "classification":  # score runs on every position; the last real token is picked after
        c.linear(x, "score", shape.tokens, h, cfg.num_labels)


def _gpt2(c: _Counter, spec: Spec, shape: Shape) -> None:
    cfg = spec.hf_config
    p = _prefix(spec, "transformer")
    h, n = cfg.hidden_size, shape.tokens
    inner = cfg.n_inner if cfg.n_inner is not None else 4 * h
    x = c.trains(f"{p}wte/embedding", f"{p}wpe/embedding")
    for i in range(cfg.num_hidden_layers):
        base = f"{p}h/{i}"
        qkv = c.linear(c.norm(x, f"{base}/ln_1"), f"{base}/attn/c_attn", n, h, 3 * h)
        att = c.attention(qkv, qkv, qkv, shape.pairs(), cfg.num_attention_heads, h // cfg.num_attention_heads)
        x = c.linear(att, f"{base}/attn/c_proj", n, h, h) or x
        m = c.linear(c.norm(x, f"{base}/ln_2"), f"{base}/mlp/c_fc", n, h, inner)
        x = c.linear(m, f"{base}/mlp/c_proj", n, inner, h) or x
    _decoder_head(c, c.norm(x, f"{p}ln_f"), spec, shape, p, "wte")


def _llama(c: _Counter, spec: Spec, shape: Shape) -> None:
    """Llama, Mistral, Qwen2, Qwen3, Phi-3 (GQA: k/v project to kv_heads x head_dim; SwiGLU MLP; Phi-3's fused
    qkv_proj and gate_up_proj are one matmul each, whose output feeds all of q/k/v or gate and up)."""
    cfg = spec.hf_config
    p = _prefix(spec, "model")
    h, n, d = cfg.hidden_size, shape.tokens, llama.head_dim(cfg)
    arch, sparse = llama.arch_for(cfg), llama.sparse_layers(cfg)
    heads, kv, inner = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    x = c.trains(f"{p}embed_tokens/embedding")
    for i, window in enumerate(llama.layer_windows(cfg)):
        base = f"{p}layers/{i}"
        a = c.norm(x, f"{base}/input_layernorm")
        if arch.fused_qkv:
            q = k = v = c.linear(a, f"{base}/self_attn/qkv_proj", n, h, (heads + 2 * kv) * d)
        else:
            q = c.norm(c.linear(a, f"{base}/self_attn/q_proj", n, h, heads * d), f"{base}/self_attn/q_norm")
            k = c.norm(c.linear(a, f"{base}/self_attn/k_proj", n, h, kv * d), f"{base}/self_attn/k_norm")
            v = c.linear(a, f"{base}/self_attn/v_proj", n, h, kv * d)
        att = c.attention(q, k, v, shape.pairs(window), heads, d)
        x = c.linear(att, f"{base}/self_attn/o_proj", n, heads * d, h) or x
        m = c.norm(x, f"{base}/post_attention_layernorm")
        if sparse[i]:
            x = _moe_block(c, m, f"{base}/{arch.moe}", arch.expert_names, cfg, n) or x
            continue
        if arch.fused_gate_up:
            gate = up = c.linear(m, f"{base}/mlp/gate_up_proj", n, h, 2 * inner)
        else:
            gate = c.linear(m, f"{base}/mlp/gate_proj", n, h, inner)
            up = c.linear(m, f"{base}/mlp/up_proj", n, h, inner)
        x = c.linear(gate or up, f"{base}/mlp/down_proj", n, inner, h) or x
    _decoder_head(c, c.norm(x, f"{p}norm"), spec, shape, p, "embed_tokens")


def _moe_block(c: _Counter, m: bool, path: str, names: tuple[str, str, str], cfg: Any, n: float) -> bool:
    """A mixture-of-experts block (moe.py) on n tokens: the router, then top_k experts per token. Each expert's
    matmuls run on its own tokens, n * top_k / experts of them on average (the total is exact: n * top_k
    expert passes); an expert whose weights train gets its weight gradient over its share."""
    experts, top_k = moe.expert_config(cfg)
    inner = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    h, share = cfg.hidden_size, n * top_k / experts
    out = c.linear(m, f"{path}/gate", n, h, experts)
    for e in range(experts):
        expert = f"{path}/experts/{e}"
        gate = c.linear(m, f"{expert}/{names[0]}", share, h, inner)
        up = c.linear(m, f"{expert}/{names[1]}", share, h, inner)
        out = c.linear(gate or up, f"{expert}/{names[2]}", share, inner, h) or out
    return out


def _gemma(c: _Counter, spec: Spec, shape: Shape) -> None:
    """Gemma 2 / 3: Llama's matmuls (Gemma 3's q/k norms) with norms after attention and MLP as well, windows
    per layer type; the soft-caps and the embedding scale are elementwise."""
    cfg = spec.hf_config
    p = _prefix(spec, "model")
    h, n, d = cfg.hidden_size, shape.tokens, gemma.head_dim(cfg)
    heads, kv, inner = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    x = c.trains(f"{p}embed_tokens/embedding")
    for i, window in enumerate(gemma.layer_windows(cfg)):
        base = f"{p}layers/{i}"
        a = c.norm(x, f"{base}/input_layernorm")
        q = c.norm(c.linear(a, f"{base}/self_attn/q_proj", n, h, heads * d), f"{base}/self_attn/q_norm")
        k = c.norm(c.linear(a, f"{base}/self_attn/k_proj", n, h, kv * d), f"{base}/self_attn/k_norm")
        v = c.linear(a, f"{base}/self_attn/v_proj", n, h, kv * d)
        att = c.attention(q, k, v, shape.pairs(window), heads, d)
        o = c.linear(att, f"{base}/self_attn/o_proj", n, heads * d, h)
        x = c.norm(o, f"{base}/post_attention_layernorm") or x
        m = c.norm(x, f"{base}/pre_feedforward_layernorm")
        gate = c.linear(m, f"{base}/mlp/gate_proj", n, h, inner)
        up = c.linear(m, f"{base}/mlp/up_proj", n, h, inner)
        down = c.linear(gate or up, f"{base}/mlp/down_proj", n, inner, h)
        x = c.norm(down, f"{base}/post_feedforward_layernorm") or x
    _decoder_head(c, c.norm(x, f"{p}norm"), spec, shape, p, "embed_tokens")


def _modernbert(c: _Counter, spec: Spec, shape: Shape) -> None:
    """ModernBERT: pre-norm layers with a fused Wqkv and a GeGLU Wi [input | gate]; local layers' keys within
    |q - k| < w of each query (2w - 1 of them at most); heads on the pooled rows or on every token."""
    cfg, task = spec.hf_config, spec.task
    p = _prefix(spec, "model")
    h, n, rows, inner = cfg.hidden_size, shape.tokens, shape.rows, int(cfg.intermediate_size)
    emb = f"{p}embeddings"
    x = c.norm(c.trains(f"{emb}/tok_embeddings/embedding"), f"{emb}/norm")
    for i, window in enumerate(modernbert.layer_windows(cfg)):
        base = f"{p}layers/{i}"
        a = c.norm(x, f"{base}/attn_norm") if i > 0 else x
        qkv = c.linear(a, f"{base}/attn/Wqkv", n, h, 3 * h)
        pairs = shape.pairs(None if window is None else 2 * window - 1)
        att = c.attention(qkv, qkv, qkv, pairs, cfg.num_attention_heads, modernbert.head_dim(cfg))
        x = c.linear(att, f"{base}/attn/Wo", n, h, h) or x
        m = c.linear(c.norm(x, f"{base}/mlp_norm"), f"{base}/mlp/Wi", n, h, 2 * inner)
        x = c.linear(m, f"{base}/mlp/Wo", n, inner, h) or x
    x = c.norm(x, f"{p}final_norm")
    if task == "base":
        return
    per = rows if task == "classification" else n  # classification: the head runs on the pooled rows
    t = c.norm(c.linear(x, "head/dense", per, h, h), "head/norm")
    if task == "masked_lm":
        c.linear(t, f"{emb}/tok_embeddings", n, h, cfg.vocab_size, weight="embedding")
    else:
        c.linear(t, "classifier", per, h, cfg.num_labels)


def _deberta(c: _Counter, spec: Spec, shape: Shape) -> None:
    """DeBERTa-v2/v3: BERT's post-LN layer plus the relative terms. Each layer projects the window of relative
    embeddings its length reaches (deberta.window_rows: W rows; pos_key by key_proj or pos_key_proj, pos_query by
    query_proj or pos_query_proj) and scores every token against it (c2p q . pos_key, p2c k . pos_query: 2 x
    tokens x W x hidden each) before the gathers pick per (query, key); the ContextPooler on the first tokens."""
    cfg, task = spec.hf_config, spec.task
    p = _prefix(spec, "deberta")
    emb, h, n, inner = f"{p}embeddings", cfg.hidden_size, shape.tokens, cfg.intermediate_size
    x = c.trains(*(f"{emb}/{e}_embeddings/embedding" for e in ("word", "position", "token_type")))
    if deberta.embedding_size(cfg) != h:
        x = c.linear(x, f"{emb}/embed_proj", n, deberta.embedding_size(cfg), h)
    x = c.norm(x, f"{emb}/LayerNorm")
    types = deberta.pos_att_types(cfg) if deberta.relative_attention(cfg) else ()
    share = bool(getattr(cfg, "share_att_key", False))
    w = deberta.window_rows(cfg, shape.seq_len) if types else 0
    rel = c.norm(c.trains(f"{p}encoder/rel_embeddings/embedding"), f"{p}encoder/LayerNorm")
    for i in range(cfg.num_hidden_layers):
        base = f"{p}encoder/layer/{i}"
        att = f"{base}/attention/self"
        q, k, v = (c.linear(x, f"{att}/{r}_proj", n, h, h) for r in ("query", "key", "value"))
        scores = c.matmul(2.0 * shape.pairs() * h, q, k)
        if "c2p" in types:
            pos_key = c.linear(rel, f"{att}/{'key_proj' if share else 'pos_key_proj'}", w, h, h)
            scores = c.matmul(2.0 * n * w * h, q, pos_key) or scores
        if "p2c" in types:
            pos_query = c.linear(rel, f"{att}/{'query_proj' if share else 'pos_query_proj'}", w, h, h)
            scores = c.matmul(2.0 * n * w * h, k, pos_query) or scores
        a = c.matmul(2.0 * shape.pairs() * h, scores, v)
        x = c.norm(c.linear(a, f"{base}/attention/output/dense", n, h, h) or x, f"{base}/attention/output/LayerNorm")
        m = c.linear(c.linear(x, f"{base}/intermediate/dense", n, h, inner), f"{base}/output/dense", n, inner, h)
        x = c.norm(m or x, f"{base}/output/LayerNorm")
    head = "cls/predictions/transform" if getattr(cfg, "legacy", True) else "lm_predictions/lm_head"
    _encoder_head(c, x, cfg, task, shape, h, "pooler/dense", (f"{head}/dense", f"{head}/LayerNorm"),
                  f"{emb}/word_embeddings")


FAMILIES = {
    "bert": _bert, "roberta": _bert, "xlm-roberta": _bert, "distilbert": _distilbert, "vit": _vit,
    "gpt2": _gpt2, "llama": _llama, "mistral": _llama, "qwen2": _llama, "qwen3": _llama, "phi3": _llama,
    "mixtral": _llama, "qwen3_moe": _llama,
    "modernbert": _modernbert, "gemma2": _gemma, "gemma3_text": _gemma, "deberta-v2": _deberta,
}


def step_flops(model: Any, trainable: frozenset[str] | Sequence[str], shape: Shape,
               reference_forward: bool = False, teacher: Any = None) -> StepFlops:
    """Matmul FLOPs of one training step on `shape` (forward, and backward for the `trainable` param paths,
    '/'-joined as in `Optimizer.trainable_at(step)`). `model`: an ftjax model or a `Spec`. reference_forward:
    the step also runs a reference model's forward on the same rows (DPO's reference: counted as a second
    forward, adapters included, an upper bound by the adapters' share). teacher: a distillation teacher (a model
    or Spec) whose forward on the same rows the step also runs."""
    spec = model if isinstance(model, Spec) else spec_of(model)
    walker = FAMILIES.get(spec.hf_config.model_type)
    if walker is None:
        raise ValueError(f"no FLOP count for model_type {spec.hf_config.model_type!r}; known: {sorted(FAMILIES)}")
    counter = _Counter(frozenset(trainable), dict(spec.lora_ranks))
    walker(counter, spec, shape)
    forward = counter.forward * (2 if reference_forward else 1)
    if teacher is not None:
        forward += step_flops(teacher, frozenset(), shape).forward
    return StepFlops(forward, counter.backward)


# ---- FLOPs of a compiled program (for dry_run's HLO / model FLOP ratio).

# Optimized HLO names values %x; the text of a lowered (unoptimized) module drops the %.
_SHAPE = re.compile(r"%?([\w.\-]+) = \w+\[([\d,]*)\]")
_DOT = re.compile(r"= \w+\[([\d,]*)\]\S* dot\(%?([\w.\-]+), ")


_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_CALLEE = re.compile(r"(calls|to_apply|body|condition)=%?([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_BOUND = re.compile(r"= s32\[\]\S* constant\((\d+)\)")


def hlo_matmul_flops(hlo: str) -> float:
    """2 x output elements x contracted size of every dot in an HLO module, each counted as often as it runs:
    fused and called computations through their callers, while-loop bodies (a scanned layer stack, the CPU
    attention's `lax.map` over chunks) times their trip count. XLA's own cost_analysis counts a loop body once,
    so for a scanned model it misses all layers but one. Give it a lowered module (`lowered.as_text(dialect=
    "hlo")`: the whole mesh's program, with remat's recomputation) or a CPU/GPU compiled one (one device's);
    TPU-compiled programs rewrite dots as windowed convolutions, which this does not count. Fused kernels
    (Pallas custom calls such as splash attention) hide their FLOPs."""
    shapes = {m.group(1): [int(d) for d in m.group(2).split(",") if d] for m in _SHAPE.finditer(hlo)}
    own, calls, bounds, entry, name = {}, {}, {}, None, None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            name = header.group(1)
            own[name], calls[name] = 0.0, []
            entry = name if line.startswith("ENTRY") else entry
            continue
        if name is None:
            continue
        m = _DOT.search(line)
        if m:
            out = math.prod(int(d) for d in m.group(1).split(",") if d)
            dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
            lhs = shapes[m.group(2)]
            own[name] += 2.0 * out * math.prod(lhs[int(i)] for i in dims.split(",") if i)
        bound = _BOUND.search(line)
        if bound:
            bounds.setdefault(name, []).append(int(bound.group(1)))
        trips = _TRIPS.search(line)
        callees = dict((kind, callee) for kind, callee in _CALLEE.findall(line))
        for kind, callee in _CALLEE.findall(line):
            # A while loop runs its body known_trip_count times; TPU programs omit it: then the bound its
            # condition compares the counter with (a scan's length).
            times: Any = 1
            if kind == "body":
                times = int(trips.group(1)) if trips else ("condition", callees.get("condition"), line[:200])
            calls[name].append((callee, times))

    def trip_count(condition: str | None, line: str) -> int:
        found = sorted(set(bounds.get(condition, [])))
        if len(found) != 1:
            raise ValueError(f"hlo_matmul_flops: a while loop without a known trip count: {line}")
        return found[0]

    def total(comp: str) -> float:
        return own[comp] + sum((times if isinstance(times, int) else trip_count(*times[1:])) * total(callee)
                               for callee, times in calls[comp])

    return total(entry)
