"""Multi-process start-up: `jax.distributed.initialize` from flags or the cluster's environment.

One call at the top of `main` (before any JAX op) makes every process of a TPU pod, a SLURM/Open MPI GPU
job or a local CPU run join one JAX runtime; `is_primary` and `sync_flag` are what the trainer needs after.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils

from ftjax.errors import UserError

try:  # A private JAX helper (TPU chips on the PCI bus); when it moves, `_on_tpu_vm` assumes no TPU.
    from jax._src import hardware_utils
except ImportError:
    hardware_utils = None

COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's coordinator for multi-process runs (default: $JAX_COORDINATOR_ADDRESS, or "
    "the first host of the SLURM nodelist; TPU VMs find it themselves).")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None,
    "Number of processes of the run (default: $JAX_NUM_PROCESSES, $SLURM_NTASKS, $OMPI_COMM_WORLD_SIZE, "
    "or TPU VM metadata). 1 = single process, no distributed start-up.")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None,
    "This process's index in [0, num_processes) (default: $JAX_PROCESS_ID, $SLURM_PROCID, "
    "$OMPI_COMM_WORLD_RANK).")
CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None,
    "CPU backend only: number of local CPU devices per process (sets jax_num_cpu_devices; for tests and "
    "local multi-process runs).")

# Port used when the coordinator's host comes from SLURM and no port is given (same rule as JAX's own
# SLURM detection: one port per job id in the ephemeral range, so concurrent jobs rarely collide).
_PORT_BASE = 65535 - 2**12 + 1


class DistributedConfigError(UserError, ValueError):
    """Multi-process settings are missing or inconsistent; the message names the flag/variable and the fix."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `init_from_flags_or_env` will do, resolved from flags and environment without touching JAX."""

    source: str  # "single" | "flags" | "env" | "slurm" | "ompi" | "tpu"
    num_processes: int | None = 1  # None with source "tpu": JAX reads it from the TPU VM metadata.
    process_id: int | None = 0
    coordinator_address: str | None = None
    local_device_ids: tuple[int, ...] | None = None  # None: all local devices are this process's.

    @property
    def multi_process(self) -> bool:
        return self.source == "tpu" or (self.num_processes or 1) > 1


def _int_setting(value: Any, name: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DistributedConfigError(f"{name}={value!r} is not an integer; set it to a whole number") from None


def check_coordinator(address: str, name: str = "--coordinator_address") -> str:
    """Returns `address` if it is host:port (IPv6 as [addr]:port), else raises naming `name`."""
    address = address.strip()
    host, sep, port = address.rpartition(":")
    if not sep or not host or (host.count(":") and not (host.startswith("[") and host.endswith("]"))):
        raise DistributedConfigError(
            f"{name}={address!r} has no port: use HOST:PORT, e.g. {name}={address or '10.0.0.1'}:1234 "
            "(IPv6: [ADDR]:PORT); the port must be free on process 0's host")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedConfigError(f"{name}={address!r}: port {port!r} must be a number in 1..65535")
    return address


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: 'gpu[003-004,9],cpu1' -> 'gpu003' (what `scontrol show hostnames`
    prints first)."""
    item, depth = [], 0
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            break
        depth += ch == "["
        depth -= ch == "]"
        item.append(ch)
    # Each bracket group [a-b,c] stands for its first value, a (zero padding kept).
    host = re.sub(r"\[([^\],-]*)[^\]]*\]", r"\1", "".join(item))
    if not host or "[" in host or "]" in host:
        raise DistributedConfigError(
            f"cannot read the first host of SLURM nodelist {nodelist!r}; pass --coordinator_address=HOST:PORT")
    return host


def _on_tpu_vm() -> bool:
    """True on a Cloud TPU VM (TPU chips on the PCI bus and libtpu installed), without starting JAX."""
    if hardware_utils is None:
        return False
    try:
        chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    except Exception:  # noqa: BLE001 - a private JAX helper: when it changes, assume no TPU.
        return False
    return chips > 0 and (importlib.util.find_spec("libtpu") is not None or "TPU_LIBRARY_PATH" in os.environ)


@dataclasses.dataclass
class _Settings:
    """The settings while `resolve` fills them in, each with the flag or variable it came from (for errors)."""

    source: str | None
    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    coord_name: str
    count_name: str
    id_name: str
    local_device_ids: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class _Cluster:
    """What a scheduler's environment says: this task's place in the job."""

    kind: str  # "slurm" | "ompi"
    count: int
    task_id: int
    nodes: int
    local_id: str | None
    count_var: str
    id_var: str
    local_var: str


def _explicit_settings(coordinator, num_processes, process_id, env: Mapping[str, str]) -> _Settings:
    """Step 1: the arguments (flags), then the JAX_* variables for what the flags leave unset."""
    source = "flags" if any(v is not None for v in (coordinator, num_processes, process_id)) else None

    def from_env(current, var, parse):
        nonlocal source
        if current is None and env.get(var, "").strip():
            source = source or "env"
            return parse(env[var], var)
        return current

    coordinator = from_env(coordinator, "JAX_COORDINATOR_ADDRESS", lambda v, n: v.strip())
    num_processes = from_env(num_processes, "JAX_NUM_PROCESSES", _int_setting)
    process_id = from_env(process_id, "JAX_PROCESS_ID", _int_setting)
    flags_first = source == "flags"
    return _Settings(source, coordinator, num_processes, process_id,
                     coord_name="--coordinator_address" if flags_first else "JAX_COORDINATOR_ADDRESS",
                     count_name="--num_processes" if flags_first else "JAX_NUM_PROCESSES",
                     id_name="--process_id" if flags_first else "JAX_PROCESS_ID")


def _slurm_cluster(env: Mapping[str, str]) -> _Cluster | None:
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return None
    count = _int_setting(env["SLURM_NTASKS"], "SLURM_NTASKS")
    task_id = _int_setting(env["SLURM_PROCID"], "SLURM_PROCID")
    nodes = _int_setting(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", count)), "SLURM_NNODES")
    return _Cluster("slurm", count, task_id, nodes, env.get("SLURM_LOCALID"), "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_LOCALID")


def _ompi_cluster(env: Mapping[str, str]) -> _Cluster | None:
    if "OMPI_COMM_WORLD_SIZE" not in env or "OMPI_COMM_WORLD_RANK" not in env:
        return None
    count = _int_setting(env["OMPI_COMM_WORLD_SIZE"], "OMPI_COMM_WORLD_SIZE")
    task_id = _int_setting(env["OMPI_COMM_WORLD_RANK"], "OMPI_COMM_WORLD_RANK")
    nodes = count // max(_int_setting(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1), "OMPI_COMM_WORLD_LOCAL_SIZE"), 1)
    return _Cluster("ompi", count, task_id, nodes, env.get("OMPI_COMM_WORLD_LOCAL_RANK"), "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")


def _slurm_coordinator(env: Mapping[str, str]) -> str:
    """process 0's address under SLURM: the first host of the nodelist and a port derived from the job id."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise DistributedConfigError(
            "SLURM_NTASKS/SLURM_PROCID are set but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST "
            "is: run under srun, or pass --coordinator_address=HOST:PORT")
    port = env.get("JAX_COORDINATOR_PORT") or str(
        _int_setting(env.get("SLURM_JOB_ID", 0), "SLURM_JOB_ID") % 2**12 + _PORT_BASE)
    return f"{first_slurm_host(nodelist)}:{port}"


