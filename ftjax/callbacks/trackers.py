"""MLflow and W&B as trackers behind the MetricWriter (`train.trackers`), so a run shows up where a team already
compares its runs: the metrics at their steps, the flat config as params, the final summary and the run's files
(plots, summary.json, run.json). The tracker's run id is kept in run.json: rerunning the command resumes the
same MLflow / W&B run and appends the later steps. Both packages are optional extras, checked before training.
"""

from __future__ import annotations

import importlib
import json
import netrc
import os
import re
import secrets
import shutil
import string
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from ftjax import fileio
from ftjax import workdir as workdir_lib
from ftjax.callbacks.metric_log import (
    FINISHED,
    KILLED,
    TensorBoard,
    Tracker,
    scalars_of,
)
from ftjax.config import ConfigError, tracker_names
from ftjax.loop import TrainingError

MLFLOW_DB = "mlflow.db"  # the default MLflow store: sqlite:///WORKDIR/mlflow.db ...
MLFLOW_ARTIFACTS = "mlartifacts"  # ... with its artifacts in WORKDIR/mlartifacts
WANDB_STEP = "global_step"  # W&B's x-axis of every ftjax metric (define_metric), so no point is dropped
EXTRAS = ("mlflow", "wandb")  # trackers whose package is the ftjax extra of the same name


