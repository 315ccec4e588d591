"""LoRA for any ftjax model: adapters on targeted nnx.Linear layers, merged or PEFT-format export.

`apply_lora` swaps each targeted nnx.Linear for a `LoRALinear` holding the same kernel/bias Params under
the same names plus `lora_a` [in, r] and `lora_b` [r, out] (and, with DoRA, `lora_magnitude` [out]);
`ftjax.optim` then freezes every other param. Variants: rsLoRA (scale alpha / sqrt(r)), DoRA (weight-
decomposed), LoRA+ (an LR ratio for lora_b, in the param table) and targets="all-linear".
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax import fileio, hf, models, stacking
from ftjax import params as params_lib
from ftjax.config import ConfigError
from ftjax.models import common, quantized
from ftjax.models.common import AXES

LORA_PARAM_PATTERN = r"(?:.*/)?lora_(?:a|b|magnitude)"  # fullmatches the adapter params' paths
ALL_LINEAR = "all-linear"  # optim.lora.targets shorthand: every nnx.Linear but the task head
# PEFT task_type for each ftjax task (adapter_config.json).
PEFT_TASK_TYPES = {
    "causal_lm": "CAUSAL_LM",
    "classification": "SEQ_CLS",
    "token_classification": "TOKEN_CLS",
    "base": "FEATURE_EXTRACTION",
}

# The dropout key of the model call being traced (None: deterministic). Set by the model wrapper below,
# read by every LoRALinear, so adapters get dropout without changing the families' call signatures.
_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
    "ftjax_lora_key", default=None
)
# True while a call traces the base model alone (`adapters_off`): every LoRALinear returns its base layer's output.
_ADAPTERS_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("ftjax_lora_off", default=False)


# A population whose members differ in LoRA rank or alpha (ftjax/tune/population.py): while one member's step is
# traced, every LoRALinear scales by that member's alpha / r (traced) instead of its own static one.
_TRACED_SCALE: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("ftjax_lora_scale", default=None)


@contextlib.contextmanager
def traced_scale(scale: jax.Array) -> Iterator[None]:
    """Inside the block, every adapter's delta is scaled by `scale` (a population member's alpha / r)."""
    token = _TRACED_SCALE.set(scale)
    try:
        yield
    finally:
        _TRACED_SCALE.reset(token)


def scale_of(rank: int, alpha: float, rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def _init_a(keys: list, din: int, rank: int, dtype: Any, stacked: bool) -> jax.Array:
    """PEFT's lora_A init (nn.init.kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))), as
    [in, r] (stacked [layers, in, r]: each layer from its own key)."""
    bound = 1.0 / math.sqrt(din)
    a = jnp.stack([jax.random.uniform(k, (din, rank), jnp.float32, -bound, bound) for k in keys])
    return (a if stacked else a[0]).astype(dtype)


def _adapter_key(base_key: jax.Array, name: str, stacks: dict[str, int]) -> jax.Array | list:
    """The init key of the adapter on module `name`: fold_in(key(seed), crc32(path)); for a Linear of a scanned
    stack, the list of each layer's (the unrolled model's module paths: equal adapters scanned or not)."""
    prefix = stacking.stack_of(name, stacks)
    if prefix is None:
        return jax.random.fold_in(base_key, zlib.crc32(name.encode()))
    return [jax.random.fold_in(base_key, zlib.crc32(stacking.layer_path(name, prefix, i).encode()))
            for i in range(stacks[prefix])]


def padded_lora_a(model: nnx.Module, rank: int, seed: int) -> dict[str, jax.Array]:
    """{param path of each adapter's lora_a: the A a rank-`rank` adapter of `model` draws (apply_lora's init and
    keys), zero-padded to the model's own rank}: a population member of a smaller rank, whose padded columns
    (and lora_b's zero rows) then keep zero gradients, so it trains as its own rank's adapter."""
    stacks = model.stacks() if hasattr(model, "stacks") else {}
    out = {}
    for path, m in nnx.iter_graph(model):
        if isinstance(m, LoRALinear):
            name = module_path(path)
            key = _adapter_key(jax.random.key(seed), name, stacks)
            stacked = isinstance(key, list)
            a = _init_a(key if stacked else [key], m.in_features, rank, m.lora_a[...].dtype, stacked)
            pad = [(0, 0)] * (a.ndim - 1) + [(0, m.rank - rank)]
            out[f"{name}/lora_a"] = jnp.pad(a, pad)
    return out


@contextlib.contextmanager
def adapters_off():
    """Model calls inside run as the base model (PEFT's disable_adapter): the reference model of preference
    tuning under LoRA, in the same traced step and with the same params, at no extra memory."""
    token = _ADAPTERS_OFF.set(True)
    try:
        yield
    finally:
        _ADAPTERS_OFF.reset(token)


class LoRALinear(nnx.Module):
    """y = x @ W + b + (dropout(x) @ A @ B) * s, with W, b the wrapped nnx.Linear's own Params and
    s = alpha / r (rsLoRA: alpha / sqrt(r)). DoRA: y = (m / n) * (x @ W + s * x @ A @ B) + b, where
    n = ||W + s A B||_c is the norm of each output's column (held constant in the gradient, as PEFT does)
    and m starts at ||W||_c; with dropout on, x there is dropout(x) (PEFT's formula)."""

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, dropout: float, key: jax.Array | list, index: int,
                 rslora: bool = False, dora: bool = False):
        # A QLoRA base (quantized.QuantizedLinear): its quantised leaves instead of the kernel, dequantised per call.
        self.quant = getattr(base, "quant", None)
        stored = [base.kernel] if self.quant is None else [getattr(base, n) for n in self.quant.leaves()]
        for name, variable in zip(["kernel"] if self.quant is None else self.quant.leaves(), stored):
            setattr(self, name, variable)
        self.bias = base.bias if base.bias is not None else nnx.data(None)
        for name in ("in_features", "out_features", "use_bias", "dtype", "param_dtype", "precision", "dot_general",
                     "promote_dtype", "preferred_element_type"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))
        din, dout = base.in_features, base.out_features
        kernel_axes = tuple(stored[0].get_metadata().get(AXES) or (None,) * stored[0][...].ndim)
        # A Linear of a scanned stack (kernel [layers, in, out]): one adapter per layer, stacked like it, each
        # drawn from its own layer's key (`key` is then the list of them), as the unrolled model's would be.
        stacked = isinstance(key, (list, tuple))
        lead, axes = (kernel_axes[:1], kernel_axes[1:]) if stacked else ((), kernel_axes)
        keys = list(key) if stacked else [key]
        a = _init_a(keys, din, rank, base.param_dtype, stacked)
        self.lora_a = nnx.Param(a, **{AXES: (*lead, axes[0], None)})
        self.lora_b = nnx.Param(jnp.zeros((*([len(keys)] if stacked else []), rank, dout), base.param_dtype),
                                **{AXES: (*lead, None, axes[1])})
        self.rank, self.alpha, self.dropout_rate, self.index = int(rank), float(alpha), float(dropout), int(index)
        self.rslora, self.dora = bool(rslora), bool(dora)
        if self.dora:  # m = ||W0||_c: the layer starts as the base layer
            norm = jnp.linalg.norm(self.base_kernel(jnp.float32), axis=-2)
            self.lora_magnitude = nnx.Param(norm.astype(base.param_dtype), **{AXES: (*lead, axes[1])})

    @property
    def scale(self) -> Any:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA; a population member's traced one while it is traced."""
        traced = _TRACED_SCALE.get()
        return scale_of(self.rank, self.alpha, self.rslora) if traced is None else traced

    def base_kernel(self, dtype: Any = None) -> jax.Array:
        """W [..., in, out]: the kernel, or a quantised base's dequantised into `dtype` (the compute dtype)."""
        if self.quant is None:
            return self.kernel[...]
        return quantized.dequantize(quantized.quant_leaves(self), self.quant, self.in_features,
                                   dtype or self.dtype or jnp.float32)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        if self.quant is None:
            y = nnx.Linear.__call__(self, inputs, out_sharding)  # the base layer's exact math
        else:
            y = quantized.linear_output(self, inputs, self.base_kernel())
        if _ADAPTERS_OFF.get():
            return y
        x = inputs
        key = _DROPOUT_KEY.get()
        dropped = key is not None and self.dropout_rate > 0
        if dropped:
            key = jax.random.fold_in(key, self.index)
            layer = common.layer_index()  # a scanned stack's adapter: each layer its own mask
            key = key if layer is None else jax.random.fold_in(key, layer)
            keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout_rate), 0).astype(x.dtype)
        x, a, b = nnx.nn.dtypes.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        delta = ((x @ a) @ b) * self.scale
        if not self.dora:
            return y + delta.astype(y.dtype)
        w = self.base_kernel().astype(delta.dtype)
        norm = jax.lax.stop_gradient(dora_norm(w, self.lora_a[...], self.lora_b[...], self.scale))
        m_over_n = (self.lora_magnitude[...].astype(jnp.float32) / norm).astype(delta.dtype)
        bias = self.bias[...] if self.bias is not None else None
        base = x @ w if dropped else (y - bias if bias is not None else y).astype(delta.dtype)
        return y + ((m_over_n - 1) * base + m_over_n * delta).astype(y.dtype)


