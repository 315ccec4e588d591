"""--mode=compare: fake run workdirs written by the real writers are compared into one report (config diff,
final numbers with the best in bold, overlaid PNGs); bad inputs are clear errors; sweeps link their
comparison; TensorBoard HParams summaries land in the run's tb/."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time
import types

import optuna
import pytest
from tensorboardX.proto import event_pb2, plugin_hparams_pb2

from ftjax import fileio
from ftjax.callbacks import EarlyStopping, MetricWriter
from ftjax.callbacks.hparams import HParams
from ftjax.config import default_config
from ftjax.reporting import compare
from ftjax.reporting.hparams import SEVEN, write_hparams
from ftjax.tune import report, space
from ftjax.workdir import flatten

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"
DATA = {"train": {"source": "files:train.csv", "rows": 100, "sha256": "a" * 64}}
MODEL = {"name_or_path": "/models/tiny", "config_sha256": "b" * 64}


def _config(lr: float, **changes):
    cfg = default_config()
    cfg.optim.lr = lr
    for field, value in changes.items():
        section, name = field.split(".")
        cfg[section][name] = value
    return cfg


def make_run(workdir, lr: float, accuracy: float, *, data=DATA, forgetting: bool = False, summary: bool = True,
             member: bool = False, **changes) -> str:
    """A run's workdir as the trainer leaves it: run.json (or a population member's config.json),
    metrics.jsonl (train / lr / val / gap lines, optionally a forgetting monitor's) and summary.json."""
    workdir = str(workdir)
    cfg = _config(lr, **changes)
    if member:
        fileio.write_json(fileio.path(workdir) / "config.json", flatten(cfg))
    else:
        fileio.write_json(fileio.path(workdir) / "run.json",
                          {"config": flatten(cfg), "data": data, "model": MODEL, "labels": ["neg", "pos"]})
    with MetricWriter(workdir) as w:
        for i, step in enumerate((10, 20, 30)):
            w.write(step, "train", {"loss": 1.0 - 0.2 * i - lr * 100, "grad_norm": 1.0 + i})
            w.write(step, "lr", {"trainable": lr * (1 - i / 3), "head": 10 * lr * (1 - i / 3)})
            w.write(step, "val", {"loss": 1.1 - 0.2 * i, "accuracy": accuracy - 0.1 * (2 - i), "count": 50})
            w.write(step, "gap", {"val_minus_train_loss": 0.1 + lr * 100})
            if forgetting:
                w.write(step, "forgetting", {"pretrain_loss_delta": 0.05 * i})
        w.write(30, "test", {"loss": 0.8, "accuracy": accuracy - 0.02})
    if summary:
        fileio.write_json(fileio.path(workdir) / "summary.json", {
            "status": "done", "steps": 30, "best_step": 30 if accuracy < 0.85 else 20,
            **({} if accuracy < 0.85 else {"last": {"step": 30, "test": {"loss": 0.9, "accuracy": 0.84}}}),
            "val": {"loss": 1.0 - accuracy / 2, "accuracy": accuracy, "count": 50},
            "test": {"loss": 0.8, "accuracy": accuracy - 0.02},
            "timing": {"train_examples_per_second": 100.0 * accuracy, "wall_seconds": 12.0},
            "perf": {"mfu": 0.1 + accuracy / 10}})
    return workdir


@pytest.fixture
def three_runs(tmp_path):
    root = tmp_path / "runs"
    return [make_run(root / "lr_1", 1e-4, 0.7), make_run(root / "lr_2", 3e-4, 0.9, forgetting=True),
            make_run(root / "lr_3", 1e-3, 0.8)]


def _section(md: str, title: str) -> str:
    return md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_report_has_the_diff_the_final_numbers_and_overlaid_curves(three_runs, tmp_path):
    path = compare.write_compare(three_runs)
    assert path == fileio.path(tmp_path / "runs" / "compare" / "compare.md")  # default: the parent's compare/
    md = path.read_text()

    diff = _section(md, "Config differences")
    rows = [line for line in diff.splitlines() if line.startswith("| `")]
    assert rows == ["| `optim.lr` | 0.0001 | 0.0003 | 0.001 |"], diff  # exactly the field that differs
    assert "| field | lr_1 | lr_2 | lr_3 |" in diff

    final = [line for line in _section(md, "Final numbers").splitlines() if line.startswith("| lr_")]
    assert final[1].startswith("| lr_2 |")  # accuracy 0.9: the best val accuracy, test accuracy, loss ...
    header = [h.strip() for h in _section(md, "Final numbers").split("\n| run |")[1].split("\n")[0].split("|")]
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in final}
    col = {h: i for i, h in enumerate(h for h in header if h)}
    assert cells["lr_2"][col["val accuracy"]] == "**0.9000**" and cells["lr_1"][col["val accuracy"]] == "0.7000"
    assert cells["lr_2"][col["val loss"]] == "**0.5500**"  # lower is better for a loss
    assert cells["lr_2"][col["MFU"]] == "**19.0%**" and cells["lr_3"][col["MFU"]] == "18.0%"
    assert cells["lr_1"][col["test loss"]] == "**0.8000**" == cells["lr_3"][col["test loss"]]  # ties: all bold
    assert "best step" in col and "examples/s" in col and "val count" not in col
    # Only lr_2's best step came before its last: the last weights' test numbers, "-" for the others.
    assert cells["lr_2"][col["last test accuracy"]] == "**0.8400**" and cells["lr_1"][col["last test loss"]] == "-"

    out = path.parent
    for name in ("train_loss.png", "val_loss.png", "val_accuracy.png", "gap_val_minus_train_loss.png", "lr.png",
                 "forgetting_pretrain_loss_delta.png", "train_grad_norm.png", "effect.png"):
        assert (out / name).read_bytes().startswith(PNG), name
        assert f"]({name})" in md, name
    linked = re.findall(r"\]\(([^)]+\.png)\)", md)
    assert all((out / name).exists() for name in linked)
    assert not (out / "val_count.png").exists()  # not a metric
    runs = compare.load_runs(three_runs)
    assert runs[0].label == "lr_1 (lr=0.0001)"  # the legends say what differs


