"""Fused causal attention for accelerators (no KV cache): TPU Pallas splash attention and GPU cuDNN flash
attention behind one call, and the choice of `model.attention` (auto | xla | splash | cudnn) with reasons.

Why jax's own splash kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) and not tokamax: it ships
with jax (no new dependency), takes packed segment ids natively (`SegmentIds`, no [B, L, L] mask), has
lazy causal / local masks with block skipping, grouped-query heads in its multi-head form, a fused backward
kernel, Pallas interpret mode for CPU tests, and it is what MaxText trains with. tokamax 0.0.12 wraps a fork
of the same kernel behind the `jax.nn.dot_product_attention` API, which has no segment ids (packing would
need a dense mask), and pulls pydantic, qwix, jaxtyping and a pinned typeguard into a 0.0.x API.

Masks are those of `decoder.DecoderInputs.mask(window)`: key k is visible from query q iff k <= q,
q - window < k (with a window), key_valid[k], and segment[q] == segment[k]. Rows with no visible key (a
query before the first valid key, or a padding query of a packed row) come out finite but are not equal
to the XLA path's (which averages every value there): the losses mask those rows, so their values and
gradients never reach the parameters (the tests pin finiteness and the equality of every other row).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ftjax.config.fields import ATTENTION_IMPLEMENTATIONS

IMPLEMENTATIONS = ATTENTION_IMPLEMENTATIONS  # model.attention's values, declared with the field
BATCH_AXES = ("data", "fsdp")  # as ftjax.sharding.BATCH_AXES (the batch is split over these mesh axes)
HEAD_AXIS = "tensor"  # as ftjax.sharding.DEFAULT_RULES["heads"]
SPLASH_BLOCKS = (512, 256, 128)  # tried in order; the first that divides the length is used
SPLASH_MAX_HEAD_DIM = 256  # v5e AOT compiles fwd + bwd for head dims 4..256 (not only multiples of 128)
CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper and later; 128 holds on every GPU cuDNN flash attention runs on


def _gpu(platform: str) -> bool:
    return platform in ("gpu", "cuda")


def target_platform() -> str:
    """The platform programs are built for: the devices of the current `jax.set_mesh` (a TPU topology's when
    compiling ahead of time on a CPU), else jax.default_backend()."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def unsupported_reason(implementation: str, *, q_shape: Sequence[int], kv_heads: int, dtype: Any,
                       platform: str | None = None, has_dropout: bool = False, window: int | None = None,
                       packed: bool = False, softcap: bool = False) -> str | None:
    """Why `implementation` cannot run causal self-attention of q [B, L, H, D] (None: it can). `platform` is a
    jax platform name (default: target_platform()); `packed`: segment ids or key padding are given;
    `softcap`: the scores are soft-capped (Gemma 2's attn_logit_softcapping)."""
    if implementation not in IMPLEMENTATIONS:
        return f"unknown implementation (valid: {', '.join(IMPLEMENTATIONS)})"
    if implementation in ("auto", "xla"):
        return None
    platform = platform or target_platform()
    batch, length, heads, head_dim = (int(s) for s in q_shape)
    dtype = jnp.dtype(dtype)
    if has_dropout:
        return "attention dropout cannot run inside the fused kernels (it needs the probability matrix)"
    if softcap:
        return "attention logit soft-capping (config.json attn_logit_softcapping) is not in the fused kernels"
    if kv_heads < 1 or heads % kv_heads:
        return f"{heads} query heads are not a multiple of {kv_heads} kv heads"
    if window is not None and window < 1:
        return f"sliding window {window} must be >= 1"
    if implementation == "splash":
        if platform != "tpu":
            return f"splash attention is a TPU kernel and the backend is {platform}"
        if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
            return f"splash attention takes bfloat16 or float32, not {dtype}"
        if length % 128:
            return f"sequence length {length} is not a multiple of 128 (the kernel's block size)"
        if head_dim > SPLASH_MAX_HEAD_DIM:
            return f"head dim {head_dim} > {SPLASH_MAX_HEAD_DIM}, the largest compiled and tested here"
        return None
    # cudnn
    if not _gpu(platform):
        return f"cuDNN flash attention needs an NVIDIA GPU and the backend is {platform}"
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN flash attention takes bfloat16 or float16, not {dtype}"
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return f"head dim {head_dim} must be a multiple of 8 and <= {CUDNN_MAX_HEAD_DIM}"
    if packed and length % 2:
        return f"a padding/segment mask needs an even sequence length, got {length}"
    return None


