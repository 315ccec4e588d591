"""Device mesh, logical-axis rules and the shardings of params and batches.

One `jax.sharding.Mesh` with axes (data, fsdp, tensor) carries the whole run: params are placed by
rules from logical axis names (vocab, embed, mlp, heads, ...) to mesh axes, the batch is split over
(data, fsdp), and `jax.jit` partitions the step from those shardings (the successor of pmap).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ftjax import config as config_lib
from ftjax import params as params_lib

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The sharding rules, one table for every model family (bert, roberta, distilbert, vit, gpt2, llama,
# mistral, qwen2/3: they all name their param dims with these logical axes).
#
# tensor (Megatron): a logical axis -> the mesh axes it may be split over. q/k/v, gate/up and lm_head are
#   column-parallel (their "heads" / "mlp" / "vocab" output dim over `tensor`), o/down are row-parallel
#   (their "heads" / "mlp" input dim over `tensor`), so attention and MLP blocks need one all-reduce each
#   and the [batch, seq, heads, head_dim] reshapes keep whole heads per device ("heads" is only split when
#   `tensor` divides the number of heads, see `head_dim`). "embed" is never split over `tensor`.
# fsdp: every param with >= 2 non-trivial dims has its LARGEST dim not already taken by `tensor` split
#   over `fsdp` (all-gathered before use, gradients reduce-scattered). Vectors (biases, norm scales) stay
#   replicated over `fsdp`: they are < 1% of the bytes, and an "embed" vector sharded over the axis that
#   also splits the batch makes XLA's sharding propagation put the hidden dim of activations on `fsdp`,
#   which it can only undo by replicating them ("[SPMD] Involuntary full rematerialization"). For the
#   same reason the lookup tables (".../embedding": word, position, token-type) are only split by rows:
#   a table split on "embed" hands its gathers a hidden-dim sharding on the batch's axis.
# data: params are replicated; only the batch is split over (data, fsdp).
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "embed": (),
    "kv": (),  # head_dim (e.g. qwen3 q/k norms): inside one head, never split.
    "layers": (),
    # A mixture-of-experts block's experts [expert, in, out]: the expert dim stays whole (a token's experts are
    # picked at run time); FSDP splits each expert kernel's largest dim, as any other kernel's.
    "expert": (),
    "labels": (),
}
FSDP_AXIS = "fsdp"

# Params whose logical names would mislead the rules. GPT-2's c_attn packs [q | k | v] along its "heads"
# dim: a contiguous split over `tensor` would cut across q/k/v, so it is only FSDP-sharded.
PATH_OVERRIDES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(.*/)?c_attn/kernel", ("embed", None)),
    (r"(.*/)?c_attn/bias", (None,)),
    (r"(.*/)?c_attn/lora_b", (None, None)),
)
# Params of modules packing several projections along their output dim, Phi-3's qkv_proj [q | k | v] and
# gate_up_proj [gate | up], ModernBERT's Wqkv and Wi [input | gate]: as c_attn, their last (output) dim loses its
# name, so it is only FSDP-sharded. Only that dim changes, so a scanned stack's [layers, in, out] kernel and
# LoRA's lora_a / lora_b keep the rest.
PACKED_OUTPUTS = r"(.*/)?(qkv_proj|gate_up_proj|Wqkv|Wi)/[^/]+"


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over all devices (of all processes) from `config.mesh`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = config_lib.resolve_mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - CPU/odd topologies: plain row-major order is fine.
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def head_dim_of(model: Any) -> int | None:
    """The attention head size of a model (from its HF config), or None if it has no such config."""
    cfg = getattr(model, "hf_config", None)
    if cfg is None:
        return None
    explicit = getattr(cfg, "head_dim", None)
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
        return hidden // heads
    return None


def logical_for(path: str, logical: Sequence[str | None] | None) -> Sequence[str | None] | None:
    """A param's logical axis names after PATH_OVERRIDES and PACKED_OUTPUTS."""
    for pattern, names in PATH_OVERRIDES:
        if re.fullmatch(pattern, path):
            return names
    if logical and re.fullmatch(PACKED_OUTPUTS, path):
        return (*tuple(logical)[:-1], None)
    return logical