def names(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    return tracker_names(cfg.train.trackers)


def check(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """Before a run builds anything: each tracker's package imports, and the MLflow default store (a file in
    the workdir) has a local workdir. Raises ConfigError naming the field and the fix."""
    for name in names(cfg):
        if name in EXTRAS:
            require_package(name, names(cfg))
    if "mlflow" in names(cfg) and fileio.is_remote(fileio.path(workdir)) and not mlflow_uri(cfg, workdir):
        raise ConfigError("train.mlflow.tracking_uri", cfg.train.mlflow.tracking_uri,
                          f"set an MLflow server or database URI (or $MLFLOW_TRACKING_URI): the default, "
                          f"sqlite:///WORKDIR/{MLFLOW_DB}, needs a local --workdir, not {workdir}")


def require_package(name: str, trackers: Sequence[str]) -> Any:
    """Imports tracker `name`'s package; ConfigError naming the extra when it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError("train.trackers", tuple(trackers), f"includes {name!r} but the {name} package is not "
                          f"installed: pip install 'ftjax[{name}]'") from None


def build(cfg: ml_collections.ConfigDict, member_dirs: Sequence[str], solo: bool) -> list[list[Tracker]]:
    """Each member's trackers by `train.trackers`. MLflow and W&B follow a solo run (a population's members
    have no run.json of their own to keep a run id in): its members get TensorBoard only."""
    wanted = names(cfg)
    params = workdir_lib.flatten(cfg)
    if not solo:
        if set(wanted) - {"tensorboard"}:
            logging.warning("train.trackers %s: a population's members log to metrics.jsonl%s only",
                            wanted, " and TensorBoard" if "tensorboard" in wanted else "")
        return [[TensorBoard(d)] if "tensorboard" in wanted else [] for d in member_dirs]
    (workdir,) = member_dirs
    out: list[Tracker] = []
    for name in wanted:
        if name == "tensorboard":
            out.append(TensorBoard(workdir, params))
        elif name == "mlflow":
            out.append(MLflow(workdir, params, mlflow_uri(cfg, workdir), cfg.train.mlflow.experiment))
        elif name == "wandb":
            w = cfg.train.wandb
            out.append(WandB(workdir, params, w.project, w.entity, wandb_mode(w.mode)))
    return [out]


def mlflow_uri(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """train.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///WORKDIR/mlflow.db (local workdirs;
    "" for gs://)."""
    uri = cfg.train.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri or fileio.is_remote(fileio.path(workdir)):
        return uri
    return "sqlite:///" + os.path.abspath(os.path.join(str(workdir), MLFLOW_DB))


def wandb_mode(mode: str) -> str:
    """train.wandb.mode resolved: auto is $WANDB_MODE, else online with an API key, else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if _wandb_api_key() else "offline"


def _wandb_api_key() -> bool:
    """Whether W&B has an API key: $WANDB_API_KEY, or `wandb login`'s entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return bool(netrc.netrc(os.environ.get("NETRC")).authenticators(host or ""))
    except (OSError, netrc.NetrcParseError):
        return False


def summary_numbers(summary: dict[str, Any], prefix: str = "summary/") -> dict[str, float]:
    """summary.json's numbers as flat "summary/val/loss"-style keys (booleans and strings left out)."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            out.update(summary_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def _local_copies(paths: Sequence[epath.Path], root: epath.Path, into: str) -> list[tuple[str, str]]:
    """(local file, its path relative to the workdir) of each artifact; files of a gs:// workdir are copied
    into the local folder `into` first."""
    out = []
    for p in paths:
        if not p.exists():
            continue
        rel = os.path.relpath(str(p), str(root))
        if fileio.is_remote(p):
            local = os.path.join(into, rel)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "wb") as f:
                f.write(p.read_bytes())
        else:
            local = str(p)
        out.append((local, rel))
    return out


class _RunTracker(Tracker):
    """A tracker with a run of its own that keeps every point it gets (no purge): a resumed run skips the
    steps the tracker already holds (`logged`) and sends what it lacks of metrics.jsonl's kept lines."""

    def __init__(self, workdir: fileio.PathLike, params: dict[str, Any]):
        self.workdir, self.params = fileio.path(workdir), params
        self.logged: dict[str, int] = {}  # key -> last step the tracker's run holds from earlier attempts

    def _new(self, step: int, scalars: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in scalars.items() if step > self.logged.get(k, -1)}

    def _backfill(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            self.write(int(r["step"]), scalars_of(r))


class MLflow(_RunTracker):
    """An MLflow run through MlflowClient on `tracking_uri`: metrics buffered and sent at each flush (each eval
    and checkpoint, so a resume from a checkpoint finds them), params from the flat config, and at the end the
    summary as metrics ("summary/val/loss"), the files as artifacts and the run's status. A run that cannot
    be reached mid-run keeps its points for the next flush (a warning, training goes on)."""

    name = "mlflow"
    MAX_METRICS, MAX_PARAMS, MAX_VALUE = 1000, 100, 6000  # per log_batch call; chars of a param value

    def __init__(self, workdir: fileio.PathLike, params: dict[str, Any], tracking_uri: str, experiment: str):
        super().__init__(workdir, params)
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.client: Any = None
        self.run_id: str | None = None
        self._pending: list[Any] = []

    def begin(self, records: list[dict[str, Any]], logged: dict[str, int]) -> None:
        from mlflow.exceptions import MlflowException  # an optional extra
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        where = {"tracking_uri": self.tracking_uri, "experiment": self.experiment}
        stored = workdir_lib.tracker_run(str(self.workdir), self.name)
        try:
            if stored and {k: stored.get(k) for k in where} == where:
                self.run_id = self._resume(stored["run_id"])
            elif stored:
                logging.warning("train.mlflow now points to %s (was %s): a new MLflow run", where,
                                {k: stored.get(k) for k in where})
            if self.run_id is None:
                self.run_id = self._create()
            self._log_params()
        except MlflowException as e:
            raise TrainingError(f"train.trackers 'mlflow': MLflow at {self.tracking_uri} failed: {e} (check "
                                "train.mlflow.tracking_uri and the server)") from None
        workdir_lib.record_tracker_run(str(self.workdir), self.name, {**where, "run_id": self.run_id})
        logging.info("MLflow run %s (experiment %r at %s)", self.run_id, self.experiment, self.tracking_uri)
        self._backfill(records)
        self.flush()

    def _resume(self, run_id: str) -> str | None:
        """The stored run, set running again, with the last step of each of its metrics; None when it is gone."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            logging.warning("MLflow run %s (run.json) is gone from %s: a new run", run_id, self.tracking_uri)
            return None
        self.client.update_run(run_id, status="RUNNING")
        for key in run.data.metrics:
            history = self.client.get_metric_history(run_id, key)
            if history:
                self.logged[key] = max(m.step for m in history)
        return run_id

    def _create(self) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            local = self.tracking_uri.startswith("sqlite:///") and self.tracking_uri.endswith("/" + MLFLOW_DB)
            location = (self.workdir / MLFLOW_ARTIFACTS).as_uri() if local else None
            try:
                experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
            except MlflowException:  # created meanwhile by another run
                experiment_id = self.client.get_experiment_by_name(self.experiment).experiment_id
        run = self.client.create_run(experiment_id, run_name=self.workdir.name,
                                     tags={"ftjax.workdir": str(self.workdir)})
        return run.info.run_id

    def _log_params(self) -> None:
        """The flat config as params; a resumed run keeps the values it started with (MLflow params are fixed)
        and gets a `resumed.FIELD` tag with the new value of each field a resume changed."""
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        values = {_mlflow_key(k): _param_value(v)[: self.MAX_VALUE] for k, v in self.params.items()}
        new = [Param(k, v) for k, v in values.items() if k not in have]
        for i in range(0, len(new), self.MAX_PARAMS):
            self.client.log_batch(self.run_id, params=new[i: i + self.MAX_PARAMS])
        for k, v in values.items():
            if k in have and have[k] != v:
                self.client.set_tag(self.run_id, f"resumed.{k}", v)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in self._new(step, {_mlflow_key(k): v for k, v in scalars.items()}).items():
            self._pending.append(Metric(key, value, now, step))

    def flush(self) -> None:
        while self._pending:
            batch = self._pending[: self.MAX_METRICS]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as e:  # noqa: BLE001 - a logging hiccup must not end hours of training
                logging.warning("MLflow at %s: %s; %d points kept for the next flush (metrics.jsonl has them)",
                                self.tracking_uri, e, len(self._pending))
                return
            del self._pending[: len(batch)]

    def close(self) -> None:
        if self.client is not None:
            self.flush()

    def end(self, summary: dict[str, Any] | None, artifacts: Sequence[epath.Path], status: str) -> None:
        if self.client is None or self.run_id is None:  # never started (or failed to)
            return
        if summary is not None:
            self.write(int(summary.get("steps") or 0), summary_numbers(summary))
        self.flush()
        with tempfile.TemporaryDirectory(prefix="ftjax_mlflow_") as tmp:
            try:
                for local, rel in _local_copies(artifacts, self.workdir, tmp):
                    folder = os.path.dirname(rel)
                    self.client.log_artifact(self.run_id, local, artifact_path=folder or None)
                self.client.set_terminated(self.run_id, status=status)
            except Exception as e:  # noqa: BLE001 - the run's files are safe in the workdir
                logging.warning("MLflow at %s: the run's end was not recorded: %s", self.tracking_uri, e)
        self.client = None


class WandB(_RunTracker):
    """A W&B run (`wandb.init(id=..., resume="allow")`) whose files live under WORKDIR/wandb (a gs:// workdir:
    W&B's own folder, $WANDB_DIR; offline: one folder per attempt, all with the run's id; `wandb sync` uploads
    them into the one run). Every metric is plotted against `global_step`; the config is the run's config, the
    final summary its summary, and the run's files are copied into its files folder at the end."""

    name = "wandb"

    def __init__(self, workdir: fileio.PathLike, params: dict[str, Any], project: str, entity: str, mode: str):
        super().__init__(workdir, params)
        self.project, self.entity, self.mode = project, entity, mode
        self.run: Any = None

    def begin(self, records: list[dict[str, Any]], logged: dict[str, int]) -> None:
        import wandb  # an optional extra

        where = {"project": self.project, "entity": self.entity}
        stored = workdir_lib.tracker_run(str(self.workdir), self.name)
        if stored and {k: stored.get(k) for k in where} == where:
            run_id, self.logged = stored["id"], dict(logged)  # what earlier attempts logged (metrics.jsonl)
        else:
            if stored:
                logging.warning("train.wandb now points to %s (was %s): a new W&B run", where,
                                {k: stored.get(k) for k in where})
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        local = not fileio.is_remote(self.workdir)
        try:
            self.run = wandb.init(project=self.project, entity=self.entity or None, id=run_id, resume="allow",
                                  name=self.workdir.name, mode=self.mode, reinit="create_new",
                                  dir=str(self.workdir) if local else None)
        except Exception as e:  # noqa: BLE001 - wandb's errors (login, network) have no common base
            raise TrainingError(f"train.trackers 'wandb': wandb.init failed ({self.mode}): {e} (check "
                                "train.wandb.* and the API key, or train.wandb.mode=offline)") from None
        workdir_lib.record_tracker_run(str(self.workdir), self.name, {**where, "id": run_id})
        self.run.define_metric(WANDB_STEP)
        self.run.define_metric("*", step_metric=WANDB_STEP)
        self.run.config.update(self.params, allow_val_change=True)
        logging.info("W&B run %s (%s, files in %s)", run_id, self.mode, self.run.dir)
        self._backfill(records)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        new = self._new(step, scalars)
        if new and self.run is not None:
            self.run.log({WANDB_STEP: step, **new})

    def end(self, summary: dict[str, Any] | None, artifacts: Sequence[epath.Path], status: str) -> None:
        if self.run is None:
            return
        if summary is not None:
            self.run.summary.update(summary_numbers(summary))
        with tempfile.TemporaryDirectory(prefix="ftjax_wandb_") as tmp:
            for local, rel in _local_copies(artifacts, self.workdir, tmp):
                target = os.path.join(self.run.dir, rel)  # files in the run's folder are uploaded with it
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(local, target)
        self.run.finish(exit_code={FINISHED: 0, KILLED: 143}.get(status, 1))
        self.run = None


def _mlflow_key(key: str) -> str:
    """A metric / param name MLflow accepts: letters, digits, _ - . / and space, and no empty path segment."""
    return re.sub(r"/{2,}", "/", re.sub(r"[^\w\-./ ]", "_", key)).strip("/") or "_"


def _param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
