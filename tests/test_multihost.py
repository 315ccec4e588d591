"""Two processes x 2 CPU devices (gloo over loopback) train through `python -m ftjax.main` like one process
with 4 devices: per-process data shards, one writer (process 0), collective orbax checkpoints, identical
eval metrics everywhere, and SIGTERM preemption (both save the same step, a relaunch resumes and finishes)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16
# Every wait below ends on an event (a process exiting, a log row appearing); this is only the ceiling on any
# one launch, sized for the slowest CI machines (AVX2-only EPYCs, 3-4x slower than a Xeon, where 75 s ran out
# while the two-process run was still starting), so a fast machine waits no longer for it.
TIMEOUT = 300


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    model_dir = tiny.tiny_bert(str(root / "model"))
    data_dir = tiny.sentiment_csvs(str(root / "data"))
    path = root / "recipe.py"
    path.write_text(textwrap.dedent(f"""
        from tests import tiny

        def get_config(arg=None):
            # One length bucket (one train program); the relaunch reuses the programs compiled before.
            return tiny.tiny_config({model_dir!r}, {data_dir!r}, **{{
                "train.steps": {STEPS}, "train.eval_every": 8, "train.log_every": 1, "data.buckets": (32,),
                "train.checkpoint.every": 0, "train.checkpoint.keep": 2, "mesh.data": 4,
                "train.compilation_cache": {str(root / "jax_cache")!r}}})
    """))
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
    # Each process sets its own CPU device count (--cpu_devices), not conftest's 8 host devices.
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return env


def _launch(recipe: str, workdir: str, processes: int, devices: int) -> list[subprocess.Popen]:
    common = [sys.executable, "-m", "ftjax.main", f"--config={recipe}", f"--workdir={workdir}",
              f"--cpu_devices={devices}"]
    if processes == 1:
        cmds = [common]
    else:
        port = _free_port()
        cmds = [common + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                          f"--process_id={i}"] for i in range(processes)]
    return [subprocess.Popen(c, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for c in cmds]


def _wait(procs: list[subprocess.Popen], deadline: float) -> list[tuple[int, str]]:
    """(returncode, output) of each process; kills all of them at the deadline."""
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
            results.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def _rows(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _params(workdir: str, step: int) -> dict[str, np.ndarray]:
    """The params of a checkpoint as numpy arrays (any device layout), read straight from orbax."""
    import orbax.checkpoint as ocp

    item = os.path.join(workdir, "checkpoints", str(step), "state")
    meta = ocp.StandardCheckpointer().metadata(item)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    keys = [k for k in tree if k.startswith("params/")]
    restore_args = {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in tree}
    with ocp.PyTreeCheckpointer() as ckptr:
        flat = ckptr.restore(item, restore_args=restore_args)
    return {k: np.asarray(flat[k]) for k in keys}


def test_two_processes_train_like_one_and_survive_preemption(recipe, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    reference = _launch(recipe, one, processes=1, devices=4)  # runs alongside the 2-process run
    procs = _launch(recipe, two, processes=2, devices=2)

    # Preempt process 1 only, once training is under way: both must save the same step and exit.
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and sum(r["split"] == "train" for r in _rows(two)) < 2:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)
    preempted = _wait(procs, deadline)
    saved = []
    for i, (rc, out) in enumerate(preempted):
        assert rc == 143, f"process {i} exited {rc} after SIGTERM:\n{out[-3000:]}"
        saved.append(int(re.search(r"SIGTERM: saved step (\d+)", out).group(1)))
    assert saved[0] == saved[1] < STEPS, saved
    steps_on_disk = sorted(int(d) for d in os.listdir(os.path.join(two, "checkpoints")) if d.isdigit())
    assert steps_on_disk[-1] == saved[0], steps_on_disk

    # The relaunch resumes from that checkpoint (written by 2 processes) and finishes.
    resumed = _wait(_launch(recipe, two, processes=2, devices=2), time.time() + TIMEOUT)
    for i, (rc, out) in enumerate(resumed):
        assert rc == 0, f"process {i} of the relaunch exited {rc}:\n{out[-3000:]}"
        assert re.search(rf"resumed from .* at step {saved[0]}", out), out[-3000:]
    (rc, ref_out), = _wait(reference, time.time() + TIMEOUT)
    assert rc == 0, ref_out[-3000:]

    # Eval metrics are replicated: both processes print the very same val/test lines, as does 1 process.
    def finals(out: str) -> list[str]:
        return [line for line in out.splitlines() if line.startswith(("val: ", "test: "))]

    assert finals(resumed[0][1]) == finals(resumed[1][1]) and len(finals(resumed[0][1])) == 2
    # Only process 0 writes: one metrics row per (split, step), the same steps as the 1-process run.
    rows, ref_rows = _rows(two), _rows(one)
    keys = [(r["split"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted((r["split"], r["step"]) for r in ref_rows)
    for name in ("summary.json", "run.json", "plots/loss.png"):
        assert os.path.exists(os.path.join(two, name)), name
    ref_loss = {r["step"]: r["loss"] for r in ref_rows if r["split"] == "train"}
    loss = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
    np.testing.assert_allclose([loss[s] for s in sorted(loss)], [ref_loss[s] for s in sorted(loss)],
                               rtol=1e-4, atol=1e-5)

    # Same params as one process with 4 devices (only reduction order differs).
    a, b = _params(one, STEPS), _params(two, STEPS)
    assert a.keys() == b.keys() and len(a) > 10
    for path in a:
        np.testing.assert_allclose(b[path], a[path], rtol=1e-4, atol=1e-5, err_msg=path)

    # Export with the params sharded over both hosts (fsdp=4 across 2 processes): gathered, written once.
    export = str(tmp_path / "export")
    port = _free_port()
    cmds = [[sys.executable, "-m", "ftjax.main", f"--config={recipe}", f"--workdir={two}", "--mode=export",
             f"--export_dir={export}", f"--step={STEPS}", "--config.mesh.data=1", "--config.mesh.fsdp=4",
             "--cpu_devices=2", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}"] for i in range(2)]
    exporters = [subprocess.Popen(c, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for c in cmds]
    for i, (rc, out) in enumerate(_wait(exporters, time.time() + TIMEOUT)):
        assert rc == 0, f"export process {i} exited {rc}:\n{out[-3000:]}"
    from safetensors.numpy import load_file

    exported = load_file(os.path.join(export, "model.safetensors"))
    np.testing.assert_array_equal(exported["classifier.weight"], b["params/classifier/kernel"].T)