def dora_norm(kernel: Any, a: Any, b: Any, scale: float) -> jax.Array:
    """||W + s A B||_c in float32: the L2 norm over the inputs of each output's column of the [in, out] kernel
    (PEFT's torch.linalg.norm(weight, dim=1) on the [out, in] weight)."""
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return jnp.linalg.norm(f32(kernel) + scale * (f32(a) @ f32(b)), axis=-2)


_WRAPPED: dict[type, type] = {}


def _with_key(head: Callable[[jax.Array], jax.Array], key: jax.Array | None) -> Callable[[jax.Array], jax.Array]:
    """`head` run with the model call's adapter dropout key (a head returned by a return_hidden call runs after
    the call, e.g. chunk by chunk in ftjax.losses, and its adapter must still drop out)."""

    def run(hidden: jax.Array) -> jax.Array:
        token = _DROPOUT_KEY.set(key)
        try:
            return head(hidden)
        finally:
            _DROPOUT_KEY.reset(token)

    return run


def _with_lora_call(cls: type) -> type:
    """A subclass of the model class whose call sets the adapters' dropout key during a training call, and
    whose `export_params` (what models.save_pretrained writes) merges the adapters into the kernels."""
    if getattr(cls, "_lora_wrapped", False):
        return cls
    if cls not in _WRAPPED:  # one class per model class, so graphdefs stay equal (and jit caches hit).

        def __call__(self, *args: Any, deterministic: bool = True, rngs: Any = None, **kwargs: Any) -> Any:
            key = rngs.dropout() if (not deterministic and rngs is not None) else None
            token = _DROPOUT_KEY.set(key)
            try:
                out = cls.__call__(self, *args, deterministic=deterministic, rngs=rngs, **kwargs)
            finally:
                _DROPOUT_KEY.reset(token)
            if isinstance(out, dict) and callable(out.get("lm_head")):  # return_hidden: the head runs later
                out["lm_head"] = _with_key(out["lm_head"], key)
            return out

        namespace = {
            "__call__": __call__,
            "export_params": merged_params,
            "__module__": cls.__module__,
            "_lora_wrapped": True,
        }
        _WRAPPED[cls] = type(cls)(f"LoRA{cls.__name__}", (cls,), namespace)
    return _WRAPPED[cls]


