"""MFU, compile time and time to first step: the `Throughput` callback.

Each step's model FLOPs come from the architecture (`ftjax.flops`) for the trainable set at that step (so
gradual unfreezing changes them) and the batch's real tokens when the batches are watched
(`Throughput.watch`); achieved FLOP/s are measured over windows of `log_every` steps (the first step, which
waits for compilation, and evaluation time are left out), and MFU = achieved / the devices' peak. Each
window goes to metrics.jsonl as a "perf" line (through the MetricLogger's writer) and to the progress line
("MFU 41.2%"); `perf()` is the run's summary, for summary.json.

Compile time comes from jax's monitoring events (`/jax/core/compile/*`): the backend compile seconds of
every program compiled between the loop's start and the first step's metrics being read back (the
Precompile callback's programs, or the first step's), and the jit(train_step) share of them.
"""

from __future__ import annotations

import collections
import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging

from ftjax import flops as flops_lib
from ftjax import peaks
from ftjax.callbacks.cadence import Cadence
from ftjax.callbacks.metric_log import MetricLogger
from ftjax.callbacks.progress import ProgressBar
from ftjax.loop import Callback, Loop

_BACKEND = "/jax/core/compile/backend_compile_duration"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_CACHE_SAVED = "/jax/compilation_cache/compile_time_saved_sec"

# Process-wide totals of jax's compile events (one listener, registered on first use).
_COMPILE = {"backend_seconds": 0.0, "programs": 0, "train_step_seconds": 0.0, "trace_lower_seconds": 0.0,
            "cache_saved_seconds": 0.0}
_LISTENING = False


def _on_event(event: str, seconds: float, **kwargs: Any) -> None:
    if event == _BACKEND:
        _COMPILE["backend_seconds"] += seconds
        _COMPILE["programs"] += 1
        if "train_step" in str(kwargs.get("fun_name", "")):
            _COMPILE["train_step_seconds"] += seconds
    elif event in (_TRACE, _LOWER):
        _COMPILE["trace_lower_seconds"] += seconds
    elif event == _CACHE_SAVED:
        _COMPILE["cache_saved_seconds"] += seconds


def compile_totals() -> dict[str, float]:
    """jax's compile totals in this process since the first call (starts listening)."""
    global _LISTENING
    if not _LISTENING:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _LISTENING = True
    return dict(_COMPILE)


