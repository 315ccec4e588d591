"""`--mode=refine` against the recipe's defaults and an Optuna TPE sweep with the same number of trials, on a
MiniLM recipe (--recipe: configs/minilm_food_reviews.py, the main job, or configs/minilm_wiki_topics.py, 11
Wikipedia topics), per seed: validation and test metrics and wall time.

    python benchmarks/refine_vs_tpe.py                          # the full comparison: R=3, K=8, 3 seeds, all data
    python benchmarks/refine_vs_tpe.py --recipe minilm_wiki_topics
    python benchmarks/refine_vs_tpe.py --rounds 2 --population 4 --seeds 0 1 --max_examples 800 --epochs 1

Each seed runs three arms from the same config (train.seed = the seed): the defaults (one solo run), refine
(round 0 = the defaults again, then R rounds of K candidates trained as one population, then the best config
trained solo for its test metrics), and TPE (sequential trials, population=0, no pruning) with 1 + R x K trials
over the same seven hyperparameters refine moves. Every arm keeps its best by the validation early-stop metric
(train.early_stop.metric) over the evaluations of its runs (the same cadence in every arm: refine's); test
metrics are read after the choice. Appends one JSON line per seed and arm to
--out and prints a table with the mean and spread over the seeds; --plot draws every row of --out (val loss and
test accuracy against wall time, one panel per task, one point per seed and arm) as a PNG; with no --arms it
only reports: the table of every row of --out (and the plot):

    python benchmarks/refine_vs_tpe.py --out rows.jsonl --plot refine_vs_tpe.png --arms
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tpe_space() -> dict:
    """The seven (batch size, LR, epochs, dropout, weight decay, schedule warmup; freezing as the embeddings
    frozen or not) plus label smoothing, around the recipe's values."""
    from ftjax.tune import space

    return {
        "optim.lr": space.loguniform(1e-5, 3e-4),
        "train.batch_size": space.choice(16, 32, 64),
        "train.epochs": space.choice(0.5, 1.0, 2.0),
        "model.dropout.hidden": space.uniform(0.0, 0.3),
        "optim.weight_decay": space.choice(0.0, 0.01, 0.1),
        "optim.schedule.warmup": space.uniform(0.0, 0.2),
        "optim.freeze_layers": space.choice("", "embeddings"),
        "train.label_smoothing": space.choice(0.0, 0.1),
    }


def _metrics(summary: dict, metric: str) -> dict:
    val, test = summary.get("val") or {}, summary.get("test") or {}
    chosen = (summary.get("best_val") or val).get(metric)  # what the arm chose by (the early-stop metric)
    return {"val_" + metric: chosen, "val_accuracy": val.get("accuracy"),
            "test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1")}


ARM_STYLE = {"defaults": ("tab:gray", "s"), "refine": ("tab:blue", "o"), "tpe": ("tab:orange", "^")}


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def chosen_metric(rows: list[dict]) -> str:
    """The rows' key of the validation metric each arm chose by (e.g. "val_loss")."""
    return next(k for k in rows[0] if k.startswith("val_") and k != "val_accuracy")