def _get(cfg: Any, key: str, default: Any) -> Any:
    try:
        return cfg[key]
    except (KeyError, AttributeError):
        return getattr(cfg, key, default)


def module_path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def apply_lora(model: nnx.Module, lora_cfg: Any, seed: int = 0) -> nnx.Module:
    """Replaces the nnx.Linear modules whose path fullmatches lora_cfg.targets with LoRALinear (in place).

    lora_cfg: {rank, alpha, dropout, targets, rslora, dora} (cfg.optim.lora). lora_a gets PEFT's kaiming-uniform
    init from fold_in(key(seed), crc32(path)); lora_b starts at zero (and DoRA's magnitude at ||W0||_c), so the
    model's outputs are unchanged at first. Returns the model (its class gains a call wrapper that feeds the
    adapters' dropout key).
    """
    rank, alpha = int(_get(lora_cfg, "rank", 0)), float(_get(lora_cfg, "alpha", 16.0))
    dropout, targets = float(_get(lora_cfg, "dropout", 0.0)), _get(lora_cfg, "targets", "")
    variants = {"rslora": bool(_get(lora_cfg, "rslora", False)), "dora": bool(_get(lora_cfg, "dora", False))}
    if rank < 1:
        raise ConfigError("optim.lora.rank", rank, ">= 1 to apply LoRA (0 = LoRA off)")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError("optim.lora.dropout", dropout, "in [0, 1)")
    found = [(p, n) for p, n in nnx.iter_graph(model) if isinstance(n, (nnx.Linear, quantized.QuantizedLinear)) and p]
    stacks = model.stacks() if hasattr(model, "stacks") else {}
    hits = [(p, n) for p, n in found if _targets_stack_or_module(_targeted(model, targets), module_path(p), stacks,
                                                                  targets)]
    if not hits:
        shown = ", ".join(module_path(p) for p, _ in found[:6])
        raise ConfigError(
            "optim.lora.targets",
            targets,
            f"fullmatches no nnx.Linear module path; this model's Linear layers are e.g. {shown} "
            f"({len(found)} in all). Use a regex like r'.*(query|value)'",
        )
    base_key = jax.random.key(seed)
    for index, (path, linear) in enumerate(hits):
        name = module_path(path)
        key = _adapter_key(base_key, name, stacks)
        parent = model
        for part in path[:-1]:
            parent = parent[part] if isinstance(part, int) else getattr(parent, part)
        wrapped = LoRALinear(linear, rank, alpha, dropout, key, index, **variants)
        if isinstance(path[-1], int):
            parent[path[-1]] = wrapped
        else:
            setattr(parent, path[-1], wrapped)
    model.__class__ = _with_lora_call(type(model))
    return model


