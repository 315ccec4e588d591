"""Params as plain nested dicts keyed by '/'-joined paths: split from / merged into NNX modules, partitioned.

Everything outside the model code (optimizer masks, sharding, checkpoints, HF conversion) sees params
as a nested dict of arrays; a param's name is its path joined with '/', e.g.
"bert/encoder/layer/3/attention/self/query/kernel".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

Params = dict[str, Any]


def _key_str(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(keypath: tuple) -> str:
    return "/".join(_key_str(k) for k in keypath)


def flatten(tree: Any) -> dict[str, Any]:
    """{"a/b/kernel": leaf, ...} in tree order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(kp): leaf for kp, leaf in leaves}


def unflatten(flat: dict[str, Any]) -> dict:
    """The nested dict of {"a/3/b": leaf} paths; numeric parts become int keys (list indices), so the tree
    orders layers as an nnx.List does (2 before 10)."""
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(int(part) if part.isdigit() else part, {})
        node[parts[-1]] = value
    return nested


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """tree_map where fn also gets the param's '/'-joined path."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn(path_str(kp), x), tree)


def partition(tree: Params, keep: Callable[[str], bool], prefix: str = "") -> tuple[Params, Params]:
    """Splits a nested dict into (kept, rest), two sparse nested dicts; `combine` undoes it."""
    kept, rest = {}, {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            a, b = partition(value, keep, path + "/")
            if a:
                kept[key] = a
            if b:
                rest[key] = b
        elif keep(path):
            kept[key] = value
        else:
            rest[key] = value
    return kept, rest


def combine(a: Params, b: Params) -> Params:
    """Merges two sparse nested dicts with disjoint leaves (the inverse of `partition`)."""
    out = dict(a)
    for key, value in b.items():
        if key in out and isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = combine(out[key], value)
        elif key in out:
            raise ValueError(f"combine: leaf {key!r} is in both trees")
        else:
            out[key] = value
    return out


def split(model: nnx.Module) -> tuple[nnx.GraphDef, Params, nnx.State]:
    """(graphdef, params as a nested dict, every other variable as an nnx.State)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def merge(graphdef: nnx.GraphDef, params: Params, rest: nnx.State) -> nnx.Module:
    """A module from `split`'s parts; works inside jit (params may be tracers)."""
    return nnx.merge(graphdef, params, rest)


def count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


def nbytes(tree: Any) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
