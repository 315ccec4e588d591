"""Scanned layer stacks seen one layer at a time: the per-layer ("virtual") view of stacked params.

A scanned stack keeps the params of its L layers stacked along a leading axis under one path, e.g.
"model/layers/self_attn/q_proj/kernel" [L, in, out]. Everything that decides or reports per layer (the param
table, freezing, LLRD, unfreezing, LoRA export, weight drift, HF conversion) reads the same params through
this view, where layer i of that leaf is "model/layers/i/self_attn/q_proj/kernel": exactly the path the
unrolled model has. `stacks` is {module path of a stack: number of layers} (`HFModel.stacks()`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

Stacks = Mapping[str, int]


def stack_of(path: str, stacks: Stacks) -> str | None:
    """The stack whose params include `path` (its module path), or None for an unstacked param."""
    for prefix in stacks:
        if path.startswith(prefix + "/"):
            return prefix
    return None


def layer_path(path: str, prefix: str, index: int) -> str:
    """The per-layer path of layer `index` of a stacked leaf: the index inserted after the stack's path."""
    return f"{prefix}/{index}/{path[len(prefix) + 1:]}"


def split_layer_path(virtual: str, stacks: Stacks) -> tuple[str, int | None]:
    """(stacked path, layer index) of a per-layer path; (path, None) when it names no stacked layer."""
    for prefix in stacks:
        head = prefix + "/"
        if virtual.startswith(head):
            index, _, rest = virtual[len(head):].partition("/")
            if index.isdigit() and rest:
                return f"{prefix}/{rest}", int(index)
    return virtual, None


def layer_view(flat: Mapping[str, Any], stacks: Stacks) -> dict[str, tuple[str, int | None]]:
    """{per-layer path: (path in `flat`, layer index or None)} in tree order, layers in order within a leaf."""
    out: dict[str, tuple[str, int | None]] = {}
    for path in flat:
        prefix = stack_of(path, stacks)
        if prefix is None:
            out[path] = (path, None)
        else:
            for i in range(stacks[prefix]):
                out[layer_path(path, prefix, i)] = (path, i)
    return out


def unstack(flat: Mapping[str, Any], stacks: Stacks) -> dict[str, Any]:
    """{per-layer path: value}: stacked leaves sliced per layer (arrays, tracers or ShapeDtypeStructs)."""
    out = {}
    for virtual, (path, index) in layer_view(flat, stacks).items():
        value = flat[path]
        out[virtual] = value if index is None else _slice(value, index)
    return out


def restack(per_layer: Mapping[str, Any], stacks: Stacks) -> dict[str, Any]:
    """The inverse of `unstack` for host (numpy) values: {stacked path: value}, layers stacked in order."""
    out: dict[str, Any] = {}
    layers: dict[str, dict[int, Any]] = {}
    for virtual, value in per_layer.items():
        path, index = split_layer_path(virtual, stacks)
        if index is None:
            out[path] = value
        else:
            layers.setdefault(path, {})[index] = value
            out.setdefault(path, None)
    for path, by_index in layers.items():
        prefix = stack_of(path, stacks)
        missing = sorted(set(range(stacks[prefix])) - set(by_index))
        if missing:
            raise ValueError(f"restack: layers {missing} of {path!r} are missing")
        out[path] = np.stack([np.asarray(by_index[i]) for i in range(stacks[prefix])])
    return out


def _slice(value: Any, index: int) -> Any:
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(value.shape[1:]), value.dtype)
    return value[index]
