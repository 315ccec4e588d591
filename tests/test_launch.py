"""launch/*.sh: the exact commands each script would run (--dry_run), their argument checks, the local
launcher's wait/fail behaviour with a stand-in python, and shellcheck."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ("tpu_vm.sh", "gpu_slurm.sh", "local_multiprocess.sh")
FTJAX_ARGS = ["--config=configs/x.py:a=1,b=2", "--workdir=/tmp/my run", "--config.model.name_or_path=it's"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
    env.update(extra)
    return env


def _run(script: str, *args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=env or _env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _lines(proc: subprocess.CompletedProcess) -> list[list[str]]:
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def _fake_tool(directory, name: str, body: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/usr/bin/env bash\n" + body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


# ---- static checks


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_executable(script):
    path = os.path.join(LAUNCH, script)
    assert os.access(path, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", path], check=True, timeout=10)


def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        print("shellcheck is not installed (Debian: apt-get install -y shellcheck); skipping")
        pytest.skip("shellcheck is not installed (Debian: apt-get install -y shellcheck)")
    proc = subprocess.run(["shellcheck", *(os.path.join(LAUNCH, s) for s in SCRIPTS)], check=False, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- local_multiprocess.sh


def test_local_dry_run_prints_one_command_per_process(tmp_path):
    logs = str(tmp_path / "logs")
    lines = _lines(_run("local_multiprocess.sh", "--num_processes", "3", "--cpu_devices=2", "--port", "4321",
                        "--log_dir", logs, "--dry_run", "--", *FTJAX_ARGS))
    assert lines[0] == ["mkdir", "-p", logs]
    assert len(lines) == 4
    for i, words in enumerate(lines[1:]):
        assert words[:5] == ["env", "JAX_PLATFORMS=cpu", "python", "-m", "ftjax.main"]
        assert words[5:9] == ["--coordinator_address=127.0.0.1:4321", "--num_processes=3", f"--process_id={i}",
                              "--cpu_devices=2"]
        # ftjax's own flags come back unchanged through the quoting (spaces, quotes, commas).
        assert words[9:12] == FTJAX_ARGS
        assert words[12:] == [">", f"{logs}/process_{i}.log", "2>&1", "&"]
    assert not os.path.exists(logs), "--dry_run must not create anything"


def test_local_dry_run_picks_one_free_port_for_all():
    lines = _lines(_run("local_multiprocess.sh", "--num_processes=2", "--dry_run", "--", "--workdir=w"))
    ports = {w for words in lines[1:] for w in words if w.startswith("--coordinator_address=")}
    assert len(ports) == 1
    assert 20000 <= int(ports.pop().rsplit(":", 1)[1]) < 60000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cpu_devices", "2"], "--num_processes must be a positive integer"),
        (["--num_processes", "0"], "--num_processes must be a positive integer"),
        (["--num_processes", "2", "--cpu_devices", "x"], "--cpu_devices must be a positive integer"),
        (["--num_processes", "2", "--port", "99999"], "--port must be in 1..65535"),
        (["--num_processes", "2", "--workdir=w"], "unknown option --workdir=w (ftjax's own flags go after --)"),
        (["--num_processes"], "--num_processes needs a value"),
    ],
)
def test_local_bad_arguments(args, message):
    proc = _run("local_multiprocess.sh", *args, "--dry_run")
    assert proc.returncode == 2
    assert message in proc.stderr


def test_local_run_fails_fast_with_the_failing_process_status(tmp_path):
    # A stand-in python: process 1 fails after a moment (the others have started by then); the others
    # would run for a minute unless stopped.
    fake = _fake_tool(tmp_path, "python", 'echo "args: $*"\n'
                      'for a in "$@"; do [[ $a == --process_id=1 ]] && { sleep 1; echo boom >&2; exit 7; }; done\n'
                      "sleep 60 & wait\n")
    logs = tmp_path / "logs"
    start = time.time()
    proc = _run("local_multiprocess.sh", "--num_processes", "3", "--python", fake, "--log_dir", str(logs), "--",
                "--workdir=w")
    assert proc.returncode == 7, proc.stderr
    assert time.time() - start < 20, "the other processes were not stopped"
    assert "process 1 exited with status 7" in proc.stderr and "boom" in proc.stderr
    for i in range(3):
        log = (logs / f"process_{i}.log").read_text()
        assert f"--process_id={i}" in log and "--num_processes=3" in log and "--workdir=w" in log


def test_local_run_succeeds_when_all_succeed(tmp_path):
    fake = _fake_tool(tmp_path, "python", 'echo "ok $*"\n')
    proc = _run("local_multiprocess.sh", "--num_processes=2", f"--python={fake}", f"--log_dir={tmp_path}", "--",
                "--workdir=w")
    assert proc.returncode == 0, proc.stderr
    assert all((tmp_path / f"process_{i}.log").read_text().startswith("ok -m ftjax.main") for i in range(2))


# ---- gpu_slurm.sh


def test_slurm_outside_a_job_submits_itself():
    lines = _lines(_run("gpu_slurm.sh", "--nodes", "2", "--gpus_per_node=8", "--partition", "gpu", "--time",
                        "04:00:00", "--requeue", "--dry_run", "--", *FTJAX_ARGS))
    assert lines[0] == ["mkdir", "-p", "logs/slurm"]
    sbatch = lines[1]
    assert sbatch[0] == "sbatch"
    for opt in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--signal=TERM@120", "--requeue",
                "--partition=gpu", "--time=04:00:00", "--output=logs/slurm/%x-%j.out"):
        assert opt in sbatch
    script = sbatch.index(os.path.join(LAUNCH, "gpu_slurm.sh"))
    # The job gets the same options back (without --dry_run), then ftjax's flags.
    assert "--dry_run" not in sbatch
    assert sbatch[script + 1:] == ["--nodes", "2", "--gpus_per_node=8", "--partition", "gpu", "--time", "04:00:00",
                                   "--requeue", "--", *FTJAX_ARGS]


def test_slurm_outside_a_job_needs_nodes_and_gpus():
    proc = _run("gpu_slurm.sh", "--gpus_per_node", "8", "--dry_run")
    assert proc.returncode == 2 and "--nodes must be a positive integer" in proc.stderr
    proc = _run("gpu_slurm.sh", "--nodes", "2", "--dry_run")
    assert proc.returncode == 2 and "--gpus_per_node must be a positive integer" in proc.stderr


def _in_job_env(path: str) -> dict[str, str]:
    return _env(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[007-008]", SLURM_JOB_NUM_NODES="2",
                SLURM_GPUS_PER_NODE="8", PATH=path)


def test_slurm_in_job_runs_srun_with_coordinator_from_nodelist(tmp_path):
    bin_dir = tmp_path / "bin"  # no scontrol here: the script reads the nodelist itself
    bin_dir.mkdir()
    path = f"{bin_dir}:/usr/bin:/bin"
    lines = _lines(_run("gpu_slurm.sh", "--venv", "/opt/venv", "--dry_run", "--", *FTJAX_ARGS,
                        env=_in_job_env(path)))
    assert len(lines) == 1
    srun = lines[0]
    assert srun[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--gpus-per-node=8"]
    bash_c = srun.index("bash")
    port = 4242 % 4096 + 61440
    assert srun[bash_c + 3:] == ["/opt/venv/bin/python", f"gpu007:{port}", *FTJAX_ARGS]

    # What each task runs: its own SLURM_PROCID/SLURM_NTASKS become the process flags.
    fake = _fake_tool(tmp_path, "python", 'printf "%s\\n" "$@"\n')
    task = subprocess.run(["bash", "-c", srun[bash_c + 2], fake, *srun[bash_c + 4:]], check=False, capture_output=True,
                          text=True, timeout=10, env=_env(SLURM_NTASKS="2", SLURM_PROCID="1"))
    assert task.stdout.splitlines() == ["-m", "ftjax.main", f"--coordinator_address=gpu007:{port}",
                                        "--num_processes=2", "--process_id=1", *FTJAX_ARGS]


def test_slurm_in_job_uses_scontrol_and_port_flag(tmp_path):
    _fake_tool(tmp_path, "scontrol", '[[ "$*" == "show hostnames gpu[007-008]" ]] && printf "head1\\nn2\\n"\n')
    lines = _lines(_run("gpu_slurm.sh", "--port", "7777", "--dry_run", "--", "--workdir=w",
                        env=_in_job_env(f"{tmp_path}:/usr/bin:/bin")))
    assert lines[0][-3:] == ["python", "head1:7777", "--workdir=w"]


# ---- tpu_vm.sh


def _ssh_command(words: list[str]) -> str:
    return next(w for w in words if w.startswith("--command="))[len("--command="):]


def test_tpu_all_creates_copies_installs_runs_and_deletes():
    lines = _lines(_run("tpu_vm.sh", "--name", "ft1", "--zone", "us-west4-a", "--type", "v5litepod-16",
                        "--spot", "--project=p1", "--dry_run", "--", *FTJAX_ARGS))
    plan, create, tar, scp, install, run, delete = lines
    # First the plan, here, for the slice's topology, with the run's config (not its gs:// workdir).
    assert plan[:5] == ["python3", "-m", "ftjax.main", "--mode=dry_run", "--topology=v5litepod-16"]
    assert plan[5].startswith("--workdir=") and plan[5].endswith("ftjax-plan-ft1")
    assert [a for a in FTJAX_ARGS if not a.startswith("--workdir=")] == plan[6:]
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ft1", "--zone=us-west4-a",
                      "--project=p1", "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
                      "--spot"]
    assert tar[:4] == ["tar", "-czf", "/tmp/ftjax-ft1.tar.gz", "-C"] and tar[4] == REPO
    assert "--exclude=./.venv" in tar and "--exclude=./.git" in tar
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/ftjax-ft1.tar.gz", "ft1:ftjax.tar.gz",
                   "--zone=us-west4-a", "--project=p1", "--worker=all"]
    for words in (install, run):
        assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ft1"] and "--worker=all" in words
    assert "tar -xzf ~/ftjax.tar.gz -C ~/ftjax" in _ssh_command(install)
    assert "pip install -q -e . 'jax[tpu]'" in _ssh_command(install)
    # The remote shell gets ftjax's flags back unchanged.
    remote = shlex.split(_ssh_command(run))
    main = remote.index("ftjax.main")
    assert remote[main - 2:main] == ["python3", "-m"]
    assert remote[main + 1:main + 4] == FTJAX_ARGS
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "ft1", "--zone=us-west4-a", "--project=p1",
                      "--quiet"]


def test_tpu_queued_resource_with_git_and_keep(tmp_path):
    proc = _run("tpu_vm.sh", "--name", "q1", "--zone", "z", "--type", "v4-32", "--queued", "--spot", "--git",
                "https://example.com/ftjax.git", "--ref", "feature/x", "--jax_version", "0.10.2", "--keep",
                "--dry_run", "--", "--workdir=gs://b/r")
    plan, create, describe, install, run = _lines(proc)
    assert "--topology=v4-32" in plan
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "q1", "--node-id=q1", "--zone=z",
                      "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"]
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "q1"]
    remote = _ssh_command(install)
    assert "git clone -q https://example.com/ftjax.git ~/ftjax && git -C ~/ftjax checkout -q feature/x" in remote
    assert "'jax[tpu]==0.10.2'" in remote
    assert "--workdir=gs://b/r" in _ssh_command(run)
    assert "delete --name q1 --zone z --queued" in proc.stderr  # --keep: how to delete later


@pytest.mark.parametrize(
    "args, expected",
    [
        (["delete", "--queued"], ["gcloud", "compute", "tpus", "queued-resources", "delete", "n", "--zone=z",
                                  "--force", "--quiet"]),
        (["create", "--preemptible", "--type", "v6e-8"],
         ["gcloud", "compute", "tpus", "tpu-vm", "create", "n", "--zone=z", "--accelerator-type=v6e-8",
          "--version=v2-alpha-tpuv6e", "--preemptible"]),
        (["create", "--type", "v5p-8", "--version", "custom-img"],
         ["gcloud", "compute", "tpus", "tpu-vm", "create", "n", "--zone=z", "--accelerator-type=v5p-8",
          "--version=custom-img"]),
    ],
)
def test_tpu_subcommands(args, expected):
    assert _lines(_run("tpu_vm.sh", *args, "--name", "n", "--zone", "z", "--dry_run")) == [expected]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--zone", "z", "--", "--workdir=w"], "--name is required"),
        (["--name", "n", "--", "--workdir=w"], "--zone is required"),
        (["--name", "n", "--zone", "z", "--spot", "--preemptible", "--", "--a"], "--spot and --preemptible"),
        (["--name", "n", "--zone", "z", "--queued", "--preemptible", "--", "--a"], "use --queued --spot"),
        (["--name", "n", "--zone", "z", "--type", "tpu9-8", "--", "--a"], "pass --version"),
        (["--name", "n", "--zone", "z"], "nothing to run: put ftjax's flags after --"),
    ],
)
def test_tpu_bad_arguments(args, message):
    proc = _run("tpu_vm.sh", *args, "--dry_run")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_tpu_failed_run_still_deletes_the_slice(tmp_path):
    calls = tmp_path / "calls"
    _fake_tool(tmp_path, "gcloud", f'echo "$*" >> {shlex.quote(str(calls))}\n'
               '[[ "$*" == *ftjax.main* ]] && exit 5\nexit 0\n')
    proc = _run("tpu_vm.sh", "--name", "f1", "--zone", "z", "--skip_plan", "--", "--workdir=w",
                env=_env(PATH=f"{tmp_path}:{os.environ['PATH']}", TMPDIR=str(tmp_path)))
    assert proc.returncode == 5, proc.stderr
    verbs = [line.split()[2:4] for line in calls.read_text().splitlines()]
    assert verbs == [["tpu-vm", "create"], ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"],
                     ["tpu-vm", "delete"]]
    assert (tmp_path / "ftjax-f1.tar.gz").exists()


def test_local_sigterm_reaches_every_process(tmp_path):
    fake = _fake_tool(tmp_path, "python", "trap 'echo got-TERM; exit 143' TERM\necho ready\n"
                      "for _ in $(seq 300); do sleep 0.1; done\n")
    logs = tmp_path / "logs"
    proc = subprocess.Popen(["bash", os.path.join(LAUNCH, "local_multiprocess.sh"), "--num_processes=2",
                             f"--python={fake}", f"--log_dir={logs}", "--", "--workdir=w"], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 20
        while time.time() < deadline and not all(
            (logs / f"process_{i}.log").exists() and "ready" in (logs / f"process_{i}.log").read_text()
            for i in range(2)
        ):
            time.sleep(0.1)
        proc.terminate()
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143
    for i in range(2):
        assert "got-TERM" in (logs / f"process_{i}.log").read_text()


def _fake_planner(tmp_path, fits: bool) -> None:
    """python3 whose `-m ftjax.main --mode=dry_run` writes a dry_run.json (fits or not) into --workdir; any
    other python3 call is the real one."""
    plan = {"fits": fits, "suggestion": None if fits else "does not fit: ...; would fit with: more fsdp: mesh.fsdp=16"}
    _fake_tool(tmp_path, "python3", f"""
