"""Metric math against hand-computed values, jsonl/TensorBoard writers on resume, plots, progress, early stop."""

import io
import json
import math

import numpy as np
import pytest

from ftjax.callbacks import EarlyStopper, MetricWriter, OverfitMonitor, Progress, read_metrics
from ftjax import tasks
from ftjax.config import TASKS
from ftjax.metrics import confusion_metrics
from ftjax.reporting.plots import plot_run


def _confusion(labels, preds, weights, num_labels):
    cm = np.zeros((num_labels, num_labels))
    np.add.at(cm, (labels, preds), weights)
    return cm


def test_macro_f1_counts_classes_only_predicted_and_uses_weights():
    # class 1 only predicted: F1 0; class 0: 2/3.
    assert confusion_metrics(_confusion([0, 0], [0, 1], [1, 1], 3))["macro_f1"] == pytest.approx(1 / 3)
    out = confusion_metrics(_confusion([0, 1, 0], [0, 1, 1], [2.0, 1.0, 0.5], 2))
    assert out["accuracy"] == pytest.approx(3 / 3.5)
    # class0: tp 2, fn 0.5 -> 4/4.5; class1: tp 1, fp 0.5 -> 2/2.5.
    assert out["macro_f1"] == pytest.approx((4 / 4.5 + 2 / 2.5) / 2)


def test_macro_f1_matches_sklearn_when_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 5, 50), rng.integers(0, 4, 50)
    w = rng.integers(0, 3, 50).astype(float)
    keep = w > 0
    ref = metrics.f1_score(labels[keep], preds[keep], average="macro", sample_weight=w[keep])
    assert confusion_metrics(_confusion(labels, preds, w, 6))["macro_f1"] == pytest.approx(ref)


def test_task_metrics_mean_loss_classification_and_a_capped_perplexity():
    cm = _confusion([0, 1], [0, 0], [1, 1], 2)
    assert tasks.get("classification").metrics(3.0, 2.0, {"confusion": cm}) == {
        "loss": 1.5, "accuracy": 0.5, "macro_f1": pytest.approx(1 / 3)}
    lm = tasks.get("causal_lm")
    assert lm.metrics(2.0, 1.0, {}) == {"loss": 2.0, "perplexity": pytest.approx(math.exp(2.0))}
    assert lm.metrics(1e4, 1.0, {})["perplexity"] == pytest.approx(math.exp(50.0))
    # "sum_<name>": a metric summed over the weight, reported as its mean (preference's reward metrics)
    assert lm.metrics(4.0, 2.0, {"sum_reward_accuracy": 1.0})["reward_accuracy"] == 0.5


def test_every_config_task_is_a_task_module_and_its_structure_is_declared():
    assert set(tasks.NAMES) == set(TASKS)
    for name in tasks.TASKS:
        structure = tasks.get(name).structure(4, (16, 8), None, 32)
        assert structure["weights"][0][0] == 4 and all(len(v) == 2 for v in structure.values())


def test_confusion_metrics_from_a_device_computed_matrix():
    cm = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = confusion_metrics(cm)  # [label, prediction], the same data as the hand-computed test above.
    assert out == {"accuracy": pytest.approx(4 / 6), "macro_f1": pytest.approx((0.5 + 0.8 + 2 / 3) / 3)}
    assert math.isnan(confusion_metrics(np.zeros((2, 2)))["macro_f1"])
    with pytest.raises(ValueError, match="square"):
        confusion_metrics(np.zeros((2, 3)))


