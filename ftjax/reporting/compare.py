"""`--mode=compare`: one report of several finished (or running) runs, read from their workdirs alone.

    python -m ftjax.main --mode=compare --workdir=runs/a --workdir=runs/b [--compare_out=DIR]
    python -m ftjax.main --mode=compare --workdir='runs/lr_*'

OUT/compare.md holds the config fields that differ between the runs (a table: rows = fields, columns =
runs), the data / model identity where it differs, the final numbers of each run (summary.json; the best
value of each column in bold) and links to PNGs with every run's curves overlaid on the same axes: train
and val loss, each val metric, the generalization gap, the LR per param group and every other logged
series (forgetting monitors, throughput ...). OUT defaults to the first workdir's parent + "/compare", so a
sweep's trials compare into SWEEP_DIR/compare. Reads and writes go through `ftjax.fileio` (gs:// works).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import matplotlib
import numpy as np
from etils import epath

matplotlib.use("Agg")  # files only, no display; before pyplot is imported
import matplotlib.pyplot as plt

from ftjax import fileio
from ftjax.callbacks.metric_log import read_metrics
from ftjax.errors import UserError
from ftjax.reporting.plots import series
from ftjax.workdir import MEMBER_CONFIG_FILE, METRICS_FILE, RUN_FILE, SUMMARY_FILE

REPORT_FILE = "compare.md"
_GLOB_CHARS = "*?["
_LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "error", "wer", "cer", "forgetting")
_SKIP_KEYS = {"count"}  # examples per eval, not a metric
_FINAL_NOTE = "From each run's summary.json (its best checkpoint); the best value of each column in bold."
_MAX_LR_LINES = 12  # more (runs x param groups) and only each run's first group is drawn


class CompareError(UserError, ValueError):
    """The runs cannot be compared (fewer than two, a folder that holds no run, a bad output folder)."""


@dataclass
class RunData:
    """What a workdir says about its run."""

    workdir: epath.Path
    config: dict[str, Any]
    identity: dict[str, Any]  # run.json's "data", "model", "labels" (absent for a population member)
    records: list[dict]
    summary: dict[str, Any] | None
    name: str = ""
    label: str = ""
    splits: dict[str, list[str]] = field(default_factory=dict)  # split -> scalar names, in logged order


# ------------------------------------------------------------------------------------------------------
# Reading the runs.


def _natural(p: epath.Path) -> list:
    """Sort key that puts trial_2 before trial_10."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", str(p))]


def expand_workdirs(patterns: list[str]) -> list[epath.Path]:
    """The run folders named by `patterns` (paths or globs such as runs/lr_*), in order, without repeats."""
    out: list[epath.Path] = []
    for pattern in patterns:
        if not any(c in pattern for c in _GLOB_CHARS):
            found = [fileio.path(pattern)]
        else:
            parts = str(fileio.path(pattern)).split("/")
            first = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
            base = fileio.path("/".join(parts[:first]) or "/")
            found = sorted((p for p in base.glob("/".join(parts[first:])) if p.is_dir()), key=_natural)
            if not found:
                raise CompareError(f"--workdir={pattern} matches no folder")
        out += [p for p in found if p not in out]
    return out


def load_run(workdir: fileio.PathLike) -> RunData:
    """A run's config, identity, metrics and summary; a folder that holds no run is a CompareError."""
    p = fileio.path(workdir)
    if not p.is_dir():
        raise CompareError(f"{workdir} is not a folder: --mode=compare takes run workdirs")
    identity: dict[str, Any] = {}
    if (p / RUN_FILE).exists():
        run = fileio.read_json(p / RUN_FILE)
        config = run.get("config", {})
        identity = {k: run[k] for k in ("data", "model", "labels") if k in run}
    elif (p / MEMBER_CONFIG_FILE).exists() and _is_flat_config(
            config := fileio.read_json(p / MEMBER_CONFIG_FILE)):
        pass
    else:
        raise CompareError(f"{workdir} is not an ftjax run: it has no {RUN_FILE} (nor a population member's "
                           f"{MEMBER_CONFIG_FILE}). Pass the workdirs of trained runs")
    if not (p / METRICS_FILE).exists():
        raise CompareError(f"{workdir} is not an ftjax run with metrics: it has no {METRICS_FILE} (did the run "
                           "log a step?)")
    records = read_metrics(p)
    summary = fileio.read_json(p / SUMMARY_FILE) if (p / SUMMARY_FILE).exists() else None
    splits: dict[str, list[str]] = {}
    for r in records:
        names = splits.setdefault(r["split"], [])
        names += [k for k in r if k not in ("step", "split") and k not in names and k not in _SKIP_KEYS]
    return RunData(p, config, identity, records, summary, splits=splits)


