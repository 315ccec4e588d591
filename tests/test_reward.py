"""model.task="reward": a scalar head trained with the Bradley-Terry loss on preference pairs learns to rank
held-out pairs, its loss equals TRL's RewardTrainer formula on the same scores, and the export loads in
transformers as a 1-label sequence classifier with equal scores."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ftjax import main, models, tasks, trainer
from ftjax.tasks import reward
from tests.test_lm_data import tiny_llama
from tests.test_preference import pairs_jsonl


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llama(str(tmp_path_factory.mktemp("reward") / "llama"))


def _config(model_dir: str, data: str, **overrides):
    from configs.reward import get_config
    from ftjax.config import with_overrides

    c = get_config(f"model={model_dir},data={data},batch=8,max_len=32,lr=3e-3")
    c.train.steps, c.train.eval_every = 30, 10
    c.train.compilation_cache, c.train.progress = "", False
    c.model.scan_layers = False
    return with_overrides(c, overrides)


def test_the_bradley_terry_loss_and_metrics_are_trls():
    chosen, rejected = jnp.asarray([2.0, -1.0, 0.5]), jnp.asarray([1.0, 0.5, 0.5])
    # TRL RewardTrainer: -nn.functional.logsigmoid(rewards_chosen - rewards_rejected).mean()
    want = -torch.nn.functional.logsigmoid(torch.tensor([2.0, -1.0, 0.5]) - torch.tensor([1.0, 0.5, 0.5]))
    np.testing.assert_allclose(np.asarray(reward.bradley_terry(chosen, rejected)), want.numpy(), rtol=1e-6)
    task = tasks.get("reward")
    assert task.model_task == "classification" and task.num_labels == 1
    out = task.metrics(3.0, 4.0, {"sum_accuracy": 3.0, "sum_margin": 2.0})
    assert out == {"loss": 0.75, "accuracy": 0.75, "margin": 0.5}


def test_a_reward_model_learns_to_rank_held_out_pairs_and_exports_a_1_label_classifier(folder, tmp_path):
    data = pairs_jsonl(tmp_path / "pairs.jsonl", 240)
    trainer.train(_config(folder, data), str(tmp_path / "run"))
    evals = [x for x in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if x["split"] == "val"]
    assert evals[-1]["accuracy"] > 0.9 and evals[-1]["margin"] > evals[0]["margin"]
    assert evals[-1]["loss"] < evals[0]["loss"]
    # --mode=export (the run's best checkpoint) writes what transformers loads as a 1-label classifier.
    flags.FLAGS(["ftjax", f"--export_dir={tmp_path / 'export'}"])
    try:
        main._export(_config(folder, data), str(tmp_path / "run"))
    finally:
        flags.FLAGS.unparse_flags()
    out = str(tmp_path / "export")
    model = models.from_pretrained(out, task="classification")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.num_labels == 1
    ids = np.asarray([[5, 17, 42, 99, 3, 0, 0], [7, 8, 9, 10, 11, 12, 13]])
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(model(input_ids=ids, attention_mask=mask)["logits"])
    assert got.shape == (2, 1)
    np.testing.assert_allclose(got, want, atol=1e-5)
