"""Forgetting monitors: CKA / drift / masking math on known values, hidden states equal to transformers',
the MLM loss equal to BertForMaskedLM's, a run that logs and plots them, and the budget stopping a run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import forgetting as lib
from ftjax import models, trainer
from ftjax.callbacks import read_metrics
from ftjax.config import ConfigError
from tests.tiny import MINILM, tiny_config


def test_cka_is_one_for_the_same_features_and_invariant_to_rotation_and_scale():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert float(lib.linear_cka(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(lib.linear_cka(x, 3.0 * x @ q.astype(np.float32))) == pytest.approx(1.0, abs=1e-5)
    assert float(lib.linear_cka(x, x + 5.0)) == pytest.approx(1.0, abs=1e-5)  # column centring
    y = rng.normal(size=(200, 8)).astype(np.float32)
    value = float(lib.linear_cka(x, y))
    assert 0.0 < value < 0.3
    assert float(lib.linear_cka(x, 2.0 * y @ np.eye(8, dtype=np.float32)[::-1])) == pytest.approx(value, rel=1e-4)
    # Masked rows (padding) change nothing, whatever they hold.
    w = np.ones(260, np.float32)
    w[200:] = 0
    xp = np.concatenate([x, 1e3 * rng.normal(size=(60, 16))]).astype(np.float32)
    yp = np.concatenate([y, rng.normal(size=(60, 8))]).astype(np.float32)
    assert float(lib.linear_cka(xp, yp, w)) == pytest.approx(value, rel=1e-4)
    layers = lib.layer_cka([jnp.stack([x, x])[:, None]], [jnp.stack([x, 2 * x])[:, None]], [jnp.ones((1, 200))])
    np.testing.assert_allclose(np.asarray(layers), [1.0, 1.0], atol=1e-5)


def test_weight_drift_is_zero_unchanged_and_a_tenth_for_w0_times_1_1():
    rng = np.random.default_rng(0)
    anchor = {"emb": {"kernel": jnp.asarray(rng.normal(size=(5, 4)))},
              "layer": {"0": {"kernel": jnp.asarray(rng.normal(size=(4, 4))), "bias": jnp.zeros(4)}}}
    names, group_of = lib.depth_groups({"emb/kernel": 0, "layer/0/kernel": 1, "layer/0/bias": 1}, num_layers=1)
    assert names == ["embeddings", "layer_0"]
    same = lib.drift_values(lib.drift_sums(anchor, anchor, group_of, 2), names)
    assert all(v == 0.0 for v in same.values())
    scaled = jax.tree_util.tree_map(lambda w: 1.1 * w, anchor)
    drift = lib.drift_values(lib.drift_sums(scaled, anchor, group_of, 2), names)
    for key in ("drift/total", "drift/max", "drift/embeddings", "drift/layer_0"):
        assert drift[key] == pytest.approx(0.1, rel=1e-5), key


def test_mlm_masking_is_fixed_and_80_10_10():
    rng = np.random.default_rng(1)
    ids = rng.integers(1000, 2000, size=(400, 100))
    maskable = np.ones(ids.shape, bool)
    maskable[:, :2] = False
    a = lib.mask_tokens(ids, maskable, mask_id=7, vocab_size=3000, prob=0.15, seed=3)
    b = lib.mask_tokens(ids, maskable, mask_id=7, vocab_size=3000, prob=0.15, seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    masked, labels = a
    chosen = labels != -100
    assert not chosen[:, :2].any()
    assert chosen.mean() == pytest.approx(0.15 * 0.98, abs=0.005)
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    np.testing.assert_array_equal(masked[~chosen], ids[~chosen])
    assert (masked[chosen] == 7).mean() == pytest.approx(0.8, abs=0.02)
    assert (masked[chosen] == ids[chosen]).mean() == pytest.approx(0.1, abs=0.02)


def test_hidden_states_equal_transformers_and_other_outputs_unchanged(model_dir):
    import torch
    import transformers

    texts = lib.default_corpus()[:4]
    batch = lib.encode(transformers.AutoTokenizer.from_pretrained(model_dir), texts, 32, 1, 4)[0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    for task in ("base", "classification"):
        model = models.from_pretrained(model_dir, task=task, num_labels=2)
        plain = model(**inputs)
        out = model(**inputs, output_hidden_states=True)
        assert "hidden_states" not in plain and len(out["hidden_states"]) == 3
        for key in plain:
            np.testing.assert_array_equal(np.asarray(plain[key]), np.asarray(out[key]))
    hf = transformers.BertModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in inputs.items()}, output_hidden_states=True).hidden_states
    real = batch["attention_mask"] > 0
    for ours, theirs in zip(out["hidden_states"], ref):
        np.testing.assert_allclose(np.asarray(ours)[real], theirs.numpy()[real], atol=1e-4)


def test_gpt2_hidden_states_equal_transformers(tmp_path):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    ids = np.random.default_rng(0).integers(0, 100, size=(2, 12))
    model = models.from_pretrained(str(tmp_path), task="causal_lm")
    out = model(input_ids=ids, output_hidden_states=True)
    np.testing.assert_array_equal(np.asarray(model(input_ids=ids)["logits"]), np.asarray(out["logits"]))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), output_hidden_states=True).hidden_states
    assert len(out["hidden_states"]) == len(ref) == 3
    for ours, theirs in zip(out["hidden_states"], ref):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    """A random BertForMaskedLM (with its cls.predictions head) and the MiniLM tokenizer."""
    import torch
    import transformers

    path = str(tmp_path_factory.mktemp("tiny_mlm"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertForMaskedLM(cfg).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(MINILM).save_pretrained(path)
    return path


def _hf_mlm_loss(path: str, max_len: int, n: int) -> float:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertForMaskedLM.from_pretrained(path).eval()
    batch = lib.encode(tok, lib.default_corpus()[:n], max_len, 1, n)[0]
    ids, labels = lib.mask_tokens(batch["input_ids"], batch["maskable"], tok.mask_token_id,
                                  min(model.config.vocab_size, len(tok)), 0.15, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(batch["attention_mask"]),
                    token_type_ids=torch.tensor(batch["token_type_ids"]), labels=torch.tensor(labels).long())
    return float(out.loss)


def test_a_run_logs_plots_and_summarises_every_monitor(mlm_dir, data_dir, tmp_path):
    retain = (("old_reviews", f"files:{data_dir}/test.csv"),)
    cfg = tiny_config(mlm_dir, data_dir, **{
        "train.steps": 8, "train.eval_every": 4, "forgetting.monitors": ("weight_drift", "cka", "pretrain"),
        "forgetting.max_examples": 8, "forgetting.batch_size": 8, "forgetting.retain": retain})
    summary = trainer.train(cfg, str(tmp_path))
    f = summary["forgetting"]
    assert f["skipped"] == []
    # The MLM loss at step 0 is BertForMaskedLM's on the same fixed masking (one batch of 8 texts).
    assert f["step0"]["mlm_loss"] == pytest.approx(_hf_mlm_loss(mlm_dir, 32, 8), abs=1e-4)
    assert f["step0"]["drift/total"] == 0.0 and f["step0"]["cka/min"] == pytest.approx(1.0, abs=1e-5)
    lines = [r for r in read_metrics(tmp_path) if r["split"] == "forgetting"]
    assert [r["step"] for r in lines] == [0, 4, 8]
    last = lines[-1]
    assert {"drift/layer_0", "drift/layer_1", "drift/embeddings", "cka/layer_1", "mlm_loss",
            "retain/old_reviews/accuracy", "retain/old_reviews/loss"} <= set(last)
    assert 0 < last["drift/total"] and last["cka/mean"] < 1.0
    assert f["last"]["step"] == 8 and f["worst"]["drift/total"] == pytest.approx(max(r["drift/total"] for r in lines))
    assert f["worst"]["cka/mean"] == pytest.approx(min(r["cka/mean"] for r in lines))
    assert os.path.exists(tmp_path / "plots" / "forgetting.png")
    assert summary["timing"]["forgetting_seconds"] > 0
    assert json.loads((tmp_path / "summary.json").read_text())["forgetting"]["budget"]["exceeded"] is None


def test_the_budget_stops_a_run_and_a_missing_mlm_head_is_skipped(model_dir, data_dir, tmp_path):
    cfg = tiny_config(model_dir, data_dir, **{
        "optim.lr": 0.05, "train.steps": 40, "train.eval_every": 2, "forgetting.monitors": ("cka", "pretrain"),
        "forgetting.max_examples": 16, "forgetting.budget": 0.02, "forgetting.budget_action": "stop"})
    summary = trainer.train(cfg, str(tmp_path))
    f = summary["forgetting"]
    assert f["skipped"] and "no masked_lm head" in f["skipped"][0]
    assert f["budget"]["metric"] == "cka/mean"  # auto: no MLM loss here
    exceeded = f["budget"]["exceeded"]
    assert exceeded is not None and exceeded["value"] < 0.98 and exceeded["action"] == "stop"
    assert summary["status"] == "stopped_early" and summary["steps"] == exceeded["step"] < 40


def test_a_retain_set_with_other_labels_is_refused(model_dir, data_dir, tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("text,label\ngood tea,a\nbad tea,b\nfresh box,c\n")
    cfg = tiny_config(model_dir, data_dir, **{"forgetting.monitors": (),
                                              "forgetting.retain": (("other", f"files:{other}"),)})
    with pytest.raises(ConfigError, match="same label set"):
        trainer.train(cfg, str(tmp_path / "wd"))


def test_a_decoder_classifier_scores_lm_loss_with_the_checkpoints_lm_head(data_dir, tmp_path):
    import torch
    import transformers

    from ftjax.callbacks.forgetting import PretrainObjective, WeightDrift
    from ftjax.run import Run
    from tests.test_lm_data import tiny_llama

    path = tiny_llama(str(tmp_path / "llama"))
    run = Run(tiny_config(path, data_dir, **{"data.packing": False}), str(tmp_path / "wd"))
    tok = run.tokenizer
    batches = lib.encode(tok, lib.default_corpus()[:8], 32, 8, 8)
    objective, why = PretrainObjective.load(run, batches)
    assert objective is not None, why
    ours = objective.values(run.state["params"])
    hf = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    b = batches[0]
    labels = np.where(b["attention_mask"] > 0, b["input_ids"], -100)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(b["input_ids"]).long(), attention_mask=torch.tensor(b["attention_mask"]),
                 labels=torch.tensor(labels).long()).loss
    assert ours["lm_loss"] == pytest.approx(float(ref), abs=1e-4)
    assert ours["lm_perplexity"] == pytest.approx(float(np.exp(float(ref))), rel=1e-4)
    assert all(v == 0.0 for v in WeightDrift(run).values(run.state["params"]).values())
