"""distill.*: the divergences, the step's loss (alpha = 1: the task's alone; alpha = 0: T^2 x the mean divergence
over the labelled positions, by hand from both models' logits), distillation lowering the divergence in real
runs (causal LM and classification), the teacher's FLOPs, and the teachers that cannot teach a student."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftjax import distill, flops, models, tasks, trainer
from ftjax import params as params_lib
from ftjax.config import ConfigError, default_config, validate
from ftjax.step import StepConfig, make_train_step
from tests import tiny
from tests.test_lm_data import CORPUS, tiny_llama


def test_divergences_at_a_temperature():
    rng = np.random.RandomState(0)
    t, s = rng.randn(3, 5).astype(np.float32), rng.randn(3, 5).astype(np.float32)
    temp = 2.0

    def softmax(x):
        e = np.exp(x / temp - (x / temp).max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(t), softmax(s)
    kl = lambda a, b: (a * (np.log(a) - np.log(b))).sum(-1)
    m = (p + q) / 2
    np.testing.assert_allclose(distill.divergence(t, s, "forward_kl", temp), kl(p, q), rtol=1e-5)
    np.testing.assert_allclose(distill.divergence(t, s, "reverse_kl", temp), kl(q, p), rtol=1e-5)
    jsd = np.asarray(distill.divergence(t, s, "jsd", temp))
    np.testing.assert_allclose(jsd, (kl(p, m) + kl(q, m)) / 2, rtol=1e-5)
    assert (jsd <= np.log(2)).all() and np.allclose(distill.divergence(t, t, "jsd", temp), 0, atol=1e-7)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return tiny_llama(str(root / "student"), seed=0), tiny_llama(str(root / "teacher"), seed=1,
                                                                  num_hidden_layers=3)


def _lm_config(student: str, corpus: str, **overrides):
    from ftjax.config import with_overrides

    c = default_config()
    c.model.name_or_path, c.model.task, c.model.scan_layers = student, "causal_lm", False
    c.data.source, c.data.max_len, c.data.validation_fraction = f"files:{corpus}", 32, 0.1
    c.data.lm.num_samples, c.data.lm.documents = 0, "paragraph"
    c.optim.lr, c.optim.weight_decay, c.optim.schedule.type = 3e-3, 0.0, "constant"
    c.train.batch_size, c.train.steps, c.train.eval_every, c.train.log_every = 8, 24, 12, 4
    c.train.progress, c.train.compilation_cache, c.train.checkpoint.async_save = False, "", False
    c.forgetting.monitors = ()
    return with_overrides(c, overrides)


def test_the_step_mixes_the_task_loss_and_the_divergence_over_labelled_positions(llamas):
    student_dir, teacher_dir = llamas
    student = models.from_pretrained(student_dir, task="causal_lm")
    teacher = models.from_pretrained(teacher_dir, task="causal_lm")
    graphdef, params, rest = params_lib.split(student)
    t_graphdef, t_params, t_rest = params_lib.split(teacher)
    ids = np.random.RandomState(1).randint(3, 60, (2, 10)).astype(np.int32)
    labels = ids.copy()
    labels[1, :4] = -100  # a prompt: no loss there, and no divergence either
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels, "weights": np.ones(2, np.float32)}
    tx = optax.sgd(0.0)
    state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params)}
    cfg = _lm_config(student_dir, "unused", **{"distill.teacher": teacher_dir})

    def loss_at(alpha):
        cfg.distill.alpha = alpha
        step = make_train_step(graphdef, rest, tx, frozenset(params_lib.flatten(params)),
                               StepConfig(tasks.of(cfg)), teacher=(t_graphdef, t_rest))
        return float(jax.jit(step)(state, batch, jax.random.key(0), t_params)[1]["loss"])

    plain = make_train_step(graphdef, rest, tx, frozenset(params_lib.flatten(params)), StepConfig("causal_lm"))
    task_loss = float(jax.jit(plain)(state, batch, jax.random.key(0))[1]["loss"])
    assert loss_at(1.0) == pytest.approx(task_loss, rel=1e-6)
    s_logits = np.asarray(student(input_ids=ids)["logits"])
    t_logits = np.asarray(teacher(input_ids=ids)["logits"])
    div = np.asarray(distill.divergence(t_logits, s_logits, "forward_kl", 2.0))
    shifted = np.concatenate([labels[:, 1:], np.full((2, 1), -100)], axis=1) != -100
    assert loss_at(0.0) == pytest.approx(4.0 * div[shifted].mean(), rel=1e-5)


def _train_losses(workdir) -> list[float]:
    return [x["loss"] for x in map(json.loads, open(workdir / "metrics.jsonl")) if x["split"] == "train"]


def test_distilling_a_causal_lm_lowers_its_divergence_from_the_teacher(llamas, tmp_path):
    student_dir, teacher_dir = llamas
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 10))
    cfg = _lm_config(student_dir, str(corpus), **{"distill.teacher": teacher_dir, "distill.alpha": 0.0})
    trainer.train(cfg, str(tmp_path / "run"))
    losses = _train_losses(tmp_path / "run")  # alpha 0: the logged loss is T^2 x the mean divergence
    assert losses[-1] < 0.5 * losses[0]


def test_distilling_a_classifier_toward_a_teacher_head(tmp_path):
    import torch
    import transformers

    data = tiny.sentiment_csvs(str(tmp_path / "data"), n_train=64, n_test=8)
    student = tiny.tiny_bert(str(tmp_path / "student"), layers=1)
    torch.manual_seed(3)
    teacher_cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=64, num_labels=2)
    transformers.BertForSequenceClassification(teacher_cfg).save_pretrained(str(tmp_path / "teacher"))
    cfg = tiny.tiny_config(student, data, **{"distill.teacher": str(tmp_path / "teacher"), "distill.alpha": 0.0,
                                             "distill.loss": "jsd", "train.epochs": 4.0, "train.log_every": 2,
                                             "optim.schedule.type": "constant"})
    trainer.train(cfg, str(tmp_path / "run"))
    losses = _train_losses(tmp_path / "run")
    assert losses[-1] < 0.5 * losses[0]


def test_the_teachers_forward_counts_in_the_step_flops(llamas):
    student_dir, teacher_dir = llamas
    student = models.from_pretrained(student_dir, task="causal_lm")
    teacher = models.from_pretrained(teacher_dir, task="causal_lm")
    trainable = frozenset(params_lib.flatten(params_lib.split(student)[1]))
    shape = flops.Shape(2, 16)
    alone = flops.step_flops(student, trainable, shape)
    taught = flops.step_flops(student, trainable, shape, teacher=teacher)
    assert taught.forward == pytest.approx(alone.forward + flops.step_flops(teacher, frozenset(), shape).forward)
    assert taught.backward == alone.backward


def test_teachers_that_cannot_teach_are_refused_naming_distill_teacher(llamas, tmp_path):
    from ftjax.run import Run

    student_dir, _ = llamas
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 4))
    other_vocab = tiny_llama(str(tmp_path / "other"), vocab_size=500)
    with pytest.raises(ConfigError, match="distill.teacher.*vocabulary has 500 entries"):
        Run(_lm_config(student_dir, str(corpus), **{"distill.teacher": other_vocab}), str(tmp_path / "w"))
    bad = _lm_config(student_dir, str(corpus), **{"distill.teacher": other_vocab, "model.loss_chunk_tokens": 64})
    with pytest.raises(ConfigError, match="model.loss_chunk_tokens"):
        validate(bad)
    pref = _lm_config(student_dir, str(corpus), **{"distill.teacher": other_vocab, "model.task": "preference",
                                                   "preference.loss": "orpo"})
    with pytest.raises(ConfigError, match="distill.teacher"):
        validate(pref)
