"""A run's workdir is its source of truth. WORKDIR/run.json holds the resolved config, the data
fingerprint, the model identity and the experiment trackers' run ids, so eval, export and dry_run need nothing
but the workdir and a resume continues the same MLflow / W&B run; a rerun compares against it (the resume
policy below); a lock file keeps a second trainer out. This module names every file and folder of a workdir
(the layout below: nobody else spells them) and opens its checkpoints (`checkpointer`)."""

from __future__ import annotations

import atexit
import datetime
import hashlib
import os
import socket
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from ftjax import fileio
from ftjax.checkpoint import Checkpointer
from ftjax.config import ConfigError, default_config, set_field, validate
from ftjax.loop import TrainingError

# The layout. A solo run's WORKDIR, and each population member's folder (MEMBER_DIR: metrics, tb, plots,
# samples, summary and MEMBER_CONFIG_FILE; the population's checkpoints and lock are in its WORKDIR).
RUN_FILE = "run.json"  # solo runs: config, data fingerprint, model identity, data stats, resumes, tracker ids
LOCK_FILE = "train.lock"  # the trainer holding the workdir (WorkdirLock)
CHECKPOINTS_DIR = "checkpoints"  # orbax: last k + best (ftjax.checkpoint; opened by `checkpointer`)
METRICS_FILE = "metrics.jsonl"  # every logged scalar (callbacks/metric_log.py)
TB_DIR = "tb"  # TensorBoard events, the HParams view and profiler traces (train.profile)
PLOTS_DIR = "plots"  # PNGs of the run (reporting/plots.py), its LR schedule and its diagnosis
LR_SCHEDULE_PLOT = "lr_schedule.png"  # in PLOTS_DIR: the LR of each param group over the run (train, dry_run)
SAMPLES_DIR = "samples"  # generations at each eval: LM samples, seq2seq eval outputs (`samples_file`)
SUMMARY_FILE = "summary.json"  # a finished run's final numbers (trainer.finish; a population member's too)
MEMBER_CONFIG_FILE = "config.json"  # a population member's flat config (it has no run.json)
EVAL_FILE = "eval.json"  # --mode=eval: the checkpoint's val/test metrics, and lm-eval's under LM_EVAL_KEY
EXPORT_DIR = "export"  # --mode=export's default --export_dir: the HF folder (+ adapter/ with LoRA)
DRY_RUN_FILE = "dry_run.json"  # --mode=dry_run: the plan (per-chip memory, fits, compile time, FLOPs)
LR_FIND_FILE = "lr_find.json"  # --mode=lr_find: the range test's losses and suggested LR
LR_FIND_PLOT = "lr_find.png"  # --mode=lr_find: the loss over the LR ramp
DIAGNOSIS_FILE = "diagnosis.md"  # --mode=diagnose: the findings, their evidence, plots and flags to change
DIAGNOSIS_JSON = "diagnosis.json"  # the same as data
REFINE_FILE = "refine.json"  # --mode=refine: each round's candidates (recorded before they train) and results
REFINE_REPORT = "refine_report.md"  # --mode=refine: per round findings, candidates, curves, what was kept
REFINE_ROUND_DIR = "round_{}"  # --mode=refine: round R's workdir (a population's; round 0 a solo run)
REFINE_MEMBER_DIR = "member_{}"  # in a round's workdir: candidate K's folder
REFINE_FINAL_DIR = "final"  # --mode=refine: the best config's solo run (test metrics, export)
TRACKERS_KEY = "trackers"  # run.json: {"mlflow": {"run_id": ...}, "wandb": {"id": ...}} (callbacks/trackers.py)
LM_EVAL_KEY = "lm_eval"  # --mode=eval --lm_eval=TASKS: lm-evaluation-harness results (ftjax/lm_eval_model.py)


def checkpoints_dir(workdir: fileio.PathLike) -> epath.Path:
    return fileio.path(workdir) / CHECKPOINTS_DIR