if [[ "$*" == *ftjax.main* ]]; then
  for a in "$@"; do [[ $a == --workdir=* ]] && d=${{a#--workdir=}}; done
  mkdir -p "$d" && echo {shlex.quote(json.dumps(plan))} > "$d/dry_run.json"; exit 0
fi
exec {shlex.quote(sys.executable)} "$@"
""")


@pytest.mark.parametrize("fits", [True, False])
def test_tpu_plan_runs_first_and_a_plan_that_does_not_fit_creates_nothing(tmp_path, fits):
    calls = tmp_path / "calls"
    _fake_tool(tmp_path, "gcloud", f'echo "$*" >> {shlex.quote(str(calls))}\nexit 0\n')
    _fake_planner(tmp_path, fits)
    proc = _run("tpu_vm.sh", "--name", "p1", "--zone", "z", "--type", "v5p-16", "--", "--config=c.py",
                "--workdir=gs://b/r", env=_env(PATH=f"{tmp_path}:{os.environ['PATH']}", TMPDIR=str(tmp_path)))
    verbs = [line.split()[2:4] for line in calls.read_text().splitlines()] if calls.exists() else []
    if fits:
        assert proc.returncode == 0, proc.stderr
        assert verbs[0] == ["tpu-vm", "create"] and "the plan fits v5p-16" in proc.stderr
    else:
        assert proc.returncode == 2 and verbs == [], proc.stderr
        assert "does not fit v5p-16" in proc.stderr and "more fsdp" in proc.stderr
