"""model.task="preference": pairs batched with a response-only mask, the LoRA reference (the base with the
adapters off), a DPO run that learns a synthetic preference on held-out pairs, and a bit-identical resume."""

from __future__ import annotations

import json
import random

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from ftjax import lora, models, preference, trainer
from ftjax.config import ConfigError, validate
from ftjax.data import preference as preference_data
from ftjax.data.sources import RawSplit
from ftjax.tasks import preference as preference_task
from tests.test_lm_data import tiny_llama, tiny_tokenizer

GOOD = ["the cat sat on the mat", "a dog ran in the park", "fine thanks"]
BAD = ["the lazy fox", "brown ball", "how are you"]


def pairs_jsonl(path, n: int, seed: int = 0) -> str:
    """Pairs whose chosen response is always one of GOOD and rejected one of BAD: a preference DPO learns."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": rng.choice(["hello world,", "the quick", "a red"]),
                                "chosen": " " + rng.choice(GOOD), "rejected": " " + rng.choice(BAD)}) + "\n" for _ in range(n))
    return str(path)


def _config(model_dir: str, data: str, **overrides):
    from configs.preference import get_config

    c = get_config(f"model={model_dir},data={data},lora=8,batch=8,max_len=32,forgetting=0")
    c.optim.lr = 2e-3
    c.train.steps = 30
    c.train.eval_every = 10
    c.train.compilation_cache = ""
    c.train.progress = False
    c.model.scan_layers = False
    for key, value in overrides.items():
        node, *path = key.split(".")
        target = c[node]
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    return c


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llama(str(tmp_path_factory.mktemp("pref") / "llama"))


def test_pairs_are_batched_together_with_the_loss_on_response_tokens_only(tmp_path):
    tok = tiny_tokenizer()
    rows = [{"prompt": "hello world,", "chosen": " fine thanks", "rejected": " how are you today"},
            {"prompt": [{"role": "user", "content": "the cat"}], "chosen": [{"role": "assistant", "content": "sat"}],
             "rejected": [{"role": "assistant", "content": "ran in the park"}]}]
    split = RawSplit(pd.DataFrame(rows), "pairs.jsonl")
    tokens = preference_data.tokenize(tok, split, {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}, 64)
    batch = preference_data.PairBatcher(tokens, (16, 64), tok.pad_token_id, slice(0, 3))(np.array([0, 1, -1]))
    assert batch["input_ids"].shape == (3, 2, 64) and batch["weights"].tolist() == [1, 1, 0]
    prompt = tok("hello world,")["input_ids"]
    chosen = tok(" fine thanks", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(prompt) + len(chosen)
    assert batch["input_ids"][0, 0, :n].tolist() == prompt + chosen
    assert batch["response_mask"][0, 0].tolist() == [0] * len(prompt) + [1] * len(chosen) + [0] * (64 - n)
    # chat rows: the response is what the template adds for the assistant turn (prompt tokens carry no loss)
    rendered = tok.decode(batch["input_ids"][1, 1][batch["response_mask"][1, 1] > 0])
    assert rendered == "ran in the park\n" and "<|assistant|>" in tok.decode(batch["input_ids"][1, 1])
    # the targets of the shifted loss fall on response tokens only
    targets = preference.response_targets(jnp.asarray(batch["input_ids"][0]), jnp.asarray(batch["response_mask"][0]))
    assert int((targets[0] != -100).sum()) == len(chosen)


def test_the_lora_reference_is_the_base_model(folder):
    """With the adapters off, a LoRA model (after its adapters moved away from zero) equals the base."""
    base = models.from_pretrained(folder, task="causal_lm")
    tuned = lora.apply_lora(models.from_pretrained(folder, task="causal_lm"),
                            {"rank": 4, "alpha": 8.0, "targets": "all-linear"})
    for _, mod in lora.lora_modules(tuned).items():
        mod.lora_b[...] = jnp.ones_like(mod.lora_b[...]) * 0.05
    ids = jnp.asarray([[5, 17, 42, 99, 3, 2, 7, 8]])
    ref = preference_task.adapters_off_reference(tuned)({"input_ids": ids, "attention_mask": jnp.ones_like(ids)})
    np.testing.assert_allclose(np.asarray(ref), np.asarray(base(input_ids=ids)["logits"]), atol=1e-6)
    assert not np.allclose(np.asarray(tuned(input_ids=ids)["logits"]), np.asarray(ref), atol=1e-3)


def test_dpo_learns_the_preference_on_held_out_pairs(folder, tmp_path):
    data = pairs_jsonl(tmp_path / "pairs.jsonl", 240)
    summary = trainer.train(_config(folder, data), str(tmp_path / "run"))
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [x for x in lines if x["split"] == "val"]
    first, last = evals[0], evals[-1]
    assert last["reward_accuracy"] > 0.9 and last["reward_margin"] > first["reward_margin"] > 0
    assert last["loss"] < first["loss"]
    # the chosen responses got likelier against the reference; the rejected ones less likely
    assert last["rewards_chosen"] > last["rewards_rejected"]
    assert summary["best"]["metrics"]["reward_accuracy"] > 0.9 if "metrics" in summary.get("best", {}) else True


def test_full_fine_tuning_takes_a_frozen_copy_as_reference_and_orpo_needs_none(folder, tmp_path):
    data = pairs_jsonl(tmp_path / "pairs.jsonl", 64)
    # DPO without LoRA: the reference is the checkpoint loaded again beside the policy, frozen (the step's last
    # argument, no gradient, no optimizer state) and used by the eval step too.
    c = _config(folder, data, **{"optim.lora.rank": 0, "train.steps": 12, "train.eval_every": 6, "optim.lr": 1e-4})
    validate(c)
    assert preference_task.of_config(c).frozen_model == folder
    from ftjax.run import Run

    run = Run(c, str(tmp_path / "plan"), purpose="eval")
    assert run.teacher is not None and run.eval_args == run.teacher_args
    assert all(not r.frozen for r in run.optimizer.table.values())  # every policy param trains; the reference apart
    # Step 0: the policy is its own reference, so every reward is 0 and the DPO loss is log 2.
    first = run.evaluate("validation")
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(np.log(2.0), abs=1e-6)
    trainer.train(c, str(tmp_path / "dpo_full"))
    evals = [json.loads(x) for x in open(tmp_path / "dpo_full" / "metrics.jsonl") if '"val"' in x]
    assert evals[-1]["reward_margin"] > 0 and evals[-1]["loss"] < np.log(2.0)
    c = _config(folder, data, **{"optim.lora.rank": 0, "preference.loss": "orpo", "train.steps": 4,
                                 "train.eval_every": 4, "optim.lr": 1e-4})
    validate(c)
    assert preference_task.of_config(c).frozen_model == ""  # reference-free
    trainer.train(c, str(tmp_path / "orpo"))
    evals = [json.loads(x) for x in open(tmp_path / "orpo" / "metrics.jsonl") if '"val"' in x]
    assert np.isfinite(evals[-1]["loss"]) and 0 <= evals[-1]["reward_accuracy"] <= 1


@pytest.mark.slow  # the quick suite pins bit-identical resume on solo runs and populations (test_train, test_population)
def test_a_preference_run_resumes_bit_identically(folder, tmp_path):
    data = pairs_jsonl(tmp_path / "pairs.jsonl", 96)
    c = _config(folder, data, **{"train.steps": 8, "train.eval_every": 4, "train.checkpoint.every": 3})
    trainer.train(c, str(tmp_path / "straight"))
    trainer.train(c, str(tmp_path / "resumed"), stop_after=5)
    trainer.train(c, str(tmp_path / "resumed"))
    def losses(d):
        return [(x["step"], x["loss"]) for x in map(json.loads, open(d / "metrics.jsonl")) if x["split"] == "train"]
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


@pytest.mark.parametrize("lora_rank", [8, 0], ids=["lora_dpo", "full_orpo"])
def test_the_forgetting_monitors_report_what_alignment_costs(folder, tmp_path, monkeypatch, lora_rank):
    """A preference run (DPO under LoRA; ORPO fully fine-tuned) logs the reference text's perplexity through its
    own causal-LM forward (no second copy of the checkpoint): at step 0 it is the base model's (equal to
    transformers'), after training it moved, and the weight drift (LoRA: merged weights) went from 0 up."""
    import torch
    import transformers

    from ftjax import forgetting

    loads = []
    real = models.from_pretrained
    monkeypatch.setattr(models, "from_pretrained", lambda *a, **k: loads.append(k.get("task")) or real(*a, **k))
    data = pairs_jsonl(tmp_path / "pairs.jsonl", 48)
    over = {"forgetting.monitors": ("weight_drift", "pretrain"), "forgetting.max_examples": 16,
            "train.steps": 3, "train.eval_every": 3, "train.precompile": False, "data.buckets": 1}
    if not lora_rank:
        over.update({"optim.lora.rank": 0, "preference.loss": "orpo", "optim.lr": 1e-3})
    c = _config(folder, data, **over)
    summary = trainer.train(c, str(tmp_path / "run"))
    assert loads == ["causal_lm"]  # the run's model only: the monitor reuses its forward (LoRA adapters on)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    logged = [x for x in map(json.loads, lines) if x["split"] == "forgetting"]
    assert [x["step"] for x in logged] == [0, 3]
    step0, last = summary["forgetting"]["step0"], summary["forgetting"]["last"]
    assert summary["forgetting"]["skipped"] == []
    assert step0["drift/total"] == 0.0 and last["drift/total"] > 1e-4
    assert last["lm_perplexity"] != step0["lm_perplexity"] and np.isfinite(last["lm_perplexity"])
    # step 0 is the loaded model's perplexity on the reference text, as transformers computes it
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    rows = forgetting.encode(tok, forgetting.reference_texts(c)[:16], min(c.forgetting.max_len, c.data.max_len), 1, 16)[0]
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    labels = np.where(rows["attention_mask"] > 0, rows["input_ids"], -100)
    with torch.no_grad():
        loss = hf(input_ids=torch.tensor(rows["input_ids"]).long(), attention_mask=torch.tensor(rows["attention_mask"]),
                  labels=torch.tensor(labels).long()).loss
    assert step0["lm_loss"] == pytest.approx(float(loss), abs=1e-4)
    assert step0["lm_perplexity"] == pytest.approx(float(np.exp(float(loss))), rel=1e-4)