def resolve(requested: str, *, q_shape: Sequence[int], kv_heads: int, dtype: Any, platform: str | None = None,
            has_dropout: bool = False, window: int | None = None, packed: bool = False,
            softcap: bool = False) -> str:
    """The implementation for `model.attention=requested`: auto = splash on TPU, cudnn on a GPU where the
    shapes allow, else xla; an explicit kernel that cannot run raises a one-line ValueError."""
    platform = platform or target_platform()
    args = dict(q_shape=q_shape, kv_heads=kv_heads, dtype=dtype, platform=platform, has_dropout=has_dropout,
                window=window, packed=packed, softcap=softcap)
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={requested!r} is not valid; use one of {', '.join(IMPLEMENTATIONS)}")
    if requested == "xla":
        return "xla"
    if requested == "auto":
        kernel = "splash" if platform == "tpu" else "cudnn" if _gpu(platform) else None
        return kernel if kernel and unsupported_reason(kernel, **args) is None else "xla"
    reason = unsupported_reason(requested, **args)
    if reason is not None:
        fix = ("set model.dropout.attention=0.0 (the checkpoint's rate applies when None), or model.attention=auto "
               "(falls back to xla)" if has_dropout else "use model.attention=auto (picks what runs) or xla")
        raise ValueError(f"model.attention={requested!r} cannot run: {reason}; fix: {fix}")
    return requested


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, implementation: str,
                    segment_ids: jax.Array | None = None, key_valid: jax.Array | None = None,
                    window: int | None = None, interpret: bool = False) -> jax.Array:
    """Causal grouped-query self-attention without a cache. q [B, L, H, D], k/v [B, L, KVH, D] (query head h
    uses kv head h // (H // KVH)), segment_ids int [B, L] (0 = padding), key_valid bool [B, L], window as
    `DecoderInputs.mask`. Returns [B, L, H, D] in q's dtype. `interpret` runs splash in Pallas interpret mode
    (CPU tests). Under `jax.set_mesh`, splash runs per shard (shard_map over the batch axes and `tensor`)."""
    batch, length, heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, length) or k.shape[3] != head_dim:
        raise ValueError(f"fused_attention: k {k.shape} and v {v.shape} must be [B, L, KVH, D] for q {q.shape}")
    packed = segment_ids is not None or key_valid is not None
    platform = "tpu" if implementation == "splash" and interpret else target_platform()
    reason = unsupported_reason(implementation, q_shape=q.shape, kv_heads=k.shape[2], dtype=q.dtype,
                                platform=platform, window=window, packed=packed)
    if reason is not None or implementation in ("auto", "xla"):
        raise ValueError(f"model.attention={implementation!r} cannot run in fused_attention: "
                         f"{reason or 'resolve() first; xla is decoder.attend'}")
    if window is not None and window >= length:
        window = None  # the window covers the whole causal row
    valid = _key_valid(segment_ids, key_valid, (batch, length))
    if implementation == "cudnn":
        return _cudnn(q, k, v, scale, segment_ids, valid, window)
    return _splash(q, k, v, scale, segment_ids, valid, window, interpret)


def _key_valid(segment_ids: jax.Array | None, key_valid: jax.Array | None, shape: tuple) -> jax.Array | None:
    valid = None if key_valid is None else jnp.asarray(key_valid).astype(bool)
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        if segment_ids.shape != shape:
            raise ValueError(f"segment_ids must be [B, L] = {shape}, got {segment_ids.shape}")
        valid = segment_ids > 0 if valid is None else valid & (segment_ids > 0)
    if valid is not None and valid.shape != shape:
        raise ValueError(f"key_valid must be [B, L] = {shape}, got {valid.shape}")
    return valid


def _cudnn(q, k, v, scale, segment_ids, valid, window):
    mask = None
    if valid is not None:  # jax.nn exposes no packed offsets: a [B, 1, L, L] mask (cuDNN adds it as a bias)
        mask = valid[:, None, None, :]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
    local = None if window is None else (window - 1, 0)  # sees q - window < k <= q
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True, local_window_size=local,
                                        implementation="cudnn")


def splash_block(length: int) -> int:
    """The splash block size for a sequence length (a multiple of 128)."""
    return next(b for b in SPLASH_BLOCKS if length % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(length: int, heads: int, window: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = splash_block(length)
    shape = (length, length)
    mask = splash.CausalMask(shape) if window is None else splash.LocalMask(shape, (window - 1, 0), offset=0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, scale, segment_ids, valid, window, interpret):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, length, heads, _ = q.shape
    kv_heads = k.shape[2]
    seg_q = seg_kv = None
    if valid is not None:  # a key is visible iff seg_q[q] == seg_kv[k]: invalid keys get -1, never matched
        seg = jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        seg_q, seg_kv = seg, jnp.where(valid, seg, -1)
    q = (q * jnp.asarray(scale, q.dtype)).swapaxes(1, 2)  # [B, H, L, D]; splash does not scale
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    batch_axes, head_axis = _mesh_axes(batch, heads, kv_heads)
    shard_heads = heads // (1 if head_axis is None else jax.sharding.get_abstract_mesh().shape[head_axis])
    kernel = _splash_kernel(length, shard_heads, window, interpret)

    def run(q, k, v, seg_q, seg_kv):
        if seg_q is None:
            return jax.vmap(kernel)(q, k, v)
        return jax.vmap(kernel)(q, k, v, splash.SegmentIds(q=seg_q, kv=seg_kv))

    if batch_axes or head_axis:
        qkv = P(batch_axes or None, head_axis)
        seg = None if seg_q is None else P(batch_axes or None)
        run = jax.shard_map(run, in_specs=(qkv, qkv, qkv, seg, seg), out_specs=qkv, check_vma=False)
    return run(q, k, v, seg_q, seg_kv).swapaxes(1, 2)


def _mesh_axes(batch: int, heads: int, kv_heads: int) -> tuple[tuple[str, ...], str | None]:
    """The mesh axes of the current `jax.set_mesh` to split the kernel's batch and heads over (none: one call)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), None
    free = {a: n for a, n in mesh.shape.items() if a not in mesh.manual_axes and n > 1}
    batch_axes = tuple(a for a in BATCH_AXES if a in free)
    if batch_axes and batch % int(np.prod([free[a] for a in batch_axes])):
        batch_axes = tuple(a for a in batch_axes if batch % free[a] == 0)[:1]
    head_axis = HEAD_AXIS if HEAD_AXIS in free and heads % free[HEAD_AXIS] == 0 == kv_heads % free[HEAD_AXIS] \
        else None
    return batch_axes, head_axis
