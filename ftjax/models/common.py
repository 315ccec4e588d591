"""Building blocks shared by the model families: HF-initialised layers with logical axis names, attention,
padding masks, per-layer remat, and `HFModel`, the base class that carries the contract's attributes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.config.fields import REMAT_POLICIES, remat_policy
from ftjax.hf import UnsupportedModelError

NO_HEAD = r"(?!x)x"  # head_pattern of a task without a head (matches no param path).
AXES = "logical_axes"  # metadata key on every nnx.Param: a tuple of logical axis names (or None) per dim.

def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU as torch computes it, x/2 * (1 + erf(x/sqrt(2))). jax.nn.gelu(approximate=False) uses
    erfc, which XLA expands into two rational approximations, an exp and two divisions, all evaluated
    and selected (several times slower on CPU: benchmarks/README.md, "CPU kernel choices"), and XLA:CPU
    cannot fuse it into the YNNPACK fusion of the FFN matmuls as it does erf. Both agree with torch to 1.5e-6."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_erf,  # HF "gelu" is the exact erf form.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"config.json: activation {name!r} is not implemented; supported: {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[name]


@dataclasses.dataclass
class Ctx:
    """Construction settings passed down the module tree (never stored on modules)."""

    rngs: nnx.Rngs
    dtype: Any = jnp.float32  # compute dtype.
    param_dtype: Any = jnp.float32  # storage dtype.
    init_range: float = 0.02  # HF initializer_range: std of normal init for kernels and embeddings.
    remat: str = "none"  # a REMAT_POLICIES name: what each layer keeps for the backward pass.
    classifier_dropout: float | None = None  # override of the head's dropout rate (None: the family's).
    scan_layers: bool = False  # families that can: one scanned layer over params stacked on a "layers" axis.
    attention: str = "auto"  # model.attention: the decoders' attention kernel (ftjax.models.fused_attention).


def normal_init(std: float) -> Callable:
    return nnx.initializers.normal(stddev=std)


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection on uint32 with full avalanche."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def drop_threshold(rate: float) -> int:
    """The uint32 threshold `keep_mask` drops below: P(bits < threshold) = rate."""
    return min(round(float(rate) * 2**32), 2**32 - 1)


def keep_mask(key: jax.Array, shape: tuple[int, ...], threshold: Any) -> jax.Array:
    """A Bernoulli(1 - rate) mask (`threshold` = drop_threshold(rate), a Python int or a traced uint32) from a
    counter-based hash of each element's global index and a 64-bit seed drawn from `key`.

    Why not `jax.random.bernoulli`: on XLA:CPU generating the bits made dropout a large share of a MiniLM step;
    this hash fuses into the surrounding elementwise loop (benchmarks/README.md, "CPU kernel choices").
    The mask depends only on the key and the element's position, so it is the same under any sharding.
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % 2**32)
        stride *= shape[dim]
    bits = _fmix32(_fmix32(index ^ seed[0]) + seed[1])
    return bits >= jnp.asarray(threshold, jnp.uint32)


# A population whose members differ in dropout (ftjax.tune.population): while one member's step is traced, each
# Dropout module with a `slot` reads that member's rate from here as traced values, (thresholds uint32 [S],
# keep probabilities float32 [S]), instead of its static rate; one compiled program serves every member.
_TRACED_RATES: contextvars.ContextVar[tuple[jax.Array, jax.Array] | None] = contextvars.ContextVar(
    "ftjax_traced_dropout", default=None)


@contextlib.contextmanager
def traced_dropout(thresholds: jax.Array, keeps: jax.Array) -> Iterator[None]:
    """Inside the block, the Dropout module in slot i drops with threshold thresholds[i] and scales by
    1 / keeps[i] (see `Dropout.slot`)."""
    token = _TRACED_RATES.set((thresholds, keeps))
    try:
        yield
    finally:
        _TRACED_RATES.reset(token)


