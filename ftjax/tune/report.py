"""What a sweep tells its user: the progress line, WORKDIR/sweep_report.md with the best trial's
ready-to-run command, the trial table, hyperparameter importances and plots.

Optuna and matplotlib are the `sweep` extra, so they are imported inside the functions that use them.
"""

from __future__ import annotations

import os
import shlex
import time
from typing import Any

import numpy as np

from ftjax.reporting import compare
from ftjax.tune.space import Choice, Dim, SweepSpec
from ftjax.tune.study import counts, storage_url

REPORT = "sweep_report.md"
COMPARE_TOP_K = 5  # the best trials compared run by run in WORKDIR/compare/compare.md


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def progress_line(study, spec: SweepSpec, t_start: float, ran: int) -> str:
    """One line after each trial: done/running, the last and the best trial, and this worker's ETA."""
    import optuna

    done, running = counts(study)
    S = optuna.trial.TrialState
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    last = max(finished, key=lambda t: t.datetime_complete or 0, default=None)
    line = f"sweep: {done}/{spec.n_trials} trials done, {running} running"
    if last is not None:
        value = f"{spec.metric}={last.value:.4f}" if last.value is not None else ""
        line += f" | last: trial {last.number} {last.state.name.lower()} {value}"
    complete = [t for t in finished if t.state == S.COMPLETE]
    if complete:
        best = study.best_trial
        line += f" | best: trial {best.number} {spec.metric}={best.value:.4f}"
    elapsed = time.time() - t_start
    if ran:
        eta = elapsed / ran * max(spec.n_trials - done, 0)
        line += f" | elapsed {elapsed / 60:.1f} min, ETA ~{eta / 60:.1f} min (this worker)"
    return line


def _flag_value(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    return shlex.quote(str(v))


def best_command(study, spec: SweepSpec, workdir: str, command: list[str] | None) -> str:
    """`python -m ftjax.main --mode=train ...` with the best trial's values as --config.FIELD flags."""
    best = study.best_trial
    base = [a for a in (command or ["--config=CONFIG.py"])
            if not any(a.startswith(f"--config.{f}=") for f in best.params)]
    flags = [f"--config.{f}={_flag_value(v)}" for f, v in best.params.items()]
    return " ".join(["python -m ftjax.main --mode=train", *base, *flags,
                     f"--workdir={os.path.join(workdir, 'best')}"])


def _trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        last_step = max(t.intermediate_values, default=None)
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
                     "last_step": last_step, "retry_of": t.user_attrs.get("retry_of"),
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                     if t.datetime_complete and t.datetime_start else None,
                     "error": t.user_attrs.get("error")})
    return rows


def importances(study) -> tuple[dict[str, float], str]:
    """Optuna's fANOVA importances (PED-ANOVA when scikit-learn is absent); ({}, reason) when impossible."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return {}, "needs at least 2 completed trials"
    try:
        import sklearn  # noqa: F401

        evaluator, name = optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
    except ImportError:
        evaluator, name = optuna.importance.PedAnovaImportanceEvaluator(), "PED-ANOVA"
    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), name
    except Exception as e:  # noqa: BLE001 - e.g. a parameter that never varied
        return {}, f"not computable ({type(e).__name__}: {e})"


def _summary_lines(study, spec: SweepSpec, workdir: str, rows: list[dict], command: list[str] | None) -> list:
    """The objective, the trial counts and the best trial with its command."""
    lines = [f"# Sweep report: {spec.study_name}", "",
             (f"Objective: {spec.mode}imise validation `{spec.metric}` (of each trial's best checkpoint); "
              f"sampler {spec.sampler}, pruner {spec.pruner}, population {spec.population or 'off'}; "
              f"storage `{storage_url(spec, workdir).split('@')[-1]}`."), ""]
    n_state = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running", "waiting")}
    lines += ["Trials: " + ", ".join(f"{n} {s}" for s, n in n_state.items() if n), ""]
    if n_state["complete"]:
        best = study.best_trial
        lines += ["## Best", "", f"Trial {best.number}: {spec.metric} = {best.value:.6g}", "",
                  "```", best_command(study, spec, workdir, command), "```", ""]
    return lines


def _trial_table(spec: SweepSpec, rows: list[dict]) -> list[str]:
    fields = list(spec.space)
    lines = ["## Trials", "", "| trial | state | " + " | ".join(fields) + f" | {spec.metric} | at step | seconds |",
             "|---" * (len(fields) + 5) + "|"]
    for r in rows:
        params = " | ".join(_fmt(r["params"].get(f, "")) for f in fields)
        value = f"{r['value']:.5g}" if r["value"] is not None else "-"
        state = r["state"] + (f" (retry of {r['retry_of']})" if r["retry_of"] is not None else "")
        secs = f"{r['seconds']:.0f}" if r["seconds"] is not None else "-"
        lines.append(f"| {r['number']} | {state} | {params} | {value} | {r['last_step'] or '-'} | {secs} |")
    errors = [r for r in rows if r["error"]]
    if errors:
        lines += ["", "Errors:", *[f"- trial {r['number']}: {r['error']}" for r in errors]]
    return lines


def _analysis_lines(study, spec: SweepSpec, workdir: str) -> list[str]:
    """Importances and the plots (written next to the report)."""
    imp, how = importances(study)
    lines = ["", "## Hyperparameter importance", ""]
    if imp:
        lines += [f"({how})", "", *[f"- `{f}`: {v:.3f}" for f, v in imp.items()]]
    else:
        lines.append(f"Not shown: {how}.")
    written = write_plots(study, spec, workdir, imp)
    return lines + ["", "## Plots", "", *[f"![{name}]({name})" for name in written]] + _compare_lines(
        study, spec, workdir)


def _compare_lines(study, spec: SweepSpec, workdir: str) -> list[str]:
    """Writes the comparison of the top trials' runs (WORKDIR/compare/compare.md) and links it."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    top = sorted(done, key=lambda t: t.value, reverse=spec.mode == "max")[:COMPARE_TOP_K]
    dirs = [t.user_attrs.get("workdir") or os.path.join(workdir, f"trial_{t.number}") for t in top]
    dirs = [d for d in dirs if os.path.isdir(d)]
    if len(dirs) < 2:
        return []
    title = f"## Comparison of the top {len(dirs)} trials"
    try:
        path = compare.write_compare(dirs, os.path.join(workdir, "compare"))
    except compare.CompareError as e:
        return ["", title, "", f"Not written: {e}"]
    rel = os.path.relpath(path, workdir)
    return ["", title, "", f"Config differences, final numbers and overlaid curves: [{rel}]({rel})"]


