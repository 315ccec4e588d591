"""--mode=diagnose: runs that have one problem each (real tiny runs for overfitting and a NaN stop; workdirs
written by the real writers for the rest) get exactly that finding, with evidence, a plot and flag lines that
parse as config overrides; a healthy run gets none; a workdir without metrics is one error line."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from ftjax import fileio, trainer
from ftjax.callbacks import MetricWriter
from ftjax.config import default_config, validate
from ftjax.loop import TrainingError
from ftjax.tune import diagnose
from ftjax.workdir import (
    DIAGNOSIS_FILE,
    DIAGNOSIS_JSON,
    LR_FIND_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    describe,
)
from tests import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "/models/tiny"
TRAIN = {"source": "files:/data/train.csv", "rows": 1800, "sha256": "a" * 64}


def _kinds(result: dict) -> list[str]:
    return [f["kind"] for f in result["findings"]]


def _parse_flags(tmp_path, workdir: str, line: str):
    """The config a user gets by rerunning with a recipe of the run's own config plus the suggested flags."""
    recipe = tmp_path / "rerun_recipe.py"
    recipe.write_text("from ftjax.workdir import saved_config\n\n"
                      f"def get_config(arg=None):\n    return saved_config({workdir!r})\n")
    argv = ["prog", f"--config={recipe}", *shlex.split(line)]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "recipe", flag_values=values, sys_argv=argv)
    values(argv)
    return validate(values.config)


def _check_remedies(tmp_path, workdir: str, result: dict) -> None:
    """Every remedy's flag line is a valid override of the run's config that sets what it says."""
    for finding in result["findings"]:
        assert finding["remedies"], finding["kind"]
        for remedy in finding["remedies"]:
            cfg = _parse_flags(tmp_path, workdir, remedy["flags"])
            for field, change in remedy["changes"].items():
                node = cfg
                for part in field.split("."):
                    node = node[part]
                assert _lists(node) == pytest.approx(_lists(change["to"])), (field, node, change["to"])


