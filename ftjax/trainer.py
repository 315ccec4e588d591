"""A solo fine-tune: the `Run` stepped by the one loop with the standard callbacks, then the best
checkpoint evaluated on validation and test and summarised in WORKDIR/summary.json (+ PNG plots)."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from absl import logging

from ftjax import distributed, fileio
from ftjax import sharding as sharding_lib
from ftjax.callbacks import (
    Checkpoint,
    EarlyStopping,
    Evaluate,
    MetricLogger,
    NanGuard,
    OverfitWarning,
    Preemption,
    ProgressBar,
    StopAfter,
    profiling,
    trackers,
)
from ftjax.callbacks.averaging import AveragedEvaluate
from ftjax.callbacks.forgetting import Forgetting
from ftjax.callbacks.metric_log import FAILED
from ftjax.callbacks.plots import plot_run
from ftjax.callbacks.profiling import ProfileTrace
from ftjax.callbacks.samples import LMSamples
from ftjax.callbacks.seq2seq_eval import Seq2SeqEval
from ftjax.callbacks.throughput import Throughput
from ftjax.checkpoint import Checkpointer
from ftjax.loop import PRUNED, STOPPED_EARLY, Callback, Loop, fit
from ftjax.run import Run
from ftjax.workdir import RUN_FILE, WorkdirLock, check_workdir_path


class SoloStepper:
    """One run's jitted step on its sharded state (the Stepper protocol of `ftjax.loop`)."""

    members = 1

    def __init__(self, run: Run):
        self.run = run
        self.total_steps = run.total_steps

    @property
    def state(self) -> Any:
        return self.run.state

    @state.setter
    def state(self, value: Any) -> None:
        self.run.state = value

    def step(self, step: int, batch: dict, active: np.ndarray) -> dict:
        run = self.run
        train_step = run.train_step_for(step)
        with jax.set_mesh(run.mesh):
            run.state, metrics = train_step(run.state, sharding_lib.shard_batch(batch, run.mesh), run.key,
                                            *run.teacher_args)
        return metrics

    def evaluate(self, split: str) -> list[dict[str, float]]:
        return [self.run.evaluate(split)]

    def params(self, member: int) -> Any:
        return self.run.state["params"]

    def lr_at(self, step: int) -> list[dict[str, float]]:
        return [self.run.optimizer.lr_at(step)]

    def abstract_state(self) -> Any:
        return self.run.abstract_state()

    def precompile(self, step: int) -> None:
        self.run.precompile(step)


class Precompile(Callback):
    """Compiles every program the run will need (all bucket lengths, train and eval) before the first step."""

    def on_begin(self, loop: Loop) -> None:
        if loop.step < loop.total_steps:
            loop.stepper.precompile(loop.step)


def open_checkpointer(run: Run, metric: str | None, mode: str = "min") -> Checkpointer:
    c = run.cfg.train.checkpoint
    return Checkpointer(fileio.path(run.workdir) / "checkpoints", keep=c.keep,
                        best_metric=f"val_{metric}" if metric else None, best_mode=mode,
                        async_save=c.async_save, primary_host=run.primary)


def _forgetting_on(cfg: Any) -> bool:
    return bool(cfg.forgetting.monitors or cfg.forgetting.retain)


def standard_callbacks(
    run: Run, ckpt: Checkpointer, member_dirs: list[str], *, metric: str, mode: str, solo: bool,
    extra: list[Callback] = (),
) -> list[Callback]:
    """The callbacks of a training run, in the order they act on an event: evaluate (+ seq2seq generation
    metrics), the NaN guard, log,
    the forgetting monitors (solo runs), early stopping, the overfit warning, `extra` (e.g. sweep pruning),
    LM samples, precompile, progress, then the checkpoint (which saves the decisions above) and the SIGTERM
    save."""
    t, members = run.cfg.train, len(member_dirs)
    logger = MetricLogger(member_dirs, t.log_every, enabled=run.primary,  # + train.trackers, on process 0
                          trackers=trackers.build(run.cfg, member_dirs, solo) if run.primary else None)
    checkpoint = Checkpoint(ckpt, every=t.checkpoint.every)
    callbacks: list[Callback] = [
        Evaluate(run.eval_every),
        *Seq2SeqEval.for_run(run, member_dirs),  # seq2seq: adds bleu/chrf/rouge to the validation results
        *([AveragedEvaluate(run, run.eval_every)] if solo and run.averaging.on else []),
        NanGuard(raise_error=solo, last_checkpoint=checkpoint.last_good),
        logger,
        *([Forgetting(run, logger)] if solo and _forgetting_on(run.cfg) else []),  # writes via the logger
        EarlyStopping(metric, mode, t.early_stop.patience, t.early_stop.min_delta, members),
        OverfitWarning(logger, t.overfit_patience, members),
        *extra,
    ]
    lm = run.cfg.data.lm
    prompts = list(getattr(run.data, "sample_prompts", []))[: lm.num_samples]
    if run.cfg.model.task == "causal_lm" and prompts:
        callbacks.append(LMSamples(run, member_dirs, prompts, lm.sample_max_new_tokens, enabled=run.primary))
    callbacks.append(Throughput.for_run(run))  # before Precompile: it times the compiles
    if t.precompile:
        callbacks.append(Precompile())
    profile = profiling.parse(t.profile)
    if profile is not None:
        callbacks.append(ProfileTrace(member_dirs[0], *profile, enabled=run.primary))
    callbacks += [ProgressBar(enabled=run.primary and t.progress, metric=metric), checkpoint,
                  Preemption(checkpoint)]
    return callbacks


