"""TensorBoard's HParams view as a callback (`ftjax.reporting.hparams` writes it): each member's at the end of the
loop. `write_hparams` is re-exported here for the callers that import it from this module."""

from __future__ import annotations

from typing import Any

from ftjax.callbacks.stopping import EarlyStopping
from ftjax.loop import Callback, Loop
from ftjax.reporting.hparams import write_hparams

__all__ = ["HParams", "write_hparams"]


class HParams(Callback):
    """Writes each member's HParams at the end of the loop, with the early-stopping best val metrics (the
    trainer's `write_hparams` call after the final evaluation is the better place for a solo run)."""

    def __init__(self, member_dirs: list[str], member_cfgs: list[Any], enabled: bool = True):
        self.member_dirs, self.member_cfgs, self.enabled = list(member_dirs), list(member_cfgs), enabled

    def on_end(self, loop: Loop) -> None:
        if not self.enabled or loop.interrupted:
            return
        early = next((cb for cb in loop.callbacks if isinstance(cb, EarlyStopping)), None)
        for k, (d, cfg) in enumerate(zip(self.member_dirs, self.member_cfgs)):
            val = (early.best_results[k] if early is not None else None) or {}
            write_hparams(d, cfg, {"val": val, "steps": loop.step})