def test_diff_shows_several_fields_and_the_data_identity(tmp_path):
    other = {"train": {**DATA["train"], "rows": 120, "sha256": "c" * 64}}
    a = make_run(tmp_path / "a" / "run", 1e-4, 0.7)
    b = make_run(tmp_path / "b" / "run", 1e-4, 0.8, data=other, **{"train.batch_size": 64})
    runs = compare.load_runs([a, b])
    assert [r.name for r in runs] == ["a/run", "b/run"]  # basenames repeat: the parent tells them apart
    assert compare.config_diff(runs) == ["train.batch_size"]
    table = "\n".join(compare.diff_table(runs))
    assert "| `train.batch_size` | 32 | 64 |" in table
    assert "| data[train] | 100 rows, aaaaaaaaaaaa | 120 rows, cccccccccccc |" in table
    assert "model" not in table and "labels" not in table  # the same in both runs


def test_glob_natural_order_population_members_and_unfinished_runs(tmp_path):
    for n in (10, 2, 1):
        make_run(tmp_path / "sweep" / f"trial_{n}", 1e-4 * n, 0.5 + n / 100, member=True, summary=n != 10)
    out = tmp_path / "cmp"
    path = compare.write_compare([str(tmp_path / "sweep" / "trial_*")], out)
    md = path.read_text()
    assert [r.name for r in compare.load_runs([str(tmp_path / "sweep" / "trial_*")])] == [
        "trial_1", "trial_2", "trial_10"]
    assert "trial_10 (no summary.json yet)" in md and "| `optim.lr` |" in md
    assert path.parent == fileio.path(out)


