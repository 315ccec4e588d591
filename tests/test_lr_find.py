"""LR range test: on a toy problem with a known stable range it suggests an LR inside it; the ftjax run
(ramp and population) writes its plot and a suggestion."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ftjax.tune import lr_find
from ftjax.config import ConfigError
from tests import tiny


def test_on_a_quadratic_the_suggestion_is_inside_the_known_good_range():
    # Gradient descent on 0.5 * sum(h_i * w_i^2) converges iff lr < 2 / max(h), and makes real progress on
    # every direction only for lr >= ~0.1 / max(h): the good range is [0.1 / L, 2 / L] with L = 10.
    h = np.linspace(1.0, 10.0, 8)
    w = np.ones_like(h)

    def step(i, lr):
        nonlocal w
        loss = 0.5 * float(np.sum(h * w * w))
        w = w - lr * h * w
        return loss

    lrs = lr_find.lr_ramp(1e-5, 10.0, 100)
    recorder = lr_find.RangeTest(members=1)
    for i, lr in enumerate(lrs):
        if recorder.record(np.array([step(i, lr)])):
            break
    losses = np.stack(recorder.losses)[:, 0]
    assert len(losses) < 100  # it stopped once the loss blew up
    s = lr_find.suggest_lr(lrs, losses)
    assert s["method"] == "steepest descent"
    assert 0.1 / 10 <= s["lr"] <= 2 / 10, s


def test_suggest_falls_back_to_min_over_10_without_a_descent():
    lrs = lr_find.lr_ramp(1e-4, 1.0, 20)
    losses = np.linspace(1.0, 3.0, 20)  # only rises
    s = lr_find.suggest_lr(lrs, losses)
    assert s["method"] == "min / 10" and s["lr"] == pytest.approx(lrs[0] / 10)


def test_bad_ranges_are_clear_errors():
    with pytest.raises(ConfigError, match="0 < --lr_min < --lr_max"):
        lr_find.lr_ramp(1e-2, 1e-4, 50)
    with pytest.raises(ConfigError, match="lr_find.steps"):
        lr_find.lr_ramp(1e-5, 1.0, 2)


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    model = tiny.tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")))
    data = tiny.sentiment_csvs(str(tmp_path_factory.mktemp("reviews")))
    return tiny.tiny_config(model, data)


def test_lr_find_on_a_tiny_bert_writes_a_plot_and_a_suggestion(tiny_cfg, tmp_path):
    result = lr_find.lr_find(tiny_cfg, str(tmp_path), lr_min=1e-5, lr_max=10.0, steps=30)
    assert os.path.getsize(tmp_path / "lr_find.png") > 1000
    with open(tmp_path / "lr_find.json") as f:
        saved = json.load(f)
    assert saved["suggestion"] == result["suggestion"]
    losses = [x for x in result["losses"] if x is not None]
    assert 1e-5 <= result["suggestion"]["lr"] <= 10.0
    assert max(losses) > 2 * losses[0]  # the ramp reached LRs where the loss blows up


def test_lr_find_as_a_population_trains_constant_lrs_at_once(tiny_cfg, tmp_path):
    result = lr_find.lr_find(tiny_cfg, str(tmp_path), lr_min=1e-4, lr_max=10.0, steps=6, population=3)
    assert result["lrs"] == pytest.approx([1e-4, 3.1623e-2, 10.0], rel=1e-3)
    losses = result["losses"]
    assert losses[2] is None or losses[2] > losses[0]  # LR 10 is far too high
    assert result["suggestion"]["lr"] in result["lrs"][:2]
    assert os.path.getsize(tmp_path / "lr_find.png") > 1000
