"""The whole life of a run in a gs:// workdir, against a real GCS emulator (tests/gcs_emulator.py): train,
SIGTERM, resume bit-identical to an uninterrupted local run, eval and export from the workdir alone,
and the export loads in transformers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from ftjax import fileio, trainer
from ftjax.loop import Callback
from tests import tiny
from tests.gcs_emulator import invalidate_caches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SigtermAt(Callback):
    """Sends this process a real SIGTERM after `step`; the Preemption callback saves and exits 143."""

    def __init__(self, step: int):
        self.step = step

    def after_step(self, loop):
        if loop.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-m", "ftjax.main", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    invalidate_caches()  # the subprocess wrote to the bucket behind this process's listing cache
    return proc


def _train_losses(workdir) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (fileio.path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]


def _params(workdir, cfg) -> dict:
    from ftjax import params as params_lib
    from ftjax.checkpoint import Checkpointer
    from ftjax.run import Run

    run = Run(cfg, str(workdir), purpose="eval")
    ckpt = Checkpointer(fileio.path(workdir) / "checkpoints", keep=1, async_save=False, read_only=True)
    state, _ = ckpt.restore(ckpt.latest_step(), run.abstract_state())
    ckpt.close()
    return params_lib.flatten(jax.device_get(state["params"]))


@pytest.mark.slow
def test_train_preempt_resume_eval_export_on_gcs(gcs_bucket, model_dir, data_dir, tmp_path):
    overrides = {"train.steps": 10, "train.eval_every": 5, "train.log_every": 1, "train.checkpoint.every": 3}
    cfg = tiny.tiny_config(model_dir, data_dir, **overrides)
    local = tmp_path / "local"
    trainer.train(cfg, str(local))

    workdir = f"{gcs_bucket}/runs/tiny"
    with pytest.raises(SystemExit) as e:
        trainer.train(cfg, workdir, callbacks=[SigtermAt(4)])
    assert e.value.code == 143
    assert (fileio.path(workdir) / "checkpoints" / "4").exists()
    summary = trainer.train(cfg, workdir)  # the same call resumes from step 4
    assert summary["steps"] == 10
    assert _train_losses(workdir) == _train_losses(local)
    a, b = _params(local, cfg), _params(workdir, cfg)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    saved = json.loads((fileio.path(workdir) / "summary.json").read_text())
    assert saved["best_step"] == summary["best_step"]
    assert (fileio.path(workdir) / "plots" / "loss.png").exists()
    assert any((fileio.path(workdir) / "tb").iterdir())

    # eval and export need only the gs:// workdir; the export lands on gs:// and loads in transformers.
    out = _cli(f"--workdir={workdir}", "--mode=eval")
    assert f"checkpoint: step {summary['best_step']}" in out.stdout
    assert json.loads((fileio.path(workdir) / "eval.json").read_text())["step"] == summary["best_step"]
    _cli(f"--workdir={workdir}", "--mode=export")
    export = tmp_path / "export_copy"
    export.mkdir()
    for f in (fileio.path(workdir) / "export").iterdir():
        f.copy(fileio.path(export) / f.name)
    import torch
    import transformers

    from ftjax import models

    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(str(export)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(export))
    enc = tok(["the snack was great", "stale coffee"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hf_logits = hf_model(**enc).logits.numpy()
    ours = models.from_pretrained(str(export), task="classification")
    np.testing.assert_allclose(np.asarray(ours(**{k: v.numpy() for k, v in enc.items()})["logits"]), hf_logits,
                               atol=1e-5)
