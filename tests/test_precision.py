"""Mixed precision: bfloat16 compute with float32 master params and optimizer state tracks float32 training."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import params as params_lib
from ftjax import trainer
from ftjax.run import Run, compute_dtype
from tests import tiny


def _train_losses(workdir: str) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_elsewhere():
    assert jax.default_backend() == "cpu" and compute_dtype("auto") == "float32"
    assert compute_dtype("bfloat16") == "bfloat16" and compute_dtype("float32") == "float32"


@pytest.mark.slow
def test_bfloat16_training_tracks_float32_with_float32_master_state(model_dir, data_dir, tmp_path):
    common = {"train.log_every": 1, "train.epochs": 2.0, "model.dropout.hidden": 0.0,
              "model.dropout.attention": 0.0, "model.param_dtype": "float32"}
    f32 = trainer.train(tiny.tiny_config(model_dir, data_dir, **common, **{"model.dtype": "float32"}),
                        str(tmp_path / "f32"))
    bf16_cfg = tiny.tiny_config(model_dir, data_dir, **common, **{"model.dtype": "bfloat16"})
    bf16 = trainer.train(bf16_cfg, str(tmp_path / "bf16"))
    a, b = np.array(_train_losses(str(tmp_path / "f32"))), np.array(_train_losses(str(tmp_path / "bf16")))
    assert len(a) == len(b) > 10
    # bf16 has 8 mantissa bits (~0.4% per op): the curves agree to a few percent, step by step.
    np.testing.assert_allclose(b, a, rtol=0.03)
    assert abs(bf16["val"]["loss"] - f32["val"]["loss"]) < 0.03 * f32["val"]["loss"]
    # The master params and Adam moments stay float32; only the compute ran in bf16.
    run = Run(bf16_cfg, str(tmp_path / "probe"))
    leaves = params_lib.flatten(run.state["params"]).values()
    assert all(x.dtype == jnp.float32 for x in leaves)
    moments = [x for x in jax.tree_util.tree_leaves(run.state["opt_state"]) if x.ndim > 0]
    assert moments and all(x.dtype == jnp.float32 for x in moments)
    batch = {k: jnp.asarray(v) for k, v in next(run.data.train_iterator()).items()}
    model = params_lib.merge(run.graphdef, run.state["params"], run.rest)
    out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch})
    assert out["logits"].dtype == jnp.bfloat16
