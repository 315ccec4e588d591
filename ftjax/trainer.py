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
from ftjax import workdir as workdir_lib
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
from ftjax.callbacks.cadence import Every
from ftjax.callbacks.forgetting import Forgetting
from ftjax.callbacks.metric_log import FAILED
from ftjax.callbacks.profiling import ProfileTrace
from ftjax.callbacks.samples import LMSamples
from ftjax.callbacks.seq2seq_eval import Seq2SeqEval
from ftjax.callbacks.throughput import Throughput
from ftjax.checkpoint import Checkpointer
from ftjax.loop import PRUNED, STOPPED_EARLY, Callback, Loop, fit
from ftjax.reporting import optimizer as optimizer_report
from ftjax.reporting.plots import plot_run
from ftjax.run import Run
from ftjax.workdir import WorkdirLock, check_workdir_path


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


def _forgetting_on(cfg: Any) -> bool:
    return bool(cfg.forgetting.monitors or cfg.forgetting.retain)


class StandardCallbacks(list):
    """The standard callbacks in the order they act (a list: `fit` takes it as it is), with handles on those
    the end of a run reads: `logger` (MetricLogger), `early` (EarlyStopping), `checkpoint` (Checkpoint),
    `throughput` (Throughput) and `forgetting` (Forgetting; None unless a solo run monitors forgetting)."""

    def __init__(self, callbacks: list[Callback], *, logger: MetricLogger, early: EarlyStopping,
                 checkpoint: Checkpoint, throughput: Throughput, forgetting: Forgetting | None):
        super().__init__(callbacks)
        self.logger, self.early, self.checkpoint = logger, early, checkpoint
        self.throughput, self.forgetting = throughput, forgetting


def standard_callbacks(
    run: Run, ckpt: Checkpointer, member_dirs: list[str], *, metric: str, mode: str, solo: bool,
    extra: list[Callback] = (), t_start: float | None = None,
) -> StandardCallbacks:
    """The callbacks of a training run, in the order they act on an event: evaluate (+ seq2seq generation
    metrics, the EMA / SWA weights' evaluation), the NaN guard, log, the forgetting monitors (solo runs), early
    stopping, the overfit warning, `extra` (e.g. sweep pruning), LM samples, throughput, precompile, the profiler
    trace, progress, then the checkpoint (which saves the decisions above) and the SIGTERM save. Cadences are
    given here (`Every`). `t_start`: when the run started (time to first step; default: the loop's start)."""
    t, members = run.cfg.train, len(member_dirs)
    logger = MetricLogger(member_dirs, t.log_every, enabled=run.primary,  # + train.trackers, on process 0
                          trackers=trackers.build(run.cfg, member_dirs, solo) if run.primary else None)
    checkpoint = Checkpoint(ckpt)
    evaluate = [
        Every(Evaluate(), run.eval_every),
        *Seq2SeqEval.for_run(run, member_dirs),  # seq2seq: adds bleu/chrf/rouge to the validation results
        *([Every(AveragedEvaluate(run), run.eval_every)] if solo and run.averaging.on else []),
    ]
    forgetting = Forgetting(run, logger) if solo and _forgetting_on(run.cfg) else None  # writes via the logger
    early = EarlyStopping(metric, mode, t.early_stop.patience, t.early_stop.min_delta, members)
    progress = ProgressBar(enabled=run.primary and t.progress, metric=metric)
    throughput = Throughput.for_run(run, t_start, logger=logger, progress=progress)
    callbacks: list[Callback] = [
        *evaluate,
        NanGuard(raise_error=solo, last_checkpoint=checkpoint.last_good, logger=logger),
        logger,
        *([forgetting] if forgetting is not None else []),
        early,
        OverfitWarning(logger, t.overfit_patience, members),
        *extra,
    ]
    lm = run.cfg.data.lm
    prompts = run.data.sample_prompts[: lm.num_samples]
    if run.cfg.model.task == "causal_lm" and prompts:
        callbacks.append(LMSamples(run, member_dirs, prompts, lm.sample_max_new_tokens, enabled=run.primary))
    callbacks.append(throughput)  # before Precompile: it times the compiles
    if t.precompile:
        callbacks.append(Precompile())
    profile = profiling.parse(t.profile)
    if profile is not None:
        callbacks.append(ProfileTrace(member_dirs[0], *profile, enabled=run.primary))
    callbacks += [progress, Every(checkpoint, t.checkpoint.every, at_end=False), Preemption(checkpoint)]
    return StandardCallbacks(callbacks, logger=logger, early=early, checkpoint=checkpoint, throughput=throughput,
                             forgetting=forgetting)


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
    ckpt = workdir_lib.checkpointer(workdir, cfg, metric=es.metric, mode=es.mode, primary=run.primary)
    extra = list(callbacks) + ([StopAfter(stop_after)] if stop_after is not None else [])
    cbs = standard_callbacks(run, ckpt, [workdir], metric=es.metric, mode=es.mode, solo=True, extra=extra,
                             t_start=t_start)
    if run.primary:
        optimizer_report.plot_lr(run.optimizer,
                                 fileio.path(workdir) / workdir_lib.PLOTS_DIR / workdir_lib.LR_SCHEDULE_PLOT)
    logging.info("%d steps (%d per epoch), eval every %d, global batch %d", run.total_steps,
                 run.steps_per_epoch, run.eval_every, cfg.train.batch_size)
    try:
        loop = fit(SoloStepper(run), cbs.throughput.watch(run.data.train_iterator), cbs)
        if loop.interrupted:
            return {"interrupted_at": loop.step}
        return finish(run, ckpt, loop, cbs, t_start)
    finally:
        cbs.logger.end(FAILED)  # the trackers' runs of a run that raised; after finish or an interruption, nothing
        ckpt.close()
        lock.release()


