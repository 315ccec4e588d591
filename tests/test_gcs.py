"""The storage stack against a real GCS emulator (tests/gcs_emulator.py): gcsfs, tensorstore, orbax,
tensorboardX and etils.epath on gs:// paths, in this process and in a subprocess. These pin that a
`gs://bucket/run` workdir can work; the run lifecycle on gs:// is tested on top of the same fixture."""

import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from tests.gcs_emulator import invalidate_caches


def test_gcsfs_talks_to_the_emulator_anonymously(gcs_bucket, gcs_emulator):
    import fsspec

    fs = fsspec.filesystem("gs")
    assert fs._location == gcs_emulator.url
    assert fs.credentials.method == "anon"
    fs.pipe(f"{gcs_bucket}/dir/a.bin", b"\x00\x01payload")
    assert fs.cat(f"{gcs_bucket}/dir/a.bin") == b"\x00\x01payload"
    assert fs.ls(f"{gcs_bucket}/dir", detail=False) == [f"{gcs_bucket[5:]}/dir/a.bin"]
    assert fs.info(f"{gcs_bucket}/dir")["type"] == "directory"
    fs.rm(f"{gcs_bucket}/dir", recursive=True)
    assert not fs.exists(f"{gcs_bucket}/dir/a.bin")


def test_epath_file_operations(gcs_bucket):
    from etils import epath

    root = epath.Path(gcs_bucket) / "run"
    assert type(root).__name__ == "PosixGPath" and os.fspath(root) == f"{gcs_bucket}/run"
    assert not root.exists()
    # Object stores have no empty folders: mkdir succeeds but a folder exists only once it holds a file.
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"lr": 1e-3}))
    (root / "logs" / "plot.png").write_bytes(b"\x89PNG fake")
    with (root / "logs" / "metrics.jsonl").open("w") as f:
        f.write('{"step": 1}\n{"step": 2}\n')
    assert root.is_dir() and (root / "logs").is_dir() and (root / "config.json").is_file()
    assert json.loads((root / "config.json").read_text()) == {"lr": 1e-3}
    assert (root / "logs" / "plot.png").read_bytes() == b"\x89PNG fake"
    assert (root / "logs" / "metrics.jsonl").read_text().splitlines() == ['{"step": 1}', '{"step": 2}']
    assert (root / "config.json").stat().length == len(json.dumps({"lr": 1e-3}))
    assert sorted(p.name for p in root.iterdir()) == ["config.json", "logs"]
    assert sorted(p.name for p in root.glob("logs/*.png")) == ["plot.png"]
    assert sorted(os.fspath(p) for p in root.glob("*/*")) == [
        f"{gcs_bucket}/run/logs/metrics.jsonl", f"{gcs_bucket}/run/logs/plot.png"]

    # rename: a file, then a whole folder (gcsfs copies and deletes; not atomic on GCS)
    (root / "config.json").rename(root / "config.old.json")
    assert not (root / "config.json").exists() and (root / "config.old.json").is_file()
    (root / "logs").rename(root / "logs2")
    assert not (root / "logs").exists()
    assert sorted(p.name for p in (root / "logs2").iterdir()) == ["metrics.jsonl", "plot.png"]
    with pytest.raises(FileExistsError):
        (root / "config.old.json").rename(root / "logs2" / "plot.png")

    (root / "config.old.json").unlink()
    assert not (root / "config.old.json").exists()
    (root / "logs2").rmtree()
    assert not (root / "logs2").exists() and not root.exists()


