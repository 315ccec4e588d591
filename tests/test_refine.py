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


def _round(n: int, start: dict, cands: list[tuple[str, dict, float]], kept: int | None) -> dict:
    entry = {"round": n, "findings": [], "done": True, "kept": kept,
             "candidates": [{"overrides": o, "why": why, "workdir": f"r{n}/m{i}", "value": v, "status": "complete"}
                            for i, (why, o, v) in enumerate(cands)]}
    entry["best"] = start if kept is None else {"overrides": cands[kept][1], "value": cands[kept][2],
                                                  "workdir": f"r{n}/m{kept}"}
    return entry


def test_later_rounds_follow_what_earlier_moves_did(model_dir, data_dir):
    """Round 1 showed: LR x2 helped most (kept), epochs x1.5 helped too, batch x2 hurt, weight decay 0 tied. Round 2
    combines epochs x1.5 with the kept LR, goes on up in LR and epochs, and takes batch x2 last."""
    cfg = tiny.tiny_config(model_dir, data_dir)
    lr, epochs = cfg.optim.lr, cfg.train.epochs
    start = {"overrides": {}, "value": 0.60, "workdir": "r0"}
    r0 = {"round": 0, "findings": [], "kept": 0, "best": start,
          "candidates": [{"overrides": {}, "why": "the config", "workdir": "r0", "value": 0.60, "status": "complete"}]}
    r1 = _round(1, start, [("lr x0.5", {"optim.lr": lr * 0.5}, 0.65),
                           ("epochs x1.5", {"train.epochs": epochs * 1.5}, 0.55),
                           ("batch x2", {"train.batch_size": 2 * cfg.train.batch_size}, 0.62),
                           ("wd 0", {"optim.weight_decay": 0.0}, 0.60 * (1 - refine.TIE / 2)),
                           ("lr x2", {"optim.lr": lr * 2}, 0.50)], kept=4)
    history = [r0, r1]
    effects = refine.field_effects(cfg, history, "min")
    assert [(e.field, e.verdict) for f in sorted(effects) for e in effects[f]] == [
        ("optim.lr", -1), ("optim.lr", 1), ("optim.weight_decay", 0), ("train.batch_size", -1),
        ("train.epochs", 1)]
    assert refine.improvers(cfg, history, "min") == [
        ("round 1 candidate 1 (epochs x1.5) also beat that round's start", {"train.epochs": epochs * 1.5})]

    tried = {refine._key(cfg, c["overrides"]) for r in history for c in r["candidates"]}
    cands = refine.propose(cfg, r1["best"]["overrides"], [], 20, tried, history, "min")
    whys = [c.why for c in cands]
    assert cands[0].overrides == {"optim.lr": lr * 2, "train.epochs": epochs * 1.5}
    assert whys[0].startswith("combine: round 1 candidate 1")
    # Fields that last helped come first (LR, epochs: upwards first), the one that hurt (batch x2) ends the first
    # pass; epochs x1.5 is the combination already, LR x0.5 and x0.25 around LR x2 were run before: not again.
    assert whys[1:11] == [
        "local: learning rate x2", "local: weight decay 0", "local: hidden dropout 0.2",
        "local: warmup 0.2 of the run", "local: label smoothing 0.1", "local: batch size x2",
        "local: learning rate x4", "local: epochs x0.5", "local: weight decay 0.1", "local: hidden dropout 0"]
    assert cands[1].overrides == {"optim.lr": lr * 4} and cands[7].overrides == {"optim.lr": lr * 8}
    # Without a history the order is the default one.
    plain = refine.propose(cfg, r1["best"]["overrides"], [], 3, set())
    assert [c.why for c in plain] == ["local: learning rate x0.5", "local: epochs x1.5", "local: batch size x2"]


def test_a_round_trains_one_population_per_batch_size(model_dir, data_dir):
    cfg = tiny.tiny_config(model_dir, data_dir)
    cfgs = [config_lib.with_overrides(cfg, o) for o in (
        {}, {"train.batch_size": 16}, {"optim.lr": 1e-3}, {"train.batch_size": 16, "optim.lr": 1e-3})]
    assert refine._batch_groups(cfgs) == {8: [0, 2], 16: [1, 3]}


