"""Progress a person can watch: a tqdm bar on a tty, else a compact line every 30 s (step, examples/s,
loss, ETA); eval results as lines."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

import numpy as np
from tqdm import tqdm

from ftjax.loop import Callback, Loop


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class Progress:
    """A tqdm bar on stderr (step, examples/s, loss, ETA); when stderr is not a tty (CI, log files) it
    prints one compact line every `interval_s` seconds instead. Rates exclude the first step (compile)."""

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        interval_s: float = 30.0,
        stream: TextIO | None = None,
    ):
        self.total = total_steps
        self.enabled = enabled
        self.interval_s = interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.step = initial_step
        self._start: tuple[float, int, float] | None = None  # (time, step, examples) at the first update.
        self._examples = 0.0
        self._last_print = -math.inf
        self._bar = None
        if enabled and self.stream.isatty():
            self._bar = tqdm(
                total=total_steps, initial=initial_step, file=self.stream, unit="step", dynamic_ncols=True
            )

    def update(self, step: int, examples: float = 0, loss: float | None = None, extra: str = "") -> None:
        """Reports reaching `step` after `examples` more training examples (since the last update); `extra`
        is shown after the rate (e.g. "MFU 41.2%")."""
        if not self.enabled:
            return
        now = time.monotonic()
        self._examples += examples
        if self._start is None:
            self._start = (now, step, self._examples)
        elapsed = now - self._start[0]
        ex_rate = (self._examples - self._start[2]) / elapsed if elapsed > 0 else math.nan
        step_rate = (step - self._start[1]) / elapsed if elapsed > 0 else math.nan
        eta = (self.total - step) / step_rate if step_rate > 0 else math.nan
        self.step = step
        loss_text = f"{float(loss):.4f}" if loss is not None else "-"
        rate_text = f"{ex_rate:.1f}" if math.isfinite(ex_rate) else "-"
        rate_text += f" ex/s, {extra}" if extra else " ex/s"
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(f"loss {loss_text}, {rate_text}", refresh=False)
            return
        if now - self._last_print >= self.interval_s or step >= self.total:
            self._last_print = now
            pct = 100.0 * step / max(self.total, 1)
            print(
                f"step {step}/{self.total} ({pct:.0f}%) | {rate_text} | loss {loss_text} | ETA {_hms(eta)}",
                file=self.stream,
                flush=True,
            )

    def write(self, message: str) -> None:
        """Prints a message without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None



class ProgressBar(Callback):
    """Shows the loop's progress: mean loss over the training members, examples/s, ETA, eval lines, and
    what other callbacks put in `extras` ({name: text}, e.g. Throughput's "MFU 41.2%")."""

    def __init__(self, enabled: bool = True, metric: str | None = None):
        self.enabled, self.metric = enabled, metric
        self.progress: Progress | None = None
        self.extras: dict[str, str] = {}

    def on_begin(self, loop: Loop) -> None:
        self.progress = Progress(loop.total_steps, loop.step, enabled=self.enabled)

    def on_step(self, loop: Loop, step: int, metrics: dict[str, np.ndarray]) -> None:
        losses = metrics["loss"][loop.active]
        loss = float(np.nanmean(losses)) if losses.size else None
        self.progress.update(step + 1, float(metrics["examples"][0]), loss, ", ".join(self.extras.values()))

    def on_eval(self, loop: Loop, split: str, results: list[dict[str, float]]) -> None:
        if split != "validation":
            return
        if loop.members == 1:
            text = " ".join(f"val_{k}={v:.4f}" for k, v in results[0].items())
        else:
            metric = self.metric or "loss"
            text = " ".join(f"m{k}:{metric}={r[metric]:.4f}" for k, r in enumerate(results)
                            if loop.status[k] != "failed")
        self.progress.write(f"step {loop.step}: {text}")

    def on_end(self, loop: Loop) -> None:
        self.progress.close()
