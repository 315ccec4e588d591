"""Checkpointer: bit-exact sharded round trips, last-k plus best retention, atomicity, clear corruption errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint._src.path import atomicity

from ftjax.checkpoint import Checkpointer, CheckpointError


def _state(seed: int = 0):
    rng = np.random.default_rng(seed)
    key_data = jax.random.key_data(jax.random.key(seed))
    params = {
        "bert": {
            "layer": {
                i: {"kernel": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)} for i in (0, 1, 2, 10)
            }
        },
        "classifier": {"bias": jnp.asarray(rng.standard_normal(2), jnp.float32)},
    }
    return {"params": params, "step": jnp.asarray(seed, jnp.int32), "rng": key_data}


def _abstract(tree, sharding=None):
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _assert_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bit_exact_with_int_keys_and_sharded_placement(tmp_path):
    state = _state(3)
    assert state["rng"].dtype == jnp.uint32
    meta = {"data": {"epoch": 1, "position": 7}, "early_stop": {"best_value": None}}
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    assert ckpt.save(5, state, meta)
    ckpt.wait()
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    sharded = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    abstract = _abstract(state, replicated)
    kernel = abstract["params"]["bert"]["layer"][10]["kernel"]
    abstract["params"]["bert"]["layer"][10]["kernel"] = jax.ShapeDtypeStruct(
        kernel.shape, kernel.dtype, sharding=sharded
    )
    restored, restored_meta = Checkpointer(tmp_path / "ckpt", keep=2).restore(5, abstract)
    _assert_bit_equal(restored, state)
    assert list(restored["params"]["bert"]["layer"]) == [0, 1, 2, 10]  # int keys, not "0".."10".
    assert restored_meta == meta
    leaf = restored["params"]["bert"]["layer"][10]["kernel"]
    assert leaf.sharding == sharded
    assert {s.data.shape for s in leaf.addressable_shards} == {(2, 2)}
    ckpt.close()


def test_optax_state_with_masked_nodes_round_trips(tmp_path):
    params = {"a": jnp.ones((3,)), "b": {0: jnp.zeros((2, 2))}}
    tx = optax.multi_transform(
        {"train": optax.adam(1e-3), "frozen": optax.set_to_zero()}, {"a": "train", "b": {0: "frozen"}}
    )
    state = {"params": params, "opt": tx.init(params)}
    state["opt"] = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, state["opt"])
    with Checkpointer(tmp_path, keep=1, async_save=False) as ckpt:
        ckpt.save(1, state, {})
        restored, _ = ckpt.restore(None, _abstract(state))
    _assert_bit_equal(restored, state)


def test_keeps_last_k_and_the_best_even_when_old(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2, best_metric="loss", best_mode="min")
    state = _state()
    for step, loss in [(10, 0.9), (20, 0.2), (30, 0.5), (40, None), (50, 0.7), (60, float("nan"))]:
        ckpt.save(
            step, state, {"step": step}, metrics=None if loss is None else {"loss": loss, "accuracy": 0.5}
        )
    ckpt.wait()
    assert ckpt.all_steps() == [20, 50, 60]
    assert ckpt.best_step() == 20
    assert ckpt.latest_step() == 60
    ckpt.save(70, state, {}, metrics={"loss": 0.1})
    ckpt.save(80, state, {}, metrics={"loss": 0.3})
    ckpt.close()
    reopened = Checkpointer(tmp_path, keep=2, best_metric="loss", best_mode="min")
    assert reopened.all_steps() == [70, 80]  # the old best (20) went once 70 beat it.
    assert reopened.best_step() == 70


def test_best_mode_max_and_missing_metric_is_an_error(tmp_path):
    ckpt = Checkpointer(
        tmp_path, keep=1, best_metric="accuracy", best_mode="max", async_save=False, primary_host=True
    )
    for step, acc in [(1, 0.8), (2, 0.6), (3, 0.7)]:
        ckpt.save(step, _state(), {}, metrics={"accuracy": acc})
    assert ckpt.all_steps() == [1, 3] and ckpt.best_step() == 1
    with pytest.raises(CheckpointError, match="accuracy"):
        ckpt.save(4, _state(), {}, metrics={"loss": 0.1})
    assert not ckpt.save(3, _state(), {})  # an existing step (resume point) is not re-saved.
    ckpt.close()


def test_crash_before_commit_leaves_last_good_checkpoint(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, keep=3, async_save=False)
    ckpt.save(1, _state(1), {"step": 1})

    async def crash(self):
        raise RuntimeError("simulated kill before the atomic rename")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        ckpt.save(2, _state(2), {"step": 2})
    assert any(".orbax-checkpoint-tmp" in name for name in os.listdir(tmp_path))  # data was half-written.
    monkeypatch.undo()
    reopened = Checkpointer(tmp_path, keep=3, async_save=False)
    assert reopened.latest_step() == 1
    state, meta = reopened.restore(None, _abstract(_state(1)))
    _assert_bit_equal(state, _state(1))
    assert meta == {"step": 1}
    assert reopened.save(2, _state(2), {"step": 2})  # the resumed run redoes step 2 cleanly.
    assert not any(".orbax-checkpoint-tmp" in name for name in os.listdir(tmp_path))  # leftovers removed.
    assert reopened.all_steps() == [1, 2]


@pytest.mark.parametrize("damage", ["truncate_data", "delete_manifest", "delete_meta"])
def test_damaged_checkpoint_raises_checkpoint_error_naming_the_directory(tmp_path, damage):
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    ckpt.save(7, _state(), {"x": 1})
    step_dir = tmp_path / "7"
    if damage == "truncate_data":
        files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
        assert files
        for p in files:
            p.write_bytes(p.read_bytes()[:10])
    elif damage == "delete_manifest":
        (step_dir / "state" / "manifest.ocdbt").unlink()
    else:
        for p in (step_dir / "meta").iterdir():
            p.unlink() if p.is_file() else None
    with pytest.raises(CheckpointError, match=r"7.*(Delete that step|choose another workdir)") as err:
        Checkpointer(tmp_path, keep=2).restore(7, _abstract(_state()))
    assert str(step_dir) in str(err.value)


def test_restore_with_a_different_state_structure_names_the_paths(tmp_path):
    with Checkpointer(tmp_path, keep=1, async_save=False) as ckpt:
        ckpt.save(1, _state(), {})
        other = _state()
        other["params"]["pooler"] = jnp.ones(3)
        with pytest.raises(CheckpointError, match="params/pooler"):
            ckpt.restore(1, _abstract(other))
        with pytest.raises(CheckpointError, match=r"saved steps: \[1\]"):
            ckpt.restore(2, _abstract(_state()))
