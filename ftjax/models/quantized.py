"""A frozen base stored in 8 or 4 bits (QLoRA, Dettmers et al. 2023): block-wise absmax int8 and NF4, with
optional double quantisation of the block scales, and `QuantizedLinear`, the frozen Linear that holds them.

Why here and not qwix: ftjax's loader quantises each checkpoint tensor as it is read (host memory about one
tensor, the full-precision base never exists on the device), LoRA wraps the quantised layer in its own
`LoRALinear`, scanned stacks keep their leading layer axis, and export dequantises into the HF layout. qwix
quantises a model already built in full precision through its own LoRA provider, which would bypass all
three; the format itself is a few lines.

Layout of a kernel [..., in, out] (ftjax's layout; leading axes: a scanned stack's layers): blocks of `block`
consecutive inputs per output column, i.e. exactly bitsandbytes' blocks of the [out, in] torch weight. `in` is
padded to a multiple of the block with zeros. Leaves (nnx.Params, never trained):
  kernel_q       int8: int8 [..., in_p, out];  nf4: uint8 [..., in_p / 2, out] (two 4-bit codes, rows 2i, 2i+1)
  kernel_absmax  float32 [..., in_p / block, out]  (double quantisation: int8 codes of absmax - mean, with
  kernel_absmax_scale float32 [..., in_p / block, ceil(out / 256)] per 256 columns and kernel_absmax_mean [...])
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.models.common import AXES

QTYPES = ("int8", "nf4")
# NF4: the 16 quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA appendix E; bitsandbytes).
NF4_CODE = np.asarray([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
_NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
SCALE_BLOCK = 256  # double quantisation: one float32 scale per 256 block scales (QLoRA's choice).
LEAVES = ("kernel_q", "kernel_absmax", "kernel_absmax_q", "kernel_absmax_scale", "kernel_absmax_mean")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How the frozen base is stored: qtype ("int8" | "nf4"), inputs per block, double quantisation."""

    qtype: str
    block: int = 64
    double: bool = False

    def __post_init__(self):
        if self.qtype not in QTYPES:
            raise ValueError(f"quantisation type {self.qtype!r}: one of {QTYPES}")
        if self.block < 2 or self.block % 2:
            raise ValueError(f"quantisation block {self.block}: an even number >= 2")

    def bound(self) -> float:
        """Worst-case |dequantised - original| per unit of the block's absmax (half the widest code gap)."""
        if self.qtype == "int8":
            return 0.5 / 127
        return float(np.max(np.diff(NF4_CODE))) / 2

    def leaves(self) -> tuple[str, ...]:
        scales = ("kernel_absmax_q", "kernel_absmax_scale", "kernel_absmax_mean") if self.double else ("kernel_absmax",)
        return ("kernel_q", *scales)


def spec_of(lora_cfg: Any) -> QuantSpec | None:
    """The QuantSpec of optim.lora (quantize_base, quantize_block, double_quant), None when the base is not quantised."""
    qtype = lora_cfg["quantize_base"] if "quantize_base" in lora_cfg else ""
    if not qtype:
        return None
    return QuantSpec(qtype, int(lora_cfg["quantize_block"]), bool(lora_cfg["double_quant"]))