def _lines(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_writer_appends_on_resume_and_drops_lines_after_the_resumed_step(tmp_path):
    with MetricWriter(tmp_path) as w:
        for step in (10, 20, 30):
            w.write(step, "train", {"loss": np.float32(1.0 / step)})
        w.write(20, "val", {"loss": 0.5, "accuracy": 0.75})
        w.write(30, "lr", {"head": 1e-3, "body": 1e-4})
    assert _lines(tmp_path)[-1] == {"step": 30, "split": "lr", "head": 1e-3, "body": 1e-4}
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "spl')  # a line torn by the crash.
    with MetricWriter(tmp_path) as w:  # the trainer's order: open, find the checkpoint, truncate.
        w.truncate_after(20)
        w.write(30, "train", {"loss": 0.01})
    lines = _lines(tmp_path)
    assert [(r["step"], r["split"]) for r in lines] == [
        (10, "train"),
        (20, "train"),
        (20, "val"),
        (30, "train"),
    ]
    assert lines[-1]["loss"] == 0.01
    assert lines[2] == {"step": 20, "split": "val", "loss": 0.5, "accuracy": 0.75}
    with MetricWriter(tmp_path, resume_step=10) as w:
        w.write(11, "train", {"loss": 0.1})
    assert [r["step"] for r in _lines(tmp_path)] == [10, 11]
    with MetricWriter(tmp_path) as w:
        w.truncate_after(0)  # a fresh start (no checkpoint) in a workdir with stale lines.
    assert _lines(tmp_path) == []


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricWriter(tmp_path / "run", enabled=False)
    w.write(1, "train", {"loss": 1.0})
    w.close()
    assert not (tmp_path / "run").exists()


def test_plot_run_writes_all_pngs_and_skips_missing_splits(tmp_path):
    with MetricWriter(tmp_path) as w:
        for step in range(0, 101, 10):
            w.write(step, "train", {"loss": 2.0 - step / 100})
            w.write(step, "lr", {"head": 1e-3 * (1 - step / 100), "encoder": 1e-4})
        for step in (50, 100):
            w.write(step, "val", {"loss": 1.5, "accuracy": 0.6, "macro_f1": 0.5, "count": 10})
        w.write(100, "test", {"loss": 1.4, "accuracy": 0.62})
    paths = plot_run(tmp_path)
    assert sorted(p.name for p in paths) == ["gap.png", "loss.png", "lr.png", "metrics.png"]
    for p in paths:
        assert p.parent == tmp_path / "plots"
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().length > 5000

    only_train = tmp_path / "only_train"
    with MetricWriter(only_train) as w:
        w.write(1, "train", {"loss": 1.0})
    assert [p.name for p in plot_run(only_train)] == ["loss.png"]
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path / "nothing")


def test_read_metrics_keeps_the_last_line_per_step_and_split(tmp_path):
    with MetricWriter(tmp_path) as w:
        w.write(5, "train", {"loss": 1.0})
        w.write(5, "train", {"loss": 2.0})
        w.write(3, "val", {"loss": 3.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(3, 3.0), (5, 2.0)]


def test_progress_prints_compact_lines_when_not_a_tty():
    out = io.StringIO()
    p = Progress(total_steps=10, initial_step=2, interval_s=3600, stream=out)
    p.update(3, examples=8, loss=0.5)  # first update prints; rates start here (compile excluded).
    p.update(4, examples=8, loss=0.4)  # within the interval: silent.
    p.update(10, examples=8, loss=0.25)  # last step always prints.
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("step 3/10 (30%)") and "loss 0.5000" in lines[0]
    assert lines[1].startswith("step 10/10 (100%)") and "ex/s" in lines[1] and "ETA" in lines[1]


def test_progress_draws_a_bar_on_a_tty_and_nothing_when_disabled():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    p = Progress(total_steps=4, stream=out)
    p.update(1, examples=4, loss=1.5)
    p.update(4, examples=12, loss=1.25)
    p.close()
    assert "4/4" in out.getvalue() and "loss 1.2500" in out.getvalue()
    quiet = io.StringIO()
    Progress(4, enabled=False, stream=quiet).update(1, 4, 1.0)
    assert quiet.getvalue() == ""


def test_overfit_monitor_warns_once_after_patience_evals():
    mon = OverfitMonitor(patience=2)
    seq = [(1.0, 1.0), (0.9, 1.1), (0.8, 1.2), (0.7, 1.3), (0.6, 1.2), (0.5, 1.3), (0.4, 1.4)]
    out = [mon.update(t, v, step=i) for i, (t, v) in enumerate(seq)]
    assert [o is not None for o in out] == [False, False, True, False, False, False, True]
    assert "step 2" in out[2] and "val loss rose" in out[2]
    resumed = OverfitMonitor(patience=2)
    resumed.load_state_dict(json.loads(json.dumps(mon.state_dict())))
    assert resumed.update(0.3, 1.5) is None and resumed.streak == 3
    assert OverfitMonitor(0).update(1, 1) is None


def test_early_stopper_patience_min_delta_and_resume():
    es = EarlyStopper("accuracy", mode="max", patience=2, min_delta=0.01)
    assert es.update(100, {"accuracy": 0.70}) == (True, False)
    assert es.update(200, {"accuracy": 0.705}) == (False, False)  # within min_delta: not an improvement.
    state = json.loads(json.dumps(es.state_dict()))
    resumed = EarlyStopper("accuracy", mode="max", patience=2, min_delta=0.01)
    resumed.load_state_dict(state)
    assert not resumed.should_stop
    assert resumed.update(300, {"accuracy": float("nan")}) == (False, True)
    assert resumed.should_stop
    assert (resumed.best_step, resumed.best_value) == (100, 0.70)
    never = EarlyStopper("loss", "min", patience=0)
    assert [never.update(s, {"loss": 1.0})[1] for s in range(5)] == [False] * 5
    assert never.update(5, {"loss": 0.5}) == (True, False) and never.best_step == 5
    with pytest.raises(ValueError, match="early_stop.metric='loss'.*accuracy"):
        never.update(6, {"accuracy": 1.0})