def samples_file(member_dir: fileio.PathLike, step: int) -> epath.Path:
    """MEMBER_DIR/samples/step_<step>.jsonl: the generations of the eval at `step`."""
    return fileio.path(member_dir) / SAMPLES_DIR / f"step_{step:06d}.jsonl"


def checkpointer(workdir: fileio.PathLike, cfg: ml_collections.ConfigDict, *, metric: str | None = None,
                 mode: str = "min", primary: bool = True, read_only: bool = False) -> Checkpointer:
    """The Checkpointer of WORKDIR/checkpoints: train.checkpoint's retention and async saving, the best step
    ranked by val_`metric` (None: unranked, as a population's). `read_only`: eval / export beside a training
    run (nothing created or deleted, synchronous)."""
    c = cfg.train.checkpoint
    return Checkpointer(checkpoints_dir(workdir), keep=1 if read_only else c.keep,
                        best_metric=f"val_{metric}" if metric else None, best_mode=mode,
                        async_save=False if read_only else c.async_save, primary_host=primary, read_only=read_only)

# The resume policy: fields that may change when a run is resumed, and what the change does. Every other
# field is fixed for the life of the run (model, data, batch size, seed, optimizer, schedule shape ...).
CHANGEABLE = {
    "train.epochs": "the run continues to the new length; step-based LR schedules stretch to it",
    "train.steps": "the run continues to the new length; step-based LR schedules stretch to it",
    "train.eval_every": "evaluation cadence",
    "train.log_every": "logging cadence",
    "train.eval_batch_size": "eval batches only (same metrics)",
    "train.checkpoint.every": "checkpoint cadence",
    "train.checkpoint.keep": "how many recent checkpoints are kept",
    "train.checkpoint.async_save": "how checkpoints are written",
    "train.early_stop.patience": "early stopping from now on",
    "train.early_stop.min_delta": "early stopping from now on",
    "train.overfit_patience": "the overfitting warning from now on",
    "train.compilation_cache": "where compiled programs are cached",
    "train.progress": "the progress display",
    "train.reuse_host_memory": "how this process's malloc reuses memory (same math)",
    "train.precompile": "when programs compile",
    "train.trackers": "which trackers get the run from now on (one that had it continues its run)",
    "train.mlflow.tracking_uri": "a new MLflow run there from now on (metrics.jsonl's earlier points sent first)",
    "train.mlflow.experiment": "a new MLflow run there from now on (metrics.jsonl's earlier points sent first)",
    "train.wandb.project": "a new W&B run there from now on (metrics.jsonl's earlier points sent first)",
    "train.wandb.entity": "a new W&B run there from now on (metrics.jsonl's earlier points sent first)",
    "train.wandb.mode": "W&B online or offline (the same run id)",
    "data.test_split": "the final test evaluation",
    "data.lm.num_samples": "LM samples written at each eval",
    "data.lm.sample_max_new_tokens": "LM samples written at each eval",
    "model.remat": "memory/compute trade-off (same math)",
    "model.loss_chunk_tokens": "memory/compute trade-off (same math)",
    "model.allow_pickle": "how the base weights may be read",
    "forgetting.monitors": "which forgetting monitors run from now on (they only observe)",
    "forgetting.budget": "the forgetting budget from now on",
    "forgetting.budget_action": "the forgetting budget from now on",
    "forgetting.retain": "which retain sets are scored from now on",
    "mesh.data": "the checkpoint is restored onto the new mesh",
    "mesh.fsdp": "the checkpoint is restored onto the new mesh",
    "mesh.tensor": "the checkpoint is restored onto the new mesh",
}


# Fields added after runs existed whose default would change what an older run built: a run.json without the
# field means this value (so resuming, evaluating or exporting an older run rebuilds the same model).
BEFORE_FIELD = {
    "model.scan_layers": False,  # older runs kept one param per layer; a scanned model stacks them
}


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} of a nested dict / ConfigDict (lists for tuples, as JSON has them)."""
    d = d.to_dict() if isinstance(d, ml_collections.ConfigDict) else d
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = _jsonable(value)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def config_from_dict(saved: dict) -> ml_collections.ConfigDict:
    """The config a run was started with, rebuilt from run.json on top of today's defaults."""
    cfg = default_config()
    saved_fields = flatten(saved)
    for field, value in BEFORE_FIELD.items():
        if field not in saved_fields:
            saved_fields[field] = value
    known = flatten(cfg.to_dict())
    for field, value in saved_fields.items():
        if field in known:  # a field today's config no longer has is dropped
            set_field(cfg, field, _tuples(value))
    return validate(cfg)


