"""TensorBoard's HParams view of a run: its hyperparameters and final val/test metrics, written into the run's
own WORKDIR/tb at the end of the run. Point TensorBoard at the runs' common parent (`tensorboard --logdir
runs/`) and the HParams dashboard lists every run with its values side by side (the same view as
`--mode=compare`'s tables).

A solo run's TensorBoard tracker (`callbacks/metric_log.TensorBoard.end`) calls `write_hparams(workdir, cfg,
summary)` once summary.json is written; a population writes its members' after the loop (tune/population.py);
`ftjax.callbacks.hparams.HParams` does it as a callback.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from typing import Any

import ml_collections
from etils import epath
from tensorboardX import SummaryWriter
from tensorboardX import summary as tb_summary

from ftjax import fileio
from ftjax.workdir import TB_DIR, flatten

METRIC_PREFIX = "hparams/"  # metric tags of the dashboard; unique, so no logged curve is mistaken for them

# The seven hyperparameters (README "The seven hyperparameters") and what identifies the run's inputs.
SEVEN = (
    "optim.lr", "optim.layer_lr_decay", "train.batch_size", "train.grad_accum", "train.epochs", "train.steps",
    "model.dropout.hidden", "model.dropout.attention", "model.dropout.classifier", "optim.weight_decay",
    "optim.schedule.type", "optim.schedule.warmup", "optim.freeze_layers", "optim.train_only",
    "optim.lora.rank",
)
IDENTITY = ("model.name_or_path", "model.task", "data.source", "data.max_len")
# optim.* and train.* fields that are bookkeeping, not hyperparameters.
BOOKKEEPING = ("train.checkpoint.", "train.compilation_cache", "train.progress", "train.precompile",
               "train.log_every", "train.eval_every", "train.eval_batch_size", "train.trackers", "train.mlflow.",
               "train.wandb.")


def hparam_dict(flat_config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The config values TensorBoard shows: the seven hyperparameters, then every optim.* / train.* field
    that is not bookkeeping, then the model and data identity. Lists become JSON strings; None (e.g. a
    dropout rate left to the checkpoint) is left out, as TensorBoard has no null."""
    names = [*SEVEN, *sorted(f for f in flat_config if f.startswith(("optim.", "train.")) and f not in SEVEN
                             and not f.startswith(BOOKKEEPING)), *IDENTITY]
    out: dict[str, bool | int | float | str] = {}
    for name in names:
        value = flat_config.get(name)
        if isinstance(value, (list, tuple, dict)):
            out[name] = json.dumps(value)
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
    return out


def metric_dict(summary: dict[str, Any]) -> dict[str, float]:
    """{"hparams/val_accuracy": ..., "hparams/test_loss": ...} from a summary's final val / test metrics."""
    out = {}
    for split in ("val", "test"):
        for name, value in (summary.get(split) or {}).items():
            if name != "count" and isinstance(value, (int, float)):
                out[f"{METRIC_PREFIX}{split}_{name}"] = float(value)
    return out


def write_hparams(workdir: fileio.PathLike, cfg: ml_collections.ConfigDict | dict[str, Any],
                  summary: dict[str, Any]) -> epath.Path:
    """Writes the HParams experiment, session start/end and the final metrics as an events file in
    WORKDIR/tb (local or gs://; written whole, atomically; it replaces an earlier one, e.g. before a resume);
    returns its path. Call on the primary process."""
    flat = flatten(cfg)
    metrics = metric_dict(summary)
    exp, start, end = tb_summary.hparams(hparam_dict(flat), metrics)
    local = tempfile.mkdtemp(prefix="ftjax_hparams_")
    try:
        with SummaryWriter(logdir=local, filename_suffix=".hparams") as writer:
            for s in (exp, start, end):
                writer.file_writer.add_summary(s)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, global_step=int(summary.get("steps") or 0))
        (event_file,) = epath.Path(local).glob("events.out.tfevents.*")
        tb_dir = fileio.path(workdir) / TB_DIR
        old = list(tb_dir.glob("*.hparams")) if tb_dir.exists() else []  # a resumed run's earlier session
        target = tb_dir / event_file.name
        fileio.write_bytes(target, event_file.read_bytes())
        for path in old:
            if path != target:
                path.unlink(missing_ok=True)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return target
