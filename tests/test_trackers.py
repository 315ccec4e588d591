"""train.trackers: MLflow (against a real local tracking server) and W&B (offline) get a run's metrics at their
steps, its config, its final summary and files; a resume continues the same tracker run with no step twice;
a missing package is one config error naming the extra."""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import pytest

from ftjax import fileio, trainer
from ftjax.callbacks import MetricWriter, read_metrics, trackers
from ftjax.config import ConfigError, default_config, validate
from tests import tiny

# No tracker may reach the internet: MLflow's telemetry off; W&B offline (no API key, no netrc login).
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "WANDB_SILENT": "true",
         "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true"}


@pytest.fixture(autouse=True)
def offline_trackers(monkeypatch, tmp_path):
    for key, value in QUIET.items():
        monkeypatch.setenv(key, value)
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    return tiny.tiny_bert(str(root / "bert")), tiny.sentiment_csvs(str(root / "data"), n_train=32, n_test=8)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free local port (sqlite store, artifacts proxied into a temp folder); its URI."""
    root = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **QUIET, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job-runner processes
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its uvicorn worker (a throwaway store)
        proc.wait(timeout=30)
        log.close()


def _config(tiny_run, **overrides):
    model_dir, data_dir = tiny_run
    # One train and one eval program (one bucket), no forgetting monitors: each run costs little more than a compile.
    return tiny.tiny_config(model_dir, data_dir, **{"data.max_len": 16, "data.buckets": (16,), "train.log_every": 2,
                                                    "train.eval_every": 3, "forgetting.monitors": (), **overrides})


def _jsonl(workdir, key: str) -> dict[int, float]:
    split, name = key.split("/", 1)
    return {r["step"]: r[name] for r in read_metrics(workdir) if r["split"] == split and name in r}


def test_mlflow_gets_the_run_and_a_resume_appends_to_the_same_run(tiny_run, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    workdir = str(tmp_path / "run")
    settings = {"train.trackers": ("tensorboard", "mlflow"), "train.mlflow.tracking_uri": mlflow_server,
                "train.mlflow.experiment": "ftjax_test", "train.steps": 6}
    # A crash at step 5: checkpoint at 3, train/loss at step 4 already sent; the rerun replays 4 and finishes.
    assert "interrupted_at" in trainer.train(_config(tiny_run, **settings), workdir, stop_after=5)
    run_id = fileio.read_json(f"{workdir}/run.json")["trackers"]["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(run_id).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4]
    trainer.train(_config(tiny_run, **settings), workdir)
    assert client.get_run(run_id).info.status == "FINISHED"
    trainer.train(_config(tiny_run, **{**settings, "train.steps": 10}), workdir)  # a longer run, resumed

    assert fileio.read_json(f"{workdir}/run.json")["trackers"]["mlflow"]["run_id"] == run_id
    experiment = client.get_experiment_by_name("ftjax_test")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    # Every metric at its steps, each step once, with metrics.jsonl's values (the crash's step 4 not twice).
    for key in ("train/loss", "train/grad_norm", "val/loss", "val/accuracy", "test/loss"):
        history = client.get_metric_history(run_id, key)
        steps = [m.step for m in history]
        assert len(steps) == len(set(steps)), (key, steps)
        assert {m.step: m.value for m in history} == pytest.approx(_jsonl(workdir, key)), key
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [2, 4, 6, 8, 10]
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/loss")) == [3, 6, 9, 10]
    summary = fileio.read_json(f"{workdir}/summary.json")
    assert run.data.metrics["summary/val/loss"] == pytest.approx(summary["val"]["loss"])
    assert [m.step for m in client.get_metric_history(run_id, "summary/val/loss")] == [6, 10]
    # The flat config as params (the values it started with); the resume's change as a tag.
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["train.steps"] == "6"
    assert run.data.params["train.trackers"] == '["tensorboard", "mlflow"]'
    assert run.data.tags["resumed.train.steps"] == "10"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "run.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/loss.png", "plots/metrics.png", "plots/lr_schedule.png"} <= plots
    local = client.download_artifacts(run_id, "summary.json", str(tmp_path / "down"))
    assert fileio.read_json(local)["steps"] == 10
    assert glob.glob(f"{workdir}/tb/events.out.tfevents.*")  # TensorBoard is a tracker beside it


def test_mlflow_default_store_lives_in_the_workdir(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's own defaults would write ./mlruns, ./mlartifacts here
    workdir = tmp_path / "run"
    uri = trackers.mlflow_uri(default_config(), str(workdir))
    assert uri == f"sqlite:///{workdir}/mlflow.db"
    tracker = trackers.MLflow(workdir, {"optim.lr": 0.001, "optim.freeze": ["a", "b"]}, uri, "ftjax")
    with MetricWriter(workdir, trackers=[tracker]) as writer:
        writer.write(2, "train", {"loss": 0.5})
        writer.write(2, "lr", {"body+encoder": 1e-4})  # a group name MLflow would refuse as is
        fileio.write_json(workdir / "summary.json", {"steps": 2, "val": {"loss": 0.4}, "stopped_early": False})
        writer.end({"steps": 2, "val": {"loss": 0.4}}, [workdir / "summary.json"])
    run_id = fileio.read_json(workdir / "run.json")["trackers"]["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.metrics == {"train/loss": 0.5, "lr/body_encoder": 1e-4, "summary/val/loss": 0.4,
                                "summary/steps": 2}
    assert run.data.params == {"optim.lr": "0.001", "optim.freeze": '["a", "b"]'} and run.info.status == "FINISHED"
    assert glob.glob(f"{workdir}/mlartifacts/*/artifacts/summary.json")
    assert sorted(os.listdir(tmp_path)) == ["no_netrc", "run"] or sorted(os.listdir(tmp_path)) == ["run"]


def _wandb_records(path: str) -> list:
    """The records of a W&B transaction log (.wandb): LevelDB-style 32 KiB blocks of chunks after a 7-byte
    header, each chunk [crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last)]."""
    from wandb.proto import wandb_internal_pb2

    data = fileio.path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def _history(records) -> list[dict]:
    return [{(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


@pytest.mark.slow
def test_wandb_offline_writes_under_the_workdir_and_a_resume_keeps_the_run_id(tiny_run, tmp_path):
    workdir = str(tmp_path / "run")
    settings = {"train.trackers": ("wandb",), "train.wandb.project": "ftjax_test", "train.steps": 4}
    trainer.train(_config(tiny_run, **settings), workdir)
    run_id = fileio.read_json(f"{workdir}/run.json")["trackers"]["wandb"]["id"]
    trainer.train(_config(tiny_run, **{**settings, "train.steps": 8}), workdir)
    assert fileio.read_json(f"{workdir}/run.json")["trackers"]["wandb"]["id"] == run_id

    runs = sorted(glob.glob(f"{workdir}/wandb/offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs)  # one W&B run, two attempts
    steps: dict[str, list[int]] = {}
    for folder in runs:
        records = _wandb_records(f"{folder}/run-{run_id}.wandb")
        for row in _history(records):
            for key in row:
                if "/" in key and not key.startswith("_"):
                    steps.setdefault(key, []).append(row["global_step"])
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
                  for u in r.config.update}
        assert run.run_id == run_id and run.project == "ftjax_test" and config["optim.lr"] == 0.001
        assert os.path.exists(f"{folder}/files/summary.json") and os.path.exists(f"{folder}/files/plots/loss.png")
    assert steps["train/loss"] == [2, 4, 6, 8] and steps["val/loss"] == [3, 4, 6, 8]  # no step twice
    assert steps["test/accuracy"] == [4, 8]
    last = _wandb_records(f"{runs[1]}/run-{run_id}.wandb")
    summary = {u.key or "/".join(u.nested_key): json.loads(u.value_json)
               for r in last if r.WhichOneof("record_type") == "summary" for u in r.summary.update}
    assert summary["summary/val/loss"] == pytest.approx(fileio.read_json(f"{workdir}/summary.json")["val"]["loss"])
    assert not os.path.exists(f"{workdir}/tb")  # tensorboard is not in train.trackers


def test_a_missing_tracker_package_stops_the_run_before_it_loads_anything(monkeypatch, tiny_run, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    cfg = _config(tiny_run, **{"train.trackers": ("tensorboard", "mlflow")})
    cfg.model.name_or_path = str(tmp_path / "no_model")  # loading would fail otherwise
    with pytest.raises(ConfigError, match=r"train.trackers.*includes 'mlflow' but the mlflow package is not "
                                          r"installed: pip install 'ftjax\[mlflow\]'"):
        trainer.train(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_an_unreachable_mlflow_server_stops_the_run_before_it_trains(monkeypatch, tiny_run, tmp_path):
    from ftjax.loop import TrainingError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config(tiny_run, **{"train.trackers": ("mlflow",), "train.mlflow.tracking_uri": f"http://127.0.0.1:{port}",
                               "train.precompile": True})
    with pytest.raises(TrainingError, match="train.trackers 'mlflow': MLflow at http://127.0.0.1"):
        trainer.train(cfg, str(tmp_path / "run"))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""  # not one step ran


def test_tracker_settings_resolve_and_are_checked(tiny_run, monkeypatch, tmp_path):
    cfg = _config(tiny_run, **{"train.trackers": ("mlflow",)})
    assert trackers.mlflow_uri(cfg, str(tmp_path / "w")) == f"sqlite:///{tmp_path}/w/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert trackers.mlflow_uri(cfg, str(tmp_path / "w")) == "http://tracking:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ConfigError, match="train.mlflow.tracking_uri.*needs a local --workdir"):
        trackers.check(cfg, "gs://bucket/run")
    assert trackers.wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert trackers.wandb_mode("auto") == "online" and trackers.wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert trackers.wandb_mode("auto") == "disabled"
    for bad in (("mlflow", "mlflow"), ("neptune",), ("tensorboard,tensorboard",)):
        cfg.train.trackers = bad
        with pytest.raises(ConfigError, match="train.trackers"):
            validate(cfg)
    cfg.train.trackers = ("tensorboard, mlflow",)  # --config.train.trackers=tensorboard,mlflow
    assert trackers.names(validate(cfg)) == ("tensorboard", "mlflow")
