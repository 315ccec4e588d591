"""Behaviours of the training loop (`ftjax.loop.fit`), one callback each: evaluation, metric logging,
progress, early stopping, the overfitting warning, non-finite-loss handling, sweep pruning, LM samples,
checkpoints and the SIGTERM save. `ftjax.trainer.standard_callbacks` lists them in the order they run."""

from ftjax.callbacks.cadence import Every
from ftjax.callbacks.checkpointing import Checkpoint, Preemption
from ftjax.callbacks.evaluation import Evaluate
from ftjax.callbacks.metric_log import MetricLogger, MetricWriter, read_metrics
from ftjax.callbacks.progress import Progress, ProgressBar
from ftjax.callbacks.stopping import (
    EarlyStopper,
    EarlyStopping,
    NanGuard,
    OverfitMonitor,
    OverfitWarning,
    Pruning,
    StopAfter,
)

__all__ = [
    "Checkpoint", "EarlyStopper", "EarlyStopping", "Evaluate", "Every", "MetricLogger", "MetricWriter", "NanGuard",
    "OverfitMonitor", "OverfitWarning", "Preemption", "Progress", "ProgressBar", "Pruning", "StopAfter",
    "read_metrics",
]