def test_bad_inputs_are_clear_errors(three_runs, tmp_path):
    with pytest.raises(compare.CompareError, match="at least 2 runs"):
        compare.write_compare(three_runs[:1])
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(compare.CompareError, match=f"{plain} is not an ftjax run: it has no run.json"):
        compare.write_compare([three_runs[0], str(plain)])
    fileio.write_json(plain / "run.json", {"config": flatten(default_config())})
    with pytest.raises(compare.CompareError, match="no metrics.jsonl"):
        compare.write_compare([three_runs[0], str(plain)])
    with pytest.raises(compare.CompareError, match="is not a folder"):
        compare.write_compare([three_runs[0], str(tmp_path / "missing")])
    with pytest.raises(compare.CompareError, match="matches no folder"):
        compare.write_compare([str(tmp_path / "nothing_*")])
    with pytest.raises(compare.CompareError, match="into the run"):
        compare.write_compare(three_runs, out=os.path.join(three_runs[1], "cmp"))
    with pytest.raises(compare.CompareError, match="holds a run"):
        compare.write_compare(three_runs[:2], out=three_runs[2])


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "ftjax.main", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.slow
def test_cli_compare_mode_and_one_workdir_for_other_modes(three_runs, tmp_path):
    out = str(tmp_path / "report")
    proc = _cli("--mode=compare", f"--workdir={os.path.dirname(three_runs[0])}/lr_*", f"--compare_out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"comparison: {out}/compare.md" in proc.stdout
    assert os.path.exists(os.path.join(out, "val_accuracy.png"))
    proc = _cli("--mode=compare", f"--workdir={three_runs[0]}")
    assert proc.returncode == 2 and "needs at least 2 runs" in proc.stderr.strip().splitlines()[-1]
    proc = _cli("--mode=eval", f"--workdir={three_runs[0]}", f"--workdir={three_runs[1]}")
    assert proc.returncode != 0 and "--mode=eval takes one --workdir, got 2" in proc.stderr


def _events(path) -> list:
    """The Event records of a TensorBoard events file (TFRecord framing: length, crc, data, crc)."""
    data, i, out = path.read_bytes(), 0, []
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
        i += 12 + n + 4
    return out


def _hparams_content(events) -> tuple[dict, dict]:
    """({tag: HParamsPluginData} of the hparams plugin, {tag: scalar}) in the events."""
    plugin, scalars = {}, {}
    for event in events:
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "hparams":
                plugin[value.tag] = plugin_hparams_pb2.HParamsPluginData.FromString(
                    value.metadata.plugin_data.content)
            elif value.HasField("simple_value"):
                scalars[value.tag] = value.simple_value
    return plugin, scalars


def test_hparams_summaries_land_in_the_runs_tb_folder(tmp_path):
    workdir = make_run(tmp_path / "run", 3e-4, 0.9)
    summary = fileio.read_json(os.path.join(workdir, "summary.json"))
    path = write_hparams(workdir, _config(3e-4), summary)
    assert path.parent == fileio.path(workdir) / "tb" and path.name.endswith(".hparams")
    plugin, scalars = _hparams_content(_events(path))
    assert set(plugin) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    hp = plugin["_hparams_/session_start_info"].session_start_info.hparams
    assert hp["optim.lr"].number_value == pytest.approx(3e-4)
    assert hp["optim.schedule.type"].string_value == "warmup_linear" and hp["train.batch_size"].number_value == 32
    assert hp["optim.groups"].string_value == "[]" and "model.dropout.hidden" not in hp  # None: left out
    assert "train.compilation_cache" not in hp  # bookkeeping, not a hyperparameter
    infos = plugin["_hparams_/experiment"].experiment
    names = [h.name for h in infos.hparam_infos]
    assert [f for f in SEVEN if not f.startswith("model.dropout")] == names[:len(SEVEN) - 3]
    assert {m.name.tag for m in infos.metric_infos} == {"hparams/val_loss", "hparams/val_accuracy",
                                                        "hparams/test_loss", "hparams/test_accuracy"}
    assert scalars["hparams/val_accuracy"] == pytest.approx(0.9)

    # As a callback (a population's members): the early-stopping best val metrics of each member.
    early = EarlyStopping("accuracy", "max", 0, 0.0, 2)
    early.best_results = [{"accuracy": 0.6}, {"accuracy": 0.7}]
    dirs = [str(tmp_path / "m0"), str(tmp_path / "m1")]
    loop = types.SimpleNamespace(interrupted=False, callbacks=[early], step=7)
    HParams(dirs, [_config(1e-4), flatten(_config(2e-4))]).on_end(loop)
    (event_file,) = (fileio.path(dirs[1]) / "tb").glob("*.hparams")
    plugin, scalars = _hparams_content(_events(event_file))
    assert plugin["_hparams_/session_start_info"].session_start_info.hparams["optim.lr"].number_value == 2e-4
    assert scalars == {"hparams/val_accuracy": pytest.approx(0.7)}


def test_sweep_report_links_the_comparison_of_its_top_trials(tmp_path):
    sweep_dir = tmp_path / "sweep"
    spec = space.make_spec({"space": {"optim.lr": space.loguniform(1e-5, 1e-2)}, "metric": "accuracy",
                            "mode": "max", "sampler": "random", "n_trials": 3})
    study = optuna.create_study(direction="maximize")
    dist = {"optim.lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}
    for n, (lr, acc) in enumerate([(1e-4, 0.7), (3e-4, 0.9), (1e-3, 0.8)]):
        trial_dir = make_run(sweep_dir / f"trial_{n}", lr, acc)
        study.add_trial(optuna.trial.create_trial(params={"optim.lr": lr}, distributions=dist, value=acc,
                                                  user_attrs={"workdir": trial_dir}))
    path = report.write_report(study, spec, str(sweep_dir), plots=True)
    md = fileio.path(path).read_text()
    assert "## Comparison of the top 3 trials" in md and "[compare/compare.md](compare/compare.md)" in md
    table = (sweep_dir / "compare" / "compare.md").read_text()
    assert "| field | trial_1 | trial_2 | trial_0 |" in table  # best first


def test_compare_and_hparams_on_gcs(gcs_bucket):
    root = f"{gcs_bucket}/runs"
    make_run(f"{root}/lr_1", 1e-4, 0.7)
    b = make_run(f"{root}/lr_2", 3e-4, 0.9)
    path = compare.write_compare([f"{root}/lr_*"])
    assert str(path) == f"{root}/compare/compare.md" and "| `optim.lr` | 0.0001 | 0.0003 |" in path.read_text()
    assert (path.parent / "val_accuracy.png").read_bytes().startswith(PNG)
    event_file = write_hparams(b, _config(3e-4), fileio.read_json(f"{b}/summary.json"))
    assert str(event_file).startswith(f"{b}/tb/") and _hparams_content(_events(event_file))[1]


def test_hparams_of_a_resumed_run_replace_the_earlier_ones(tmp_path):
    workdir = make_run(tmp_path / "run", 3e-4, 0.9)
    write_hparams(workdir, _config(3e-4), {"val": {"accuracy": 0.5}, "steps": 10})
    time.sleep(1.1)  # event file names hold the time in seconds
    second = write_hparams(workdir, _config(3e-4), {"val": {"accuracy": 0.9}, "steps": 30})
    assert list((fileio.path(workdir) / "tb").glob("*.hparams")) == [second]
    assert _hparams_content(_events(second))[1] == {"hparams/val_accuracy": pytest.approx(0.9)}