def test_append_mode_is_not_supported_on_gcs(gcs_bucket):
    """GCS objects are immutable: gcsfs opens "a" as "w" (with a warning), so a jsonl log on gs:// must be
    rewritten whole (or written locally and copied), never appended to."""
    from etils import epath

    p = epath.Path(gcs_bucket) / "metrics.jsonl"
    p.write_text("line1\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with p.open("a") as f:
            f.write("line2\n")
    # If this fails, gcsfs learnt to append: metrics.jsonl could then be appended to on gs:// too.
    assert p.read_text() == "line2\n"
    assert any("Append mode" in str(w.message) for w in caught)


def test_fileio_json_and_atomic_dir(gcs_bucket):
    from ftjax import fileio

    run = f"{gcs_bucket}/run"
    assert fileio.is_remote(run) and os.fspath(fileio.path(run)) == run
    fileio.write_json(f"{run}/summary.json", {"acc": 0.5})
    assert fileio.read_json(f"{run}/summary.json") == {"acc": 0.5}
    for version in (1, 2):  # the second export replaces the first
        with fileio.atomic_dir(f"{run}/export") as tmp:
            (tmp / "config.json").write_text(json.dumps({"v": version}))
            (tmp / "model.safetensors").write_bytes(b"x" * version)
    export = fileio.path(f"{run}/export")
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((export / "config.json").read_text()) == {"v": 2}
    assert sorted(p.name for p in fileio.path(run).iterdir()) == ["export", "summary.json"]


def test_tensorstore_gcs_kvstore_and_zarr(gcs_bucket):
    import tensorstore as ts

    bucket = gcs_bucket[len("gs://"):]
    kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": "kv/"}).result()
    kv[b"key"] = b"value"
    assert kv[b"key"] == b"value" and kv.list().result() == [b"key"]
    data = np.arange(24, dtype=np.float32).reshape(4, 6)
    spec = {"driver": "zarr3", "kvstore": f"{gcs_bucket}/arr/"}
    ts.open(spec, create=True, dtype=ts.float32, shape=data.shape).result().write(data).result()
    np.testing.assert_array_equal(ts.open(spec).result().read().result(), data)
    from etils import epath

    assert (epath.Path(gcs_bucket) / "arr" / "zarr.json").is_file()  # the same objects, seen through gcsfs


def test_orbax_checkpoint_manager_sharded_pytree_and_json(gcs_bucket):
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from etils import epath
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    sharding = NamedSharding(Mesh(devices, ("data", "model")), P("data", "model"))
    state = {"w": jax.device_put(jnp.arange(64, dtype=jnp.float32).reshape(8, 8), sharding),
             "b": jnp.ones((3,), jnp.bfloat16), "step": jnp.int32(0)}
    directory = epath.Path(gcs_bucket) / "run" / "ckpt"
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    with ocp.CheckpointManager(directory, options=options, item_names=("state", "meta")) as mgr:
        for step in (1, 2, 3):
            state = {**state, "w": state["w"] + 1, "step": jnp.int32(step)}
            meta = {"step": step, "loss": 1.0 / step}
            mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2, 3]
    invalidate_caches()
    assert sorted(p.name for p in directory.iterdir()) == ["2", "3"]

    with ocp.CheckpointManager(directory, options=options, item_names=("state", "meta")) as mgr:
        assert mgr.latest_step() == 3
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = mgr.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          meta=ocp.args.JsonRestore()))
    assert restored.meta == {"step": 3, "loss": 1.0 / 3}
    assert restored.state["w"].sharding == sharding
    np.testing.assert_array_equal(restored.state["w"], np.arange(64, dtype=np.float32).reshape(8, 8) + 3)
    assert restored.state["b"].dtype == jnp.bfloat16 and int(restored.state["step"]) == 3


def _read_scalars(event_file):
    from tensorboardX.proto import event_pb2

    data, out, offset = event_file.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        out += [(event.step, v.tag, round(v.simple_value, 6)) for v in event.summary.value]
    return out


def test_tensorboardx_writes_event_files_to_gcs(gcs_bucket):
    from etils import epath
    from tensorboardX import SummaryWriter

    logdir = f"{gcs_bucket}/run/tb/train"
    writer = SummaryWriter(logdir)
    for step in range(3):
        writer.add_scalar("loss", 1.0 / (step + 1), step)
    writer.flush()  # each flush re-uploads the whole event file (GCS objects cannot be appended to)
    writer.add_scalar("loss", 0.125, 3)
    writer.close()
    (event_file,) = epath.Path(logdir).glob("events.out.tfevents.*")
    assert _read_scalars(event_file) == [(0, "loss", 1.0), (1, "loss", 0.5), (2, "loss", 0.333333),
                                         (3, "loss", 0.125)]


def test_subprocess_inherits_the_emulator(gcs_bucket):
    """A child started by a test (e.g. `python -m ftjax.main ...`) reaches the emulator via os.environ."""
    code = textwrap.dedent(f"""
        import numpy as np, tensorstore as ts
        from etils import epath
        epath.Path("{gcs_bucket}/child/hello.txt").write_text("from the child")
        ts.open({{"driver": "zarr3", "kvstore": "{gcs_bucket}/child/arr/"}}, create=True,
                dtype=ts.int32, shape=[3]).result().write(np.array([1, 2, 3], np.int32)).result()
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    import tensorstore as ts
    from etils import epath

    assert (epath.Path(gcs_bucket) / "child" / "hello.txt").read_text() == "from the child"
    arr = ts.open({"driver": "zarr3", "kvstore": f"{gcs_bucket}/child/arr/"}).result().read().result()
    np.testing.assert_array_equal(arr, [1, 2, 3])
