"""Population mode: each vmapped member equals its solo run; shape-changing fields are refused."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from ftjax import config as config_lib
from ftjax import params as params_lib
from ftjax import trainer
from ftjax.callbacks import Pruning, StopAfter
from ftjax.tune import population
from tests import tiny


def _curve(workdir: str, split: str, key: str) -> list[tuple[int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r[key]) for r in rows if r["split"] == split]


MEMBERS = [
    {"optim.lr": 1e-3},
    {"optim.lr": 3e-4, "optim.schedule.type": "warmup_cosine", "optim.schedule.warmup": 3,
     "optim.weight_decay": 0.1, "train.label_smoothing": 0.1},
    {"optim.lr": 2e-3, "optim.layer_lr_decay": 0.5, "optim.schedule.min_ratio": 0.2, "optim.weight_decay": 0.0},
]


def test_population_members_equal_their_solo_runs(model_dir, data_dir, tmp_path):
    base = tiny.tiny_config(model_dir, data_dir, **{"train.eval_every": 4, "train.log_every": 2,
                                                    "optim.freeze_layers": "embeddings"})
    cfgs = [config_lib.with_overrides(base, m) for m in MEMBERS]
    dirs = [str(tmp_path / f"member_{k}") for k in range(len(cfgs))]
    summaries = population.train_population(cfgs, str(tmp_path / "pop"), dirs)
    assert [s["status"] for s in summaries] == ["complete"] * 3
    for k, cfg in enumerate(cfgs):
        solo_dir = str(tmp_path / f"solo_{k}")
        solo = trainer.train(cfg, solo_dir)
        pop_val, solo_val = _curve(dirs[k], "val", "loss"), _curve(solo_dir, "val", "loss")
        assert [s for s, _ in pop_val] == [s for s, _ in solo_val] and len(pop_val) >= 3
        np.testing.assert_allclose([v for _, v in pop_val], [v for _, v in solo_val], rtol=2e-4, atol=1e-5,
                                   err_msg=f"member {k}")
        np.testing.assert_allclose([v for _, v in _curve(dirs[k], "train", "loss")],
                                   [v for _, v in _curve(solo_dir, "train", "loss")], rtol=2e-4, atol=1e-5)
        assert summaries[k]["val"]["loss"] == pytest.approx(solo["val"]["loss"], rel=2e-4)
    # The members really differ (the test would pass trivially if they all ran member 0's config).
    finals = [_curve(d, "val", "loss")[-1][1] for d in dirs]
    assert len({round(v, 5) for v in finals}) == 3


def test_a_stopped_member_keeps_its_state_while_the_others_train(model_dir, data_dir, tmp_path):
    base = tiny.tiny_config(model_dir, data_dir, **{"train.eval_every": 3})
    cfgs = [config_lib.with_overrides(base, {"optim.lr": lr}) for lr in (1e-3, 2e-3)]
    dirs = [str(tmp_path / f"m{k}") for k in range(2)]
    summaries = population.train_population(cfgs, str(tmp_path / "pop"), dirs,
                                            callbacks=[Pruning(lambda k, step, val: k == 1 and step >= 3)])
    assert summaries[0]["status"] == "complete" and summaries[1]["status"] == "pruned"
    assert [s for s, _ in _curve(dirs[1], "val", "loss")] == [3]
    assert len(_curve(dirs[0], "val", "loss")) > 1


def test_an_interrupted_population_resumes_bit_identically(model_dir, data_dir, tmp_path):
    base = tiny.tiny_config(model_dir, data_dir, **{"train.eval_every": 3, "train.log_every": 1,
                                                    "train.checkpoint.every": 2})
    cfgs = [config_lib.with_overrides(base, m) for m in MEMBERS[:2]]
    straight = [str(tmp_path / f"straight_{k}") for k in range(2)]
    population.train_population(cfgs, str(tmp_path / "pop_straight"), straight)
    resumed = [str(tmp_path / f"resumed_{k}") for k in range(2)]
    out = population.train_population(cfgs, str(tmp_path / "pop_resumed"), resumed, callbacks=[StopAfter(5)])
    assert out[0] == {"interrupted_at": 5}  # checkpoints at 2, 3 (eval) and 4: step 5 is redone
    summaries = population.train_population(cfgs, str(tmp_path / "pop_resumed"), resumed)
    assert [s["status"] for s in summaries] == ["complete"] * 2
    for a, b in zip(straight, resumed):
        assert _curve(a, "train", "loss") == _curve(b, "train", "loss")
        assert _curve(a, "val", "loss") == _curve(b, "val", "loss")


def _assert_member_equals_solo(member_dir: str, solo_dir: str, rtol: float = 2e-4) -> None:
    pop_val, solo_val = _curve(member_dir, "val", "loss"), _curve(solo_dir, "val", "loss")
    assert [s for s, _ in pop_val] == [s for s, _ in solo_val] and pop_val
    np.testing.assert_allclose([v for _, v in pop_val], [v for _, v in solo_val], rtol=rtol, atol=1e-5)
    pop_train, solo_train = _curve(member_dir, "train", "loss"), _curve(solo_dir, "train", "loss")
    assert [s for s, _ in pop_train] == [s for s, _ in solo_train]
    np.testing.assert_allclose([v for _, v in pop_train], [v for _, v in solo_train], rtol=rtol, atol=1e-5)


def _population_vs_solo(base, members: list[dict], tmp_path, rtol: float = 2e-4) -> list[dict]:
    cfgs = [config_lib.with_overrides(base, m) for m in members]
    dirs = [str(tmp_path / f"member_{k}") for k in range(len(cfgs))]
    summaries = population.train_population(cfgs, str(tmp_path / "pop"), dirs)
    assert [s["status"] for s in summaries] == ["complete"] * len(cfgs)
    for k, cfg in enumerate(cfgs):
        solo_dir = str(tmp_path / f"solo_{k}")
        solo = trainer.train(cfg, solo_dir)
        _assert_member_equals_solo(dirs[k], solo_dir, rtol)
        assert summaries[k]["steps"] == solo["steps"], f"member {k}"
    finals = [_curve(d, "val", "loss")[-1][1] for d in dirs]
    assert len({round(v, 5) for v in finals}) == len(cfgs), "the members should differ"
    return summaries


def test_members_of_different_lengths_end_at_their_own_step(model_dir, data_dir, tmp_path):
    # 11 steps an epoch: members of 0.5 and 1 epochs and of 7 steps; each schedule is stretched over its own
    # run, each member evaluated at the cadence and at its own end.
    base = tiny.tiny_config(model_dir, data_dir, **{"train.eval_every": 4, "train.log_every": 1,
                                                    "optim.schedule.type": "warmup_cosine"})
    members = [{"train.epochs": 0.5}, {"train.epochs": 1.0}, {"train.steps": 7}]
    summaries = _population_vs_solo(base, members, tmp_path)
    assert [s["steps"] for s in summaries] == [6, 11, 7]


@pytest.mark.parametrize("eval_every,members,evals", [
    # a fraction of the run: each member evaluates at quarters of its own length (6 steps: 2, 4, 6; 11: 3, 6, 9, 11)
    (0.25, [{"train.epochs": 0.5}, {"train.epochs": 1.0}], [[2, 4, 6], [3, 6, 9, 11]]),
    # each epoch, of the member's own batch size (11 steps an epoch at batch 8, 4 at batch 24)
    (0, [{"train.batch_size": 8, "train.epochs": 1.0}, {"train.batch_size": 24, "train.epochs": 2.0}],
     [[11], [4, 8]]),
])
def test_each_member_evaluates_at_its_own_solo_cadence(model_dir, data_dir, tmp_path, eval_every, members, evals):
    # train.eval_every in epochs or as a fraction of the run means different steps for members of different
    # lengths or batch sizes: each evaluates (and early-stops, and keeps its best) where its solo run does.
    base = tiny.tiny_config(model_dir, data_dir, **{"train.eval_every": eval_every, "train.log_every": 1,
                                                    **NO_DROPOUT})
    _population_vs_solo(base, members, tmp_path)
    assert [[s for s, _ in _curve(str(tmp_path / f"member_{k}"), "val", "loss")] for k in range(len(members))] == evals


@pytest.mark.slow  # the decay path is shared with the solo optimizer (optim.decoupled_weight_decay); this pins L2-SP
def test_members_decaying_toward_the_pretrained_weights_equal_their_solo_runs(model_dir, data_dir, tmp_path):
    base = tiny.tiny_config(model_dir, data_dir, **{"train.eval_every": 4, "train.log_every": 1,
                                                    "optim.decay_toward": "pretrained"})
    _population_vs_solo(base, [{"optim.weight_decay": 0.0}, {"optim.weight_decay": 0.5, "optim.lr": 2e-3}], tmp_path)


def test_members_differing_in_dropout_equal_their_solo_runs(model_dir, data_dir, tmp_path):
    base = tiny.tiny_config(model_dir, data_dir, **{"train.eval_every": 3, "train.log_every": 1})
    members = [{"model.dropout.hidden": 0.0, "model.dropout.attention": 0.0},
               {"model.dropout.hidden": 0.3},
               {"model.dropout.attention": 0.25, "model.dropout.classifier": 0.5}]
    _population_vs_solo(base, members, tmp_path)


FREEZING = [{},
            {"optim.freeze_layers": "embeddings,0"},
            # frozen, then layer 1 trains from step 5 (with decay, which must not act before then)
            {"optim.freeze_layers": "embeddings,0-1", "optim.unfreeze": ((5, ".*/layer/1/.*"),),
             "optim.weight_decay": 1.0, "optim.lr": 5e-3}]


@pytest.mark.slow  # the quick suite pins the same through the params (the next test); this is the loop's view
def test_members_differing_in_what_they_freeze_equal_their_solo_runs(model_dir, data_dir, tmp_path):
    base = tiny.tiny_config(model_dir, data_dir, **{"train.eval_every": 3, "train.log_every": 1,
                                                    "optim.clip_norm": 0.5})
    _population_vs_solo(base, FREEZING, tmp_path)


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_member_never_touches_what_it_freezes_and_ends_with_its_solo_params(model_dir, data_dir, tmp_path, scan):
    # The step differentiates the union; a member's frozen params get no gradient (before clipping), no update,
    # no decay and no optimizer-state change, and a param it unfreezes starts with fresh Adam moments at its own
    # step. Scanned: the members' starts differ between layers of one stack (per-layer masks and segments).
    from ftjax.run import Run

    base = tiny.tiny_config(model_dir, data_dir, **{"optim.clip_norm": 0.05, "model.scan_layers": scan})
    cfgs = [config_lib.with_overrides(base, m) for m in FREEZING]
    pop = population.Population(cfgs, str(tmp_path / "pop"))
    init = params_lib.flatten(jax.device_get(pop.params(0)))
    iterator = pop.run.data.train_iterator()
    batches = [next(iterator) for _ in range(8)]

    def frozen_in(member: int, path: str) -> bool:  # (layer 1 of member 2 until step 5)
        frozen = {1: ("embeddings/", "layer/0/"), 2: ("embeddings/", "layer/0/", "layer/1/")}.get(member, ())
        return any(part in path for part in frozen)

    for step, batch in enumerate(batches):
        pop.step(step, batch, np.ones(3, bool))
        if step == 4:  # member 2's layer 1 is still frozen (with decay 1.0 and Adam state untouched)
            for k in (1, 2):
                for path, value in params_lib.flatten(jax.device_get(pop.params(k))).items():
                    if frozen_in(k, path) and not scan:
                        np.testing.assert_array_equal(value, init[path], err_msg=f"member {k} {path}")
    for k, cfg in enumerate(cfgs):
        solo = trainer.SoloStepper(Run(cfg, str(tmp_path / f"solo_{k}")))
        for step, batch in enumerate(batches):
            solo.step(step, batch, np.ones(1, bool))
        mine = params_lib.flatten(jax.device_get(pop.params(k)))
        for path, value in params_lib.flatten(jax.device_get(solo.params(0))).items():
            np.testing.assert_allclose(mine[path], value, rtol=1e-4, atol=2e-6, err_msg=f"member {k} {path}")


NO_DROPOUT = {"model.dropout.hidden": 0.0, "model.dropout.attention": 0.0}


@pytest.mark.parametrize("shape,members,steps", [
    # packed rows (the default for encoders): members pack their own rows and segments, padded to the most
    (NO_DROPOUT, [{"train.batch_size": 8}, {"train.batch_size": 24, "optim.schedule.type": "warmup_cosine"}],
     [11, 4]),
    # unpacked rows of one step padded to the longest member's length (with dropout off: its masks follow the
    # padded shape)
    ({"data.packing": False, "data.buckets": (16, 32), **NO_DROPOUT},
     [{"train.batch_size": 8}, {"train.batch_size": 16, "optim.lr": 5e-4}], [11, 6]),
    # dropout on, micro-batches, rows of one length (one bucket, unpacked): a member's rows come first in each
    # micro-batch, so its dropout masks are its solo run's (over a padded length or packed segments they are drawn
    # for the padded shape: the same rates, other draws)
    pytest.param({"data.buckets": (32,), "data.packing": False, "train.grad_accum": 2},
                 [{"train.batch_size": 16}, {"train.batch_size": 32, "optim.lr": 2e-3}], [6, 3],
                 marks=pytest.mark.slow),
])
def test_members_differing_in_batch_size_equal_their_solo_runs(model_dir, data_dir, tmp_path, shape, members,
                                                               steps):
    # Each member takes its solo run's batches (its own epochs of its own batch size), padded with weight-0 rows
    # to the largest; its loss averages over its own rows.
    base = tiny.tiny_config(model_dir, data_dir, **{"train.eval_every": 2, "train.log_every": 1, **shape})
    summaries = _population_vs_solo(base, members, tmp_path)
    assert [s["steps"] for s in summaries] == steps


def test_members_differing_in_lora_rank_and_alpha_equal_their_solo_runs(model_dir, data_dir, tmp_path):
    # Adapters padded with zeros to the largest rank: each member starts from its own rank's init (the same keys
    # as its solo run), its padded columns keep zero gradients, and its scale alpha / r is traced.
    base = tiny.tiny_config(model_dir, data_dir, **{"train.eval_every": 3, "train.log_every": 1,
                                                    "optim.lora.rank": 4, "optim.lr": 3e-3})
    members = [{"optim.lora.rank": 2}, {"optim.lora.rank": 8, "optim.lora.alpha": 8.0},
               {"optim.lora.alpha": 64.0}]
    _population_vs_solo(base, members, tmp_path)


def test_preference_members_differing_in_beta_equal_their_solo_runs(tmp_path):
    from tests.test_preference import _config, pairs_jsonl, tiny_llama

    folder = tiny_llama(str(tmp_path / "llama"))
    data = pairs_jsonl(tmp_path / "pairs.jsonl", 48)
    base = _config(folder, data, **{"train.steps": 6, "train.eval_every": 3, "train.log_every": 1})
    members = [{"preference.beta": 0.1}, {"preference.beta": 0.5, "preference.label_smoothing": 0.2}]
    _population_vs_solo(base, members, tmp_path, rtol=5e-4)


@pytest.mark.parametrize("field,value,match", [
    ("train.grad_accum", 2, "changes shapes or the compiled program"),
    ("data.max_len", 16, "changes shapes"),
    ("train.seed", 3, "share the data order"),
])
def test_a_population_over_a_shape_changing_field_is_an_error(model_dir, data_dir, tmp_path, field, value, match):
    base = tiny.tiny_config(model_dir, data_dir)
    cfgs = [base, config_lib.with_overrides(base, {field: value})]
    with pytest.raises(population.PopulationError, match=match) as e:
        population.Population(cfgs, str(tmp_path))
    assert field in str(e.value)


def test_an_unknown_field_is_an_error():
    from ftjax.config import ConfigError, default_config

    with pytest.raises(ConfigError, match="optim.learning_rate.*not a field"):
        config_lib.with_overrides(default_config(), {"optim.learning_rate": 1e-3})