def hold_workdir(workdir: str) -> WorkdirLock:
    """The workdir lock, held by process 0 for the whole run (a second trainer is refused)."""
    check_workdir_path(workdir)
    lock = WorkdirLock(workdir)
    if distributed.is_primary():
        lock.acquire()
    return lock


def member_summary(loop: Loop, cbs: StandardCallbacks, member: int, steps: int, best_step: int | None
                   ) -> dict[str, Any]:
    """What every run's summary.json starts with, a solo run's or a population member's: how it ended, its
    steps, its best step and best validation value by the early-stopping metric."""
    stopper, status = cbs.early.stoppers[member], loop.status[member]
    return {"status": status, "steps": steps, "best_step": best_step, "stopped_early": status == STOPPED_EARLY,
            "stopped_by_hook": status == PRUNED, "best_val": {stopper.metric: stopper.best_value}}


def finish(run: Run, ckpt: Checkpointer, loop: Loop, cbs: StandardCallbacks, t_start: float) -> dict[str, Any]:
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
    summary: dict[str, Any] = {
        **member_summary(loop, cbs, 0, loop.step, best),
        "num_examples": dict(run.data.num_examples),
        "data_stats": run.data.stats,
        "val": run.evaluate("validation"),
    }
    writer = cbs.logger.writers[0]
    if run.data.has_split("test"):
        summary["test"] = run.evaluate("test")
        writer.write(loop.step, "test", summary["test"])
        writer.flush()
    if last is not None:
        summary["last"] = last
    summary["timing"] = {**loop.timing, "wall_seconds": time.time() - t_start,
                         # Real (non-padding) examples over the training loop's wall time, evaluation excluded.
                         "train_examples_per_second": loop.examples_per_second()}
    summary["perf"] = cbs.throughput.perf()
    if cbs.forgetting is not None:
        summary["forgetting"] = cbs.forgetting.summary()
    if run.primary:
        folder = fileio.path(run.workdir)
        fileio.write_json(folder / workdir_lib.SUMMARY_FILE, summary)
        plot_run(run.workdir)
        # The trackers' end: TensorBoard's HParams view; MLflow / W&B get the summary and these files.
        writer.end(summary, [*sorted((folder / workdir_lib.PLOTS_DIR).glob("*.png")),
                             folder / workdir_lib.SUMMARY_FILE, folder / workdir_lib.RUN_FILE])
    return summary
