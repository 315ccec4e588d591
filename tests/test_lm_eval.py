"""lm-evaluation-harness over ftjax: the same numbers as lm-eval's own HF (torch) backend on the same folder, and
--mode=eval --lm_eval on a trained workdir. Offline: the tasks are YAMLs over local JSONL written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ftjax import lm_eval_model, trainer
from tests.test_lm_data import CORPUS, _recipe, tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = " ".join(CORPUS)  # the tiny tokenizer's vocabulary comes from these sentences
TASKS = ("ftjax_tiny_mc", "ftjax_tiny_gen", "ftjax_tiny_ppl")


def _write_tasks(folder) -> str:
    """Three tasks over local JSONL: multiple choice (one context longer than the model's 128 positions, so
    it is left-truncated), generate_until with exact match, and a rolling perplexity over a long text."""
    folder.mkdir(parents=True, exist_ok=True)
    long_context = (WORDS + " ") * 3 + "the cat sat on the"
    mc = [
        {"question": "the cat sat on the", "choices": ["mat", "dog", "red ball"], "label": 0},
        {"question": "a dog ran in the", "choices": ["park", "mat"], "label": 0},
        {"question": "the quick brown fox jumps over the lazy", "choices": ["dog", "cat", "fox"], "label": 0},
        {"question": long_context, "choices": ["mat", "park"], "label": 0},
    ]
    gen = [{"prompt": p, "answer": a} for p, a in [("hello world, how are", "you"), ("the cat sat on", "the"),
                                                    ("a dog ran", "in"), (long_context, "mat")]]
    ppl = [{"text": CORPUS[0]}, {"text": (WORDS + " ") * 4}]  # the second needs several 128-token windows
    common = "test_split: test\ndataset_path: json\n"
    for name, rows in (("mc", mc), ("gen", gen), ("ppl", ppl)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = "dataset_kwargs:\n  data_files:\n    test: {}\n"
    (folder / "mc.yaml").write_text(
        f"task: ftjax_tiny_mc\n{common}{data.format(folder / 'mc.jsonl')}output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "gen.yaml").write_text(
        f"task: ftjax_tiny_gen\n{common}{data.format(folder / 'gen.jsonl')}output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: [" ", "."]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")
    (folder / "ppl.yaml").write_text(
        f"task: ftjax_tiny_ppl\n{common}{data.format(folder / 'ppl.jsonl')}output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return str(folder)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> str:
    return _write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return tiny_llama(str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def manager(tasks_dir):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=tasks_dir, include_defaults=False)  # the local tasks only: fast


def _evaluate(model, manager, **kwargs) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(model=model, tasks=list(TASKS), task_manager=manager, bootstrap_iters=0,
                                   log_samples=True, **kwargs)


def _responses(out: dict, task: str) -> list:
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def test_scores_and_generations_equal_lm_eval_hf_backend(llama_dir, manager):
    """ftjax (registered as "ftjax", batch 3: partial batches padded) vs lm-eval's HFLM on the same folder:
    every loglikelihood within 1e-4, the same is_greedy flags and generations, equal task metrics."""
    from lm_eval.models.huggingface import HFLM

    ours = _evaluate("ftjax", manager, model_args=f"pretrained={llama_dir},batch_size=3")
    theirs = _evaluate(HFLM(pretrained=llama_dir, device="cpu", batch_size=4), manager)
    for task, key in (("ftjax_tiny_mc", lambda r: r[0][0]), ("ftjax_tiny_ppl", lambda r: r[0])):
        a, b = _responses(ours, task), _responses(theirs, task)
        assert len(a) == len(b) > 0
        la = np.asarray([key(r) for resps in a for r in resps], np.float64)
        lb = np.asarray([key(r) for resps in b for r in resps], np.float64)
        print(f"{task}: max |ftjax - hf| = {np.max(np.abs(la - lb)):.2e} over {len(la)} requests, "
              f"largest |loglikelihood| {np.max(np.abs(lb)):.0f}")
        # float32 sums: 1e-4, or one part in 1e7 of a long text's total (its float32 resolution).
        np.testing.assert_allclose(la, lb, atol=1e-4, rtol=1e-7)
        if task.endswith("mc"):
            assert [r[0][1] for resps in a for r in resps] == [r[0][1] for resps in b for r in resps]  # is_greedy
    gen_a, gen_b = _responses(ours, "ftjax_tiny_gen"), _responses(theirs, "ftjax_tiny_gen")
    assert gen_a == gen_b and len(gen_a) == 4
    for task in TASKS:
        metrics_a = {k: v for k, v in ours["results"][task].items() if "stderr" not in k and k != "alias"}
        metrics_b = {k: v for k, v in theirs["results"][task].items() if "stderr" not in k and k != "alias"}
        assert metrics_a.keys() == metrics_b.keys()
        for key, value in metrics_a.items():
            want = metrics_b[key]
            assert (value == pytest.approx(want, rel=1e-5)) if isinstance(want, float) else value == want, (task, key)


def test_is_greedy_and_truncation_match_hf_backend(llama_dir):
    """A continuation that is the model's argmax is flagged greedy; a context past max_length is left-truncated
    as the HF backend does (checked on token ids, bypassing the tasks)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=llama_dir, device="cpu", batch_size=8)
    ours = lm_eval_model.FtjaxLM(pretrained=llama_dir, batch_size=4)
    context = hf.tok_encode(WORDS)
    with torch.no_grad():
        nxt = int(hf.model(torch.tensor([context])).logits[0, -1].argmax())
    long = hf.tok_encode((WORDS + " ") * 6)
    assert len(long) > ours.max_length == hf.max_length == 128
    requests = [(None, context, [nxt]), (None, context, [(nxt + 1) % 200]), (None, long, long[:3]),
                (None, context, context[:5])]
    a, b = ours._loglikelihood_tokens(requests), hf._loglikelihood_tokens(requests)
    assert [g for _, g in a] == [g for _, g in b] and a[0][1] is True and a[1][1] is False
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], atol=1e-4)


