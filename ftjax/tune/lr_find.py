"""LR range test: ramp the LR exponentially over N steps, plot loss against LR and suggest an LR
(steepest descent of the smoothed loss; min-loss LR / 10 when that is ill-defined). As a population,
K members train at K log-spaced constant LRs at once and the loss after N steps is compared.
"""

from __future__ import annotations

import math

import matplotlib
import numpy as np
from absl import logging

from ftjax import fileio
from ftjax.config import ConfigError, with_overrides
from ftjax.loop import Callback, Loop, fit
from ftjax.tune.population import Population
from ftjax.workdir import LR_FIND_FILE, LR_FIND_PLOT

matplotlib.use("Agg")  # files only, no display; before pyplot is imported
import matplotlib.pyplot as plt


def lr_ramp(lr_min: float, lr_max: float, steps: int) -> np.ndarray:
    """lr(t) = lr_min * (lr_max / lr_min) ** (t / (steps - 1)), t = 0 .. steps - 1."""
    if not 0 < lr_min < lr_max:
        raise ConfigError("lr_find", (lr_min, lr_max), "needs 0 < --lr_min < --lr_max")
    if steps < 5:
        raise ConfigError("lr_find.steps", steps, ">= 5 steps")
    return lr_min * (lr_max / lr_min) ** (np.arange(steps) / (steps - 1))


def smooth(losses: np.ndarray, beta: float = 0.98) -> np.ndarray:
    """Bias-corrected exponential moving average (fastai's), so the first points are not pulled to 0."""
    out, avg = np.empty(len(losses)), 0.0
    for i, x in enumerate(losses):
        avg = beta * avg + (1 - beta) * x
        out[i] = avg / (1 - beta ** (i + 1))
    return out


class RangeTest(Callback):
    """Records each member's training loss per step. With `diverge` set (the ramp), stops the loop once
    the smoothed loss exceeds `diverge` x its minimum or a loss is not finite."""

    def __init__(self, members: int, diverge: float | None = 4.0, beta: float = 0.98):
        self.diverge, self.beta = diverge, beta
        self.losses: list[np.ndarray] = []
        self._best, self._stopped = math.inf, False

    def record(self, losses: np.ndarray) -> bool:
        """Adds one step's losses; True when the (single-member) ramp has diverged."""
        self.losses.append(np.asarray(losses, np.float64))
        if self.diverge is None:
            return False
        curve = np.asarray([x[0] for x in self.losses])
        if not math.isfinite(curve[-1]):
            return True
        s = smooth(curve, self.beta)[-1]
        self._best = min(self._best, s)
        return len(curve) > 3 and s > self.diverge * self._best

    def on_step(self, loop: Loop, step: int, metrics: dict[str, np.ndarray]) -> None:
        if not self._stopped and self.record(metrics["loss"]):
            self._stopped = True
            loop.request_stop("diverged")


def suggest_lr(lrs: np.ndarray, losses: np.ndarray, beta: float = 0.98) -> dict:
    """{"lr", "method", "steepest", "min_over_10"}: the LR where the smoothed loss falls fastest (per log LR),
    before its minimum; min-loss LR / 10 when there is no such descent."""
    n = int(np.sum(np.isfinite(losses)))
    if n < 3:
        raise ValueError(f"lr_find: only {n} finite losses; lower --lr_min or raise --lr_steps")
    lrs, s = np.asarray(lrs[:n], float), smooth(np.asarray(losses[:n], float), beta)
    i_min = int(np.argmin(s))
    min_over_10 = float(lrs[i_min] / 10)
    skip = max(1, n // 10)  # the first points are mostly the EMA warming up
    grad = np.gradient(s, np.log(lrs))
    window = grad[skip:i_min + 1] if i_min > skip else np.array([])
    if window.size and window.min() < 0:
        i = skip + int(np.argmin(window))
        return {"lr": float(lrs[i]), "method": "steepest descent", "steepest": float(lrs[i]),
                "min_over_10": min_over_10}
    return {"lr": min_over_10, "method": "min / 10", "steepest": None, "min_over_10": min_over_10}


def plot(lrs: np.ndarray, losses: np.ndarray, suggestion: dict, png: str, title: str = "LR range test") -> None:
    n = len(losses)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(lrs[:n], losses, alpha=0.35, label="loss")
    finite = np.isfinite(losses)
    if finite.sum() > 1:
        ax.plot(lrs[:n][finite], smooth(losses[finite]), label="smoothed")
        lo, hi = np.nanmin(losses[finite]), np.nanpercentile(losses[finite], 95)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.2 * (hi - lo + 1e-9))
    ax.axvline(suggestion["lr"], color="red", linestyle="--", label=f"suggested {suggestion['lr']:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fileio.save_figure(fig, png, dpi=90)
    plt.close(fig)


def lr_find(cfg, workdir: str, *, lr_min: float = 1e-7, lr_max: float = 1.0, steps: int = 100,
            population: int = 0, devices: list | None = None) -> dict:
    """Runs the range test on `cfg`'s model and data; writes WORKDIR/lr_find.png and lr_find.json.

    population=0: one run, LR ramped exponentially from lr_min to lr_max over `steps` steps (stops at
    divergence). population=K: K members at constant log-spaced LRs in [lr_min, lr_max], `steps` steps
    each in one vmapped step; the suggestion is the LR with the lowest loss over the last fifth of the steps.
    Both are a `Population` stepped by the one loop with a `RangeTest` callback.
    """
    if population < 0:
        raise ConfigError("lr_find.population", population, ">= 0")
    c = with_overrides(cfg, {"train.steps": int(steps), "optim.schedule.type": "constant",
                             "optim.schedule.warmup": 0, "optim.lr": 1.0})
    fileio.path(workdir).mkdir(parents=True, exist_ok=True)
    if population == 0:
        lrs = lr_ramp(lr_min, lr_max, steps)
        tables, members, diverge = lrs[None], [c], 4.0
    else:
        lrs = np.geomspace(lr_min, lr_max, population) if population > 1 else np.array([lr_min])
        tables, members, diverge = np.repeat(lrs[:, None], steps, 1), [c] * population, None
    pop = Population(members, workdir, devices=devices, lr_tables=tables)
    recorder = RangeTest(len(members), diverge)
    fit(pop, pop.run.data.train_iterator, [recorder])
    history = np.stack(recorder.losses)  # [steps seen, K]
    if population == 0:
        losses = history[:, 0]
        suggestion = suggest_lr(lrs, losses)
        title = f"LR range test: {len(losses)} steps, exponential ramp"
    else:
        tail = history[-max(1, steps // 5):]
        losses = np.where(np.isfinite(tail).all(0), tail.mean(0), np.inf)
        i = int(np.argmin(losses))
        suggestion = {"lr": float(lrs[i]), "method": f"lowest loss after {steps} steps", "steepest": None,
                      "min_over_10": float(lrs[i] / 10)}
        title = f"LR sweep: {population} members, {steps} steps each at constant LR"
    plot(lrs, np.where(np.isfinite(losses), losses, np.nan), suggestion, fileio.path(workdir) / LR_FIND_PLOT,
         title)
    result = {"suggestion": suggestion, "lrs": lrs[:len(losses)].tolist(),
              "losses": [float(x) if math.isfinite(x) else None for x in losses], "population": population}
    fileio.write_json(fileio.path(workdir) / LR_FIND_FILE, result)
    logging.info("lr_find: suggested lr %.3g (%s)", suggestion["lr"], suggestion["method"])
    return result
