"""Tasks: what a model.task trains and how it is scored, one module each, as ftjax.models has one per family.

A task (`base.Task`) declares its data builder, the arrays of its batches, its loss (train and eval), what an
evaluation adds up and the metrics made from that, and the extra forward passes its step runs (FLOPs). The step,
the run, the plan and the callbacks ask `of(cfg)` instead of switching on the task's name; a new objective is a
new module here plus its entry in TASKS below.
"""

from __future__ import annotations

from typing import Any

from ftjax.data import structure
from ftjax.tasks import (
    causal_lm,
    classification,
    distill,
    preference,
    reward,
    seq2seq,
    tokens,
)
from ftjax.tasks.base import INPUT_KEYS, Structure, Task, model_inputs

# Tasks that need no settings beyond their name; those built from a config section are in `of`.
TASKS: dict[str, Task] = {t.name: t for t in (
    classification.CLASSIFICATION, classification.IMAGE_CLASSIFICATION, tokens.TOKEN_CLASSIFICATION,
    tokens.MASKED_LM, causal_lm.CAUSAL_LM, seq2seq.SEQ2SEQ, reward.REWARD,
)}
_FROM_CONFIG = {"preference": preference.of_config}

NAMES = (*TASKS, *_FROM_CONFIG)  # every model.task (ftjax.config.TASKS lists the same; a test checks)

__all__ = ["INPUT_KEYS", "NAMES", "TASKS", "Structure", "Task", "build_data", "get", "model_inputs", "of", "resolve"]


def get(name: str) -> Task:
    """The task of a model.task value that needs no config section (e.g. "classification")."""
    if name in TASKS:
        return TASKS[name]
    if name in _FROM_CONFIG:
        raise ValueError(f"task {name!r} is built from its config section: use ftjax.tasks.of(cfg)")
    raise ValueError(f"model.task={name!r} is not a task; use one of {', '.join(NAMES)}")


def resolve(task: Task | str) -> Task:
    """A Task as given, or the task of a name (`get`)."""
    return task if isinstance(task, Task) else get(task)


def of(cfg: Any) -> Task:
    """The task a config trains (model.task, with its section's settings)."""
    name = cfg.model.task
    task = _FROM_CONFIG[name](cfg) if name in _FROM_CONFIG else get(name)
    return distill.of_config(task, cfg) if cfg.distill.teacher else task


def build_data(cfg: Any, tokenizer: Any, *, process_index: int = 0, process_count: int = 1,
               data_parallel: int | None = None) -> Any:
    """Reads cfg.data's splits, tokenises (or indexes images) once, and returns the run's DataBundle, built by
    its task's builder (ftjax/data/*), with the batch layout a plan of this run uses too."""
    task = of(cfg)
    bundle = task.build_data(cfg, tokenizer, process_index=process_index, process_count=process_count,
                             data_parallel=data_parallel)
    bundle.batch_layout = structure.of_bundle(cfg, bundle, task)
    return bundle