class Dropout(nnx.Dropout):
    """nnx.Dropout with the hash mask of `keep_mask` (same rate, scaling, deterministic and rngs rules).

    When training, each call draws its key even at rate 0, so a model's dropout streams do not depend on which
    rates are 0 (a population member whose rate is traced draws exactly the keys its solo run draws). `slot`
    (set by a population on its shared model; None otherwise): the index of this module's traced rate."""

    slot: int | None = None

    def traced_rate(self) -> tuple[jax.Array, jax.Array] | None:
        """(threshold, keep probability) of this module for the member being traced, else None."""
        rates = _TRACED_RATES.get()
        if rates is None or self.slot is None:
            return None
        return rates[0][self.slot], rates[1][self.slot]

    def active(self, deterministic: bool) -> bool:
        """Whether a call drops anything (static: a traced rate counts as active)."""
        return not deterministic and (self.rate > 0 or self.traced_rate() is not None)

    def draw_key(self, rngs: Any) -> jax.Array | None:
        """The key of one call (advancing the stream), or None without rngs."""
        rngs = self.rngs if rngs is None else rngs
        if rngs is None:
            return None
        if isinstance(rngs, nnx.Rngs):
            return rngs[self.rng_collection]()
        if isinstance(rngs, nnx.RngStream):
            return rngs()
        if isinstance(rngs, jax.Array):
            return rngs
        raise TypeError(f"Dropout needs rngs (nnx.Rngs, RngStream or a key) when training, got {type(rngs)}")

    def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None, rngs: Any = None) -> jax.Array:
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic:
            return inputs
        key = self.draw_key(rngs)
        traced = self.traced_rate()
        if traced is None:
            if self.rate == 0.0:
                return inputs
            if self.rate == 1.0:
                return jnp.zeros_like(inputs)
            threshold, keep = drop_threshold(self.rate), jnp.asarray(1.0 - self.rate, inputs.dtype)
        else:
            threshold, keep = traced[0], traced[1].astype(inputs.dtype)
        if key is None:
            raise TypeError("Dropout needs rngs (nnx.Rngs, RngStream or a key) when training, got None")
        mask = keep_mask(key, inputs.shape, threshold)
        return jax.lax.select(mask, inputs / keep, jnp.zeros_like(inputs))


def dropout_active(dropout: nnx.Dropout, deterministic: bool) -> bool:
    """Whether `dropout` (ftjax's Dropout or a plain nnx.Dropout) drops anything in this call."""
    if isinstance(dropout, Dropout):
        return dropout.active(deterministic)
    return not deterministic and dropout.rate > 0


class Dense(nnx.Linear):
    """nnx.Linear applied to [N, in] rows: [B, L, in] inputs are flattened first, so the kernel gradient is
    one GEMM contracting a single dim. XLA:CPU runs the (batch, length)-contracting dot_general of a 3-D
    input slower in the backward pass (benchmarks/README.md, "CPU kernel choices")."""

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        if inputs.ndim <= 2:
            return super().__call__(inputs, out_sharding)
        lead = inputs.shape[:-1]
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]), out_sharding)
        return y.reshape(*lead, y.shape[-1])


def linear(din: int, dout: int, ctx: Ctx, axes: tuple, use_bias: bool = True) -> nnx.Linear:
    """Dense (an nnx.Linear) with HF init (normal(initializer_range) kernel, zero bias) and logical axes."""
    return Dense(
        din,
        dout,
        use_bias=use_bias,
        dtype=ctx.dtype,
        param_dtype=ctx.param_dtype,
        kernel_init=normal_init(ctx.init_range),
        bias_init=nnx.initializers.zeros,
        kernel_metadata={AXES: tuple(axes)},
        bias_metadata={AXES: (axes[1],)},
        rngs=ctx.rngs,
    )