def _targets_stack_or_module(match: Any, name: str, stacks: dict[str, int], targets: str) -> bool:
    """Whether a module is adapted: its path matches, or (a Linear of a scanned stack) every layer's path
    does; a targets regex that picks only some layers of a stack is refused (one adapter spans the stack)."""
    prefix = stacking.stack_of(name, stacks)
    if prefix is None or match(name):
        return bool(match(name))
    hits = [i for i in range(stacks[prefix]) if match(stacking.layer_path(name, prefix, i))]
    if hits and len(hits) < stacks[prefix]:
        raise ConfigError("optim.lora.targets", targets, f"selects layers {hits} of the scanned stack {prefix!r} "
                          "but not the others: adapt whole stacks, or set model.scan_layers=false for LoRA on "
                          "some layers only")
    return bool(hits)


def _targeted(model: nnx.Module, targets: str) -> Any:
    """A predicate on module paths: the targets regex (fullmatch), or for "all-linear" every module whose
    kernel is not part of the model's task head (`head_pattern`; an LM head too, as PEFT leaves it out)."""
    if targets == ALL_LINEAR:
        head = getattr(model, "head_pattern", None)
        return lambda path: not (head and re.fullmatch(head, f"{path}/kernel"))
    try:
        return re.compile(targets).fullmatch
    except (re.error, TypeError) as e:
        raise ConfigError("optim.lora.targets", targets, f"a regex over module paths ({e})") from None


def lora_modules(model: nnx.Module) -> dict[str, LoRALinear]:
    """{module path: LoRALinear} of a model after apply_lora."""
    return {module_path(p): n for p, n in nnx.iter_graph(model) if isinstance(n, LoRALinear)}


def is_lora_param(path: str) -> bool:
    return re.fullmatch(LORA_PARAM_PATTERN, path) is not None


