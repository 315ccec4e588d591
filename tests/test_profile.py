"""train.profile: a jax.profiler trace of the chosen steps under WORKDIR/tb, readable by TensorBoard's profile
plugin (an .xplane.pb per host) and Perfetto (a .trace.json.gz)."""

from __future__ import annotations

import glob
import os

import pytest

from ftjax import trainer
from ftjax.callbacks import profiling
from ftjax.config import ConfigError, validate
from tests import tiny


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    return tiny.tiny_bert(str(root / "bert")), tiny.sentiment_csvs(str(root / "data"), n_train=32, n_test=8)


def test_the_trace_of_the_chosen_steps_appears_under_tb(tiny_run, tmp_path):
    model_dir, data_dir = tiny_run
    cfg = tiny.tiny_config(model_dir, data_dir, **{"train.profile": "2:2", "train.steps": 6})
    trainer.train(cfg, str(tmp_path / "run"))
    traces = glob.glob(str(tmp_path / "run" / "tb" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000


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
