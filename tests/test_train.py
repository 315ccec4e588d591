"""The trainer: sharded step, gradient accumulation, frozen params, resume, early stopping, bad inputs."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import params as params_lib
from ftjax import step as step_lib
from ftjax import trainer
from ftjax.loop import TrainingError
from ftjax.run import Run
from tests import tiny


def _losses(workdir: str) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _final_params(workdir: str, cfg) -> dict:
    run = Run(cfg, workdir)
    from ftjax import checkpoint as checkpoint_lib

    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
    state, _ = ckpt.restore(ckpt.latest_step(), run.abstract_state())
    ckpt.close()
    return params_lib.flatten(jax.device_get(state["params"]))


def test_sharded_step_on_1_and_4_devices_gives_the_same_loss_curve(model_dir, data_dir, tmp_path):
    cfg = tiny.tiny_config(model_dir, data_dir, **{"train.log_every": 1, "model.dropout.hidden": 0.0,
                                                   "model.dropout.attention": 0.0})
    trainer.train(cfg, str(tmp_path / "one"), devices=jax.devices()[:1])
    cfg4 = tiny.tiny_config(model_dir, data_dir, **{"train.log_every": 1, "model.dropout.hidden": 0.0,
                                                    "model.dropout.attention": 0.0, "mesh.data": 2,
                                                    "mesh.fsdp": 2})
    trainer.train(cfg4, str(tmp_path / "four"), devices=jax.devices()[:4])
    one, four = _losses(str(tmp_path / "one")), _losses(str(tmp_path / "four"))
    assert len(one) == len(four) > 5
    np.testing.assert_allclose(one, four, rtol=2e-4, atol=2e-5)


def _tiny_run(model_dir, data_dir, workdir, **overrides):
    cfg = tiny.tiny_config(model_dir, data_dir, **overrides)
    return Run(cfg, str(workdir))


def test_gradient_accumulation_equals_one_big_batch(model_dir, data_dir, tmp_path):
    run = _tiny_run(model_dir, data_dir, tmp_path, **{"model.dropout.hidden": 0.0,
                                                      "model.dropout.attention": 0.0})
    batch = next(run.data.train_iterator())
    batch["weights"][-1] = 0.0  # a padding example must not count, however the batch is split.
    results = []
    for accum in (1, 4):
        step_cfg = step_lib.StepConfig("classification", grad_accum=accum)
        fn = jax.jit(step_lib.make_train_step(run.graphdef, run.rest, run.optimizer.tx,
                                           run.optimizer.trainable_at(0), step_cfg))
        state = jax.tree_util.tree_map(jnp.array, run.state)
        new_state, metrics = fn(state, {k: jnp.asarray(v) for k, v in batch.items()}, run.key)
        results.append((float(metrics["loss"]), params_lib.flatten(jax.device_get(new_state["params"]))))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for path, value in results[0][1].items():
        np.testing.assert_allclose(value, results[1][1][path], rtol=1e-4, atol=1e-6, err_msg=path)


def test_frozen_params_are_unchanged_and_get_no_gradient_work(model_dir, data_dir, tmp_path):
    full = _tiny_run(model_dir, data_dir, tmp_path / "full")
    frozen = _tiny_run(model_dir, data_dir, tmp_path / "frozen", **{"optim.freeze_layers": "embeddings,0"})
    batch = {k: jnp.asarray(v) for k, v in next(full.data.train_iterator()).items()}

    def flops(run):
        fn = step_lib.make_train_step(run.graphdef, run.rest, run.optimizer.tx, run.optimizer.trainable_at(0),
                                   run.step_cfg)
        compiled = jax.jit(fn).lower(run.state, batch, run.key).compile()
        return compiled.cost_analysis()["flops"], fn

    full_flops, _ = flops(full)
    frozen_flops, fn = flops(frozen)
    # Embedding and layer-0 gradients (and the embedding table's AdamW update) are gone from the program.
    assert frozen_flops < 0.8 * full_flops, (frozen_flops, full_flops)

    before = params_lib.flatten(jax.device_get(frozen.state["params"]))
    state = frozen.state
    for _ in range(3):
        state, _ = jax.jit(fn)(state, batch, frozen.key)
    after = params_lib.flatten(jax.device_get(state["params"]))
    frozen_paths = set(before) - set(frozen.optimizer.trainable_at(0))
    assert any("embeddings" in p for p in frozen_paths) and any("layer/0/" in p for p in frozen_paths)
    for path in before:
        same = np.array_equal(before[path], after[path])
        assert same == (path in frozen_paths), path


def test_resume_after_interruption_is_bit_identical(model_dir, data_dir, tmp_path):
    overrides = {"train.checkpoint.every": 3, "train.epochs": 2.0}
    cfg = tiny.tiny_config(model_dir, data_dir, **overrides)
    trainer.train(cfg, str(tmp_path / "straight"))
    interrupted = str(tmp_path / "interrupted")
    out = trainer.train(cfg, interrupted, stop_after=7)  # checkpoints at 3 and 6: step 7 is redone.
    assert out == {"interrupted_at": 7}
    trainer.train(cfg, interrupted)
    a = _final_params(str(tmp_path / "straight"), cfg)
    b = _final_params(interrupted, cfg)
    assert a.keys() == b.keys()
    for path in a:
        assert np.array_equal(a[path], b[path]), path
    assert _losses(str(tmp_path / "straight")) == _losses(interrupted)


def test_early_stopping_stops_at_the_right_eval_and_restores_the_best(model_dir, data_dir, tmp_path):
    # lr high enough to diverge after a while: val loss rises; patience 2 stops two evals after the best.
    cfg = tiny.tiny_config(model_dir, data_dir, **{"train.eval_every": 2, "train.epochs": 6.0,
                                                   "train.early_stop.patience": 2, "optim.lr": 3e-3})
    summary = trainer.train(cfg, str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        val = [json.loads(line) for line in f]
    val = [(r["step"], r["loss"]) for r in val if r["split"] == "val"]
    best_step, best_loss = min(val, key=lambda r: r[1])
    if summary["stopped_early"]:
        assert val[-1][0] == val[[s for s, _ in val].index(best_step) + 2][0]
    else:
        assert len(val) - 1 - [s for s, _ in val].index(best_step) < 2
    assert summary["best_step"] == best_step
    assert summary["val"]["loss"] == pytest.approx(best_loss, rel=1e-5)
    assert ("last" in summary) == (best_step != summary["steps"])  # the last weights' test numbers, if not best


def test_a_workdir_holding_another_model_is_an_error(model_dir, data_dir, tmp_path):
    other = tiny.tiny_bert(str(tmp_path / "other_model"), layers=1)
    cfg = tiny.tiny_config(model_dir, data_dir, **{"train.steps": 2})
    trainer.train(cfg, str(tmp_path / "work"))
    cfg2 = tiny.tiny_config(other, data_dir, **{"train.steps": 2})
    with pytest.raises(TrainingError, match=r"cannot change mid-run:\n.*model.name_or_path"):
        trainer.train(cfg2, str(tmp_path / "work"))


def test_nan_loss_stops_the_run_naming_the_step_and_last_checkpoint(model_dir, data_dir, tmp_path):
    cfg = tiny.tiny_config(model_dir, data_dir, **{"optim.lr": 1e30, "optim.clip_norm": 0.0,
                                                   "train.checkpoint.every": 1, "optim.schedule.type": "constant"})
    with pytest.raises(TrainingError, match=r"(loss is (nan|inf)|the update made params inf/nan) at step \d+.*Last good checkpoint"):
        trainer.train(cfg, str(tmp_path))