def test_unknown_task_and_non_causal_run_are_clear_errors(manager, model_dir, data_dir, tmp_path):
    with pytest.raises(lm_eval_model.LMEvalError, match=r"unknown lm-eval task 'ftjax_tiny_m' \(did you mean "
                       r"ftjax_tiny_mc.*lm-eval ls tasks"):
        lm_eval_model.check_tasks(["ftjax_tiny_mc", "ftjax_tiny_m"], manager)
    from tests import tiny

    cfg = tiny.tiny_config(model_dir, data_dir)  # a classification run
    with pytest.raises(lm_eval_model.LMEvalError, match="scores causal language models.*classification"):
        lm_eval_model.evaluate_workdir(cfg, str(tmp_path / "run"), ["ftjax_tiny_mc"], include_path=None,
                                       restore=lambda run, workdir: pytest.fail("restored a non-causal run"),
                                       manager=manager)


def _cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen([sys.executable, "-m", "ftjax.main", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_eval_mode_scores_the_best_checkpoint_with_lm_eval(llama_dir, tasks_dir, tmp_path):
    """A tiny causal-LM run trained two steps, then --mode=eval --lm_eval: eval.json gets the tasks' metrics
    under "lm_eval" (limit applied) and a table is printed; an unknown task is one error line."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 10))
    cfg = _recipe("causal_lm_text").get_config(f"model={llama_dir},data={corpus},steps=2,batch=2,max_len=32")
    cfg.train.compilation_cache = ""
    cfg.train.progress = False
    cfg.train.checkpoint.async_save = False
    cfg.data.lm.num_samples = 0
    workdir = str(tmp_path / "work")
    trainer.train(cfg, workdir, devices=jax.devices()[:1])

    include = f"--lm_eval_include={tasks_dir}"
    good = _cli(f"--workdir={workdir}", "--mode=eval", "--lm_eval=ftjax_tiny_mc,ftjax_tiny_gen", include,
                "--lm_eval_limit=2")
    bad = _cli(f"--workdir={workdir}", "--mode=eval", "--lm_eval=no_such_task_xyz", include)  # side by side
    (stdout, stderr), (_, bad_stderr) = good.communicate(timeout=600), bad.communicate(timeout=600)
    assert good.returncode == 0, stderr[-4000:]
    assert "checkpoint: step 2" in stdout and "|ftjax_tiny_mc" in stdout.replace(" ", "")
    with open(os.path.join(workdir, "eval.json")) as f:
        record = json.load(f)["lm_eval"]
    assert record["step"] == 2 and record["limit"] == 2
    assert record["results"]["ftjax_tiny_mc"]["sample_len"] == 2
    assert 0.0 <= record["results"]["ftjax_tiny_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in record["results"]["ftjax_tiny_gen"]

    last = bad_stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and "Traceback" not in bad_stderr, bad_stderr[-3000:]
    assert last.startswith("ftjax: error:") and "no_such_task_xyz" in last and "lm-eval ls tasks" in last