def write_report(study, spec: SweepSpec, workdir: str, *, command: list[str] | None = None,
                 plots: bool = True) -> str:
    """Writes WORKDIR/sweep_report.md (and its PNGs when `plots`); returns the markdown path."""
    rows = _trial_rows(study)
    lines = _summary_lines(study, spec, workdir, rows, command) + _trial_table(spec, rows)
    if plots:
        lines += _analysis_lines(study, spec, workdir)
    path = os.path.join(workdir, REPORT)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg backend). Each takes the completed trials and returns a figure.


def _axis_values(dim: Dim, values: list) -> tuple[np.ndarray, list | None]:
    """Numeric plot positions (log10 for log ranges, index for choices) and tick labels for choices."""
    if isinstance(dim, Choice):
        labels = [str(v) for v in dim.values]
        return np.array([labels.index(str(v)) for v in values], float), labels
    arr = np.asarray(values, float)
    return (np.log10(arr) if dim.log else arr), None


def _plot_metric_vs_params(plt, trials: list, spec: SweepSpec):
    """The metric against each hyperparameter."""
    fields, values = list(spec.space), [t.value for t in trials]
    fig, axes = plt.subplots(1, len(fields), figsize=(3.6 * len(fields), 3.2), squeeze=False)
    for ax, f in zip(axes[0], fields):
        dim = spec.space[f]
        x, labels = _axis_values(dim, [t.params[f] for t in trials])
        ax.scatter(x, values, c="tab:blue")
        if labels:
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize="small")
        ax.set_xlabel(f + (" (log10)" if getattr(dim, "log", False) else ""))
        ax.set_ylabel(spec.metric)
    return fig


def _plot_parallel_coordinates(plt, trials: list, spec: SweepSpec):
    """Each axis scaled to [0, 1]; lines coloured by the metric."""
    fields, values = list(spec.space), np.array([t.value for t in trials])
    cols = []
    for f in fields:
        x, _ = _axis_values(spec.space[f], [t.params[f] for t in trials])
        lo, hi = float(np.min(x)), float(np.max(x))
        cols.append((x - lo) / (hi - lo) if hi > lo else np.full_like(x, 0.5))
    lo, hi = float(values.min()), float(values.max())
    cols.append((values - lo) / (hi - lo) if hi > lo else np.full_like(values, 0.5))
    n = len(fields)
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * (n + 1)), 4))
    cmap = plt.get_cmap("viridis" if spec.mode == "max" else "viridis_r")
    for row, v in zip(np.stack(cols, 1), values):
        ax.plot(range(n + 1), row, color=cmap((v - lo) / (hi - lo) if hi > lo else 0.5), alpha=0.8)
    ax.set_xticks(range(n + 1), fields + [spec.metric], rotation=20, fontsize="small")
    ax.set_yticks([])
    ax.set_title("parallel coordinates (each axis min..max; colour: metric, bright = better)")
    return fig


def _plot_importance(plt, imp: dict[str, float]):
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(imp)))
    names = list(imp)[::-1]
    ax.barh(names, [imp[k] for k in names])
    ax.set_xlabel("importance")
    return fig


def _plot_learning_curves(plt, trials: list, spec: SweepSpec):
    """The metric at each eval of the top 5 trials."""
    top = sorted(trials, key=lambda t: t.value, reverse=spec.mode == "max")[:5]
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in top:
        steps = sorted(t.intermediate_values)
        if steps:
            ax.plot(steps, [t.intermediate_values[s] for s in steps], marker="o", label=f"trial {t.number}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"val {spec.metric}")
    ax.set_title("learning curves of the top trials")
    ax.legend(fontsize="small")
    return fig


def write_plots(study, spec: SweepSpec, workdir: str, imp: dict[str, float]) -> list[str]:
    """Writes the sweep's PNGs into `workdir` (none before a trial completes); returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    trials = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not trials:
        return []
    figures = [("sweep_metric_vs_params.png", lambda: _plot_metric_vs_params(plt, trials, spec)),
               ("sweep_parallel_coordinates.png", lambda: _plot_parallel_coordinates(plt, trials, spec))]
    if imp:
        figures.append(("sweep_importance.png", lambda: _plot_importance(plt, imp)))
    figures.append(("sweep_learning_curves.png", lambda: _plot_learning_curves(plt, trials, spec)))
    for name, draw in figures:
        fig = draw()
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, name), dpi=90)
        plt.close(fig)
    return [name for name, _ in figures]
