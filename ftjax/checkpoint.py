"""Atomic, resumable checkpoints (orbax): keep the last k AND the best by an eval metric, restore sharded.

A checkpoint holds `state` (any pytree of arrays: params with int list keys, optax state, RNG key data)
and `meta` (a JSON dict: data-iterator position, early-stopping state, config ...).
"""

from __future__ import annotations

import json
import math
from typing import Any, Self

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from ftjax import fileio
from ftjax.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint can't be read or doesn't match the state; the message names the directory and the fix."""


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flatten(tree: Any, what: str) -> tuple[dict[str, Any], Any]:
    """({'/'-joined path: leaf}, treedef). orbax stores the flat dict, so any key type and any pytree
    node (int dict keys, optax namedtuples, empty MaskedNodes) round-trips via the caller's treedef."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat: dict[str, Any] = {}
    for keypath, leaf in leaves:
        path = "/".join(_key_name(k) for k in keypath) or "<root>"
        if path in flat:
            raise CheckpointError(
                f"{what}: two leaves share the path {path!r} (keys like 0 and '0', or a key containing '/'); "
                "rename one of them"
            )
        flat[path] = leaf
    return flat, treedef


def _to_jsonable(meta: dict) -> dict:
    try:
        text = json.dumps(meta)
    except TypeError as e:
        raise CheckpointError(
            f"checkpoint meta must be JSON-serialisable ({e}); convert arrays with .tolist()"
        )
    back = json.loads(text)
    if back != meta:
        raise CheckpointError(
            "checkpoint meta does not survive a JSON round trip (non-str dict keys or tuples?); "
            "use str keys and lists"
        )
    return back


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:300]


