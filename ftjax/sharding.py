"""Device mesh, logical-axis rules and the shardings of params and batches.

One `jax.sharding.Mesh` with axes (data, fsdp, tensor) carries the whole run: params are placed by
rules from logical axis names (vocab, embed, mlp, heads, ...) to mesh axes, the batch is split over
(data, fsdp), and `jax.jit` partitions the step from those shardings (the successor of pmap).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax import config as config_lib
from ftjax import params as params_lib

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axes it may be split over, tried in order; the first that divides the
# dimension and is not yet used by another dimension of the same param wins, otherwise replicated.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "vocab": ("tensor", "fsdp"),
    "embed": ("fsdp",),
    "mlp": ("tensor", "fsdp"),
    "heads": ("tensor", "fsdp"),
    "kv": (),
    "layers": (),
    "labels": (),
}


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over all devices (of all processes) from `config.mesh`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = config_lib.resolve_mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - CPU/odd topologies: plain row-major order is fine.
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def spec_for(
    shape: Sequence[int],
    logical: Sequence[str | None] | None,
    mesh: Mesh,
    rules: Mapping[str, Sequence[str]] = DEFAULT_RULES,
) -> P:
    """PartitionSpec for one param: each named dim goes to the first free mesh axis that divides it."""
    if logical is None:
        return P()
    used: set[str] = set()
    spec: list[str | None] = []
    for dim, name in zip(shape, logical):
        choice = None
        for axis in rules.get(name, ()) if name else ():
            size = mesh.shape[axis]
            if axis not in used and size > 1 and dim % size == 0:
                choice = axis
                used.add(axis)
                break
        spec.append(choice)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def param_shardings(
    params: Any,
    logical_axes: Mapping[str, Sequence[str | None] | None],
    mesh: Mesh,
    rules: Mapping[str, Sequence[str]] = DEFAULT_RULES,
) -> Any:
    """A tree of NamedSharding matching `params`; params without logical names are replicated."""
    return params_lib.map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(x.shape, logical_axes.get(path), mesh, rules)), params
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) dim split over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global jax.Arrays sharded over (data, fsdp)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


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
