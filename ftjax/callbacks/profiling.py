"""train.profile = "START:STEPS": a jax.profiler trace of training steps START .. START+STEPS-1 under
WORKDIR/tb/plugins/profile/ (TensorBoard's profile plugin and Perfetto read it), so a slow step can be read
op by op. Off by default: tracing slows the traced steps and writes tens of MB."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile

import jax
from absl import logging

from ftjax import fileio
from ftjax.loop import Callback, Loop
from ftjax.workdir import TB_DIR

PROFILE_FORMAT = re.compile(r"(\d+):(\d+)")


def libtpu_loaded_off_tpu() -> bool:
    """libtpu is mapped into this process (an abstract TPU topology was described here, as --mode=dry_run
    --topology does) while the devices are not TPUs: jax.profiler.start_trace then crashes the process inside
    libtpu's profiler plugin (a segmentation fault, jax 0.10.2 / libtpu 0.0.52)."""
    if not sys.platform.startswith("linux") or jax.default_backend() == "tpu":
        return False
    try:
        with open("/proc/self/maps") as maps:
            return any("libtpu" in line for line in maps)
    except OSError:
        return False


def parse(value: str) -> tuple[int, int] | None:
    """(start step, steps) of a train.profile value, None when off ("")."""
    if not value:
        return None
    match = PROFILE_FORMAT.fullmatch(str(value).strip())
    if match is None or int(match.group(2)) < 1:
        raise ValueError(f"train.profile={value!r}: START:STEPS, e.g. 10:3 (STEPS >= 1), or '' for off")
    return int(match.group(1)), int(match.group(2))


class ProfileTrace(Callback):
    """Starts the trace when step `start` is next, stops it once `steps` steps have run (their results read
    back, so the trace holds their device work), or at the end of a run that stops earlier. A gs:// workdir:
    traced into a local folder, copied under tb/ when the trace ends. Process 0 only (`enabled`)."""

    def __init__(self, workdir: str, start: int, steps: int, enabled: bool = True):
        self.workdir, self.start, self.stop_at, self.enabled = fileio.path(workdir), start, start + steps, enabled
        self.remote = str(workdir).startswith("gs://")
        self._dir: str | None = None

    def on_begin(self, loop: Loop) -> None:
        if loop.step >= self.stop_at:
            logging.info("train.profile: steps %d..%d ran before this resume; no trace", self.start, self.stop_at - 1)
        elif loop.step >= self.start:  # resumed inside the window: trace what is left of it
            self._begin(loop.step)

    def after_step(self, loop: Loop) -> None:
        if self._dir is None and loop.step == self.start and loop.step < self.stop_at:
            self._begin(loop.step)
        elif self._dir is not None and loop.step >= self.stop_at:
            self._end(loop)

    def on_end(self, loop: Loop) -> None:
        if self._dir is not None:
            self._end(loop)

    def _begin(self, step: int) -> None:
        if not self.enabled:
            return
        if libtpu_loaded_off_tpu():
            logging.warning("train.profile: no trace: libtpu was loaded in this process for a TPU topology plan "
                            "(dry_run --topology) and its profiler crashes off TPU; profile in a fresh process")
            return
        if self.remote:
            self._dir = tempfile.mkdtemp(prefix="ftjax_profile_")
        else:
            self._dir = str(self.workdir / TB_DIR)
            os.makedirs(self._dir, exist_ok=True)
        jax.profiler.start_trace(self._dir)
        logging.info("train.profile: tracing from step %d into %s", step, self._dir)

    def _end(self, loop: Loop) -> None:
        loop.drain()  # the traced steps' device work is done before the trace closes
        jax.profiler.stop_trace()
        if self.remote:
            for root, _, files in os.walk(self._dir):
                for name in files:
                    local = os.path.join(root, name)
                    fileio.path(local).copy(self.workdir / TB_DIR / os.path.relpath(local, self._dir), overwrite=True)
            shutil.rmtree(self._dir, ignore_errors=True)
        logging.info("train.profile: trace of steps %d..%d written under %s", self.start, loop.step - 1,
                     self.workdir / TB_DIR / "plugins" / "profile")
        self._dir = None
