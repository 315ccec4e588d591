"""Language-model samples at each evaluation: a few validation prompts generated with each member's
current params, written to MEMBER_DIR/samples/step_<step>.jsonl so a person can read what changed."""

from __future__ import annotations


import json
from typing import Any

import jax
import numpy as np
from absl import logging

from ftjax import fileio
from ftjax import params as params_lib
from ftjax import workdir as workdir_lib
from ftjax.generate import generate
from ftjax.loop import Callback, Loop


class LMSamples(Callback):
    def __init__(self, run: Any, member_dirs: list[str], prompts: list[str], max_new_tokens: int,
                 enabled: bool = True):
        self.run, self.member_dirs = run, member_dirs  # run: graphdef, rest, tokenizer, mesh
        self.prompts, self.max_new_tokens, self.enabled = list(prompts), max_new_tokens, enabled

    def on_eval(self, loop: Loop, split: str, results: list[dict[str, float]]) -> None:
        if split != "validation" or not self.prompts:
            return
        member_model = getattr(loop.stepper, "member_model", None)  # a population member's own model
        for k in np.flatnonzero(loop.active):
            run, params = self.run, loop.stepper.params(int(k))
            model = member_model(int(k)) if member_model else params_lib.merge(run.graphdef, params, run.rest)
            self.write(int(k), loop.step, model)

    def write(self, member: int, step: int, model: Any) -> str | None:
        """Generates from the prompts with `model`; returns the file written (None: not process 0, or generation
        failed, which is reported and does not stop training)."""
        run = self.run
        try:
            with jax.set_mesh(run.mesh):
                outputs = generate(model, run.tokenizer, self.prompts, max_new_tokens=self.max_new_tokens)
        except Exception as e:  # noqa: BLE001 (samples are a diagnostic: a failure is reported, the run goes on)
            logging.warning("samples: generation failed at step %d (%s: %s); training goes on", step,
                            type(e).__name__, e)
            return None
        if not self.enabled:
            return None
        path = workdir_lib.samples_file(self.member_dirs[member], step)
        fileio.write_text(path, "".join(json.dumps({"step": step, "prompt": p, "generation": str(out)}) + "\n"
                                        for p, out in zip(self.prompts, outputs)))
        return str(path)