class _Watched:
    """A batch iterator that records each batch's Shape for the callback (and otherwise is the iterator)."""

    def __init__(self, inner: Any, shapes: collections.deque):
        self._inner, self._shapes = inner, shapes

    def __iter__(self) -> _Watched:
        return self

    def __next__(self) -> Any:
        batch = next(self._inner)
        if isinstance(batch, dict):
            self._shapes.append(flops_lib.batch_shape(batch))
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Throughput(Callback):
    """Model FLOPs per step, achieved FLOP/s, MFU, compile time and time to first step.

    flops_fn(trainable, shape) -> StepFlops; trainable_at(step) -> frozenset of trainable param paths;
    default_shape: the batch Shape used for steps whose batch was not watched; devices: what the peak is
    summed over (default: all jax devices); t_start: the time the run started (default: the loop's start);
    processes: how many processes each step one such batch (the watched batches are this process's rows);
    logger: the MetricLogger whose first writer gets the "perf" lines; progress: the ProgressBar that shows MFU.
    A population's step counts once per member (the vmapped step computes every member).
    """

    def __init__(self, flops_fn: Callable[[frozenset, flops_lib.Shape], flops_lib.StepFlops],
                 trainable_at: Callable[[int], frozenset], default_shape: flops_lib.Shape, *,
                 log_every: int = 50, devices: list | None = None, t_start: float | None = None,
                 peak: tuple[float, str] | None = None, processes: int = 1, logger: MetricLogger | None = None,
                 progress: ProgressBar | None = None):
        self.flops_fn, self.trainable_at, self.default_shape = flops_fn, trainable_at, default_shape
        self.cadence = Cadence(max(int(log_every), 1))  # a window every log_every steps and at the last step
        self.devices, self.t_start, self.peak = devices, t_start, peak
        self.processes = int(processes)
        self._shapes: collections.deque = collections.deque()
        self._counted: tuple[Any, float] = (None, 0.0)
        self._writer = logger.writers[0] if logger is not None and logger.writers else None
        self._progress = progress
        self._first: dict[str, float] | None = None
        self._begin: dict[str, float] = {}
        self._window = self._total = None
        self.last: dict[str, float] = {}

    @classmethod
    def for_run(cls, run: Any, t_start: float | None = None, *, logger: MetricLogger | None = None,
                progress: ProgressBar | None = None) -> Throughput:
        """The callback for an `ftjax.run.Run`: its model, trainable sets, batch size and mesh devices."""
        lengths = tuple(run.data.bucket_lengths or ())
        processes = jax.process_count()
        packed = run.data.pack_shape
        rows = packed.rows if packed is not None else run.data.batch_size
        shape = flops_lib.Shape(rows // processes, packed.length if packed is not None else max(lengths, default=0))
        reference = run.task.reference_forwards > 0  # preference: DPO's reference forward counts too
        # A distillation teacher's forward (a preference reference is the forward counted above).
        teacher = None if run.teacher is None or reference else flops_lib.spec_of(run.teacher["model"])
        return cls(functools.partial(flops_lib.step_flops, flops_lib.spec_of(run.model), reference_forward=reference,
                                     teacher=teacher),
                   run.optimizer.trainable_at, shape, log_every=run.cfg.train.log_every,
                   devices=list(run.mesh.devices.flat), t_start=t_start, processes=processes, logger=logger,
                   progress=progress)

    def watch(self, make_batches: Callable[..., Iterator]) -> Callable[..., Iterator]:
        """Wraps `fit`'s make_batches so each step's FLOPs use its batch's real shape and tokens."""

        def watched(*args: Any, **kwargs: Any) -> Iterator:
            self._shapes.clear()
            return _Watched(make_batches(*args, **kwargs), self._shapes)

        return watched

    # -- hooks
    def on_begin(self, loop: Loop) -> None:
        if self.peak is None:
            self.peak = peaks.total_peak(self.devices or jax.devices())
        now = time.time()
        self._begin = {"time": now, "t0": self.t_start if self.t_start is not None else now, **compile_totals()}
        self._first = None

    def on_step(self, loop: Loop, step: int, metrics: dict[str, np.ndarray]) -> None:
        shape = self._shapes.popleft() if self._shapes else self.default_shape
        step_flops = self.step_flops(self.trainable_at(step), shape) * loop.members * self.processes
        now, eval_s = time.time(), loop.timing.get("eval_seconds", 0.0)
        if self._first is None:  # the first step read back: compiled, waited for, not timed
            self._read_first(now, step_flops, step + 1)
            self._window, self._total = _Window(now, eval_s), _Window(now, eval_s)
            return
        self._window.add(step_flops, now, eval_s)
        self._total.add(step_flops, now, eval_s)
        done = step + 1
        if not self.cadence.due(done, loop.total_steps):
            return
        self.last = self._report(self._window, now, eval_s)
        self._window = _Window(now, eval_s)
        if self._writer is not None:
            self._writer.write(done, "perf", self.last)
        if self._progress is not None and math.isfinite(self.last["mfu"]):
            self._progress.extras["mfu"] = f"MFU {100 * self.last['mfu']:.1f}%"

    def step_flops(self, trainable: frozenset, shape: flops_lib.Shape) -> float:
        """Training FLOPs of a step; recounted only when the trainable set or the batch shape changes."""
        key = (trainable, shape)
        if key != self._counted[0]:
            try:
                count = self.flops_fn(trainable, shape).train
            except ValueError as e:  # a family without a FLOP count (encoder-decoders): MFU is not reported
                if math.isfinite(self._counted[1] if self._counted[0] is not None else 0.0):
                    logging.warning("MFU not reported: %s", e)
                count = math.nan
            self._counted = (key, count)
        return self._counted[1]

    def _read_first(self, now: float, step_flops: float, done: int) -> None:
        totals = compile_totals()
        b = self._begin
        self._first = {
            "time_to_first_step_s": now - b["t0"],
            "loop_begin_to_first_step_s": now - b["time"],
            "compile_s": totals["backend_seconds"] - b["backend_seconds"],
            "train_step_compile_s": totals["train_step_seconds"] - b["train_step_seconds"],
            "trace_lower_s": totals["trace_lower_seconds"] - b["trace_lower_seconds"],
            "compile_cache_saved_s": totals["cache_saved_seconds"] - b["cache_saved_seconds"],
            "programs_compiled": totals["programs"] - b["programs"],
            "first_step_flops": step_flops,
        }
        if self._writer is not None:
            # At the step it belongs to (a resumed run's first step is not step 1); that step writes no window.
            self._writer.write(done, "perf", {k: v for k, v in self._first.items() if k != "first_step_flops"})

    def _report(self, window: _Window, now: float, eval_s: float) -> dict[str, float]:
        seconds = window.seconds(now, eval_s)
        achieved = window.flops / seconds if seconds > 0 else math.nan
        peak = self.peak[0]
        if achieved > peak and peaks.MEASURED in self.peak[1]:
            # The start-up measurement ran under load: the run itself has shown the CPU does more. That rate
            # is the peak from now on (and for later runs on this machine): MFU never reads above 100%.
            peak = peaks.remember_cpu_peak(achieved)
            if "raised" not in self.peak[1]:
                logging.info("CPU peak raised to the achieved %.3g FLOP/s (measured %.3g at start-up under load)",
                             peak, self.peak[0])
            self.peak = (peak, self.peak[1].split(";")[0] + "; raised to the rate this run achieved)")
        return {"model_flops_per_step": window.flops / max(window.steps, 1), "achieved_flops_per_s": achieved,
                "mfu": achieved / peak if peak and math.isfinite(peak) else math.nan,
                "peak_flops_per_s": peak, "step_seconds": seconds / max(window.steps, 1)}

    def perf(self) -> dict[str, Any]:
        """The run's numbers for summary.json: averages over every timed step, the peak used, compile times."""
        out: dict[str, Any] = {"peak_flops_per_s": self.peak[0] if self.peak else math.nan,
                               "peak_source": self.peak[1] if self.peak else "not measured"}
        if self._total is not None and self._total.steps:
            out.update(self._report(self._total, self._total.last_time, self._total.last_eval))
        elif self._first is not None:
            out["model_flops_per_step"] = self._first["first_step_flops"]
        if self._first is not None:
            out.update({k: v for k, v in self._first.items() if k != "first_step_flops"})
        return out


class _Window:
    """FLOPs and steps since `start`, with evaluation time (loop.timing["eval_seconds"]) left out."""

    def __init__(self, start: float, eval_seconds: float):
        self.start, self.eval_start = start, eval_seconds
        self.flops, self.steps = 0.0, 0
        self.last_time, self.last_eval = start, eval_seconds

    def add(self, step_flops: float, now: float, eval_seconds: float) -> None:
        self.flops += step_flops
        self.steps += 1
        self.last_time, self.last_eval = now, eval_seconds

    def seconds(self, now: float, eval_seconds: float) -> float:
        return (now - self.start) - (eval_seconds - self.eval_start)