class Checkpointer:
    """orbax CheckpointManager keeping the last `keep` checkpoints plus the best one by `best_metric`.

    Retention is one orbax preservation policy: AnyPreservationPolicy([LatestN(keep), BestN(n=1)]), so a
    step survives if it is among the last `keep` OR is the best so far; the best is never deleted by
    keep-last-k, and a new best makes the old best deletable once it leaves the last `keep`.
    Checkpoints saved without metrics (periodic saves between evals) only count for LatestN.

    Every process must call save/restore (each writes/reads its own array shards); process
    `primary_host` (an index, the same on all processes; a bool means process 0) writes the JSON items
    and directories. `read_only` opens a run's checkpoints for eval/export: nothing is created, cleaned
    up or deleted there (a training run may be saving beside it). Saves are atomic: orbax writes into
    `<step>.orbax-checkpoint-tmp-*` and renames it when complete; leftovers of a crashed save are
    ignored and removed when the next Checkpointer opens the directory.
    """

    def __init__(
        self,
        directory: fileio.PathLike,
        keep: int,
        best_metric: str | None = None,
        best_mode: str = "min",
        async_save: bool = True,
        primary_host: int | bool = 0,
        read_only: bool = False,
    ):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(
                f"Checkpointer keep={keep!r} is invalid: set train.checkpoint.keep to an int >= 1"
            )
        if best_mode not in ("min", "max"):
            raise ValueError(f"Checkpointer best_mode={best_mode!r} is invalid: use 'min' or 'max'")
        if isinstance(primary_host, bool):
            primary_host = 0  # "is this process the primary?": the primary is process 0 on every process.
        if not isinstance(primary_host, int) or primary_host < 0:
            raise TypeError(
                f"Checkpointer primary_host={primary_host!r} is invalid: it is the process index (int) that "
                "writes metadata, normally 0; every process must still call save/restore"
            )
        self.directory = fileio.path(directory)
        if read_only and not self.directory.exists():
            raise CheckpointError(f"no checkpoint in {self.directory}: train first (--mode=train)")
        self.best_metric = best_metric
        self.best_mode = best_mode
        keep_policies: list[Any] = [policies.LatestN(n=keep)]
        best_fn = None
        if best_metric is not None:
            best_fn = self._score
            # BestN sorts ascending and keeps the last n: reverse=True for "min" keeps the smallest.
            keep_policies.append(
                policies.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            best_fn=best_fn,
            best_mode=best_mode,
            enable_async_checkpointing=async_save and not read_only,
            # A reader (eval/export beside a training run) never deletes or creates anything: an in-flight
            # save's temp folder belongs to the trainer.
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=primary_host),
        )
        try:
            self._mgr = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
            )
        except Exception as e:  # any failure to list/read the existing steps.
            raise CheckpointError(
                f"cannot open checkpoint directory {self.directory}: {type(e).__name__}: {e}. Delete the "
                "unreadable step directory inside it, or choose another workdir"
            ) from e

    def _score(self, metrics: dict) -> float:
        """The ranking value of a checkpoint's metrics; missing or NaN ranks worst."""
        value = metrics.get(self.best_metric) if isinstance(metrics, dict) else None
        worst = math.inf if self.best_mode == "min" else -math.inf
        if value is None:
            return worst
        value = float(value)
        return worst if math.isnan(value) else value

    def save(
        self, step: int, state: Any, meta: dict, metrics: dict | None = None, force: bool = False
    ) -> bool:
        """Saves (async by default) and applies retention; False if `step` exists already.

        `metrics` (scalars) rank the checkpoint for best-keeping and must then include `best_metric`.
        Arrays are copied off the device before this returns, so their buffers may be donated after.
        """
        step = int(step)
        if step in self._mgr.all_steps():
            return False
        flat, _ = _flatten(state, "checkpoint state")
        meta = _to_jsonable(dict(meta))
        if metrics is not None:
            metrics = {k: float(np.asarray(v)) for k, v in metrics.items()}
            if self.best_metric is not None and self.best_metric not in metrics:
                raise CheckpointError(
                    f"save(step={step}) metrics {sorted(metrics)} lack best_metric {self.best_metric!r}: set "
                    "train.early_stop.metric to one of them"
                )
            # Strict JSON on disk: a NaN metric is dropped, so that checkpoint ranks worst.
            metrics = {k: v for k, v in metrics.items() if math.isfinite(v)} or None
        args = ocp.args.Composite(state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta))
        return bool(self._mgr.save(step, args=args, metrics=metrics, force=force))

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def best_step(self) -> int | None:
        """The step with the best `best_metric` among kept checkpoints (None: no metric or none saved)."""
        if self.best_metric is None:
            return None
        return self._mgr.best_step()

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """(state, meta) of `step` (None: the latest), with `abstract_state`'s exact structure.

        abstract_state: a pytree like the saved state whose leaves are jax.ShapeDtypeStruct with shardings
        (or arrays, whose shardings are used); arrays come back placed with those shardings.
        """
        self._mgr.wait_until_finished()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(
                    f"no checkpoint in {self.directory}: train first or choose another workdir"
                )
            step = steps[-1]
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; saved steps: {steps}. Pick one of those"
            )
        step_dir = self.directory / str(step)
        target, treedef = _flatten(abstract_state, "abstract_state")
        target = {path: self._abstract_leaf(path, leaf) for path, leaf in target.items()}
        try:
            saved = self._mgr.item_metadata(step)["state"]
            saved_keys = set(saved.tree if hasattr(saved, "tree") else saved)
        except Exception as e:
            raise self._corrupt(step_dir, e) from e
        if saved_keys != set(target):
            missing, extra = sorted(saved_keys - set(target)), sorted(set(target) - saved_keys)
            raise CheckpointError(
                f"checkpoint {step_dir} does not match the state to restore: only in the checkpoint "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, only in the state {extra[:5]}"
                f"{'...' if len(extra) > 5 else ''} ({len(missing)}/{len(extra)} in all). Use the same "
                "model/optimizer config as the run that wrote it, or choose another workdir"
            )
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        try:
            restored = self._mgr.restore(step, args=args)
            flat, meta = restored["state"], restored["meta"]
        except Exception as e:  # tensorstore/json errors of a damaged step.
            raise self._corrupt(step_dir, e) from e
        if meta is None:
            raise self._corrupt(step_dir, FileNotFoundError("meta item missing"))
        state = jax.tree_util.tree_unflatten(treedef, [flat[path] for path in target])
        return state, meta

    @staticmethod
    def _abstract_leaf(path: str, leaf: Any) -> jax.ShapeDtypeStruct:
        if isinstance(leaf, jax.ShapeDtypeStruct):
            if leaf.sharding is None:
                raise CheckpointError(
                    f"abstract_state leaf {path!r} has no sharding: build it with "
                    "jax.ShapeDtypeStruct(shape, dtype, sharding=...) so restore knows where to place it"
                )
            return leaf
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        raise CheckpointError(
            f"abstract_state leaf {path!r} is a {type(leaf).__name__}: give a jax.ShapeDtypeStruct with sharding "
            "or a jax.Array"
        )

    def _corrupt(self, step_dir: epath.Path, e: BaseException) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {step_dir} is unreadable ({type(e).__name__}: {_first_line(e)}). Delete that step "
            f"directory to resume from an earlier step (saved: {self.all_steps()}), or choose another workdir"
        )

    def wait(self) -> None:
        """Blocks until pending async saves are on disk (and retention is applied)."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