def test_refine_runs_rounds_keeps_the_best_by_validation_and_resumes(model_dir, data_dir, tmp_path):
    cfg = tiny.tiny_config(model_dir, data_dir, **{"optim.lr": 1e-4, "train.eval_every": 4})
    cfg = config_lib.with_overrides(cfg, {"train.early_stop.metric": "loss", "train.early_stop.mode": "min"})
    workdir = str(tmp_path / "refine")
    state = refine.refine(cfg, workdir, rounds=2, population_size=3)
    rounds = state["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["candidates"][0]["workdir"].endswith("round_0")
    seen = [rounds[0]["best"]["value"]]  # the best so far after each round that kept one
    for r in rounds[1:]:
        assert len(r["candidates"]) == 3 and r["done"]
        assert all(os.path.exists(os.path.join(c["workdir"], "summary.json")) for c in r["candidates"])
        values = [c["value"] for c in r["candidates"]]
        # Each candidate's value is its own best validation loss, as its member's summary says.
        for c in r["candidates"]:
            summary = json.load(open(os.path.join(c["workdir"], "summary.json")))
            assert c["value"] == pytest.approx(summary["best_val"]["loss"])
        # Kept: the round's best candidate when it beats the best so far by more than a tie, else it stays.
        if min(values) < seen[-1] * (1 - refine.TIE):
            assert r["kept"] == values.index(min(values))
            assert r["best"]["overrides"] == r["candidates"][r["kept"]]["overrides"]
            seen.append(min(values))
        else:
            assert r["kept"] is None
        assert r["best"]["value"] == pytest.approx(seen[-1])
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


def test_when_nothing_beats_the_start_its_run_is_the_final_one(model_dir, data_dir, tmp_path, monkeypatch):
    cfg = tiny.tiny_config(model_dir, data_dir, **{"train.eval_every": 4})
    monkeypatch.setattr(refine, "propose", lambda *args, **kwargs: [])  # no candidate: round 0 stays the best
    workdir = str(tmp_path / "refine")
    state = refine.refine(cfg, workdir, rounds=2, population_size=2)
    assert len(state["rounds"]) == 1 and state["best"]["overrides"] == {}
    assert state["final"]["workdir"] == state["rounds"][0]["best"]["workdir"]  # not trained a second time
    assert not os.path.exists(os.path.join(workdir, refine.FINAL_DIR))
    assert set(state["final"]["test"]) >= {"accuracy", "loss"}


def test_bad_arguments_are_one_clear_error(model_dir, data_dir, tmp_path):
    cfg = tiny.tiny_config(model_dir, data_dir)
    with pytest.raises(refine.RefineError, match="--rounds=0"):
        refine.refine(cfg, str(tmp_path), rounds=0)
    with pytest.raises(refine.RefineError, match="--population=0"):
        refine.refine(cfg, str(tmp_path), population_size=0)


def test_runs_too_short_for_a_curve_evaluate_four_times(model_dir, data_dir):
    """A config that evaluates once per epoch over fewer than three epochs gives the diagnosis one or two points:
    refine's runs evaluate four times instead (a quarter of the run); any other cadence is the user's and stays."""
    cfg = tiny.tiny_config(model_dir, data_dir, **{"train.epochs": 1.0, "train.eval_every": 0})
    assert refine.eval_cadence(cfg) == {"train.eval_every": 0.25}
    config_lib.validate(config_lib.with_overrides(cfg, refine.eval_cadence(cfg)))
    for kept in ({"train.epochs": 3.0}, {"train.eval_every": 4}, {"train.steps": 10}):
        assert refine.eval_cadence(config_lib.with_overrides(cfg, kept)) == {}


def test_an_interrupted_round_resumes_at_the_batch_size_it_was_in(model_dir, data_dir, tmp_path, monkeypatch):
    """A round with two batch sizes trains two populations; interrupted in the second, a rerun reads the first's
    summaries and trains only the second (the populations here only write what the real one writes)."""
    cfg = tiny.tiny_config(model_dir, data_dir)
    calls = []

    def train_population(cfgs, pop_dir, member_dirs, metric, mode):
        calls.append((os.path.basename(pop_dir), [c.train.batch_size for c in cfgs]))
        if len(calls) == 2:
            return [{"interrupted_at": 3} for _ in cfgs]
        summaries = [{"status": "complete", "best_val": {"loss": 1.0 / c.train.batch_size + c.optim.lr}} for c in cfgs]
        for d, s in zip(member_dirs, summaries):
            os.makedirs(d, exist_ok=True)
            json.dump(s, open(os.path.join(d, "summary.json"), "w"))
        return summaries

    monkeypatch.setattr(population, "train_population", train_population)
    overrides = [{"optim.lr": 1e-3}, {"train.batch_size": 16}, {"optim.lr": 2e-3}]
    entry = {"round": 1, "findings": [], "done": False, "candidates": [
        refine.Candidate(o, "why", str(tmp_path / "round_1" / f"member_{i}")).to_json()
        for i, o in enumerate(overrides)]}
    best = {"overrides": {}, "value": 1.0, "workdir": "r0"}
    assert not refine._train_round(cfg, str(tmp_path), entry, best, "loss", "min")
    assert calls == [("batch_8", [8, 8]), ("batch_16", [16])]
    assert refine._train_round(cfg, str(tmp_path), entry, best, "loss", "min")
    assert calls[2:] == [("batch_16", [16])]
    values = [c["value"] for c in entry["candidates"]]
    assert values == pytest.approx([1 / 8 + 1e-3, 1 / 16 + cfg.optim.lr, 1 / 8 + 2e-3])
    assert entry["kept"] == 1 and entry["best"]["overrides"] == {"train.batch_size": 16}