def spec_for(
    shape: Sequence[int],
    logical: Sequence[str | None] | None,
    mesh: Mesh,
    rules: Mapping[str, Sequence[str]] = DEFAULT_RULES,
    *,
    head_dim: int | None = None,
    fsdp_dims: Sequence[int] | None = None,
) -> P:
    """PartitionSpec for one param: `rules` place its named dims on `tensor`, then `fsdp` takes the largest
    free dim of a matrix (see DEFAULT_RULES). A dim is only split over an axis that divides it; a "heads"
    dim (n_heads * head_dim) only over an axis that divides its number of heads. `fsdp_dims` limits the
    dims `fsdp` may take (None: any)."""
    shape = tuple(int(d) for d in shape)
    logical = tuple(logical) if logical is not None else (None,) * len(shape)
    used: set[str] = set()
    spec: list[str | None] = [None] * len(shape)

    def fits(dim: int, name: str | None, axis: str) -> bool:
        size = mesh.shape[axis]
        if axis in used or size <= 1:
            return False
        units = dim // head_dim if name == "heads" and head_dim and dim % head_dim == 0 else dim
        return units % size == 0

    for i, (dim, name) in enumerate(zip(shape, logical)):
        for axis in rules.get(name, ()) if name else ():
            if fits(dim, name, axis):
                spec[i] = axis
                used.add(axis)
                break
    # A scanned stack's leading "layers" axis is never split: each scan step takes one layer whole. The
    # rest of a stacked param is placed as the layer's own param would be (a stacked vector stays a vector).
    first = 1 if logical and logical[0] == "layers" else 0
    if FSDP_AXIS in mesh.shape and sum(d > 1 for d in shape[first:]) >= 2:
        allowed = range(first, len(shape)) if fsdp_dims is None else [d + first for d in fsdp_dims]
        free = sorted((i for i in allowed if spec[i] is None), key=lambda i: -shape[i])
        for i in free:
            if fits(shape[i], logical[i], FSDP_AXIS):
                spec[i] = FSDP_AXIS
                break
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def param_shardings(
    params: Any,
    logical_axes: Mapping[str, Sequence[str | None] | None],
    mesh: Mesh,
    rules: Mapping[str, Sequence[str]] = DEFAULT_RULES,
    *,
    head_dim: int | None = None,
) -> Any:
    """A tree of NamedSharding matching `params` (see DEFAULT_RULES); unnamed params: fsdp rule only."""
    def one(path: str, x: Any) -> NamedSharding:
        logical = logical_for(path, logical_axes.get(path))
        table = path.rpartition("/")[2] == "embedding"  # a gather's lookup table: fsdp splits rows only.
        spec = spec_for(x.shape, logical, mesh, rules, head_dim=head_dim, fsdp_dims=(0,) if table else None)
        return NamedSharding(mesh, spec)

    return params_lib.map_with_path(one, params)


def like_params(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree that mirrors the params inside (optax state: mu/nu/...): a leaf whose dict-key
    path ends with a param's path and has its shape gets that param's sharding; the rest (counts, scalars)
    is replicated. Without this, `jit(tx.init)` leaves the optimizer state replicated under FSDP."""
    flat_s = params_lib.flatten(param_shardings)
    flat_p = params_lib.flatten(params)

    def one(keypath: Any, leaf: Any) -> NamedSharding:
        names = [str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey)]
        # A run of layers of a stacked param (ftjax.optim.LayerSegments) is placed as the param: its layer
        # axis is never split.
        segment = bool(names) and names[-1].startswith("segment_")
        names = names[:-1] if segment else names
        for i in range(len(names)):
            path = "/".join(names[i:])
            if path in flat_s:
                want = tuple(flat_p[path].shape)
                if (want[1:] == tuple(leaf.shape)[1:]) if segment else (want == tuple(leaf.shape)):
                    return flat_s[path]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, members: bool = False) -> NamedSharding:
    """Leading (example) dim split over data x fsdp; the rest replicated. `members`: a population's batch per
    member [members, rows, ...], the rows split."""
    return NamedSharding(mesh, P(None, BATCH_AXES) if members else P(BATCH_AXES))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, members: bool = False) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global jax.Arrays sharded over (data, fsdp) (`members`: of
    each member's batch, stacked on a leading axis)."""
    sharding = batch_sharding(mesh, members)
    rows = 1 if members else 0
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        global_shape = v.shape[:rows] + (v.shape[rows] * jax.process_count(),) + v.shape[rows + 1:]
        try:
            out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
        except ValueError as e:
            raise ValueError(
                f"batch[{k!r}]: this process's {v.shape[rows]} rows cannot be its share of a global batch of "
                f"{global_shape[rows]} over mesh {dict(mesh.shape)} ({e}). Each process's devices must hold "
                "1/process_count of the batch: put the mesh's cross-process axes on data/fsdp, not tensor"
            ) from e
    return out


def describe(params: Any, shardings: Any) -> list[tuple[str, tuple[int, ...], str, int]]:
    """Rows (path, shape, spec, bytes per device) for printing in dry runs."""
    rows = []
    flat_p = params_lib.flatten(params)
    flat_s = params_lib.flatten(jax.tree_util.tree_map(lambda s: s, shardings, is_leaf=lambda s: isinstance(s, NamedSharding)))
    for path, x in flat_p.items():
        sharding = flat_s[path]
        shard_shape = sharding.shard_shape(tuple(x.shape))
        rows.append((path, tuple(x.shape), str(sharding.spec), math.prod(shard_shape) * np.dtype(x.dtype).itemsize))
    return rows


def log_mesh(mesh: Mesh) -> None:
    logging.info(
        "mesh %s over %d devices (%d processes, platform %s)",
        dict(mesh.shape),
        mesh.devices.size,
        jax.process_count(),
        jax.devices()[0].platform,
    )
