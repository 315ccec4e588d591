"""Re-initialising the top layers before fine-tuning (Zhang et al. 2021, "Revisiting Few-sample BERT
Fine-tuning"): `model.reinit_layers` = N re-draws every param of the top N layers of each layer stack (an
encoder's, a decoder's) and of a pooler with the model's own init, normal(0, initializer_range) for kernels
and embeddings, zero biases, LayerNorm scale 1 and bias 0, from `train.seed`: the values a fresh model
(`ftjax.models.from_config(..., seed=train.seed)`) has at those paths.
"""

from __future__ import annotations

import re
from typing import Any

import jax
from flax import nnx

from ftjax import params as params_lib
from ftjax import stacking
from ftjax.config import ConfigError
from ftjax.models import _init_value

POOLER = r"(?:.*/)?pooler/.*"


def top_layer_paths(paths: list[str], n: int, layer_pattern: str) -> list[str]:
    """The params of the top `n` layers of each stack (a stack: the path before the layer index that
    group(1) of `layer_pattern` captures), plus a pooler's."""
    layer_re = re.compile(layer_pattern)
    stacks: dict[str, dict[int, list[str]]] = {}
    for p in paths:
        m = layer_re.fullmatch(p)
        if m:
            stacks.setdefault(p[: m.start(1)], {}).setdefault(int(m.group(1)), []).append(p)
    if not stacks:
        raise ConfigError("model.reinit_layers", n, f"needs layers: no param path matches optim.layer_pattern="
                          f"{layer_pattern!r}")
    chosen = []
    for prefix, layers in stacks.items():
        if n > len(layers):
            raise ConfigError("model.reinit_layers", n, f"<= {len(layers)}, the layers under {prefix!r}")
        for index in sorted(layers)[-n:]:
            chosen += layers[index]
    return chosen + [p for p in paths if re.fullmatch(POOLER, p)]


def reinit_top_layers(model: Any, n: int, layer_pattern: str, seed: int) -> list[str]:
    """Re-initialises (in place, each param keeping its dtype and sharding) the top `n` layers of `model`
    and its pooler; returns their (per-layer) param paths. A scanned stack's layers are re-drawn in its
    stacked params with the values the unrolled model's would get."""
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    flat = params_lib.flatten(pure)
    stacks = model.stacks() if hasattr(model, "stacks") else {}
    view = stacking.layer_view(flat, stacks)
    chosen = set(top_layer_paths(list(view), n, layer_pattern))
    std = float(getattr(model.hf_config, "initializer_range", 0.02))
    layers_of: dict[str, list[tuple[int, str]]] = {}
    for virtual in chosen:
        path, index = view[virtual]
        layers_of.setdefault(path, []).append((index, virtual))

    def fresh(path: str, x: Any) -> Any:
        if path not in layers_of:
            return x
        sharding = getattr(x, "sharding", None)
        for index, virtual in layers_of[path]:
            if index is None:
                return _init_value(virtual, tuple(x.shape), x.dtype, std, seed, sharding)
            x = x.at[index].set(_init_value(virtual, tuple(x.shape[1:]), x.dtype, std, seed))
        return x if sharding is None else jax.device_put(x, sharding)

    nnx.replace_by_pure_dict(state, params_lib.map_with_path(fresh, pure))
    nnx.update(model, state)
    return sorted(chosen)