def layer_norm(dim: int, eps: float, ctx: Ctx, use_bias: bool = True) -> nnx.LayerNorm:
    """LayerNorm with the config's eps; statistics as torch computes them (mean of squared deviations).
    use_bias=False: no bias param (torch's LayerNorm(bias=False), ModernBERT's norm_bias)."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        dtype=ctx.dtype,
        param_dtype=ctx.param_dtype,
        use_bias=use_bias,
        use_fast_variance=False,
        scale_metadata={AXES: ("embed",)},
        bias_metadata={AXES: ("embed",)},
        rngs=ctx.rngs,
    )


def embed(num: int, dim: int, ctx: Ctx, axes: tuple = (None, "embed")) -> nnx.Embed:
    return nnx.Embed(
        num,
        dim,
        dtype=ctx.dtype,
        param_dtype=ctx.param_dtype,
        embedding_init=normal_init(ctx.init_range),
        embedding_metadata={AXES: tuple(axes)},
        rngs=ctx.rngs,
    )


def param(ctx: Ctx, shape: tuple, axes: tuple, init: Callable | None = None) -> nnx.Param:
    init = init or normal_init(ctx.init_range)
    return nnx.Param(init(ctx.rngs.params(), shape, ctx.param_dtype), **{AXES: tuple(axes)})


def mask_bias(attention_mask: jax.Array | None) -> jax.Array | None:
    """[B, L] 1/0 padding mask -> additive float32 bias [B, 1, 1, L] (0 or the float32 minimum), as HF."""
    if attention_mask is None:
        return None
    return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def segment_bias(segment_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Packed rows: [B, L] segment ids (1.. per example, 0 = padding; attention_mask 0 also counts as
    padding) -> additive float32 bias [B, 1, L, L], 0 where query and key share a segment. A token sees only
    its own example; padding sees only padding (so no softmax is all-masked) and nothing sees padding."""
    seg = jnp.asarray(segment_ids)
    if attention_mask is not None:
        seg = jnp.where(jnp.asarray(attention_mask) > 0, seg, 0)
    same = seg[:, None, :, None] == seg[:, None, None, :]
    return jnp.where(same, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 where each packed segment starts (segments are contiguous runs)."""
    length = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    starts = jnp.where(segment_ids != prev, idx, 0)
    return idx - jax.lax.cummax(starts, axis=1)


def first_tokens(x: jax.Array, segment_starts: jax.Array | None) -> jax.Array:
    """The token a classification head reads: x[:, 0] ([B, H]), or of a packed row each example's first
    token at `segment_starts` [B, S] ([B, S, H])."""
    if segment_starts is None:
        return x[:, 0]
    return jnp.take_along_axis(x, jnp.asarray(segment_starts, jnp.int32)[:, :, None], axis=1)


def check_packed(task: str, segment_ids: Any, segment_starts: Any) -> None:
    """Packed classification needs segment_ids and segment_starts together (the head reads each example's
    first token); token tasks need only segment_ids (attention and positions)."""
    if task == "classification" and (segment_ids is None) != (segment_starts is None):
        raise ValueError("packed classification needs segment_ids [B, L] and segment_starts [B, S] together "
                         f"(got segment_ids={segment_ids is not None}, segment_starts={segment_starts is not None})")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    dropout: nnx.Dropout,
    *,
    deterministic: bool,
    rngs: nnx.Rngs | None,
    scale: float | None = None,
) -> jax.Array:
    """Scaled dot-product attention on [B, L, H, D] inputs; softmax in float32; returns [B, L, H, D].
    `scale` multiplies q k^T (None: 1 / sqrt(D); DeBERTa's 1 / sqrt(D * (1 + its relative terms))); `bias` is
    added to the scaled scores.

    Without active attention dropout this is jax.nn.dot_product_attention (fused kernels where the backend
    has them; on CPU float32 `chunked_attention`); with dropout, `softmax_attention` with the probabilities
    dropped.
    """
    if not dropout_active(dropout, deterministic):
        if not deterministic and isinstance(dropout, Dropout):
            dropout.draw_key(rngs)  # the stream advances as when the rate is not 0
        if bias is not None:  # the float32 minimum would overflow to -inf in bf16/fp16 (NaN on all-pad rows)
            bias = jnp.maximum(bias, jnp.finfo(q.dtype).min).astype(q.dtype)
        if jax.default_backend() == "cpu" and q.dtype == jnp.float32:
            return chunked_attention(q, k, v, bias, scale=scale)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale)
    return softmax_attention(q, k, v, bias, lambda probs: dropout(probs, deterministic=False, rngs=rngs), scale=scale)


def softmax_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, drop: Callable | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Attention on [..., L, H, D] inputs as heads-major batched matmuls: QK^T (float32 scores and softmax),
    `drop` on the probabilities, then PV; returns [..., L, H, D].

    Heads-major ([..., H, L, D] operands, transposed once) rather than einsums on [B, L, H, D]: XLA:CPU runs
    the latter as strided, transposing batched matmuls (the timings: benchmarks/README.md, "CPU kernel
    choices")."""
    scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, q.dtype)
    scores = jnp.matmul(jnp.swapaxes(q, -3, -2) * scale, jnp.moveaxis(k, -3, -1), preferred_element_type=jnp.float32)
    if bias is not None:
        scores = scores + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if drop is not None:
        probs = drop(probs)
    return jnp.swapaxes(jnp.matmul(probs, jnp.swapaxes(v, -3, -2)), -3, -2)


ATTENTION_SCORES_BYTES = 64 * 2**20  # the most float32 scores [n, H, Lq, Lk] one chunk of examples holds


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
                      scale: float | None = None) -> jax.Array:
    """`softmax_attention` for XLA:CPU inference over chunks of examples whose scores fit in
    ATTENTION_SCORES_BYTES (MiniLM at 32 x 128: one chunk, 25 MB; a 2k-token model: one example at a time,
    so memory stays bounded by one example's scores). On a quiet 2-core AVX-512 Xeon the MiniLM forward at
    32 x 128 went from 1.26-1.30x to 1.15-1.20x torch's time (jax.nn.dot_product_attention one example at
    a time before). float32 only (XLA:CPU rejects the f16 dot)."""
    b, lq, heads, _ = q.shape
    if bias is not None:
        bias = jnp.broadcast_to(bias, (b, *bias.shape[1:]))
    chunk = max(1, ATTENTION_SCORES_BYTES // (4 * heads * lq * k.shape[1]))
    if chunk >= b:
        return softmax_attention(q, k, v, bias, scale=scale)
    return jax.lax.map(lambda xs: softmax_attention(*xs, scale=scale), (q, k, v, bias), batch_size=chunk)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def merge_heads(x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def run_layers(
    layers: nnx.List,
    h: jax.Array,
    bias: jax.Array | None,
    *,
    remat: str,
    deterministic: bool,
    rngs: nnx.Rngs | None,
) -> jax.Array:
    """Applies the layers in order; `remat` (a REMAT_POLICIES name) says what each layer keeps for the
    backward pass."""

    def apply(layer, x, b, r):
        return layer(x, b, deterministic=deterministic, rngs=r)

    step = with_remat(apply, remat)
    record_hidden(h)
    for layer in layers:
        h = step(layer, h, bias, rngs)
        record_hidden(h)
    return h


def remat_name(value: Any) -> str:
    """A REMAT_POLICIES name from model.remat (ftjax.config.remat_policy; True = full, False = none)."""
    name = remat_policy(value)
    if name is None:
        raise ValueError(f"model.remat={value!r} is invalid: one of {', '.join(REMAT_POLICIES)}")
    return name


def checkpoint_policy(name: str) -> Callable | None:
    """The jax.checkpoint policy of a remat name ("none" is not checkpointed at all; "full" saves nothing):
    dots saves every matmul output, dots_no_batch those without batch dims (the projections, not attention
    scores), offload moves those to pinned host memory instead of keeping them on the device."""
    cp = jax.checkpoint_policies
    return {
        "full": cp.nothing_saveable,
        "dots": cp.checkpoint_dots,
        "dots_no_batch": cp.checkpoint_dots_with_no_batch_dims,
        "offload": cp.offload_dot_with_no_batch_dims("device", "pinned_host"),
    }[remat_name(name)]


def with_remat(fn: Callable, remat: Any) -> Callable:
    """`fn` (taking a module first) under nnx.remat with the named policy; `fn` itself for "none"."""
    name = remat_name(remat)
    return fn if name == "none" else nnx.remat(fn, policy=checkpoint_policy(name))


STACK_AXIS = "layers"  # the logical name of a stacked layer axis (replicated: DEFAULT_RULES in ftjax.sharding)


def stack_layers(layers: list[nnx.Module], axis: str = STACK_AXIS) -> nnx.Module:
    """One module holding `layers`' params stacked on a leading `axis` (logical name: "layers", or "expert" for
    a mixture-of-experts block's experts; built abstractly, under nnx.eval_shape, like every model: values come
    from the checkpoint). The layers must have the same structure; per-layer differences (e.g. sliding windows)
    must live outside the layer. The result has `stack_size` (the number of layers), which `HFModel.stacks()`
    finds: its HF keys are read and written one layer (expert) at a time."""
    graphdef, _ = nnx.split(layers[0])
    states = [nnx.split(layer)[1] for layer in layers]
    try:
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)
    except ValueError as e:
        raise UnsupportedModelError(f"the layers of this model differ in structure and cannot be scanned ({e}); "
                                    "set model.scan_layers=false") from None
    for _, variable in nnx.iter_graph(stacked):
        if isinstance(variable, nnx.Param):
            axes = variable.get_metadata().get(AXES) or (None,) * (variable.get_value().ndim - 1)
            variable.set_metadata(AXES, (axis, *axes))
    stack = nnx.merge(graphdef, stacked)
    stack.stack_size = len(layers)
    return stack


def scan_layers(stack: nnx.Module, h: jax.Array, xs: Any, body: Callable, *, remat: Any) -> tuple[jax.Array, Any]:
    """Runs `body(layer, h, i, x_i) -> (h, y_i)` over the layers of a `stack_layers` module with jax.lax.scan:
    one traced layer whatever the depth. xs: per-layer inputs (leading axis = layers) or None; returns
    (h, ys). With remat each layer is checkpointed with the named policy; hidden states are recorded per
    layer, and `layer_index()` is the (traced) index of the layer being run."""
    graphdef, state = nnx.split(stack)
    recording = _HIDDEN.get() is not None

    def step(carry, layer_xs):
        layer_state, i, x = layer_xs
        token = _LAYER.set(i)
        try:
            out, y = body(nnx.merge(graphdef, layer_state), carry, i, x)
        finally:
            _LAYER.reset(token)
        return out, (y, out if recording else None)

    name = remat_name(remat)
    if name != "none":
        step = jax.checkpoint(step, policy=checkpoint_policy(name), prevent_cse=False)
    record_hidden(h)
    index = jnp.arange(stack.stack_size, dtype=jnp.int32)
    h, (ys, hidden) = jax.lax.scan(step, h, (state, index, xs))
    if recording:
        for i in range(hidden.shape[0]):
            record_hidden(hidden[i])
    return h, ys


_LAYER: contextvars.ContextVar[Any] = contextvars.ContextVar("ftjax_layer_index", default=None)


def layer_index() -> Any:
    """Inside a scanned stack's layer: the index of the layer being run (a traced int32); else None. Lets a
    module shared by all layers of a stack (a LoRA adapter's dropout) draw per-layer randomness."""
    return _LAYER.get()


def layer_rngs(rngs: nnx.Rngs | None, deterministic: bool) -> Callable[[Any], nnx.Rngs | None]:
    """Per-layer dropout streams: layer i draws from fold_in(key, i) of one key taken from `rngs`, the same
    in an unrolled loop and a scan (where the layers cannot share one mutable Rngs)."""
    if rngs is None or deterministic:
        return lambda i: None
    key = rngs.dropout()
    return lambda i: nnx.Rngs(dropout=jax.random.fold_in(key, i))


# `output_hidden_states=True` on a task model's call: while its backbone runs, the layer loops record the
# first layer's input (the embeddings) and each layer's output here, as HF's `hidden_states` tuple. A
# context variable (as lora.py's dropout key) keeps the modules' signatures and outputs otherwise unchanged.
_HIDDEN: contextvars.ContextVar[list | None] = contextvars.ContextVar("ftjax_hidden_states", default=None)


@contextlib.contextmanager
def collect_hidden_states(enabled: bool) -> Iterator[list | None]:
    """Yields the list the layer loops append to inside the block (None when not `enabled`)."""
    if not enabled:
        yield None
        return
    states: list = []
    token = _HIDDEN.set(states)
    try:
        yield states
    finally:
        _HIDDEN.reset(token)


def record_hidden(h: jax.Array) -> None:
    states = _HIDDEN.get()
    if states is not None:
        states.append(h)


def with_hidden_states(out: dict, hidden: list | None) -> dict:
    """`out` plus "hidden_states" (a tuple: embeddings, then each layer's output) when they were collected."""
    if hidden is not None:
        out["hidden_states"] = tuple(hidden)
    return out


class Info:
    """Static facts about a model (hf_config, load report); hashed by identity so graphdefs stay hashable."""

    def __init__(self, hf_config: Any):
        self.hf_config = hf_config
        self.load_report: dict[str, Any] = {}


class HFModel(nnx.Module):
    """Base of every ftjax task model: the attributes and methods of the Model contract."""

    family: str
    task: str
    head_pattern: str
    info: Info

    @property
    def hf_config(self) -> Any:
        return self.info.hf_config

    @property
    def load_report(self) -> dict[str, Any]:
        return self.info.load_report

    def logical_axes(self) -> dict[str, tuple]:
        """{param path: tuple of logical axis names (or None) per dim} for every nnx.Param."""
        out = {}
        for path, node in nnx.iter_graph(self):
            if isinstance(node, nnx.Param):
                axes = node.get_metadata().get(AXES)
                out["/".join(str(p) for p in path)] = tuple(axes) if axes else (None,) * node.get_value().ndim
        return out

    def stacks(self) -> dict[str, int]:
        """{module path: number of layers} of the scanned layer stacks (`stack_layers`); {} when unrolled."""
        return {"/".join(str(p) for p in path): int(node.stack_size) for path, node in nnx.iter_graph(self)
                if isinstance(node, nnx.Module) and isinstance(getattr(node, "stack_size", None), int)}

    def export_params(self, params: dict | None = None) -> dict:
        """The values an HF checkpoint of this model holds: `params` (a nested dict as from
        `ftjax.params.split`) or the module's own. A LoRA model (ftjax.lora) returns them merged."""
        return nnx.state(self, nnx.Param).to_pure_dict() if params is None else params

    def _set_info(self, family: str, task: str, head_pattern: str, hf_config: Any) -> None:
        self.family, self.task, self.head_pattern = family, task, head_pattern
        self.info = Info(hf_config)


def text_inputs(
    input_ids: jax.Array | None, attention_mask: jax.Array | None, token_type_ids: jax.Array | None,
    position_ids: jax.Array | None,
) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array]:
    """Validated text inputs with HF defaults (token types 0, positions 0..L-1)."""
    if input_ids is None:
        raise ValueError("input_ids is required for a text model (got None)")
    input_ids = jnp.asarray(input_ids)
    batch, length = input_ids.shape
    if token_type_ids is None:
        token_type_ids = jnp.zeros((batch, length), jnp.int32)
    if position_ids is None:
        position_ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return input_ids, attention_mask, token_type_ids, position_ids