def _is_flat_config(d: Any) -> bool:
    return isinstance(d, dict) and bool(d) and all("." in k for k in d)


def load_runs(patterns: list[str]) -> list[RunData]:
    """The runs to compare (at least two), named by their folders and labelled by what differs."""
    runs = [load_run(p) for p in expand_workdirs(patterns)]
    if len(runs) < 2:
        got = ", ".join(str(r.workdir) for r in runs) or "none"
        raise CompareError(f"--mode=compare needs at least 2 runs, got {len(runs)} ({got}): pass --workdir "
                           "several times or a glob such as --workdir='runs/lr_*'")
    names = _short_names([r.workdir for r in runs])
    diff = config_diff(runs)
    for r, name in zip(runs, names):
        r.name = name
        shown = [f"{f.rsplit('.', 1)[-1]}={fmt(r.config.get(f))}" for f in diff]
        r.label = f"{name} ({', '.join(shown)})" if 1 <= len(diff) <= 2 else name
    return runs


def _short_names(paths: list[epath.Path]) -> list[str]:
    """Each folder's basename; more trailing path parts where basenames repeat; an index as a last resort."""
    parts = [str(p).rstrip("/").split("/") for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return [f"run{i}" for i in range(len(paths))]


# ------------------------------------------------------------------------------------------------------
# Tables.


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_diff(runs: list[RunData]) -> list[str]:
    """The config fields whose value is not the same in every run (sorted)."""
    fields = sorted({f for r in runs for f in r.config})
    return [f for f in fields if len({json.dumps(r.config.get(f, "<absent>"), sort_keys=True) for r in runs}) > 1]


def _identity_rows(runs: list[RunData]) -> list[tuple[str, list[str]]]:
    """(row name, a cell per run) for the data splits, model and labels that are not the same in every run."""
    rows = []
    splits = sorted({s for r in runs for s in r.identity.get("data", {})})
    for split in splits:
        cells = []
        for r in runs:
            d = r.identity.get("data", {}).get(split)
            cells.append(f"{d.get('rows')} rows, {str(d.get('sha256', ''))[:12]}" if d else "-")
        rows.append((f"data[{split}]", cells))
    model = []
    for r in runs:
        m = r.identity.get("model")
        model.append(f"{m.get('name_or_path')} {str(m.get('config_sha256', ''))[:12]}".strip() if m else "-")
    rows.append(("model", model))
    rows.append(("labels", [", ".join(map(str, r.identity["labels"])) if "labels" in r.identity else "-"
                            for r in runs]))
    return [(name, cells) for name, cells in rows if len(set(cells)) > 1]


def diff_table(runs: list[RunData]) -> list[str]:
    fields = config_diff(runs)
    identity = _identity_rows(runs)
    if not fields and not identity:
        return ["The runs have the same config, data and model (they differ only by chance, e.g. a rerun)."]
    head = ["| field | " + " | ".join(_cell(r.name) for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    rows = [f"| `{f}` | " + " | ".join(_cell(fmt(r.config.get(f, "-"))) for r in runs) + " |" for f in fields]
    rows += [f"| {name} | " + " | ".join(_cell(c) for c in cells) + " |" for name, cells in identity]
    return head + rows


def lower_is_better(name: str) -> bool:
    return any(word in name.lower() for word in _LOWER_IS_BETTER)


def _final_columns(runs: list[RunData]) -> list[tuple[str, str, Any]]:
    """(header, direction "min" | "max" | "", getter) for each column of the final-numbers table."""
    cols: list[tuple[str, str, Any]] = [("best step", "", lambda s: s.get("best_step")),
                                        ("steps", "", lambda s: s.get("steps"))]
    # The best checkpoint's val / test numbers, and the last weights' test numbers where the best was earlier.
    sections = (("val", lambda s: s.get("val", {})), ("test", lambda s: s.get("test", {})),
                ("last test", lambda s: s.get("last", {}).get("test", {})))
    for label, numbers in sections:
        names: list[str] = []
        for r in runs:
            names += [k for k in numbers(r.summary or {}) if k not in names and k not in _SKIP_KEYS]
        names.sort(key=lambda k: k != "loss")
        cols += [(f"{label} {k}", "min" if lower_is_better(k) else "max",
                  lambda s, numbers=numbers, k=k: numbers(s).get(k)) for k in names]
    cols += [("examples/s", "max", lambda s: s.get("timing", {}).get("train_examples_per_second")),
             ("MFU", "max", lambda s: (s.get("perf") or {}).get("mfu")),
             ("wall s", "", lambda s: s.get("timing", {}).get("wall_seconds"))]
    return [c for c in cols if any(_number(c[2](r.summary or {})) is not None for r in runs)]


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _fmt_final(header: str, v: float | None) -> str:
    if v is None:
        return "-"
    if header == "MFU":
        return f"{100 * v:.1f}%"
    if header in ("best step", "steps"):
        return str(int(v))
    if header in ("examples/s", "wall s"):
        return f"{v:.1f}"
    return f"{v:.4f}"


def final_table(runs: list[RunData]) -> list[str]:
    """The summary.json numbers, a row per run; the best of each metric column in bold (ties: all)."""
    cols = _final_columns(runs)
    values = [[_number(get(r.summary or {})) for _, _, get in cols] for r in runs]
    best = []
    for j, (_, direction, _) in enumerate(cols):
        column = [row[j] for row in values if row[j] is not None]
        best.append((min if direction == "min" else max)(column) if direction and column else None)
    lines = ["| run | " + " | ".join(h for h, _, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r, row in zip(runs, values):
        cells = [_fmt_final(h, v) for (h, _, _), v in zip(cols, row)]
        cells = [f"**{c}**" if v is not None and v == b else c for c, v, b in zip(cells, row, best)]
        name = _cell(r.name) + ("" if r.summary is not None else f" (no {SUMMARY_FILE} yet)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------------
# Overlaid curves: one PNG per series, every run on the same axes in the same colour throughout.


def _color(i: int):
    return plt.get_cmap("tab10" if i < 10 else "tab20")(i % 20)


def _save(fig, ax, out: epath.Path, name: str, title: str, ylabel: str) -> str:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fileio.save_figure(fig, out / name)
    plt.close(fig)
    return name


def _overlay(runs: list[RunData], split: str, key: str, out: epath.Path, name: str, title: str) -> str | None:
    """`split`/`key` of every run (val metrics: the final test value as a star of the run's colour)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for i, r in enumerate(runs):
        steps, values = series(r.records, split, key)
        if steps.size:
            style = {"lw": 1.2} if split == "train" else {"marker": "o", "ms": 3, "lw": 1.2}
            ax.plot(steps, values, color=_color(i), label=r.label, **style)
            drawn = True
        t_steps, t_values = series(r.records, "test", key) if split == "val" else (np.array([]), None)
        if t_steps.size:
            ax.plot(t_steps, t_values, "*", color=_color(i), ms=11)
    if not drawn:
        plt.close(fig)
        return None
    if split == "gap":
        ax.axhline(0.0, color="gray", lw=1)
    return _save(fig, ax, out, name, title + (" (star: test)" if split == "val" else ""), key)


def _lr_plot(runs: list[RunData], out: epath.Path) -> str | None:
    """The LR of each param group of each run (line style: group); only the first group when too many."""
    groups = {i: r.splits.get("lr", []) for i, r in enumerate(runs)}
    if not any(groups.values()):
        return None
    if sum(len(g) for g in groups.values()) > _MAX_LR_LINES:
        groups = {i: g[:1] for i, g in groups.items()}
    several = any(len(g) > 1 for g in groups.values())
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(runs):
        for j, group in enumerate(groups[i]):
            ax.plot(*series(r.records, "lr", group), color=_color(i), lw=1.2, ls=("-", "--", ":", "-.")[j % 4],
                    label=f"{r.label} [{group}]" if several else r.label)
    return _save(fig, ax, out, "lr.png", "learning rate per param group", "lr")


def _other_series(runs: list[RunData]) -> list[tuple[str, str]]:
    """(split, key) of every logged series the named plots leave out, that is a curve in at least one run
    (two or more points that are not all equal): grad norm, throughput, forgetting monitors ..."""
    named = {"val", "test", "lr", "gap"}
    seen: list[tuple[str, str]] = []
    for r in runs:
        seen += [(s, k) for s, keys in r.splits.items() for k in keys
                 if s not in named and (s, k) != ("train", "loss") and (s, k) not in seen]

    def is_curve(split: str, key: str) -> bool:
        return any(len(set(series(r.records, split, key)[1].tolist())) > 1 for r in runs)

    return [sk for sk in seen if is_curve(*sk)]


def _file_name(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(parts)) + ".png"


def write_curves(runs: list[RunData], out: epath.Path) -> list[tuple[str, str]]:
    """Writes the PNGs into `out`; returns (title, file name) of each written."""
    out.mkdir(parents=True, exist_ok=True)
    plots: list[tuple[str, str | None]] = [
        ("train loss", _overlay(runs, "train", "loss", out, "train_loss.png", "train loss")),
        ("val loss", _overlay(runs, "val", "loss", out, "val_loss.png", "val loss")),
    ]
    val_keys: list[str] = []
    for r in runs:
        val_keys += [k for k in r.splits.get("val", []) if k != "loss" and k not in val_keys]
    plots += [(f"val {k}", _overlay(runs, "val", k, out, _file_name("val", k), f"val {k}")) for k in val_keys]
    gap_keys: list[str] = []
    for r in runs:
        gap_keys += [k for k in r.splits.get("gap", []) if k not in gap_keys]
    plots += [(f"generalization gap ({k})", _overlay(runs, "gap", k, out, _file_name("gap", k),
                                                     "generalization gap (rising = overfitting)"))
              for k in gap_keys]
    plots.append(("learning rate", _lr_plot(runs, out)))
    plots += [(f"{s} {k}", _overlay(runs, s, k, out, _file_name(s, k), f"{s} {k}")) for s, k in _other_series(runs)]
    return [(title, name) for title, name in plots if name]


def _effect_plot(runs: list[RunData], out: epath.Path) -> str | None:
    """When the runs differ in one numeric field: each final val metric against it (effect.png)."""
    diff = config_diff(runs)
    if len(diff) != 1 or any(r.summary is None for r in runs):
        return None
    xs = [_number(r.config.get(diff[0])) for r in runs]
    metrics = [k for k in runs[0].summary.get("val", {}) if k not in _SKIP_KEYS]
    if any(x is None for x in xs) or not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    order = np.argsort(xs)
    for ax, k in zip(axes[0], metrics):
        ys = [_number(r.summary.get("val", {}).get(k)) for r in runs]
        ax.plot([xs[i] for i in order], [ys[i] if ys[i] is not None else np.nan for i in order], "o-")
        if min(xs) > 0 and max(xs) >= 10 * min(xs):
            ax.set_xscale("log")
        ax.set_xlabel(diff[0])
        ax.set_ylabel(f"final val {k}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fileio.save_figure(fig, out / "effect.png")
    plt.close(fig)
    return "effect.png"


# ------------------------------------------------------------------------------------------------------
# The report.


def default_out(runs: list[RunData]) -> epath.Path:
    """The first run's parent folder + /compare (a sweep's trials compare into SWEEP_DIR/compare)."""
    return runs[0].workdir.parent / "compare"


def check_out(out: epath.Path, runs: list[RunData]) -> None:
    """The report may not land inside a compared run, nor in a folder that is itself a run."""
    for r in runs:
        if out == r.workdir or str(out).startswith(str(r.workdir).rstrip("/") + "/"):
            raise CompareError(f"the comparison would be written into the run {r.workdir} ({out}): choose "
                               "another folder with --compare_out")
    if (out / RUN_FILE).exists() or (out / METRICS_FILE).exists():
        raise CompareError(f"{out} holds a run: choose another folder for the comparison with --compare_out")


def _headline(runs: list[RunData]) -> list[str]:
    diff = config_diff(runs)
    lines = [f"# Comparison of {len(runs)} runs", ""]
    if diff:
        lines.append("The runs differ in " + ", ".join(f"`{f}`" for f in diff) + ".")
    lines += ["", "| run | workdir | status |", "|---|---|---|"]
    for r in runs:
        status = (r.summary or {}).get("status", "no summary.json (running or interrupted)")
        lines.append(f"| {_cell(r.name)} | `{r.workdir}` | {status} |")
    return lines + [""]


def write_compare(workdirs: list[str], out: fileio.PathLike | None = None) -> epath.Path:
    """Compares the runs in `workdirs` (paths or globs): writes OUT/compare.md and its PNGs; returns the
    report's path. OUT defaults to the first run's parent folder + /compare."""
    runs = load_runs(list(workdirs))
    out = fileio.path(out) if out else default_out(runs)
    check_out(out, runs)
    curves = write_curves(runs, out)
    effect = _effect_plot(runs, out)
    lines = _headline(runs) + ["## Config differences", "", *diff_table(runs), "",
                               "## Final numbers", "",
                               _FINAL_NOTE, "", *final_table(runs), ""]
    if effect:
        lines += [f"![final val metrics against {config_diff(runs)[0]}]({effect})", ""]
    lines += ["## Curves", ""]
    lines += [f"### {title}\n\n![{title}]({name})\n" for title, name in curves]
    path = out / REPORT_FILE
    fileio.write_text(path, "\n".join(lines) + "\n")
    return path