def _key(node: dict, part: str) -> Any:
    if part in node:
        return part
    return int(part) if part.isdigit() and int(part) in node else part


def _adapted(model: nnx.Module, params: dict | None, caller: str) -> tuple[dict[str, LoRALinear], dict, dict]:
    """(the LoRA modules, `params` or the model's own values, those flattened); an error without adapters."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError(f"{caller}: the model has no LoRA adapters (call ftjax.lora.apply_lora first)")
    if params is None:
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return modules, params, params_lib.flatten(params)


def merged_params(model: nnx.Module, params: dict | None = None) -> dict:
    """The params with each adapter folded into its kernel, W + s * A @ B (DoRA: (m / ||W + s A B||_c) *
    (W + s A B), column by column), and the lora_* leaves dropped.

    `params` defaults to the model's own values (a nested dict as from `ftjax.params.split`).
    """
    modules, params, flat = _adapted(model, params, "merged_params")
    if not any(is_lora_param(p) for p in flat):
        return params  # already merged
    flat = quantized.dequantized(flat, quantized.quantized_modules(model))  # QLoRA: the base back in float32
    out = {}
    for path, value in flat.items():
        if is_lora_param(path):
            continue
        mod = path.rsplit("/", 1)[0]
        if path.endswith("/kernel") and mod in modules:
            a = jnp.asarray(flat[f"{mod}/lora_a"], jnp.float32)
            b = jnp.asarray(flat[f"{mod}/lora_b"], jnp.float32)
            merged = jnp.asarray(value, jnp.float32) + modules[mod].scale * (a @ b)
            if modules[mod].dora:
                magnitude = jnp.asarray(flat[f"{mod}/lora_magnitude"], jnp.float32)
                merged = merged * (magnitude / jnp.linalg.norm(merged, axis=-2))[..., None, :]
            value = merged.astype(value.dtype)
        out[path] = value
    return _unflatten(out, params)


def _unflatten(flat: dict[str, Any], like: dict) -> dict:
    """Nested dict from '/'-paths, with int keys where `like` has them (list indices)."""
    out: dict = {}
    for path, value in flat.items():
        src, dst = like, out
        parts = path.split("/")
        for part in parts[:-1]:
            key = _key(src, part)
            src = src[key]
            dst = dst.setdefault(key, {})
        dst[_key(src, parts[-1])] = value
    return out


def _layer_modules(modules: dict[str, LoRALinear], stacks: dict[str, int]) -> dict[str, LoRALinear]:
    """{per-layer module path: its LoRALinear}: a scanned stack's adapter is listed once per layer."""
    out = {}
    for mod, linear in modules.items():
        prefix = stacking.stack_of(mod, stacks)
        names = [mod] if prefix is None else [stacking.layer_path(mod, prefix, i) for i in range(stacks[prefix])]
        out.update({name: linear for name in names})
    return out


def _hf_module(path: str) -> str:
    return path.replace("/", ".")


def _modules_to_save(model: nnx.Module, flat: dict[str, Any], also_trained: str | tuple[str, ...]) -> dict:
    """{param path: value} of the whole modules holding a param trained besides the adapters (PEFT copies a
    modules_to_save module whole, so every param of it is saved). also_trained: "auto" (the task's new head,
    as optim.lora.also_train="auto"), "" (none), a regex fullmatching param paths, or a tuple of paths."""
    if isinstance(also_trained, str):
        pattern = optim_head_pattern(model) if also_trained == "auto" else also_trained
        chosen = [p for p in flat if pattern and re.fullmatch(pattern, p)]
    else:
        chosen = list(also_trained)
    modules = {p.rsplit("/", 1)[0] for p in chosen if not is_lora_param(p)}
    return {p: v for p, v in flat.items() if not is_lora_param(p) and p.rsplit("/", 1)[0] in modules}