def model_identity(name_or_path: str) -> dict[str, Any]:
    """What the base model is: its path or hub id and, for a local folder, a hash of config.json and the
    names and sizes of its weight files (a changed checkpoint behind the same path is noticed)."""
    ident: dict[str, Any] = {"name_or_path": name_or_path}
    folder = fileio.path(name_or_path)
    if os.path.isdir(name_or_path) and (folder / "config.json").exists():
        ident["config_sha256"] = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
        ident["weights"] = {p.name: p.stat().length for p in sorted(folder.iterdir())
                            if p.name.endswith((".safetensors", ".bin"))}
    return ident


def has_checkpoint(workdir: str) -> bool:
    folder = checkpoints_dir(workdir)
    return folder.exists() and any(p.name.isdigit() for p in folder.iterdir())


def read_run(workdir: str) -> dict | None:
    path = fileio.path(workdir) / RUN_FILE
    if not path.exists():
        return None
    try:
        return fileio.read_json(path)
    except ValueError as e:
        raise TrainingError(f"{e}. It describes the run in {workdir}: without it, start a new --workdir") from None


def adopt_saved_structure(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """A run started before a BEFORE_FIELD field existed keeps that field's old value (unless the config sets
    it otherwise: then resume_changes names the change), so today's default does not rebuild it differently."""
    run = read_run(workdir)
    if run is None:
        return
    saved, defaults = flatten(run.get("config", {})), flatten(default_config())
    for field, value in BEFORE_FIELD.items():
        if field not in saved and flatten(cfg).get(field) == defaults.get(field):
            section, name = field.rsplit(".", 1)
            node = cfg
            for part in section.split("."):
                node = node[part]
            node[name] = value


def saved_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config of the run in `workdir` (for --mode=eval|export|dry_run without --config)."""
    run = read_run(workdir)
    if run is None:
        raise FileNotFoundError(
            f"{fileio.path(workdir) / RUN_FILE} not found: {workdir} holds no ftjax run. Train first "
            "(--mode=train), or pass --config"
        )
    return config_from_dict(run["config"])


def describe(cfg: ml_collections.ConfigDict, data_fingerprint: dict, label_names: list[str],
             steps_per_epoch: int, data_stats: dict | None = None) -> dict[str, Any]:
    """run.json's contents; `data_stats` (label counts, truncation ...: the DataBundle's stats) are recorded from
    the start, so an interrupted run can be diagnosed too."""
    return {
        "config": flatten(cfg),
        "data": data_fingerprint,
        "data_stats": _jsonable(data_stats or {}),
        "model": model_identity(cfg.model.name_or_path),
        "labels": list(label_names),
        "steps_per_epoch": int(steps_per_epoch),
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def resume_changes(old: dict, new: dict) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(applied, refused): the (field, old, new) differences between two run descriptions by the policy."""
    applied, refused = [], []
    old_cfg, new_cfg = old["config"], new["config"]
    # A field the run's ftjax did not have yet (or no longer has) at its default is no change: runs
    # resume across ftjax versions that add fields.
    defaults = flatten(default_config())
    for field in sorted(set(old_cfg) | set(new_cfg)):
        a = old_cfg.get(field, BEFORE_FIELD.get(field, defaults.get(field)))
        b = new_cfg.get(field, defaults.get(field))
        if a != b:
            (applied if field in CHANGEABLE else refused).append((field, a, b))
    for split in sorted(set(old["data"]) & set(new["data"])):
        a, b = old["data"][split], new["data"][split]
        if (a["rows"], a["sha256"]) != (b["rows"], b["sha256"]):
            refused.append((f"data[{split}]", f"{a['rows']} rows from {a['source']} ({a['sha256'][:12]})",
                            f"{b['rows']} rows from {b['source']} ({b['sha256'][:12]})"))
    if old["model"] != new["model"]:
        refused.append(("model (weights)", old["model"], new["model"]))
    if old["labels"] != new["labels"]:
        refused.append(("labels", old["labels"], new["labels"]))
    return applied, refused


