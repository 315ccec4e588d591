"""`--mode=refine`: adjust, observe, refine as one command.

Round 0 is the config's own run (or the run the workdir already holds). Each later round diagnoses the best run
so far (`ftjax.tune.diagnose`), proposes K candidates around it (first the diagnosis' remedies, then the moves
that also beat the last round's start combined with the kept one, then a local search over the hyperparameters
a population can vary: learning rate, epochs, batch size, weight decay, dropout, warmup, label smoothing, each
field's direction taken from what its earlier moves did), trains them as one population per batch size
(`ftjax.tune.population`), and keeps the best by the validation metric (never the test split; a tie within
TIE relative is not kept). Every round is a workdir, and refine.json records what was proposed before it
trains, so a rerun after an interruption resumes the round it was in with the same candidates.
WORKDIR/refine_report.md shows per round the findings, the candidates, their curves overlaid (the compare
report) and what was kept and why; at the end the best config is trained solo in WORKDIR/final (a normal run
dir: eval, export, diagnose work on it; round 0's run when nothing beat it) for its test metrics, and printed as a
ready flag line.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import logging

from ftjax import config as config_lib
from ftjax import fileio, trainer
from ftjax import workdir as workdir_lib
from ftjax.errors import UserError
from ftjax.reporting import compare
from ftjax.tune import diagnose, population

STATE_FILE, REPORT_FILE, FINAL_DIR = workdir_lib.REFINE_FILE, workdir_lib.REFINE_REPORT, workdir_lib.REFINE_FINAL_DIR
# Local moves: multiplicative steps of the learning rate, and the values tried for the other fields.
LR_FACTORS = (0.5, 2.0, 0.25, 4.0)
WEIGHT_DECAYS = (0.0, 0.01, 0.1)
DROPOUT_STEP = 0.1
EPOCH_FACTORS = (1.5, 0.5)
# A candidate within this relative distance of the best so far is a tie: not kept, and teaches no direction (an
# 80-example validation set cannot tell 1e-6 apart; seen in the reduced benchmark, where ties were kept).
TIE = 1e-3


class RefineError(UserError, ValueError):
    """A refine run cannot go on as asked (bad --rounds / --population, a metric the task has not)."""


@dataclasses.dataclass
class Candidate:
    """One member of a round: the overrides of the base config it runs with, and why it was proposed."""

    overrides: dict[str, Any]
    why: str
    workdir: str = ""
    value: float | None = None  # its best validation metric (None: failed or not trained yet)
    status: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _key(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> tuple:
    """What a candidate runs, as a hashable key: its overrides that change `cfg` (so {} and {lr: cfg's lr}
    are the same candidate)."""
    return tuple(sorted((k, repr(v)) for k, v in overrides.items() if config_lib.get_field(cfg, k) != v))


def local_moves(cfg: ml_collections.ConfigDict, effects: dict[str, list[Effect]] | None = None
                ) -> list[tuple[str, dict[str, Any]]]:
    """Single-field steps around `cfg` over the population's fields: (why, changes), taken in turn from each
    hyperparameter, so a round of a few candidates already moves each of them. `effects` (what earlier rounds'
    single-field moves did, `field_effects`) orders them: within a field the direction that last improved comes
    first and the one that last hurt comes last, and a field that last improved is taken first."""
    lr = float(cfg.optim.lr)
    by_field = [[(f"learning rate x{f:g}", {"optim.lr": lr * f}) for f in LR_FACTORS]]
    if not cfg.train.steps:
        epochs = float(cfg.train.epochs)
        by_field.append([(f"epochs x{f:g}", {"train.epochs": _round(epochs * f)}) for f in EPOCH_FACTORS])
    else:
        by_field.append([(f"steps x{f:g}", {"train.steps": max(1, int(cfg.train.steps * f))})
                         for f in EPOCH_FACTORS])
    # A larger batch (a smaller one may not divide over the data-parallel devices).
    by_field.append([("batch size x2", {"train.batch_size": 2 * int(cfg.train.batch_size)})])
    wd = float(cfg.optim.weight_decay)
    by_field.append([(f"weight decay {w:g}", {"optim.weight_decay": w}) for w in WEIGHT_DECAYS if w != wd])
    hidden = cfg.model.dropout.hidden
    rate = 0.1 if hidden is None else float(hidden)  # None: the checkpoint's (0.1 for BERT-style models)
    by_field.append([(f"hidden dropout {r:.2g}", {"model.dropout.hidden": _round(r)})
                     for r in (rate + DROPOUT_STEP, rate - DROPOUT_STEP)
                     if 0.0 <= r <= 0.5 and (hidden is None or abs(r - rate) > 1e-9)])
    warmup = cfg.optim.schedule.warmup
    if isinstance(warmup, float) and warmup < 1.0:
        by_field.append([(f"warmup {min(2 * warmup, 0.3) or 0.06:g} of the run",
                          {"optim.schedule.warmup": _round(min(2 * warmup, 0.3) or 0.06)})])
    if cfg.model.task == "classification" and not cfg.train.label_smoothing:
        by_field.append([("label smoothing 0.1", {"train.label_smoothing": 0.1})])
    if effects:
        def score(move: tuple[str, dict[str, Any]]) -> int:
            (field, to), = move[1].items()
            return _direction_score(effects.get(field, ()), _number(config_lib.get_field(cfg, field), field), to)

        by_field = [sorted(moves, key=lambda m: -score(m)) for moves in by_field if moves]
        by_field.sort(key=lambda moves: -max(map(score, moves)))  # stable: the default order among equals
    return [field[i] for i in range(max(map(len, by_field))) for field in by_field if i < len(field)]


@dataclasses.dataclass(frozen=True)
class Effect:
    """What one single-field move did in a round: `field` from `start` to `to`, and whether its validation
    metric beat the round's starting point (by more than `TIE`; a tie is neither)."""

    round: int
    field: str
    start: float
    to: float
    verdict: int  # +1 better, -1 worse (or failed), 0 a tie


def _number(value: Any, field: str) -> float:
    if value is None and field == "model.dropout.hidden":
        return 0.1  # the checkpoint's rate (BERT-style models); as local_moves reads it
    return float(value)


def _direction_score(effects: Sequence[Effect], start: float, to: float) -> int:
    """+1 if the last effect on the field moved the same way as start -> to and helped, or the other way and
    hurt; -1 the reverse; 0 nothing known."""
    if not effects or to == start:
        return 0
    last = effects[-1]
    same_way = (to > start) == (last.to > last.start)
    return last.verdict if same_way else -last.verdict


def _moved(cfg: ml_collections.ConfigDict, start: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The fields `overrides` sets to other values than `start` (overrides of `cfg`) has."""
    return {f: v for f, v in overrides.items() if start.get(f, config_lib.get_field(cfg, f)) != v}


def _verdict(value: float | None, base: float | None, mode: str) -> int:
    if value is None or not math.isfinite(value):
        return -1
    if base is None or not math.isfinite(base):
        return 1
    gain = (base - value if mode == "min" else value - base) / max(abs(base), 1e-12)
    return 0 if abs(gain) <= TIE else (1 if gain > 0 else -1)


def field_effects(cfg: ml_collections.ConfigDict, rounds: list[dict], mode: str) -> dict[str, list[Effect]]:
    """Per field, what the done rounds' single-field candidates did against their round's starting point
    (oldest first). A candidate that moved several fields (a remedy, a combination) teaches nothing per field."""
    out: dict[str, list[Effect]] = {}
    for prev, entry in zip(rounds, rounds[1:]):
        if not entry.get("done"):
            continue
        base = prev["best"]
        for c in entry["candidates"]:
            moved = _moved(cfg, base["overrides"], c["overrides"])
            if len(moved) != 1:
                continue
            (field, to), = moved.items()
            start = base["overrides"].get(field, config_lib.get_field(cfg, field))
            try:
                effect = Effect(entry["round"], field, _number(start, field), _number(to, field),
                                _verdict(c["value"], base["value"], mode))
            except (TypeError, ValueError):  # a non-numeric field (a schedule type, a freeze pattern)
                continue
            out.setdefault(field, []).append(effect)
    return out


def improvers(cfg: ml_collections.ConfigDict, rounds: list[dict], mode: str) -> list[tuple[str, dict[str, Any]]]:
    """The last done round's candidates that beat its starting point but were not kept, best first, as
    (why, the fields they moved from that point): moves worth combining with the kept one. One that moved a
    field the kept one moved is left out (on that field the kept value won)."""
    if len(rounds) < 2 or not rounds[-1].get("done") or rounds[-1].get("kept") is None:
        return []
    entry, start = rounds[-1], rounds[-2]["best"]["overrides"]

    def moved(overrides: dict[str, Any]) -> dict[str, Any]:
        return _moved(cfg, start, overrides)

    kept = set(moved(entry["best"]["overrides"]))
    better = [(c["value"], k, c) for k, c in enumerate(entry["candidates"])
              if k != entry["kept"] and _verdict(c["value"], rounds[-2]["best"]["value"], mode) > 0]
    return [(f"round {entry['round']} candidate {k} ({c['why']}) also beat that round's start", moved(c["overrides"]))
            for _, k, c in sorted(better, key=lambda t: (_rank(t[0], mode), t[1]))
            if not set(moved(c["overrides"])) & kept]


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def propose(cfg: ml_collections.ConfigDict, best: dict[str, Any], findings: list[dict], k: int,
            tried: set[tuple], history: list[dict] | None = None, mode: str = "min") -> list[Candidate]:
    """K candidates around the best so far (`best`: its overrides of `cfg`), none tried before: the diagnosis'
    remedies first (the population's fields of each; a remedy wholly outside them is left to a solo run and
    noted), then the moves that also beat the last round's start combined with the kept one, then the local
    moves (ordered by what earlier rounds' moves did, `history`: refine.json's rounds), then pairs of them."""
    base = config_lib.with_overrides(cfg, best)
    out: list[Candidate] = []

    def add(changes: dict[str, Any], why: str) -> None:
        overrides = {**best, **changes}
        key = _key(cfg, overrides)
        if len(out) < k and key not in tried and changes:
            tried.add(key)
            out.append(Candidate(overrides, why))

    for f in findings:
        for remedy in f["remedies"]:
            changes = {field: c["to"] for field, c in remedy["changes"].items()}
            allowed = {fl: v for fl, v in changes.items() if fl in population.POPULATION_FIELDS}
            left = sorted(set(changes) - set(allowed))
            note = f" (without {', '.join(left)}: not a population field)" if left else ""
            add(allowed, f"diagnosis {f['kind']}: {remedy['why']}{note}")
    history = history or []
    for why, changes in improvers(cfg, history, mode):
        add(changes, f"combine: {why}")
    moves = local_moves(base, field_effects(cfg, history, mode) if history else None)
    for why, changes in moves:
        add(changes, f"local: {why}")
    for i, (why_a, a) in enumerate(moves):
        for why_b, b in moves[i + 1:]:
            if not set(a) & set(b):
                add({**a, **b}, f"local: {why_a} and {why_b}")
    return out


# ---------------------------------------------------------------------------------------------------- rounds


def _metric(cfg: ml_collections.ConfigDict) -> tuple[str, str]:
    return str(cfg.train.early_stop.metric), str(cfg.train.early_stop.mode)


def _summary_value(summary: dict, metric: str) -> float | None:
    value = (summary.get("best_val") or {}).get(metric)
    if value is None:
        value = (summary.get("val") or {}).get(metric)
    return None if value is None else float(value)


def _holds_run(workdir: str) -> bool:
    folder = fileio.path(workdir)
    return (folder / workdir_lib.RUN_FILE).exists() and (folder / workdir_lib.SUMMARY_FILE).exists()


def _round_zero(cfg: ml_collections.ConfigDict, workdir: str, metric: str) -> dict[str, Any]:
    """Round 0: the run `workdir` already holds, or the config trained in WORKDIR/round_0."""
    if _holds_run(workdir):
        start = Candidate({}, "the run already in the workdir", workdir)
    else:
        start = Candidate({}, "the config as given", str(fileio.path(workdir) / workdir_lib.REFINE_ROUND_DIR.format(0)))
        logging.info("refine: round 0 trains the config in %s", start.workdir)
        trainer.train(cfg, start.workdir)
    summary = fileio.read_json(fileio.path(start.workdir) / workdir_lib.SUMMARY_FILE)
    start.value, start.status = _summary_value(summary, metric), "complete"
    if start.value is None:
        raise RefineError(f"train.early_stop.metric={metric!r} is not among the run's validation metrics "
                          f"{sorted(summary.get('val', {}))}: set it to one of them")
    return {"round": 0, "findings": [], "candidates": [start.to_json()], "kept": 0,
            "best": {"overrides": {}, "value": start.value, "workdir": start.workdir}, "why": "the starting point"}


def _new_round(cfg: ml_collections.ConfigDict, workdir: str, state: dict, k: int,
               tried: set[tuple]) -> dict[str, Any] | None:
    """The next round's entry, proposed from the diagnosis of the best run so far and what the rounds before
    it showed (None: nothing left to try)."""
    r, best = len(state["rounds"]), state["rounds"][-1]["best"]
    found = diagnose.diagnose(best["workdir"])
    cands = propose(cfg, best["overrides"], found["findings"], k, tried, state["rounds"], state["mode"])
    if not cands:
        return None
    round_dir = fileio.path(workdir) / workdir_lib.REFINE_ROUND_DIR.format(r)
    for i, c in enumerate(cands):
        c.workdir = str(round_dir / workdir_lib.REFINE_MEMBER_DIR.format(i))
    return {"round": r, "findings": [{"kind": f["kind"], "title": f["title"]} for f in found["findings"]],
            "candidates": [c.to_json() for c in cands], "done": False}


def _batch_groups(cfgs: list[ml_collections.ConfigDict]) -> dict[int, list[int]]:
    """The round's candidates by batch size: each size trains as its own population, since one population pads
    every member's batch to its largest: one batch x2 candidate would make every member of the round step twice
    the rows. Another compile per size costs less than that."""
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(cfgs):
        groups.setdefault(int(c.train.batch_size), []).append(i)
    return groups


def _train_round(cfg: ml_collections.ConfigDict, workdir: str, entry: dict, best: dict, metric: str,
                 mode: str) -> bool:
    """Trains round `entry`'s candidates as one population and records what it keeps; False if interrupted."""
    cands = [Candidate(**c) for c in entry["candidates"]]
    cfgs = [config_lib.with_overrides(cfg, c.overrides) for c in cands]
    round_dir = fileio.path(workdir) / workdir_lib.REFINE_ROUND_DIR.format(entry["round"])
    groups = _batch_groups(cfgs)
    for batch, members in groups.items():
        pop_dir = round_dir if len(groups) == 1 else round_dir / f"batch_{batch}"
        done = [fileio.path(cands[i].workdir) / workdir_lib.SUMMARY_FILE for i in members]
        if all(p.exists() for p in done):  # trained before an interruption in a later group
            summaries = [fileio.read_json(p) for p in done]
        else:
            logging.info("refine: round %d trains %d candidates (batch %d) as one population", entry["round"],
                         len(members), batch)
            summaries = population.train_population(
                [cfgs[i] for i in members], str(pop_dir), [cands[i].workdir for i in members],
                metric=metric, mode=mode)
            if "interrupted_at" in summaries[0]:
                return False
        for i, s in zip(members, summaries):
            cands[i].status = s["status"]
            cands[i].value = _summary_value(s, metric) if s["status"] != "failed" else None
    top = min(range(len(cands)), key=lambda i: _rank(cands[i].value, mode))
    entry["candidates"] = [c.to_json() for c in cands]
    entry["kept"] = top if _verdict(cands[top].value, best["value"], mode) > 0 else None
    if entry["kept"] is not None:
        c = cands[top]
        entry["best"] = {"overrides": c.overrides, "value": c.value, "workdir": c.workdir}
        entry["why"] = (f"candidate {top} ({c.why}) has the best validation {metric} of the round, "
                        f"{c.value:.4g}, better than the best so far {best['value']:.4g}")
    else:
        entry["best"] = best
        entry["why"] = (f"no candidate beat the best so far ({metric} {best['value']:.4g}; the round's best "
                        f"{_fmt(cands[top].value)}, a tie within {TIE:g} relative counts as none): it stays")
    entry["done"] = True
    return True


def eval_cadence(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The eval cadence refine's runs take instead of the config's: {} to keep it, or four evaluations per run
    when it evaluates once per epoch over fewer than diagnose.MIN_EVALS epochs (one eval shows no trend, so the
    diagnosis could never see under- or over-training; an eval changes nothing in training)."""
    t = cfg.train
    if t.eval_every == 0 and not t.steps and t.epochs < diagnose.MIN_EVALS:
        return {"train.eval_every": 1 / (diagnose.MIN_EVALS + 1)}
    return {}


def refine(cfg: ml_collections.ConfigDict, workdir: str, *, rounds: int = 3, population_size: int = 8,
           final: bool = True) -> dict[str, Any]:
    """Runs (or resumes) the refine loop in `workdir`; returns refine.json's content."""
    if rounds < 1:
        raise RefineError(f"--rounds={rounds}: need >= 1 round after the first run")
    if population_size < 1:
        raise RefineError(f"--population={population_size}: need >= 1 candidate per round")
    config_lib.validate(cfg)
    cadence = eval_cadence(cfg)
    cfg = config_lib.with_overrides(cfg, cadence)
    metric, mode = _metric(cfg)
    folder = fileio.path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / STATE_FILE
    state = fileio.read_json(state_path) if state_path.exists() else {"metric": metric, "mode": mode, "rounds": []}

    def save() -> None:
        fileio.write_json(state_path, state)
        write_report(state, workdir)

    if not state["rounds"]:
        state["eval_cadence"] = cadence
        state["rounds"].append(_round_zero(cfg, workdir, metric))
        save()
    tried = {_key(cfg, c["overrides"]) for r in state["rounds"] for c in r["candidates"]}
    for r in range(1, rounds + 1):
        if r < len(state["rounds"]) and state["rounds"][r].get("done"):
            continue
        best = state["rounds"][r - 1]["best"]
        if r == len(state["rounds"]):  # a new round: recorded before it trains, so a rerun resumes it
            entry = _new_round(cfg, workdir, state, population_size, tried)
            if entry is None:
                logging.info("refine: nothing left to try around the best; stopping after round %d", r - 1)
                break
            state["rounds"].append(entry)
            save()
        if not _train_round(cfg, workdir, state["rounds"][r], best, metric, mode):
            return state
        save()

    best = [r for r in state["rounds"] if "best" in r][-1]["best"]
    state["best"] = best
    state["flags"] = " ".join(f"--config.{f}={diagnose.flag_value(v)}" for f, v in best["overrides"].items())
    if final:
        if best["workdir"] == state["rounds"][0]["best"]["workdir"]:
            # Nothing beat the start: its solo run is the final one (training its config again gives the same).
            final_dir = best["workdir"]
            summary = fileio.read_json(fileio.path(final_dir) / workdir_lib.SUMMARY_FILE)
        else:
            final_dir = str(folder / FINAL_DIR)
            summary = trainer.train(config_lib.with_overrides(cfg, best["overrides"]), final_dir)
        state["final"] = {"workdir": final_dir, "val": summary.get("val"), "test": summary.get("test")}
    save()
    return state


def _rank(value: float | None, mode: str) -> float:
    if value is None or not math.isfinite(value):
        return math.inf
    return value if mode == "min" else -value


def _fmt(value: Any) -> str:
    return "failed" if value is None else f"{value:.4g}"


# ---------------------------------------------------------------------------------------------------- report


def write_report(state: dict, workdir: str) -> str:
    """WORKDIR/refine_report.md (and each round's compare report of its candidates' curves)."""
    folder = fileio.path(workdir)
    metric, mode = state["metric"], state["mode"]
    lines = [f"# Refine: {workdir}", "",
             f"Validation {metric} ({'lower' if mode == 'min' else 'higher'} is better) decides; the test split "
             "is read only by the final run.", ""]
    if state.get("eval_cadence"):
        lines += ["Every run here evaluates " + ", ".join(f"{f}={v:g}" for f, v in state["eval_cadence"].items())
                  + " (the config's once per epoch would give the diagnosis no curve to read).", ""]
    for entry in state["rounds"]:
        r = entry["round"]
        lines += [f"## Round {r}", ""]
        if entry["findings"]:
            lines += ["Diagnosis of the best run so far:", ""]
            lines += [f"- {f['kind'].replace('_', ' ')}: {f['title']}" for f in entry["findings"]]
            lines.append("")
        elif r:
            lines += ["Diagnosis of the best run so far: no findings (the candidates are a local search).", ""]
        lines += ["| # | candidate | overrides | status | val " + metric + " |", "|---|---|---|---|---|"]
        for k, c in enumerate(entry["candidates"]):
            mark = " **kept**" if entry.get("kept") == k else ""
            flags = ", ".join(f"{f}={diagnose.flag_value(v)}" for f, v in c["overrides"].items()) or "(base)"
            lines.append(f"| {k}{mark} | {c['why']} | {flags} | {c['status'] or 'pending'} | {_fmt(c['value'])} |")
        lines.append("")
        done = [c["workdir"] for c in entry["candidates"] if c["status"] and c["value"] is not None]
        if r and len(done) > 1:
            try:
                report = compare.write_compare(done, folder / workdir_lib.REFINE_ROUND_DIR.format(r) / "compare")
                lines += [f"Curves overlaid: [{os.path.relpath(report, folder)}]"
                          f"({os.path.relpath(report, folder)})", ""]
            except (UserError, OSError) as e:  # a report is no reason to stop the loop
                lines += [f"(no compare report: {e})", ""]
        if entry.get("why"):
            lines += [f"Kept: {entry['why']}.", ""]
    if "flags" in state:
        lines += ["## Result", "", f"Best validation {metric}: {state['best']['value']:.4g} "
                  f"({state['best']['workdir']}).", "", "Flags on top of the config:", "", "```",
                  state["flags"] or "(none: the config as given was best)", "```", ""]
    if "final" in state:
        test = state["final"].get("test")
        lines += [f"Final run {state['final']['workdir']}: val "
                  + ", ".join(f"{k} {v:.4g}" for k, v in (state["final"].get("val") or {}).items()
                              if isinstance(v, float))
                  + ("; test " + ", ".join(f"{k} {v:.4g}" for k, v in test.items() if isinstance(v, float))
                     if test else "; no test split"), ""]
    path = folder / REPORT_FILE
    fileio.write_text(path, "\n".join(lines) + "\n")
    return str(path)