def _apply_cluster(s: _Settings, cluster: _Cluster, env: Mapping[str, str]) -> None:
    """Step 2 (SLURM or Open MPI): the scheduler fills in what is still unset."""
    wants_cluster = s.num_processes is None and cluster.count > 1
    if not (wants_cluster or ((s.num_processes or 0) > 1 and s.process_id is None)):
        return
    s.source = s.source or cluster.kind
    if s.num_processes is None:
        s.num_processes, s.count_name = cluster.count, cluster.count_var
    if s.process_id is None:
        s.process_id, s.id_name = cluster.task_id, cluster.id_var
    # More tasks than nodes: one process per accelerator (JAX's convention), else all local devices.
    if cluster.count > cluster.nodes and cluster.local_id is not None and "JAX_LOCAL_DEVICE_IDS" not in env:
        s.local_device_ids = (_int_setting(cluster.local_id, cluster.local_var),)
    if s.coordinator is None and cluster.kind == "slurm" and (s.num_processes or 1) > 1:
        s.coordinator, s.coord_name = _slurm_coordinator(env), "SLURM nodelist + port"


def _checked_plan(s: _Settings, on_tpu: bool | None) -> Plan:
    """Step 3: a clear message for each way the settings can be incomplete or inconsistent."""
    count, pid = s.num_processes, s.process_id
    if count is None:
        if s.source == "flags" and s.coordinator is not None and (on_tpu if on_tpu is not None else _on_tpu_vm()):
            return Plan("tpu", None, pid, check_coordinator(s.coordinator, s.coord_name))
        given = "--process_id/JAX_PROCESS_ID" if pid is not None else "--coordinator_address/JAX_COORDINATOR_ADDRESS"
        raise DistributedConfigError(
            f"{given} is set but the number of processes is not: also pass --num_processes=N "
            "(or set JAX_NUM_PROCESSES), or remove it for a single-process run")
    if count < 1:
        raise DistributedConfigError(f"{s.count_name}={count} must be >= 1")
    if count == 1:
        if pid not in (None, 0):
            raise DistributedConfigError(
                f"{s.id_name}={pid} but {s.count_name}=1: a single process has id 0; fix {s.id_name} or "
                f"raise {s.count_name}")
        return Plan("single")
    if pid is None:
        raise DistributedConfigError(
            f"{s.count_name}={count} but this process's id is not set: pass --process_id=I "
            f"(0 <= I < {count}) or set JAX_PROCESS_ID")
    if not 0 <= pid < count:
        raise DistributedConfigError(
            f"{s.id_name}={pid} is out of range for {s.count_name}={count}: ids run from 0 to {count - 1}")
    if s.coordinator is None:
        raise DistributedConfigError(
            f"{s.count_name}={count} needs a coordinator: pass --coordinator_address=HOST:PORT (process 0's "
            "host and a free port, the same on every process) or set JAX_COORDINATOR_ADDRESS")
    return Plan(s.source, count, pid, check_coordinator(s.coordinator, s.coord_name), s.local_device_ids)


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    env: Mapping[str, str] | None = None,
    on_tpu: bool | None = None,
) -> Plan:
    """The multi-process settings from (in order) the arguments, JAX_* variables, SLURM, Open MPI, TPU VM.

    Each of coordinator / count / id is taken from the first source that has it, so e.g.
    `--coordinator_address` combines with OMPI_COMM_WORLD_SIZE/RANK. Nothing set -> a single process.
    """
    env = os.environ if env is None else env
    settings = _explicit_settings(coordinator, num_processes, process_id, env)
    cluster = _slurm_cluster(env) or _ompi_cluster(env)
    if cluster is not None:
        _apply_cluster(settings, cluster, env)
    if settings.source is None:  # Nothing set: a TPU VM's workers find each other, anything else is single.
        if on_tpu if on_tpu is not None else _on_tpu_vm():
            return Plan("tpu", num_processes=None, process_id=None)
        return Plan("single")
    return _checked_plan(settings, on_tpu)