def _lists(value):
    return [_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


# ---------------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A 1-layer random BERT (fast to compile) and 16 training reviews with 800 for validation."""
    root = tmp_path_factory.mktemp("diagnose")
    model = tiny.tiny_bert(str(root / "bert"), layers=1)
    data = tiny.sentiment_csvs(str(root / "data"), n_train=16, n_test=800)
    return model, data


def _tiny_config(tiny_task, **overrides):
    model, data = tiny_task
    return tiny.tiny_config(model, data, **{"data.eval_split": "test", "data.test_split": "",
                                           "forgetting.monitors": (), "train.log_every": 1, **overrides})


def test_a_tiny_model_trained_long_at_a_high_lr_on_16_examples_is_diagnosed_as_overfitting(tiny_task, tmp_path):
    workdir = str(tmp_path / "overfit")
    trainer.train(_tiny_config(tiny_task, **{"optim.lr": 1e-2, "optim.schedule.type": "constant",
                                             "train.epochs": 12.0, "train.eval_every": 3}), workdir)
    result = diagnose.diagnose(workdir)
    assert _kinds(result) == ["overfitting"], result["checks"]
    (finding,) = result["findings"]
    ev = finding["evidence"]
    assert ev["val_loss_min_step"] < ev["last_step"] and ev["evals_after_min"] >= 2
    assert ev["val_loss_last"] >= 1.1 * ev["val_loss_min"] and ev["train_loss_last"] < ev["train_loss_at_min"]
    assert ev["gap_last"] > ev["gap_at_min"]
    assert os.path.getsize(os.path.join(workdir, finding["plot"])) > 1000
    changed = {f for r in finding["remedies"] for f in r["changes"]}
    assert {"train.epochs", "model.dropout.hidden", "optim.weight_decay", "optim.lr"} <= changed
    stop = finding["remedies"][0]["changes"]["train.epochs"]
    assert stop["to"] < stop["from"]  # stop near the val minimum
    md = (tmp_path / "overfit" / DIAGNOSIS_FILE).read_text()
    assert "overfitting" in md and "--config.model.dropout.hidden=0.2" in md and finding["plot"] in md
    assert json.loads((tmp_path / "overfit" / DIAGNOSIS_JSON).read_text())["findings"] == result["findings"]
    _check_remedies(tmp_path, workdir, result)


def test_an_absurd_lr_is_diagnosed_as_unstable_at_the_step_the_nan_guard_stopped(tiny_task, tmp_path):
    workdir = str(tmp_path / "nan")
    with pytest.raises(TrainingError, match="at step 1"):
        trainer.train(_tiny_config(tiny_task, **{"optim.lr": 1e30, "optim.clip_norm": 0.0, "train.steps": 2,
                                                 "optim.schedule.type": "constant"}), workdir)
    result = diagnose.diagnose(workdir)
    assert result["status"] == "failed" and _kinds(result) == ["instability"], result["checks"]
    (finding,) = result["findings"]
    assert finding["evidence"]["nonfinite"]["step"] == 1 and "stopped the run" in finding["title"]
    changes = {f: c for r in finding["remedies"] for f, c in r["changes"].items()}
    assert changes["optim.lr"]["to"] < 1e30 and changes["optim.clip_norm"]["to"] > 0
    assert changes["optim.schedule.type"]["to"] == "warmup_constant"
    _check_remedies(tmp_path, workdir, result)


# ---------------------------------------------------------------------------------------------- written runs


def write_run(workdir, *, tau: float = 50.0, val_rise: float = 0.0001, loss_spike: int | None = None,
              grad_spike: int | None = None, cka_floor: float = 0.97, label_counts=(900, 900),
              truncated: int = 9, val_rows: int = 2000, lr_find_lr: float | None = 3e-5,
              prior: str = "") -> str:
    """A finished run's workdir as the trainer leaves it (run.json via workdir.describe, metrics.jsonl via the
    MetricWriter, summary.json), healthy by default: losses level off, val loss rises 1% at the end, accuracy
    plateaus at 0.92 on 2000 examples, CKA stays near 1, labels balanced, 0.5% truncated. A sibling lr_find
    folder (same model and data) suggests `lr_find_lr`. prior="slow" / "stuck": the val loss stays near the
    validation labels' entropy (40% neg / 60% pos), falling 2.7% over the run / flat, and from step 150 on the
    accuracy and macro-F1 are those of answering "pos" every time."""
    workdir = str(workdir)
    cfg = default_config()
    cfg.model.name_or_path = MODEL
    cfg.data.source, cfg.data.max_len, cfg.data.buckets = "files:/data", 32, (16, 32)
    cfg.optim.lr, cfg.train.epochs, cfg.train.eval_every, cfg.train.log_every = 5e-5, 3.0, 30, 10
    validate(cfg)
    stats = {"examples": {"train": 1800, "validation": val_rows},
             "label_counts": {"train": dict(zip(("neg", "pos"), label_counts)),
                              "validation": {"neg": val_rows * 2 // 5, "pos": val_rows - val_rows * 2 // 5}},
             "truncated": {"train": truncated, "validation": 0}, "train_tokens": {"p95": 30, "max": 32}}
    data = {"train": TRAIN, "validation": {"source": "held-out", "rows": val_rows, "sha256": "c" * 64}}
    fileio.write_json(fileio.path(workdir) / RUN_FILE, describe(cfg, data, ["neg", "pos"], 100, stats))
    rng = np.random.default_rng(0)
    with MetricWriter(workdir) as w:
        w.write(0, "forgetting", {"cka/mean": 1.0, "cka/layer_0": 1.0, "cka/layer_1": 1.0, "drift/total": 0.0})
        for step in range(10, 301, 10):
            decay = math.exp(-step / tau)
            loss = (0.55 * decay + 0.18) * (1 + 0.02 * rng.uniform(-1, 1))
            loss *= 3.0 if step == loss_spike else 1.0
            norm = (1 + 0.3 * rng.uniform(-1, 1)) * (20.0 if step == grad_spike else 1.0)
            w.write(step, "train", {"loss": loss, "grad_norm": norm})
            w.write(step, "lr", {"default": 5e-5 * (1 - step / 300)})
            if step % 30:
                continue
            val = 0.5 * decay + 0.30 + val_rise * max(0, step - 200)
            acc = 0.5 + 0.42 * (1 - decay) + 0.003 * rng.uniform(-1, 1)
            f1 = acc - 0.01
            if prior:
                entropy = -(0.4 * math.log(0.4) + 0.6 * math.log(0.6))
                val = entropy * (1.02 - 0.0001 * step if prior == "slow" else 1.0)
            if prior and step >= 150:
                acc, f1 = 0.6, 2 * 0.6 / 1.6 / 2  # answers "pos" (60%): its F1 2n/(n + N), "neg"'s 0, averaged
            w.write(step, "val", {"loss": val, "accuracy": acc, "macro_f1": f1})
            w.write(step, "gap", {"val_minus_train_loss": val - loss})
            cka = 1 - (1 - cka_floor) * (1 - math.exp(-step / 100)) / (1 - math.exp(-3))
            w.write(step, "forgetting", {"cka/mean": cka, "cka/layer_0": 1 - (1 - cka) / 2, "cka/layer_1": cka,
                                         "drift/total": 0.01 * step / 300})
    fileio.write_json(fileio.path(workdir) / SUMMARY_FILE,
                      {"status": "complete", "steps": 300, "best_step": 210, "data_stats": stats})
    if lr_find_lr is not None:
        sibling = fileio.path(workdir).parent / "lr_find"
        fileio.write_json(sibling / RUN_FILE, describe(cfg, {"train": TRAIN}, ["neg", "pos"], 100))
        fileio.write_json(sibling / LR_FIND_FILE, {
            "suggestion": {"lr": lr_find_lr, "method": "steepest descent"}, "population": 0,
            "lrs": np.geomspace(1e-7, 1, 20).tolist(), "losses": np.linspace(0.7, 0.5, 20).tolist()})
    return workdir


def test_a_healthy_run_gets_no_finding(tmp_path):
    workdir = write_run(tmp_path / "runs" / "healthy")
    result = diagnose.diagnose(workdir)
    assert result["findings"] == [] and result["status"] == "finished"
    assert all(c.startswith("ok:") for c in result["checks"].values()), result["checks"]  # every rule ran
    assert "No problems found" in (tmp_path / "runs" / "healthy" / DIAGNOSIS_FILE).read_text()
    assert not list((tmp_path / "runs" / "healthy" / "plots").glob("diagnose_*.png"))
    assert diagnose.summary_lines(result) == [f"{result['workdir']}: run finished at step 300; no problems found"]


PROBLEMS = {  # kind: (write_run arguments, the fields its remedies must change)
    "under_training": ({"tau": 400.0, "val_rise": 0.0}, {"train.epochs", "optim.lr"}),
    "instability": ({"loss_spike": 150, "grad_spike": 250}, {"optim.lr", "optim.schedule.warmup",
                                                              "optim.clip_norm"}),
    "lr_vs_range_test": ({"lr_find_lr": 1e-6}, {"optim.lr"}),
    "forgetting": ({"cka_floor": 0.8}, {"optim.lr", "optim.decay_toward", "optim.freeze_layers"}),
    "label_imbalance": ({"label_counts": (1500, 300)}, {"train.early_stop.metric", "train.early_stop.mode"}),
    "label_prior": ({"prior": "slow"}, {"optim.lr", "train.epochs"}),
    "truncation": ({"truncated": 400}, {"data.max_len", "data.buckets"}),
    "small_eval_set": ({"val_rows": 100}, {"data.validation_fraction"}),
}


@pytest.mark.parametrize("kind", list(PROBLEMS))
def test_a_run_with_one_problem_gets_exactly_that_finding_with_valid_flags(kind, tmp_path):
    arguments, fields = PROBLEMS[kind]
    workdir = write_run(tmp_path / "runs" / kind, **arguments)
    result = diagnose.diagnose(workdir)
    assert _kinds(result) == [kind], result["checks"]
    (finding,) = result["findings"]
    assert fields <= {f for r in finding["remedies"] for f in r["changes"]}
    assert (tmp_path / "runs" / kind / finding["plot"]).exists()
    _check_remedies(tmp_path, workdir, result)
    ev = finding["evidence"]
    if kind == "instability":
        assert [s["step"] for s in ev["loss_spikes"]] == [150] and [s["step"] for s in ev["grad_norm_spikes"]] == [250]
    elif kind == "lr_vs_range_test":
        assert ev["suggested_lr"] == 1e-6 and ev["ratio"] == pytest.approx(50)
    elif kind == "small_eval_set":
        assert ev["validation_examples"] == 100 and ev["standard_error"] > diagnose.EVAL_SE_MAX
        assert ev["margin_over_runner_up"] < diagnose.EVAL_Z * ev["standard_error"]
    elif kind == "truncation":
        assert finding["remedies"][0]["changes"]["data.buckets"]["to"] == (16, 32, 64)
    elif kind == "label_prior":
        assert ev["share_of_entropy"] == pytest.approx(0.99) and ev["val_loss_fall"] == pytest.approx(0.0265, 0.01)
        assert ev["constant_guess"] == "pos" and "answers 'pos' for every validation example" in finding["title"]
        assert finding["remedies"][0]["changes"]["optim.lr"]["to"] == pytest.approx(2e-4)  # x4: too slow


def test_a_classifier_stuck_at_the_label_prior_is_told_to_lower_the_lr(tmp_path):
    workdir = write_run(tmp_path / "runs" / "stuck", prior="stuck")
    (finding,) = diagnose.diagnose(workdir)["findings"]
    assert finding["kind"] == "label_prior" and "stuck" in finding["title"]
    changes = {f: c["to"] for r in finding["remedies"] for f, c in r["changes"].items()}
    assert changes["optim.lr"] == pytest.approx(1.3e-5) and changes["optim.schedule.warmup"] > 0
    # A constant guess is told by its accuracy AND macro-F1 together, for any class of the split.
    counts = {"a": 50, "b": 30, "c": 20}
    assert diagnose.constant_guess(counts, 0.3, 2 * 30 / 130 / 3) == "b"
    assert diagnose.constant_guess(counts, 0.3, 0.3) is None and diagnose.constant_guess(counts, 0.31, 0.15) is None


def test_an_interrupted_run_is_diagnosed_from_run_json_and_not_judged_too_short(tmp_path):
    workdir = write_run(tmp_path / "runs" / "cut", tau=400.0, val_rise=0.0, label_counts=(1500, 300))
    (tmp_path / "runs" / "cut" / SUMMARY_FILE).unlink()  # killed before the end: run.json has the data stats
    result = diagnose.diagnose(workdir)
    assert result["status"] == "interrupted or running" and _kinds(result) == ["label_imbalance"]
    assert result["checks"]["under_training"].startswith("skipped: only a finished run")


def test_a_run_on_gcs_is_diagnosed_in_place(gcs_bucket):
    workdir = write_run(f"{gcs_bucket}/runs/far", lr_find_lr=1e-6)  # the range test in a sibling on gs://
    result = diagnose.diagnose(workdir)
    assert _kinds(result) == ["lr_vs_range_test"]
    for name in (DIAGNOSIS_FILE, DIAGNOSIS_JSON, result["findings"][0]["plot"]):
        assert (fileio.path(workdir) / name).exists()


def test_a_workdir_without_metrics_is_one_error_line_naming_the_file(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "ftjax.main", "--mode=diagnose", f"--workdir={tmp_path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftjax: error:") and "metrics.jsonl not found" in lines[0]


def test_the_mode_prints_a_short_summary_and_the_report_path(tmp_path, capsys):
    from ftjax import main

    workdir = write_run(tmp_path / "runs" / "spiky", loss_spike=150)
    main.run_mode("diagnose", None, workdir)
    out = capsys.readouterr().out
    assert "1 finding(s):" in out and "instability:" in out and "try: --config.optim.lr=" in out
    assert out.strip().endswith(os.path.join(workdir, DIAGNOSIS_FILE))
