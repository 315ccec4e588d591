"""--mode=refine: round 0 runs the config, each round proposes candidates from the diagnosis and a local search,
trains them as one population and keeps the best by the validation metric; the report names each choice; a rerun
resumes from refine.json."""

from __future__ import annotations

import json
import os

import pytest

from ftjax import config as config_lib
from ftjax.tune import population, refine
from tests import tiny


def test_proposals_come_from_the_findings_then_a_local_search_without_repeats(model_dir, data_dir):
    cfg = tiny.tiny_config(model_dir, data_dir)
    findings = [{"kind": "overfitting", "remedies": [
        {"why": "stop earlier", "changes": {"train.epochs": {"from": 1.0, "to": 0.5}}},
        {"why": "longer inputs", "changes": {"data.max_len": {"from": 32, "to": 64}}},  # not a population field
        {"why": "regularise", "changes": {"model.dropout.hidden": {"from": None, "to": 0.2},
                                          "data.max_len": {"from": 32, "to": 16}}}]}]
    tried: set = set()
    cands = refine.propose(cfg, {"optim.lr": 2e-3}, findings, 6, tried)
    assert len(cands) == 6
    assert cands[0].overrides == {"optim.lr": 2e-3, "train.epochs": 0.5} and "overfitting" in cands[0].why
    # The dropout remedy keeps its population part and says what it left out; the max_len one is left out.
    assert cands[1].overrides == {"optim.lr": 2e-3, "model.dropout.hidden": 0.2}
    assert "without data.max_len" in cands[1].why
    assert all(set(c.overrides) <= set(population.POPULATION_FIELDS) for c in cands)
    assert cands[2].overrides == {"optim.lr": 1e-3} and cands[2].why == "local: learning rate x0.5"
    # The local steps take each hyperparameter in turn (a small round moves several, not four learning rates).
    assert [c.why for c in cands[3:]] == ["local: epochs x1.5", "local: batch size x2", "local: weight decay 0"]
    keys = [refine._key(cfg, c.overrides) for c in cands]
    assert len(set(keys)) == len(keys)
    again = refine.propose(cfg, {"optim.lr": 2e-3}, findings, 6, tried)  # nothing proposed twice
    assert not {refine._key(cfg, c.overrides) for c in again} & set(keys)
    # The base config's own values are the base: {"optim.lr": cfg's lr} is not a new candidate.
    assert refine._key(cfg, {"optim.lr": cfg.optim.lr}) == refine._key(cfg, {})


def test_refine_runs_rounds_keeps_the_best_by_validation_and_resumes(model_dir, data_dir, tmp_path):
    cfg = tiny.tiny_config(model_dir, data_dir, **{"optim.lr": 1e-4, "train.eval_every": 4})
    cfg = config_lib.with_overrides(cfg, {"train.early_stop.metric": "loss", "train.early_stop.mode": "min"})
    workdir = str(tmp_path / "refine")
    state = refine.refine(cfg, workdir, rounds=2, population_size=3)
    rounds = state["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["candidates"][0]["workdir"].endswith("round_0")
    seen = [rounds[0]["best"]["value"]]
    for r in rounds[1:]:
        assert len(r["candidates"]) == 3 and r["done"]
        assert all(os.path.exists(os.path.join(c["workdir"], "summary.json")) for c in r["candidates"])
        values = [c["value"] for c in r["candidates"]]
        # Each candidate's value is its own best validation loss, as its member's summary says.
        for c in r["candidates"]:
            summary = json.load(open(os.path.join(c["workdir"], "summary.json")))
            assert c["value"] == pytest.approx(summary["best_val"]["loss"])
        # Kept: the round's best candidate when it beats everything before, else the previous best stays.
        if min(values) < min(seen):
            assert r["kept"] == values.index(min(values))
            assert r["best"]["overrides"] == r["candidates"][r["kept"]]["overrides"]
        else:
            assert r["kept"] is None
        seen += values
        assert r["best"]["value"] == pytest.approx(min(seen))
    best = state["best"]
    assert state["flags"] == " ".join(f"--config.{f}={v}" for f, v in best["overrides"].items()) or not best[
        "overrides"]
    assert set(state["final"]["test"]) >= {"accuracy", "loss"}  # the final solo run reads the test split
    report = open(os.path.join(workdir, refine.REPORT_FILE)).read()
    for r in (1, 2):
        assert f"## Round {r}" in report
        assert "Kept: " in report.split(f"## Round {r}")[1]
    assert os.path.exists(os.path.join(workdir, "round_1", "compare", "compare.md"))

    # A rerun finds every round done: nothing retrains, the same state comes back.
    before = json.load(open(os.path.join(workdir, refine.STATE_FILE)))
    again = refine.refine(cfg, workdir, rounds=2, population_size=3, final=False)
    assert again["rounds"] == before["rounds"]


def test_bad_arguments_are_one_clear_error(model_dir, data_dir, tmp_path):
    cfg = tiny.tiny_config(model_dir, data_dir)
    with pytest.raises(refine.RefineError, match="--rounds=0"):
        refine.refine(cfg, str(tmp_path), rounds=0)
    with pytest.raises(refine.RefineError, match="--population=0"):
        refine.refine(cfg, str(tmp_path), population_size=0)
