"""The command line: each mode through `python -m ftjax.main`, and user errors as one clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A recipe file for the tiny BERT on the sentiment CSVs, as a user would write one."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = tiny.tiny_bert(str(root / "model"))
    data_dir = tiny.sentiment_csvs(str(root / "data"))
    path = root / "tiny_recipe.py"
    path.write_text(textwrap.dedent(f"""
        from tests import tiny

        def get_config(arg=None):
            return tiny.tiny_config({model_dir!r}, {data_dir!r})
    """))
    return str(path), model_dir


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-m", "ftjax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def test_train_eval_export_and_dry_run_modes(recipe, tmp_path):
    config, _ = recipe
    workdir = str(tmp_path / "run")
    out = _cli(f"--config={config}", f"--workdir={workdir}", "--config.train.epochs=2")
    assert "test: loss=" in out.stdout and "accuracy=" in out.stdout
    assert "malloc keeps freed memory for reuse" in out.stderr  # train.reuse_host_memory, on by default
    for name in ("summary.json", "metrics.jsonl", "run.json", "plots/loss.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    summary = json.loads(_read(os.path.join(workdir, "summary.json")))
    assert summary["steps"] == 2 * summary["steps"] // 2 > 0

    # eval and export need nothing but the workdir (its run.json holds the config).
    out = _cli(f"--workdir={workdir}", "--mode=eval")
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert result["step"] == summary["best_step"] and f"checkpoint: step {result['step']}, best" in out.stdout
    assert result["test"]["accuracy"] == pytest.approx(summary["test"]["accuracy"])

    export_dir = str(tmp_path / "export")
    _cli(f"--workdir={workdir}", "--mode=export", f"--export_dir={export_dir}")
    assert json.loads(_read(os.path.join(export_dir, "ftjax_export.json")))["step"] == summary["best_step"]
    refused = _cli(f"--workdir={workdir}", "--mode=export", f"--export_dir={export_dir}", check=False)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr.strip().splitlines()[-1]
    import torch
    import transformers

    config_json = json.loads(_read(os.path.join(export_dir, "config.json")))
    assert sorted(config_json["id2label"].values()) == ["neg", "pos"]
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(export_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(export_dir)
    enc = tok(["the snack was great", "stale and bland coffee"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hf_logits = hf_model(**enc).logits.numpy()
    from ftjax import models

    ours = models.from_pretrained(export_dir, task="classification")
    our_logits = np.asarray(ours(**{k: v.numpy() for k, v in enc.items()})["logits"])
    np.testing.assert_allclose(our_logits, hf_logits, atol=1e-5)

    # A plan reads no data: the label count comes from the config (or a workdir's run.json).
    out = _cli(f"--config={config}", f"--workdir={tmp_path / 'dry'!s}", "--mode=dry_run",
               "--config.optim.freeze_layers=embeddings,0", "--config.model.num_labels=2")
    assert "frozen" in out.stdout and "per-device memory" in out.stdout and "plan for cpu:2" in out.stdout
    assert os.path.exists(tmp_path / "dry" / "plots" / "lr_schedule.png")


def test_flag_override_reaches_the_run(recipe, tmp_path):
    config, _ = recipe
    workdir = str(tmp_path / "run")
    out = _cli(f"--config={config}", f"--workdir={workdir}", "--config.train.steps=3", "--config.optim.lr=0.002",
               "--config.train.reuse_host_memory=False")
    assert "train.reuse_host_memory" not in out.stderr
    saved = json.loads(_read(os.path.join(workdir, "run.json")))["config"]
    assert saved["train.steps"] == 3 and saved["optim.lr"] == 0.002
    assert json.loads(_read(os.path.join(workdir, "summary.json")))["steps"] == 3


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.optim.lr=-1", "config.optim.lr=-1"),
        ("--config.model.dropout.hidden=1.5", "config.model.dropout.hidden=1.5"),
        ("--config.optim.freeze=('nothing/matches/.*',)", "nothing/matches"),
        ("--config.data.text_field=body", "body"),
        ("--config.data.source=files:/no/such/dir", "/no/such/dir"),
    ],
)
def test_user_errors_end_with_one_clear_message(recipe, tmp_path, flag, message):
    config, _ = recipe
    proc = _cli(f"--config={config}", f"--workdir={tmp_path}", flag, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ftjax: error:") and message in last, last
    assert "Traceback" not in proc.stderr


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ftjax: error:"), last
    return last


def test_bad_workdirs_and_models_end_with_one_clear_message(recipe, tmp_path):
    config, model_dir = recipe
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "is a file, not a folder" in _error_line(_cli(f"--config={config}", f"--workdir={a_file}", check=False))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "run.json not found" in _error_line(_cli(f"--workdir={empty}", "--mode=export", check=False))
    line = _error_line(_cli(f"--config={config}", f"--workdir={empty}", "--mode=eval", check=False))
    assert "no checkpoint in" in line and "train first" in line
    no_config = tmp_path / "no_config_model"
    no_config.mkdir()
    line = _error_line(_cli(f"--config={config}", f"--workdir={tmp_path / 'w1'}",
                            f"--config.model.name_or_path={no_config}", check=False))
    assert "has no config.json" in line
    line = _error_line(_cli(f"--config={config}", f"--workdir={tmp_path / 'w2'}", "--config.data.max_len=200",
                            "--config.data.buckets=1",
                            check=False))
    assert "config.data.max_len=200" in line and "64 positions" in line  # the tiny BERT has 64


def test_a_single_class_training_set_is_an_error(recipe, tmp_path):
    config, _ = recipe
    data = tmp_path / "one_class"
    data.mkdir()
    (data / "train.csv").write_text("text,label\n" + "".join(f"review {i},pos\n" for i in range(40)))
    (data / "test.csv").write_text("text,label\ngood,pos\n")
    line = _error_line(_cli(f"--config={config}", f"--workdir={tmp_path / 'w'}",
                            f"--config.data.source=files:{data}", check=False))
    assert "same label ('pos')" in line and "data.label_field" in line


def test_a_sweep_over_several_processes_is_refused(monkeypatch, tmp_path):
    from ftjax import main
    from ftjax.distributed import DistributedConfigError

    monkeypatch.setattr(main.jax, "process_count", lambda: 2)
    with pytest.raises(DistributedConfigError, match="single-process job"):
        main._sweep(None, str(tmp_path))
