"""The workdir is the run: run.json and the resume policy, best-checkpoint eval/export, the lock, and
atomic writes that lose nothing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest

from ftjax import fileio, trainer
from ftjax import workdir as workdir_lib
from ftjax.loop import Callback, TrainingError
from tests import tiny
from tests.test_main import _cli


def _run_json(workdir) -> dict:
    return json.loads((workdir / "run.json").read_text())


def test_run_json_describes_config_data_and_model(model_dir, data_dir, tmp_path):
    cfg = tiny.tiny_config(model_dir, data_dir, **{"train.steps": 2})
    trainer.train(cfg, str(tmp_path))
    run = _run_json(tmp_path)
    assert run["config"]["train.steps"] == 2 and run["config"]["model.name_or_path"] == model_dir
    assert set(run["data"]) == {"train", "validation", "test"}
    assert run["data"]["train"]["rows"] + run["data"]["validation"]["rows"] == 96
    assert len(run["data"]["train"]["sha256"]) == 64 and "config_sha256" in run["model"]
    assert run["labels"] == ["neg", "pos"]
    rebuilt = workdir_lib.saved_config(str(tmp_path))
    assert workdir_lib.flatten(rebuilt) == workdir_lib.flatten(cfg)


def test_a_resume_that_changes_fixed_fields_is_refused_with_a_diff(model_dir, data_dir, tmp_path):
    trainer.train(tiny.tiny_config(model_dir, data_dir, **{"train.steps": 2}), str(tmp_path))
    changed = tiny.tiny_config(model_dir, data_dir, **{"train.steps": 2, "optim.lr": 2e-3, "train.batch_size": 16})
    with pytest.raises(TrainingError, match="cannot change mid-run") as e:
        trainer.train(changed, str(tmp_path))
    assert "optim.lr: 0.001 -> 0.002" in str(e.value) and "train.batch_size: 8 -> 16" in str(e.value)
    assert _run_json(tmp_path)["config"]["optim.lr"] == 1e-3  # nothing was rewritten


def test_changed_training_data_is_refused(model_dir, data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    cfg = tiny.tiny_config(model_dir, str(data), **{"train.steps": 2})
    trainer.train(cfg, str(tmp_path / "run"))
    with open(data / "train.csv", "a") as f:
        f.write("one more great snack,pos\n")
    with pytest.raises(TrainingError, match=r"data\[train\]: '\d+ rows"):
        trainer.train(cfg, str(tmp_path / "run"))


@pytest.mark.slow
def test_more_steps_and_new_cadences_are_applied_and_recorded(model_dir, data_dir, tmp_path):
    trainer.train(tiny.tiny_config(model_dir, data_dir, **{"train.steps": 3}), str(tmp_path))
    longer = tiny.tiny_config(model_dir, data_dir, **{"train.steps": 5, "train.log_every": 1})
    summary = trainer.train(longer, str(tmp_path))
    assert summary["steps"] == 5
    resumes = _run_json(tmp_path)["resumes"]
    assert [c[0] for c in resumes[-1]["changes"]] == ["train.log_every", "train.steps"]


def test_a_second_trainer_is_refused_naming_the_holder(model_dir, data_dir, tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        fileio.write_json(tmp_path / workdir_lib.LOCK_FILE, {"host": socket.gethostname(), "pid": holder.pid})
        cfg = tiny.tiny_config(model_dir, data_dir, **{"train.steps": 1})
        with pytest.raises(TrainingError, match=f"in use by another trainer .*pid {holder.pid}"):
            trainer.train(cfg, str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and taken over; the run releases it when done.
    trainer.train(tiny.tiny_config(model_dir, data_dir, **{"train.steps": 1}), str(tmp_path))
    assert not (tmp_path / workdir_lib.LOCK_FILE).exists()


def test_eval_and_export_take_the_best_checkpoint_and_leave_a_trainers_files_alone(model_dir, data_dir,
                                                                                   tmp_path):
    class WorseAtTheEnd(Callback):
        """The last eval's validation loss rises (as when a run overfits), so the best step is an earlier one."""

        def on_eval(self, loop, split, results):
            if loop.at_end:
                results[0]["loss"] = 1e3

    cfg = tiny.tiny_config(model_dir, data_dir, **{"train.eval_every": 4, "train.checkpoint.keep": 1})
    summary = trainer.train(cfg, str(tmp_path), callbacks=[WorseAtTheEnd()])
    assert summary["best_step"] != summary["steps"], summary  # the test needs best != last
    # A save in flight (a trainer writing beside eval): read-only eval must not clean it up.
    in_flight = tmp_path / "checkpoints" / f"{summary['steps'] + 1}.orbax-checkpoint-tmp-1"
    in_flight.mkdir()
    out = _cli(f"--workdir={tmp_path}", "--mode=eval")
    assert f"checkpoint: step {summary['best_step']}, best val_loss" in out.stdout
    assert json.loads((tmp_path / "eval.json").read_text())["step"] == summary["best_step"]
    assert in_flight.exists()
    # summary["last"]: the last weights' test numbers, the same as evaluating the last checkpoint.
    assert summary["last"]["step"] == summary["steps"]
    assert summary["last"]["test"]["loss"] != summary["test"]["loss"]
    _cli(f"--workdir={tmp_path}", "--mode=eval", f"--step={summary['steps']}")
    at_last = json.loads((tmp_path / "eval.json").read_text())
    assert at_last["step"] == summary["steps"]
    assert at_last["test"] == pytest.approx(summary["last"]["test"], rel=1e-5)
    export = tmp_path / "exported"
    _cli(f"--workdir={tmp_path}", "--mode=export", f"--export_dir={export}", f"--step={summary['steps']}")
    assert json.loads((export / "ftjax_export.json").read_text())["step"] == summary["steps"]
    line = _cli(f"--workdir={tmp_path}", "--mode=export", f"--export_dir={model_dir}", "--overwrite",
                check=False).stderr.strip().splitlines()[-1]
    assert line.startswith("ftjax: error:") and model_dir in line  # never the base model's folder