def plot(rows: list[dict], path: str) -> None:
    """Val loss (top) and test accuracy (bottom) against wall time, one column per recipe; small markers are
    seeds, the large one each arm's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    recipes = sorted({r["recipe"] for r in rows})
    fig, axes = plt.subplots(2, len(recipes), figsize=(5.5 * len(recipes), 7), squeeze=False)
    for col, recipe in enumerate(recipes):
        metric = chosen_metric(rows)
        for row, key, label in ((0, metric, metric.replace("_", " ") + " (chosen checkpoint)"),
                                (1, "test_accuracy", "test accuracy")):
            ax = axes[row, col]
            for arm, (colour, marker) in ARM_STYLE.items():
                mine = [r for r in rows if r["recipe"] == recipe and r["arm"] == arm and r.get(key) is not None]
                if not mine:
                    continue
                x, y = [r["wall_seconds"] for r in mine], [r[key] for r in mine]
                ax.scatter(x, y, c=colour, marker=marker, s=25, alpha=0.5)
                ax.scatter([np.mean(x)], [np.mean(y)], c=colour, marker=marker, s=140, edgecolors="k",
                           label=f"{arm} (n={len(mine)})")
            ax.set_xlabel("wall s")
            ax.set_ylabel(label)
            ax.set_title(recipe)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    """A markdown table: per recipe and arm, the mean ± std over its seeds of each metric, and the mean wall time."""
    import numpy as np

    keys = [chosen_metric(rows), "val_accuracy", "test_accuracy", "test_macro_f1"]
    lines = ["| task | arm | seeds | " + " | ".join(k.replace("_", " ") for k in keys) + " | wall s |",
             "|---" * (len(keys) + 4) + "|"]
    for recipe in sorted({r["recipe"] for r in rows}):
        for arm in ARM_STYLE:
            mine = [r for r in rows if r["recipe"] == recipe and r["arm"] == arm]
            if not mine:
                continue
            cells = []
            for key in keys:
                values = [r[key] for r in mine if r.get(key) is not None]
                cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "-")
            seeds = ",".join(str(r["seed"]) for r in mine)
            lines.append(f"| {recipe} | {arm} | {seeds} | " + " | ".join(cells)
                         + f" | {np.mean([r['wall_seconds'] for r in mine]):.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="minilm_food_reviews", choices=["minilm_food_reviews", "minilm_wiki_topics"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max_examples", type=int, default=0, help="train examples (0: all 4,000)")
    p.add_argument("--epochs", type=float, default=0.0, help="the recipe's epochs (0: its own, 3)")
    p.add_argument("--arms", nargs="*", default=["defaults", "refine", "tpe"])
    p.add_argument("--workdir", default="/tmp/ftjax_refine_vs_tpe")
    p.add_argument("--out", default="", help="append the JSON lines to this file")
    p.add_argument("--plot", default="", help="after the runs, draw every row of --out into this PNG")
    args = p.parse_args()
    if args.plot and not args.out:
        p.error("--plot draws the rows of --out: give --out FILE")

    import importlib

    from ftjax import config as config_lib
    from ftjax import trainer
    from ftjax.tune import refine, space, sweep

    rows = []
    for seed in args.seeds:
        cfg = importlib.import_module(f"configs.{args.recipe}").get_config()
        cfg.train.seed = seed
        cfg.train.progress = False
        if args.max_examples:
            cfg.data.max_examples = args.max_examples
        if args.epochs:
            cfg.train.epochs = args.epochs
        # Every arm evaluates as refine's runs do (four times a run when the recipe is under three epochs), so
        # all three choose among the same checkpoints.
        cfg = config_lib.with_overrides(cfg, refine.eval_cadence(cfg))
        metric = str(cfg.train.early_stop.metric)
        trials = 1 + args.rounds * args.population
        for arm in args.arms:
            folder = os.path.join(args.workdir, args.recipe, f"seed{seed}", arm)
            t0 = time.time()
            if arm == "defaults":
                out = _metrics(trainer.train(cfg, folder), metric)
            elif arm == "refine":
                state = refine.refine(cfg, folder, rounds=args.rounds, population_size=args.population)
                out = {"val_" + metric: state["best"]["value"],
                       **{k: v for k, v in _metrics({"val": state["final"]["val"], "test": state["final"]["test"]},
                                                    metric).items() if k != "val_" + metric},
                       "kept": state["best"]["overrides"]}
            else:
                spec = space.make_spec({"space": tpe_space(), "metric": metric, "mode": cfg.train.early_stop.mode,
                                        "sampler": "tpe", "pruner": "none", "n_trials": trials, "population": 0,
                                        "seed": seed})
                sweep.run_sweep(cfg, spec, folder)
                summaries = [json.load(open(f)) for f in glob.glob(os.path.join(folder, "*", "summary.json"))]
                sign = 1 if cfg.train.early_stop.mode == "min" else -1
                best = min(summaries, key=lambda s: sign * _metrics(s, metric)["val_" + metric])
                out = _metrics(best, metric)
            row = {"seed": seed, "arm": arm, "trials": 1 if arm == "defaults" else trials,
                   "wall_seconds": round(time.time() - t0, 1), **out,
                   "recipe": args.recipe, "rounds": args.rounds, "population": args.population,
                   "max_examples": args.max_examples, "epochs": float(cfg.train.epochs)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")

    if not args.arms and args.out:  # report only: every row of --out
        rows = read_rows(args.out)
    if rows:
        print("\n" + table(rows))
    if args.plot:
        plot(read_rows(args.out), args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
