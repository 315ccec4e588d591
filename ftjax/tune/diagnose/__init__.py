"""`--mode=diagnose`: reads what a run wrote (finished, interrupted or failed; local or gs://) and says what
went wrong and which hyperparameters to change, each finding with its evidence, a plot and ready flag lines.
It only reads the workdir: no devices, no model, no data.

The rules live in `training` (how the curves went) and `data` (labels and splits); `evidence` holds what they
share. Each rule reports only beyond its thresholds, so a healthy run gets no finding."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ftjax import fileio
from ftjax import workdir as workdir_lib
from ftjax.tune.diagnose import data, training
from ftjax.tune.diagnose.data import EVAL_SE_MAX, EVAL_Z, accuracy_se, constant_guess
from ftjax.tune.diagnose.evidence import (
    MIN_EVALS,
    DiagnoseError,
    Finding,
    Remedy,
    RunFiles,
    flag_value,
    read_run_files,
)
from ftjax.tune.diagnose.training import spikes

__all__ = ["EVAL_SE_MAX", "EVAL_Z", "MIN_EVALS", "RULES", "THRESHOLDS", "DiagnoseError", "Finding", "Remedy",
           "RunFiles", "accuracy_se", "constant_guess", "diagnose", "flag_value", "markdown", "read_run_files",
           "spikes", "summary_lines"]

RULES: dict[str, Callable[[RunFiles], Finding | str]] = {
    "overfitting": training.check_overfitting, "under_training": training.check_under_training,
    "instability": training.check_instability, "lr_vs_range_test": training.check_lr,
    "forgetting": training.check_forgetting, "label_imbalance": data.check_label_imbalance,
    "label_prior": data.check_label_prior, "truncation": data.check_truncation,
    "small_eval_set": data.check_eval_size,
}
THRESHOLDS = {"MIN_EVALS": MIN_EVALS, **training.THRESHOLDS, **data.THRESHOLDS}


def diagnose(workdir: fileio.PathLike) -> dict[str, Any]:
    """Runs every rule on the run in `workdir`; writes WORKDIR/diagnosis.md, diagnosis.json and a PNG per
    finding under WORKDIR/plots/; returns what diagnosis.json holds."""
    files = read_run_files(workdir)
    findings, checks = [], {}
    for kind, rule in RULES.items():
        outcome = rule(files)
        if isinstance(outcome, Finding):
            findings.append(outcome)
            checks[kind] = "finding"
        else:
            checks[kind] = outcome
    result = {"workdir": str(files.workdir), "status": files.status, "last_step": files.last_step,
              "planned_steps": files.planned_steps, "config_found": files.has_config,
              "findings": [f.to_json() for f in findings], "checks": checks, "thresholds": THRESHOLDS}
    fileio.write_json(files.workdir / workdir_lib.DIAGNOSIS_JSON, result)
    fileio.write_text(files.workdir / workdir_lib.DIAGNOSIS_FILE, markdown(result))
    return result


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "; ".join(_fmt(v) for v in value) or "none"
    return str(value)


def markdown(result: dict[str, Any]) -> str:
    findings = result["findings"]
    lines = [f"# Diagnosis of {result['workdir']}", "",
             f"Run {result['status']} at step {result['last_step']}"
             + (f" of {result['planned_steps']}" if result["planned_steps"] else "") + "."
             + ("" if result["config_found"] else " No run.json: flags below start from today's defaults."), ""]
    if not findings:
        lines += ["No problems found: every check below is within its threshold or could not run.", ""]
    for n, f in enumerate(findings, 1):
        lines += [f"## {n}. {f['kind'].replace('_', ' ')}: {f['title']}", "", "Evidence:", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in f["evidence"].items()]
        lines += ["", f"![{f['kind']}]({f['plot']})", "", "What to change (one line per option):", ""]
        for r in f["remedies"]:
            moves = ", ".join(f"{k} {_fmt(c['from'])} -> {_fmt(c['to'])}" for k, c in r["changes"].items())
            lines += [f"- {r['why']} ({moves}):", "", "  ```", f"  {r['flags']}", "  ```"]
        lines.append("")
    lines += ["## Checks", "", "| check | result |", "|---|---|"]
    lines += [f"| {kind} | {outcome} |" for kind, outcome in result["checks"].items()]
    return "\n".join(lines) + "\n"


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The short printout of --mode=diagnose."""
    findings = result["findings"]
    head = f"{result['workdir']}: run {result['status']} at step {result['last_step']}; "
    if not findings:
        return [head + "no problems found"]
    lines = [head + f"{len(findings)} finding(s):"]
    for f in findings:
        lines.append(f"  {f['kind']}: {f['title']}")
        if f["remedies"]:
            lines.append(f"    try: {f['remedies'][0]['flags']}")
    return lines