def test_json_writes_are_atomic_and_a_failed_folder_write_keeps_the_old_one(tmp_path):
    target = tmp_path / "summary.json"
    fileio.write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        fileio.write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    folder = tmp_path / "export"
    with fileio.atomic_dir(folder) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError), fileio.atomic_dir(folder) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed mid-export")
    assert (folder / "weights").read_text() == "v1"
    assert sorted(os.listdir(tmp_path)) == ["export", "summary.json"]  # no temp files left


def test_a_torn_run_json_is_a_clear_error(model_dir, data_dir, tmp_path):
    (tmp_path / "run.json").write_text('{"config": {"train.st')
    with pytest.raises(TrainingError, match="run.json is not valid JSON"):
        workdir_lib.saved_config(str(tmp_path))


def test_fields_added_by_a_newer_ftjax_at_their_defaults_do_not_block_a_resume():
    from ftjax.config import default_config

    new = {"config": workdir_lib.flatten(default_config()), "data": {}, "model": {}, "labels": []}
    old = {**new, "config": {k: v for k, v in new["config"].items() if not k.startswith("train.early_stop")}}
    assert workdir_lib.resume_changes(old, new) == ([], [])
    changed = {**new, "config": {**new["config"], "train.early_stop.metric": "accuracy"}}
    assert workdir_lib.resume_changes(old, changed)[1] == [("train.early_stop.metric", "loss", "accuracy")]


def test_a_run_from_before_scanned_layers_keeps_its_unrolled_layout(tmp_path):
    """run.json without model.scan_layers: the run was built unrolled, and resuming, evaluating or exporting
    it rebuilds it unrolled (today's default would stack its layers and not fit its checkpoints)."""
    from ftjax.config import default_config

    cfg = default_config()
    cfg.model.name_or_path, cfg.data.source = "/models/llama", "files:/data"  # a valid saved config
    saved = {k: v for k, v in workdir_lib.flatten(cfg).items() if k != "model.scan_layers"}
    fileio.write_json(tmp_path / "run.json", {"config": saved, "data": {}, "model": {}, "labels": []})
    assert workdir_lib.saved_config(str(tmp_path)).model.scan_layers is False
    assert cfg.model.scan_layers is True
    workdir_lib.adopt_saved_structure(cfg, str(tmp_path))
    assert cfg.model.scan_layers is False
    old = {"config": saved, "data": {}, "model": {}, "labels": []}
    new = {**old, "config": {**saved, "model.scan_layers": True}}  # a resume asking for the scanned layout
    assert workdir_lib.resume_changes(old, new)[1] == [("model.scan_layers", False, True)]
