"""train.profile: a jax.profiler trace of the chosen steps under WORKDIR/tb, readable by TensorBoard's profile
plugin (an .xplane.pb per host) and Perfetto (a .trace.json.gz)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap

import pytest

from ftjax import trainer
from ftjax.callbacks import profiling
from ftjax.config import ConfigError, validate
from tests import tiny


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    return tiny.tiny_bert(str(root / "bert")), tiny.sentiment_csvs(str(root / "data"), n_train=32, n_test=8)


def _traces(workdir) -> list[str]:
    return glob.glob(str(workdir / "tb" / "plugins" / "profile" / "*" / "*.xplane.pb"))


def test_the_trace_of_the_chosen_steps_appears_under_tb(tiny_run, tmp_path):
    # A fresh process, as a user's run is: this one may hold libtpu from the dry_run tests (see the next test).
    model_dir, data_dir = tiny_run
    script = textwrap.dedent(f"""
        from tests import conftest  # noqa: F401 - the test environment (CPU backend, offline)
        from ftjax import trainer
        from tests import tiny
        cfg = tiny.tiny_config({model_dir!r}, {data_dir!r}, **{{"train.profile": "2:2", "train.steps": 6}})
        trainer.train(cfg, {str(tmp_path / "run")!r})
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", script], cwd=root, check=True, timeout=900)
    traces = _traces(tmp_path / "run")
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000


def test_a_process_holding_libtpu_for_a_plan_skips_the_trace_instead_of_crashing(tiny_run, tmp_path):
    pytest.importorskip("libtpu")
    from ftjax import dry_run

    dry_run.topology("v5e-4")  # describes an abstract slice: maps libtpu into this process
    assert profiling.libtpu_loaded_off_tpu()
    model_dir, data_dir = tiny_run
    cfg = tiny.tiny_config(model_dir, data_dir, **{"train.profile": "1:1", "train.steps": 3})
    trainer.train(cfg, str(tmp_path / "run"))  # jax.profiler.start_trace would end this process (SIGSEGV)
    assert _traces(tmp_path / "run") == [] and os.path.exists(tmp_path / "run" / "summary.json")


def test_off_by_default_and_a_malformed_window_is_named(tiny_run, tmp_path):
    model_dir, data_dir = tiny_run
    cfg = tiny.tiny_config(model_dir, data_dir, **{"train.steps": 2})
    trainer.train(cfg, str(tmp_path / "plain"))
    assert not os.path.exists(tmp_path / "plain" / "tb" / "plugins")
    for bad in ("3", "3:0", "a:b"):
        cfg.train.profile = bad
        with pytest.raises(ConfigError, match="train.profile"):
            validate(cfg)
    assert profiling.parse("10:3") == (10, 3) and profiling.parse("") is None