def init_from_flags_or_env(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
    *,
    initialization_timeout: int = 300,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Starts JAX's multi-process runtime if the flags or the environment ask for it; a single process
    with nothing set does nothing. Must run before any JAX computation. Returns what was done."""
    plan = resolve(coordinator, num_processes, process_id, env=env)
    done: dict[str, Any] = {**dataclasses.asdict(plan), "initialized": False, "cpu_devices": None}
    if local_device_count is not None:
        if local_device_count < 1:
            raise DistributedConfigError(f"--cpu_devices={local_device_count} must be >= 1")
        try:
            jax.config.update("jax_num_cpu_devices", int(local_device_count))
        except RuntimeError as e:
            raise DistributedConfigError(
                f"--cpu_devices={local_device_count} came after JAX started its backends; call "
                "ftjax.distributed.init_from_flags() before any JAX computation") from e
        done["cpu_devices"] = int(local_device_count)
    if not plan.multi_process:
        return done
    if jax.distributed.is_initialized():
        logging.info("jax.distributed is already initialized; leaving it as it is")
        done["initialized"] = "already"
        return done
    # CPU backends exchange data over gloo (TCP); GPU/TPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if plan.source == "tpu":
        # TPU VMs: JAX reads the workers, this worker's id and the coordinator from the VM metadata.
        jax.distributed.initialize(coordinator_address=plan.coordinator_address, process_id=plan.process_id,
                                   initialization_timeout=initialization_timeout)
    else:
        logging.info("jax.distributed.initialize: process %d of %d, coordinator %s (from %s)",
                     plan.process_id, plan.num_processes, plan.coordinator_address, plan.source)
        jax.distributed.initialize(
            coordinator_address=plan.coordinator_address,
            num_processes=plan.num_processes,
            process_id=plan.process_id,
            local_device_ids=list(plan.local_device_ids) if plan.local_device_ids is not None else None,
            # Everything is resolved here; JAX's own cluster detection would, under SLURM with one task
            # per node, restrict each process to its first GPU.
            cluster_detection_method="deactivate",
            initialization_timeout=initialization_timeout,
        )
    done["initialized"] = True
    done["num_processes"], done["process_id"] = jax.process_count(), jax.process_index()
    return done


def init_from_flags() -> dict[str, Any]:
    """`init_from_flags_or_env` with the values of --coordinator_address/--num_processes/--process_id/
    --cpu_devices (call it first thing in `main`, after absl has parsed the flags)."""
    return init_from_flags_or_env(COORDINATOR_ADDRESS.value, NUM_PROCESSES.value, PROCESS_ID.value,
                                  CPU_DEVICES.value)


def is_primary() -> bool:
    """True on process 0, the only one that writes logs, plots, summaries and exports."""
    return jax.process_index() == 0


def sync_flag(local_flag: bool) -> bool:
    """True on every process if `local_flag` is True on any (e.g. one host got SIGTERM); all processes
    must call it at the same step. A single process returns `local_flag` without any collective."""
    if jax.process_count() == 1:
        return bool(local_flag)
    gathered = multihost_utils.process_allgather(np.asarray(bool(local_flag), dtype=np.int32))
    return bool(np.any(gathered))


def barrier(name: str) -> None:
    """Waits until every process reaches this point (no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