def check_resume(workdir: str, new: dict, has_checkpoint: bool) -> None:
    """Refuses a resume whose config, data or model differ in a field that cannot change mid-run (a
    table of field, old, new); applies and logs the changes the policy allows; records the description
    (a resume keeps the trackers' run ids; a fresh start, with no checkpoint, drops them)."""
    old = read_run(workdir)
    if old is not None and has_checkpoint:
        applied, refused = resume_changes(old, new)
        if refused:
            rows = "\n".join(f"  {f}: {a!r} -> {b!r}" for f, a, b in refused)
            raise TrainingError(
                f"{workdir} holds a run that this config cannot resume; these cannot change mid-run:\n{rows}\n"
                "Rerun with the run's own config (WORKDIR/run.json), or use a new --workdir for a new run."
            )
        for field, a, b in applied:
            logging.warning("resume: %s %r -> %r (%s)", field, a, b, CHANGEABLE[field])
        new = {**new, "resumes": old.get("resumes", []) + [{"at": new["written"], "changes": applied}]}
        if old.get(TRACKERS_KEY):  # the resumed run continues its MLflow / W&B runs
            new[TRACKERS_KEY] = old[TRACKERS_KEY]
    fileio.write_json(fileio.path(workdir) / RUN_FILE, new)


def tracker_run(workdir: str, name: str) -> dict | None:
    """What run.json records of tracker `name`'s run (its id and where it lives), or None."""
    return ((read_run(workdir) or {}).get(TRACKERS_KEY) or {}).get(name)


def record_tracker_run(workdir: str, name: str, record: dict) -> None:
    """Keeps tracker `name`'s run (id and where it lives) in run.json, so a resume continues that run."""
    run = read_run(workdir) or {}
    run[TRACKERS_KEY] = {**(run.get(TRACKERS_KEY) or {}), name: record}
    fileio.write_json(fileio.path(workdir) / RUN_FILE, run)


def update_eval(workdir: str, updates: dict) -> None:
    """Sets `updates`' keys in WORKDIR/eval.json, keeping the others (an lm-eval score beside the splits')."""
    path = fileio.path(workdir) / EVAL_FILE
    fileio.write_json(path, {**(fileio.read_json(path) if path.exists() else {}), **updates})


class WorkdirLock:
    """WORKDIR/train.lock names the trainer holding the workdir (host, pid); a second trainer is refused.
    A lock left by a dead process on this host is taken over; on another host it must be removed by hand."""

    def __init__(self, workdir: str):
        self.path = fileio.path(workdir) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        if self.path.exists():
            holder = _read_lock(self.path)
            if holder and not _stale(holder):
                raise TrainingError(
                    f"{self.path.parent} is in use by another trainer (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}). Wait for it, stop it, or use another --workdir; if it is dead, "
                    f"delete {self.path}"
                )
            logging.warning("workdir lock %s was left by a process that is gone; taking it over", self.path)
        fileio.write_json(self.path, me)
        self.held = True
        atexit.register(self.release)

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                if (_read_lock(self.path) or {}).get("pid") == os.getpid():
                    self.path.unlink()
            except OSError:
                pass


def _read_lock(path) -> dict | None:
    try:
        return fileio.read_json(path)
    except (ValueError, OSError):
        return None


def _stale(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return False
    pid = int(holder.get("pid", 0))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def check_workdir_path(workdir: str) -> None:
    """A workdir must be a folder (or not exist yet)."""
    p = fileio.path(workdir)
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"--workdir={workdir} is a file, not a folder: choose a folder path")
    if not workdir:
        raise ConfigError("workdir", workdir, "set --workdir to a folder (local or gs://)")