def train(
    cfg: Any, workdir: str, *, devices: list | None = None, callbacks: list[Callback] = (),
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Fine-tunes per `cfg` in `workdir`, resuming from its latest checkpoint; returns the summary.

    `devices` restricts the mesh (default: all devices of all processes); `callbacks` are added to the
    standard ones (before the checkpoint, e.g. sweep pruning); `stop_after` ends the loop after that many
    steps of this call, as a crash would (tests).
    """
    t_start = time.time()
    trackers.check(cfg, workdir)  # a missing mlflow / wandb package stops the run before it loads anything
    lock = hold_workdir(workdir)
    run = Run(cfg, workdir, devices=devices)
    es = cfg.train.early_stop
    ckpt = open_checkpointer(run, es.metric, es.mode)
    extra = list(callbacks) + ([StopAfter(stop_after)] if stop_after is not None else [])
    cbs = standard_callbacks(run, ckpt, [workdir], metric=es.metric, mode=es.mode, solo=True, extra=extra)
    logger = next(cb for cb in cbs if isinstance(cb, MetricLogger))
    if run.primary:
        run.optimizer.plot_lr(fileio.path(workdir) / "plots" / "lr_schedule.png")
    logging.info("%d steps (%d per epoch), eval every %d, global batch %d", run.total_steps,
                 run.steps_per_epoch, run.eval_every, cfg.train.batch_size)
    try:
        throughput = next(cb for cb in cbs if isinstance(cb, Throughput))
        throughput.t_start = t_start
        loop = fit(SoloStepper(run), throughput.watch(run.data.train_iterator), cbs)
        if loop.interrupted:
            return {"interrupted_at": loop.step}
        early = next(cb for cb in cbs if isinstance(cb, EarlyStopping))
        return finish(run, ckpt, loop, early, t_start)
    finally:
        logger.end(FAILED)  # the trackers' runs of a run that raised; after finish or an interruption, nothing
        ckpt.close()
        lock.release()


def hold_workdir(workdir: str) -> WorkdirLock:
    """The workdir lock, held by process 0 for the whole run (a second trainer is refused)."""
    check_workdir_path(workdir)
    lock = WorkdirLock(workdir)
    if distributed.is_primary():
        lock.acquire()
    return lock


def finish(run: Run, ckpt: Checkpointer, loop: Loop, early: EarlyStopping, t_start: float) -> dict[str, Any]:
    """Restores the best checkpoint, evaluates it on validation (and test), writes summary.json + plots and
    ends the trackers' runs with them.
    When the best step is not the last, the last weights are scored on test first (summary["last"]): what
    selecting the best checkpoint gained or lost, and the number to set beside a trainer that keeps its
    last weights (HF Trainer's default)."""
    ckpt.wait()
    best = ckpt.best_step()
    last = None
    if best is not None and best != loop.step:
        if run.data.has_split("test"):
            last = {"step": loop.step, "test": run.evaluate("test")}
        run.state, _ = ckpt.restore(best, run.abstract_state())
    stopper = early.stoppers[0]
    status = loop.status[0]
    summary: dict[str, Any] = {
        "status": status,
        "steps": loop.step,
        "best_step": best,
        "stopped_early": status == STOPPED_EARLY,
        "stopped_by_hook": status == PRUNED,
        "best_val": {stopper.metric: stopper.best_value},
        "num_examples": dict(run.data.num_examples),
        "data_stats": run.data.stats,
        "val": run.evaluate("validation"),
    }
    writer = next(cb for cb in loop.callbacks if isinstance(cb, MetricLogger)).writers[0]
    if run.data.has_split("test"):
        summary["test"] = run.evaluate("test")
        writer.write(loop.step, "test", summary["test"])
        writer.flush()
    if last is not None:
        summary["last"] = last
    summary["timing"] = {**loop.timing, "wall_seconds": time.time() - t_start,
                         # Real (non-padding) examples over the training loop's wall time, evaluation excluded.
                         "train_examples_per_second": loop.examples_per_second()}
    throughput = next((cb for cb in loop.callbacks if isinstance(cb, Throughput)), None)
    if throughput is not None:
        summary["perf"] = throughput.perf()
    forgetting = next((cb for cb in loop.callbacks if isinstance(cb, Forgetting)), None)
    if forgetting is not None:
        summary["forgetting"] = forgetting.summary()
    if run.primary:
        folder = fileio.path(run.workdir)
        fileio.write_json(folder / "summary.json", summary)
        plot_run(run.workdir)
        # The trackers' end: TensorBoard's HParams view; MLflow / W&B get the summary and these files.
        writer.end(summary, [*sorted((folder / "plots").glob("*.png")), folder / "summary.json", folder / RUN_FILE])
    return summary
