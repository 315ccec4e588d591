"""Sweeps: a small sweep runs, resumes after interruption without repeating trials, prunes, reports; bad
specs are clear errors; two worker processes share one PostgreSQL study."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap

import optuna
import pytest

from ftjax import trainer
from ftjax.config import ConfigError, default_config
from ftjax.tune import space, sweep
from ftjax.tune.population import PopulationError
from ftjax.tune.report import REPORT
from ftjax.tune.study import open_study, storage_url
from tests import tiny

S = optuna.trial.TrialState
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FAST = {"train.steps": 4, "train.eval_every": 2, "train.log_every": 1}


def _spec(**kw) -> space.SweepSpec:
    raw = {"space": {"optim.lr": space.loguniform(1e-4, 3e-3), "train.label_smoothing": space.choice(0.0, 0.1)},
           "metric": "accuracy", "mode": "max", "sampler": "random", "n_trials": 3}
    raw.update(kw)
    return space.make_spec(raw)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.slow
def test_a_small_sweep_resumes_after_interruption_without_repeating_trials_and_reports(
    model_dir, data_dir, tmp_path
):
    cfg = tiny.tiny_config(model_dir, data_dir, **FAST)
    spec, wd = _spec(), str(tmp_path / "sweep")
    sweep.run_sweep(cfg, spec, wd, stop_after_trials=1)
    first = open_study(spec, wd, seed_offset=1)  # (seed 0 would draw trial 0's point again)
    assert [t.state for t in first.get_trials()] == [S.COMPLETE]
    trial0_summary = os.path.join(wd, "trial_0", "summary.json")
    mtime0 = os.path.getmtime(trial0_summary)

    # A worker dies in the middle of trial 1 (after its step-2 eval and checkpoint).
    trial = first.ask()
    values = {f: space.suggest(trial, f, d) for f, d in spec.space.items()}
    crashed_dir = os.path.join(wd, f"trial_{trial.number}")
    for key, value in {"host": socket.gethostname(), "pid": _dead_pid(), "workdir": crashed_dir}.items():
        trial.set_user_attr(key, value)
    assert trainer.train(sweep.trial_config(cfg, spec, values), crashed_dir, stop_after=2) == {"interrupted_at": 2}
    ckpt2 = os.path.join(crashed_dir, "checkpoints", "2")
    ckpt2_mtime = os.path.getmtime(ckpt2)

    study = sweep.run_sweep(cfg, spec, wd, command=["--config=configs/tiny.py"])
    trials = study.get_trials()
    done = [t for t in trials if t.state == S.COMPLETE]
    assert len(done) == 3
    assert os.path.getmtime(trial0_summary) == mtime0  # trial 0 was not run again
    crashed = trials[1]
    assert crashed.state == S.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0].state == S.COMPLETE and retry[0].params == crashed.params
    # The retry continued the interrupted run from its step-2 checkpoint instead of starting over.
    moved = os.path.join(wd, f"trial_{retry[0].number}")
    assert not os.path.exists(crashed_dir)
    assert os.path.getmtime(os.path.join(moved, "checkpoints", "2")) == ckpt2_mtime
    with open(os.path.join(moved, "summary.json")) as f:
        assert json.load(f)["steps"] == 4

    with open(os.path.join(wd, REPORT)) as f:
        report = f.read()
    best = study.best_trial
    assert f"Trial {best.number}: accuracy" in report
    assert f"--config.optim.lr={best.params['optim.lr']!r}" in report and "--config=configs/tiny.py" in report
    assert report.count("| complete") == 3 and "| complete (retry of 1) |" in report and "| fail |" in report
    for png in ("sweep_metric_vs_params.png", "sweep_parallel_coordinates.png", "sweep_learning_curves.png"):
        assert os.path.getsize(os.path.join(wd, png)) > 1000, png
    # Running the finished sweep again starts no trial.
    again = sweep.run_sweep(cfg, spec, wd)
    assert len(again.get_trials()) == len(trials)


@pytest.mark.slow
def test_a_poor_trial_is_pruned_at_an_eval_point(model_dir, data_dir, tmp_path):
    # Constant LR (no warmup): the poor trial's Adam steps of size ~1 wreck the model before the first eval.
    cfg = tiny.tiny_config(model_dir, data_dir, **{**FAST, "train.steps": 6, "optim.schedule.type": "constant"})
    spec = _spec(space={"optim.lr": space.loguniform(1e-4, 1.0)}, metric="loss", mode="min", n_trials=2,
                 pruner="median", pruner_startup_trials=1)
    wd = str(tmp_path / "sweep")
    os.makedirs(wd)
    study = open_study(spec, wd)
    study.enqueue_trial({"optim.lr": 1e-3})
    study.enqueue_trial({"optim.lr": 1.0})  # blows the loss up: worse than trial 0 at its first eval
    study = sweep.run_sweep(cfg, spec, wd)
    good, poor = study.get_trials()
    assert good.state == S.COMPLETE and sorted(good.intermediate_values) == [2, 4, 6]
    assert poor.state == S.PRUNED and sorted(poor.intermediate_values) == [2]


def test_a_population_sweep_runs_its_trials_together(model_dir, data_dir, tmp_path):
    cfg = tiny.tiny_config(model_dir, data_dir, **FAST)
    spec = _spec(population=3, n_trials=3, space={"optim.lr": space.loguniform(1e-4, 3e-3),
                                                  "optim.weight_decay": space.uniform(0.0, 0.1)})
    study = sweep.run_sweep(cfg, spec, str(tmp_path))
    trials = study.get_trials()
    assert [t.state for t in trials] == [S.COMPLETE] * 3
    assert {t.user_attrs["population"] for t in trials} == {str(tmp_path / "population_0")}
    assert len({t.params["optim.lr"] for t in trials}) == 3
    for t in trials:
        assert sorted(t.intermediate_values) == [2, 4]


@pytest.mark.slow
def test_a_grid_sweep_covers_the_grid_once(model_dir, data_dir, tmp_path):
    cfg = tiny.tiny_config(model_dir, data_dir, **{**FAST, "train.steps": 2})
    spec = _spec(sampler="grid", n_trials=10, space={"optim.schedule.type": space.choice("constant", "warmup_cosine")})
    study = sweep.run_sweep(cfg, spec, str(tmp_path))
    assert sorted(t.params["optim.schedule.type"] for t in study.get_trials()) == ["constant", "warmup_cosine"]


@pytest.mark.parametrize("raw,error,match", [
    ({"space": {}}, space.SweepError, "sweep.space=.*is empty"),
    ({"space": {"optim.learning_rate": space.loguniform(1e-5, 1e-3)}}, ConfigError,
     "optim.learning_rate.*not a field of the config"),
    ({"space": {"optim.lr": space.loguniform(1e-3, 1e-5)}}, space.SweepError, "low=0.001 > high=1e-05"),
    ({"space": {"train.grad_accum": space.choice(1, 2)}, "population": 4}, PopulationError,
     "train.grad_accum.*changes shapes"),
    ({"space": {"train.seed": space.choice(0, 1)}, "population": 4}, PopulationError,
     "train.seed.*share the data order"),
    ({"space": {"optim.lr": space.loguniform(1e-5, 1e-3)}, "metric": "bleu"}, space.SweepError, "sweep.metric"),
    ({"space": {"optim.lr": space.loguniform(1e-5, 1e-3)}, "sampler": "cmaes"}, space.SweepError, "sweep.sampler"),
    ({"space": {"optim.lr": space.loguniform(0.0, 1e-3)}}, space.SweepError, "log range needs low > 0"),
])
def test_bad_sweep_specs_are_clear_errors(raw, error, match):
    cfg = default_config()
    with pytest.raises(error, match=match):
        space.validate_spec(space.make_spec(raw), cfg)


def test_an_unknown_spec_key_and_a_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(space.SweepError, match="sweep.trials=.*unknown key"):
        space.make_spec({"space": {}, "trials": 3})
    with pytest.raises(FileNotFoundError, match="configs/sweeps/<name>.py"):
        space.load_spec(str(tmp_path / "nope.py"))


@pytest.mark.parametrize("name", ["minilm_sequential", "minilm_population"])
def test_the_shipped_sweep_files_load_and_validate(name):
    spec = space.load_spec(os.path.join(ROOT, "configs", "sweeps", f"{name}.py"))
    space.validate_spec(spec, default_config())
    assert spec.space and spec.metric == "accuracy"


def test_declaring_a_search_space_needs_no_optuna():
    # optuna is the `sweep` extra: a sweep file (and anything that only reads one) must import without it.
    code = ("import sys; sys.modules['optuna'] = None\n"
            "from ftjax.tune import space\n"
            "space.make_spec({'space': {'optim.lr': space.loguniform(1e-5, 1e-3)}})")
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------
# PostgreSQL: two worker processes share one study.


def _start_postgres() -> tuple[str, list[str]]:
    """(url, stop command) of a throwaway server on loopback; pytest.skip with the reason if impossible."""
    url = os.environ.get("FTJAX_TEST_POSTGRES_URL")
    if url:
        return url, []
    bins = [os.path.dirname(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))]
    if shutil.which("initdb"):
        bins.append(os.path.dirname(shutil.which("initdb")))
    if not bins:
        reason = "no PostgreSQL server found (initdb): apt-get install postgresql, or set FTJAX_TEST_POSTGRES_URL"
        print(reason)
        pytest.skip(reason)
    bindir = bins[-1] if not glob.glob("/usr/lib/postgresql/*/bin/initdb") else bins[0]
    prefix: list[str] = []
    base = tempfile.mkdtemp(prefix="ftjax_pg_")  # not under tmp_path: its parents are private to root
    data, sock = os.path.join(base, "data"), os.path.join(base, "sock")
    os.makedirs(sock)
    if os.geteuid() == 0:  # the server refuses to run as root
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        for d in (base, sock):
            os.chown(d, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = os.path.join(base, "pg.log")
    cmds = [
        prefix + [f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "ftjax", "--no-sync"],
        prefix + [f"{bindir}/pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o",
                  f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
    ]
    for cmd in cmds:
        result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            reason = f"could not start a PostgreSQL server ({' '.join(cmd[:2])}): {result.stderr.strip()[-300:]}"
            print(reason)
            pytest.skip(reason)
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user="ftjax", dbname="postgres")
    conn.autocommit = True
    conn.cursor().execute("CREATE DATABASE sweep")
    conn.close()
    return f"postgresql://ftjax@127.0.0.1:{port}/sweep", prefix + [f"{bindir}/pg_ctl", "-D", data, "-m",
                                                                     "immediate", "stop"]


@pytest.mark.slow
def test_two_workers_share_one_postgresql_sweep(model_dir, data_dir, tmp_path):
    url, stop = _start_postgres()
    try:
        config_file, sweep_file = tmp_path / "tiny_cfg.py", tmp_path / "tiny_sweep.py"
        config_file.write_text(textwrap.dedent(f"""
            from tests import tiny
            def get_config(arg=None):
                return tiny.tiny_config({model_dir!r}, {data_dir!r}, **{{"train.steps": 2, "train.eval_every": 2}})
        """))
        sweep_file.write_text(textwrap.dedent(f"""
            from ftjax.tune import space
            def get_sweep(arg=None):
                return dict(space={{"optim.lr": space.loguniform(1e-4, 3e-3)}}, sampler="random", n_trials=4,
                            metric="accuracy", mode="max", storage={url!r}, study_name="two_workers")
        """))
        env = {**os.environ, "PYTHONPATH": ROOT}
        workers = [subprocess.Popen([sys.executable, "-m", "ftjax.main", "--mode=sweep", f"--config={config_file}",
                                     f"--sweep={sweep_file}", f"--workdir={tmp_path / f'worker{i}'}"],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for i in range(2)]
        outputs = [w.communicate(timeout=600)[0] for w in workers]
        for w, out in zip(workers, outputs):
            assert w.returncode == 0, out[-3000:]
        study = optuna.load_study(study_name="two_workers", storage=storage_url(space.make_spec(
            {"space": {}, "storage": url}), str(tmp_path)))
        trials = study.get_trials()
        complete = [t for t in trials if t.state == S.COMPLETE]
        assert 4 <= len(complete) <= 5 and len(complete) == len(trials)  # a race may start one extra
        assert len({t.user_attrs["pid"] for t in complete}) == 2, "both workers ran trials"
        assert len({t.number for t in complete}) == len(complete)
        for i in range(2):
            assert os.path.exists(tmp_path / f"worker{i}" / REPORT)
    finally:
        if stop:
            subprocess.run(stop, check=False, capture_output=True, timeout=60)
            shutil.rmtree(os.path.dirname(stop[stop.index("-D") + 1]), ignore_errors=True)