def padded_inputs(din: int, block: int) -> int:
    return -(-din // block) * block


# ----------------------------------------------------------------------------------------------------
# Host side: one tensor at a time, as the loader reads it.


def quantize(kernel: Any, spec: QuantSpec) -> dict[str, np.ndarray]:
    """The leaves of one kernel [..., in, out] (numpy, float32 math)."""
    w = np.asarray(kernel, np.float32)
    *lead, din, dout = w.shape
    pad = padded_inputs(din, spec.block) - din
    if pad:
        w = np.concatenate([w, np.zeros((*lead, pad, dout), np.float32)], axis=-2)
    blocks = w.reshape(*lead, -1, spec.block, dout)
    absmax = np.abs(blocks).max(axis=-2)  # [..., nb, out]
    safe = np.where(absmax > 0, absmax, 1.0)[..., None, :]
    normed = blocks / safe
    if spec.qtype == "int8":
        codes = np.clip(np.rint(normed * 127), -127, 127).astype(np.int8).reshape(w.shape)
    else:
        nibbles = np.searchsorted(_NF4_MIDPOINTS, normed).astype(np.uint8).reshape(w.shape)
        codes = (nibbles[..., 0::2, :] | (nibbles[..., 1::2, :] << 4)).astype(np.uint8)
    out = {"kernel_q": codes}
    if not spec.double:
        out["kernel_absmax"] = absmax.astype(np.float32)
        return out
    mean = absmax.mean(axis=(-2, -1))  # [...]
    centred = absmax - mean[..., None, None]
    groups = -(-dout // SCALE_BLOCK)
    padded = np.concatenate([centred, np.zeros((*centred.shape[:-1], groups * SCALE_BLOCK - dout), np.float32)], -1)
    grouped = padded.reshape(*centred.shape[:-1], groups, SCALE_BLOCK)
    scale = np.abs(grouped).max(axis=-1) / 127  # [..., nb, groups]
    q = np.rint(grouped / np.where(scale > 0, scale, 1.0)[..., None]).astype(np.int8)
    out["kernel_absmax_q"] = q.reshape(*centred.shape[:-1], -1)[..., :dout]
    out["kernel_absmax_scale"] = scale.astype(np.float32)
    out["kernel_absmax_mean"] = mean.astype(np.float32)
    return out


# ----------------------------------------------------------------------------------------------------
# Device side: inside the step.


def absmax_of(leaves: dict, spec: QuantSpec) -> jax.Array:
    """The block scales float32 [..., nb, out] (double quantisation undone)."""
    if not spec.double:
        return jnp.asarray(leaves["kernel_absmax"], jnp.float32)
    q = jnp.asarray(leaves["kernel_absmax_q"], jnp.float32)
    scale = jnp.repeat(jnp.asarray(leaves["kernel_absmax_scale"], jnp.float32), SCALE_BLOCK, axis=-1)[..., : q.shape[-1]]
    return q * scale + jnp.asarray(leaves["kernel_absmax_mean"], jnp.float32)[..., None, None]


def dequantize(leaves: dict, spec: QuantSpec, din: int, dtype: Any = jnp.float32) -> jax.Array:
    """The kernel [..., in, out] in `dtype` from its leaves (float32 math, then the cast)."""
    codes = jnp.asarray(leaves["kernel_q"])
    if spec.qtype == "int8":
        normed = codes.astype(jnp.float32) / 127
    else:
        pairs = jnp.stack([codes & 15, codes >> 4], axis=-2)  # [..., in_p/2, 2, out]
        nibbles = pairs.reshape(*codes.shape[:-2], codes.shape[-2] * 2, codes.shape[-1])
        normed = jnp.asarray(NF4_CODE)[nibbles.astype(jnp.int32)]
    absmax = jnp.repeat(absmax_of(leaves, spec), spec.block, axis=-2)
    return (normed * absmax)[..., :din, :].astype(dtype)


class QuantizedLinear(nnx.Module):
    """A frozen nnx.Linear whose kernel is stored quantised (the leaves above) and dequantised in each call into
    the compute dtype; the bias stays as it was. Same call as the Linear it replaces ([..., in] -> [..., out])."""

    def __init__(self, base: nnx.Linear, spec: QuantSpec, fill: bool = False):
        """fill: quantise the base's kernel values (a loaded model); else zero leaves for the loader to fill."""
        kernel = base.kernel[...]
        axes = tuple(base.kernel.get_metadata().get(AXES) or (None,) * kernel.ndim)
        leaves = quantize(jax.device_get(kernel), spec) if fill else _abstract_leaves(kernel.shape, spec)
        leaf_axes = {"kernel_absmax_scale": (*axes[:-1], None), "kernel_absmax_mean": axes[:-2]}
        for name, leaf in leaves.items():
            setattr(self, name, nnx.Param(jnp.asarray(leaf), **{AXES: leaf_axes.get(name, axes)}))
        self.bias = base.bias if base.bias is not None else nnx.data(None)
        self.in_features, self.out_features, self.use_bias = base.in_features, base.out_features, base.use_bias
        self.dtype, self.param_dtype, self.precision = base.dtype, base.param_dtype, base.precision
        self.quant = spec

    def kernel_value(self, dtype: Any = None) -> jax.Array:
        return dequantize(quant_leaves(self), self.quant, self.in_features, dtype or self.dtype or jnp.float32)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        del out_sharding
        return linear_output(self, inputs, self.kernel_value(inputs.dtype if self.dtype is None else self.dtype))


def _abstract_leaves(shape: tuple, spec: QuantSpec) -> dict:
    *lead, din, dout = shape
    nb = padded_inputs(din, spec.block) // spec.block
    rows = nb * spec.block // (2 if spec.qtype == "nf4" else 1)
    out = {"kernel_q": jnp.zeros((*lead, rows, dout), jnp.uint8 if spec.qtype == "nf4" else jnp.int8)}
    if spec.double:
        out["kernel_absmax_q"] = jnp.zeros((*lead, nb, dout), jnp.int8)
        out["kernel_absmax_scale"] = jnp.zeros((*lead, nb, -(-dout // SCALE_BLOCK)), jnp.float32)
        out["kernel_absmax_mean"] = jnp.zeros(tuple(lead), jnp.float32)
    else:
        out["kernel_absmax"] = jnp.zeros((*lead, nb, dout), jnp.float32)
    return out


def quant_leaves(module: Any) -> dict:
    """{leaf name: value} of a module holding a quantised kernel (QuantizedLinear, or a LoRALinear over one)."""
    return {name: getattr(module, name)[...] for name in module.quant.leaves()}


def linear_output(module: Any, inputs: jax.Array, kernel: jax.Array) -> jax.Array:
    """x @ W (+ b) with a given kernel, in the module's compute dtype (nnx.Linear's math)."""
    bias = module.bias[...] if module.bias is not None else None
    x, kernel, bias = nnx.nn.dtypes.promote_dtype((inputs, kernel, bias), dtype=module.dtype)
    lead = x.shape[:-1]
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel, precision=module.precision).reshape(*lead, kernel.shape[-1])
    return y if bias is None else y + bias


def quantize_linears(model: nnx.Module, spec: QuantSpec, skip: str | None, fill: bool = False) -> list[str]:
    """Replaces (in place) every nnx.Linear whose kernel path does not fullmatch `skip` (the task head) by a
    QuantizedLinear: with zero leaves that the loader fills (run it under nnx.eval_shape), or with `fill` its
    own kernel quantised (a model already loaded); returns the replaced module paths."""
    done = []
    for path, node in list(nnx.iter_graph(model)):
        if not path or not isinstance(node, nnx.Linear):
            continue
        name = "/".join(str(p) for p in path)
        if skip and re.fullmatch(skip, f"{name}/kernel"):
            continue
        parent = model
        for part in path[:-1]:
            parent = parent[part] if isinstance(part, int) else getattr(parent, part)
        replacement = QuantizedLinear(node, spec, fill)
        if isinstance(path[-1], int):
            parent[path[-1]] = replacement
        else:
            setattr(parent, path[-1], replacement)
        done.append(name)
    return done


def quantized_modules(model: nnx.Module) -> dict[str, Any]:
    """{module path: module} of every module holding a quantised kernel."""
    return {"/".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if path and isinstance(getattr(node, "quant", None), QuantSpec)}


def dequantized(flat: dict[str, Any], modules: dict[str, Any]) -> dict[str, Any]:
    """Flat params with each quantised module's leaves replaced by its float32 `kernel` (for export)."""
    out = {}
    for path, value in flat.items():
        mod, leaf = path.rsplit("/", 1) if "/" in path else ("", path)
        if mod not in modules or leaf not in LEAVES:
            out[path] = value
            continue
        if leaf == "kernel_q":
            module = modules[mod]
            leaves = {name: flat[f"{mod}/{name}"] for name in module.quant.leaves()}
            out[f"{mod}/kernel"] = dequantize(leaves, module.quant, module.in_features, jnp.float32)
    return out



def storage(model: nnx.Module, param_dtype: Any) -> tuple[int, int, int]:
    """(quantised kernels, bytes they take stored, bytes they would take in `param_dtype`) of a model: what a
    QLoRA base saves (for dry_run's report; the leaves may be ShapeDtypeStructs of a plan)."""
    modules = quantized_modules(model)
    stored = full = 0
    itemsize = np.dtype(param_dtype).itemsize
    for module in modules.values():
        leaves = {name: getattr(module, name).get_value() for name in module.quant.leaves()}
        stored += sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in leaves.values())
        lead = leaves["kernel_q"].shape[:-2]
        full += int(np.prod(lead)) * module.in_features * module.out_features * itemsize
    return len(modules), stored, full