def _peft_config(model: nnx.Module, modules: dict[str, LoRALinear], extra: dict, base: str) -> dict:
    first = next(iter(modules.values()))
    cfg = {
        "peft_type": "LORA",
        "task_type": PEFT_TASK_TYPES.get(getattr(model, "task", ""), None),
        "base_model_name_or_path": base or None,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout_rate,
        "target_modules": sorted(_hf_module(m) for m in modules),
        "modules_to_save": sorted({_hf_module(p.rsplit("/", 1)[0]) for p in extra}) or None,
        "bias": "none",
        "fan_in_fan_out": getattr(model, "family", "") == "gpt2",  # HF GPT-2 uses Conv1D ([in, out] weights).
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": first.rslora,
        "use_dora": first.dora,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    if len({m.rank for m in modules.values()}) > 1 or len({m.alpha for m in modules.values()}) > 1:
        cfg["rank_pattern"] = {_hf_module(k): m.rank for k, m in modules.items()}
        cfg["alpha_pattern"] = {_hf_module(k): m.alpha for k, m in modules.items()}
    return cfg


def export_peft(
    model: nnx.Module,
    out_dir: fileio.PathLike,
    params: dict | None = None,
    base_model_name_or_path: str = "",
    also_trained: str | tuple[str, ...] = "auto",
    overwrite: bool = False,
) -> fileio.PathLike:
    """The adapter alone in PEFT format: adapter_config.json + adapter_model.safetensors; returns out_dir.

    Keys "base_model.model.<HF module>.lora_A.weight" [r, in] and ".lora_B.weight" [out, r];
    target_modules lists the adapted modules' full names. The modules trained besides the adapters
    (`also_trained`, see `_modules_to_save`; by default a classifier's new head) are saved whole under
    "base_model.model.<HF key>" and listed in modules_to_save, as PEFT saves them, so the adapter carries
    the trained head. Written atomically like models.save_pretrained: a non-empty out_dir only with
    overwrite=True, never the base model's folder.
    """
    modules, params, flat = _adapted(model, params, "export_peft")
    local_base = [base_model_name_or_path] if base_model_name_or_path and os.path.isdir(base_model_name_or_path) else []
    target = hf.check_export_target(out_dir, overwrite=overwrite,
                                    base_folders=models.base_folders(model) + local_base)
    tensors: dict[str, np.ndarray] = {}
    stacks = model.stacks() if hasattr(model, "stacks") else {}
    per_layer = stacking.unstack({p: np.asarray(jax.device_get(v)) for p, v in flat.items() if is_lora_param(p)},
                                 stacks)  # a scanned stack's adapters: one PEFT module per layer
    layer_modules = _layer_modules(modules, stacks)
    for mod in layer_modules:
        name = f"base_model.model.{_hf_module(mod)}"
        tensors[f"{name}.lora_A.weight"] = per_layer[f"{mod}/lora_a"].T.copy()
        tensors[f"{name}.lora_B.weight"] = per_layer[f"{mod}/lora_b"].T.copy()
        if layer_modules[mod].dora:  # PEFT's DoRA magnitude [out] (its key has no ".weight")
            tensors[f"{name}.lora_magnitude_vector"] = per_layer[f"{mod}/lora_magnitude"]
    extra = _modules_to_save(model, flat, also_trained)
    if extra:
        for key, value in models.hf_state_dict(model, _unflatten(extra, params)).items():
            tensors[f"base_model.model.{key}"] = np.ascontiguousarray(value)
    cfg = _peft_config(model, layer_modules, extra, base_model_name_or_path)
    with fileio.atomic_dir(target) as tmp:
        fileio.write_text(tmp / "adapter_config.json", json.dumps(cfg, indent=2) + "\n")
        hf.write_safetensors(tensors, tmp / "adapter_model.safetensors")
    return out_dir


def optim_head_pattern(model: nnx.Module) -> str | None:
    """What optim.lora.also_train="auto" trains besides the adapters: a task's new head (classification ...),
    never an LM head (causal_lm / masked_lm) nor anything for "base" (PEFT's modules_to_save)."""
    if getattr(model, "task", "") in ("causal_lm", "masked_lm", "base"):
        return None
    return getattr(model, "head_pattern", None)
