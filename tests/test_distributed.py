"""Multi-process start-up: settings from flags / JAX_* / SLURM / Open MPI, their errors, and a real
two-process CPU run (gloo over loopback) that shards, reduces and syncs a flag across processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from ftjax import distributed
from ftjax.distributed import DistributedConfigError, resolve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SLURM_2x = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
}


# ---- resolution from flags and environment (no JAX runtime involved)


def test_nothing_set_is_a_single_process():
    plan = resolve(env={}, on_tpu=False)
    assert plan.source == "single" and not plan.multi_process


def test_tpu_vm_with_nothing_set_initializes_automatically():
    plan = resolve(env={}, on_tpu=True)
    assert plan.source == "tpu" and plan.multi_process and plan.num_processes is None


def test_explicit_flags():
    plan = resolve("10.0.0.1:1234", 4, 3, env={}, on_tpu=False)
    assert (plan.source, plan.coordinator_address, plan.num_processes, plan.process_id) == (
        "flags", "10.0.0.1:1234", 4, 3)


def test_jax_env_variables():
    env = {"JAX_COORDINATOR_ADDRESS": "[::1]:999", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    plan = resolve(env=env, on_tpu=False)
    assert (plan.source, plan.coordinator_address, plan.num_processes, plan.process_id) == ("env", "[::1]:999", 2, 0)


def test_flags_win_over_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "7"}
    plan = resolve("b:2", 2, 1, env=env, on_tpu=False)
    assert (plan.coordinator_address, plan.num_processes, plan.process_id) == ("b:2", 2, 1)


def test_slurm_coordinator_is_first_host_with_job_port():
    plan = resolve(env={**SLURM_2x, "SLURM_STEP_NODELIST": "node[12-13]"}, on_tpu=False)
    # The step's nodelist wins over the job's; the port follows JAX's rule (job id mod 4096 + 61440).
    assert plan.source == "slurm"
    assert plan.coordinator_address == f"node12:{4242 % 4096 + 61440}"
    assert (plan.num_processes, plan.process_id, plan.local_device_ids) == (2, 1, None)


def test_slurm_uses_job_nodelist_and_port_override():
    plan = resolve(env={**SLURM_2x, "JAX_COORDINATOR_PORT": "5555"}, on_tpu=False)
    assert plan.coordinator_address == "gpu007:5555"


def test_slurm_one_task_per_gpu_pins_the_local_device():
    env = {**SLURM_2x, "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
    plan = resolve(env=env, on_tpu=False)
    assert (plan.num_processes, plan.process_id, plan.local_device_ids) == (16, 9, (1,))


def test_slurm_single_task_is_single_process():
    env = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1"}
    assert resolve(env=env, on_tpu=False).source == "single"


def test_explicit_coordinator_overrides_slurm_host():
    plan = resolve("head:7000", env=SLURM_2x, on_tpu=False)
    assert (plan.coordinator_address, plan.num_processes, plan.process_id) == ("head:7000", 2, 1)


@pytest.mark.parametrize(
    "nodelist, host",
    [("gpu[003-004,9],cpu1", "gpu003"), ("a1,a2", "a1"), ("n[3]", "n3"), ("r1-n[01-02]-ib", "r1-n01-ib"),
     ("solo", "solo")],
)
def test_first_slurm_host(nodelist, host):
    assert distributed.first_slurm_host(nodelist) == host


def test_ompi_with_coordinator_flag():
    env = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}
    plan = resolve("head:7000", env=env, on_tpu=False)
    assert (plan.source, plan.num_processes, plan.process_id, plan.local_device_ids) == ("flags", 4, 2, None)
    plan = resolve(env={**env, "JAX_COORDINATOR_ADDRESS": "head:7001"}, on_tpu=False)
    assert (plan.coordinator_address, plan.num_processes, plan.process_id) == ("head:7001", 4, 2)


def test_ompi_without_coordinator_names_the_flag():
    env = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2"}
    with pytest.raises(DistributedConfigError, match="OMPI_COMM_WORLD_SIZE=4 needs a coordinator.*--coordinator_address"):
        resolve(env=env, on_tpu=False)


def test_num_processes_one_is_single_even_with_coordinator():
    assert resolve("h:1", 1, env={}, on_tpu=True).source == "single"


def test_num_processes_one_overrides_slurm():
    assert resolve(num_processes=1, env=SLURM_2x, on_tpu=False).source == "single"


def test_num_processes_flag_takes_the_id_from_slurm():
    plan = resolve(num_processes=2, env=SLURM_2x, on_tpu=False)
    assert (plan.source, plan.num_processes, plan.process_id, plan.coordinator_address) == (
        "flags", 2, 1, f"gpu007:{4242 % 4096 + 61440}")


# ---- errors


@pytest.mark.parametrize(
    "args, env, match",
    [
        (("h:1", 2, 2), {}, r"--process_id=2 is out of range for --num_processes=2"),
        (("h:1", 2, -1), {}, r"--process_id=-1 is out of range"),
        (("h:1", 0, 0), {}, r"--num_processes=0 must be >= 1"),
        (("h:1", 1, 1), {}, r"--process_id=1 but --num_processes=1"),
        (("10.0.0.1", 2, 0), {}, r"--coordinator_address='10.0.0.1' has no port.*10.0.0.1:1234"),
        (("::1", 2, 0), {}, r"has no port"),
        (("h:http", 2, 0), {}, r"port 'http' must be a number"),
        (("h:70000", 2, 0), {}, r"port '70000' must be a number in 1..65535"),
        ((None, 2, 0), {}, r"--num_processes=2 needs a coordinator: pass --coordinator_address"),
        (("h:1", 2, None), {}, r"--num_processes=2 but this process's id is not set: pass --process_id"),
        (("h:1", None, None), {}, r"--coordinator_address/JAX_COORDINATOR_ADDRESS is set but the number of"),
        ((None, None, 1), {}, r"--process_id/JAX_PROCESS_ID is set but the number of processes is not"),
        ((None, None, None), {"JAX_NUM_PROCESSES": "two"}, r"JAX_NUM_PROCESSES='two' is not an integer"),
        ((None, None, None), {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5", "JAX_COORDINATOR_ADDRESS": "h:1"},
         r"JAX_PROCESS_ID=5 is out of range for JAX_NUM_PROCESSES=2"),
        ((None, None, None), {"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, r"SLURM_STEP_NODELIST.*SLURM_JOB_NODELIST"),
        ((None, None, None), {**SLURM_2x, "SLURM_PROCID": "x"}, r"SLURM_PROCID='x' is not an integer"),
    ],
)
def test_inconsistent_settings_raise_naming_the_setting(args, env, match):
    with pytest.raises(DistributedConfigError, match=match):
        resolve(*args, env=env, on_tpu=False)


def test_error_is_a_value_error():
    assert issubclass(DistributedConfigError, ValueError)


def test_single_process_init_does_nothing():
    done = distributed.init_from_flags_or_env(env={})
    assert done["initialized"] is False and done["source"] == "single" and done["cpu_devices"] is None
    import jax

    assert not jax.distributed.is_initialized()
    assert distributed.is_primary()
    assert distributed.sync_flag(True) is True and distributed.sync_flag(False) is False


def test_cpu_devices_after_backend_start_is_a_clear_error():
    import jax

    jax.devices()  # the backend is running from here on
    with pytest.raises(DistributedConfigError, match=r"--cpu_devices=3 came after JAX started"):
        distributed.init_from_flags_or_env(local_device_count=3, env={})
    with pytest.raises(DistributedConfigError, match=r"--cpu_devices=0 must be >= 1"):
        distributed.init_from_flags_or_env(local_device_count=0, env={})


# ---- a real two-process run on CPU


def _worker(port: int, process_id: int) -> None:
    """One of the two processes: joins via ftjax.distributed, then checks collectives across processes."""
    done = distributed.init_from_flags_or_env(f"127.0.0.1:{port}", 2, process_id, local_device_count=2,
                                              initialization_timeout=120)  # a ceiling: slow CI machines
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    # Process 0 holds rows [1, 2], process 1 rows [3, 4] of the global array [1, 2, 3, 4].
    local = np.arange(2, dtype=np.float32) + 2 * process_id + 1
    x = jax.make_array_from_process_local_data(rows, local)
    total = jax.jit(
        jax.shard_map(lambda a: jax.lax.psum(a.sum(), "data"), mesh=mesh, in_specs=P("data"), out_specs=P())
    )(x)
    gathered = jax.jit(lambda a: a * 1, out_shardings=replicated)(x)
    result = {
        "done": {k: done[k] for k in ("initialized", "source", "num_processes", "process_id", "cpu_devices")},
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "global_shape": list(x.shape),
        "psum": float(total),
        "gathered": np.asarray(gathered).tolist(),
        "primary": distributed.is_primary(),
        "sync_one_set": distributed.sync_flag(process_id == 1),
        "sync_primary_set": distributed.sync_flag(process_id == 0),
        "sync_none_set": distributed.sync_flag(False),
    }
    print("RESULT " + json.dumps(result), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_share_a_mesh_and_sync_flags():
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
    # Each process sets its own device count (--cpu_devices) instead of conftest's 8 host devices.
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), str(i)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)  # a ceiling, not a clock
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed (rc {p.returncode}):\n{out[-3000:]}"
    results = [json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
               for out in outputs]
    for i, r in enumerate(results):
        assert r["done"] == {"initialized": True, "source": "flags", "num_processes": 2, "process_id": i,
                             "cpu_devices": 2}
        assert (r["process_count"], r["local_devices"], r["global_devices"]) == (2, 2, 4)
        assert r["global_shape"] == [4]
        assert r["psum"] == 10.0
        assert r["gathered"] == [1.0, 2.0, 3.0, 4.0]
        assert r["primary"] is (i == 0)
        assert r["sync_one_set"] is True and r["sync_primary_set"] is True
        assert r["sync_none_set"] is False


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]))
