"""Small reproductions of published fine-tuning findings with ftjax, as numbers that can go either way.

    python benchmarks/research_checks.py --check rslora        # ~3 min: tiny random Llama, 10 LoRA runs
    python benchmarks/research_checks.py --check unfreezing    # ~30 min (2 busy cores): MiniLM, 2 x 5 seeds
    python benchmarks/research_checks.py --check forgetting    # ~10 min: MiniLM, LoRA vs full, CKA / drift
    python benchmarks/research_checks.py --check all --output_json /tmp/research_checks.json

rslora      rsLoRA (Kalajdzievski 2023): at one LR, the final training loss falls with the rank under
            s = alpha / sqrt(r) (`optim.lora.rslora=True`) and stalls under s = alpha / r. A random tiny
            Llama (hidden 64, 2 layers, byte-level BPE) learns ftjax's packaged English corpus with LoRA on
            every linear layer, ranks 4..64, alpha 8, constant LR 3e-3, 60 steps of 8 x 32 tokens; the loss
            reported is the mean training loss of the last 10 steps (and the validation loss at the end).
unfreezing  Gradual unfreezing + discriminative (layer-wise decayed) LR (Howard & Ruder 2018, ULMFiT) vs
            plain fine-tuning (all layers, one LR): all-MiniLM-L6-v2 on 320 Amazon fine-food reviews
            (configs/minilm_food_reviews.py, max_len 32, 2 epochs, batch 16, lr 3e-4: CPU-sized), test
            accuracy on the 1,000 test reviews for each seed. "At least as good" = mean(gradual) >= mean(plain) - one standard
            error of the difference of the means.
forgetting  LoRA forgets less than full fine-tuning (Biderman et al. 2024, "LoRA Learns Less and Forgets
            Less"): MiniLM on the food reviews with full fine-tuning and with LoRA (all linear layers),
            evaluated every few steps with the forgetting monitors (`forgetting.monitors`: mean linear CKA of
            the hidden states on the reference text vs the loaded model, relative weight drift); each run is
            read at the first eval where its validation loss reaches a target both runs reach.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/research_checks.py` from the repository root
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RANKS = (4, 8, 16, 32, 64)
CORPUS = ROOT / "ftjax" / "forgetting_corpus.txt"


def _set(c: Any, **overrides: Any) -> Any:
    """c with dotted-key overrides (`_set(c, **{"optim.lr": 1e-3})`)."""
    for key, value in overrides.items():
        node, parts = c, key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return c


def _quiet() -> None:
    from absl import logging

    logging.set_verbosity(logging.WARNING)


# --------------------------------------------------------------------------------------------------------
# rsLoRA


def tiny_decoder(root: str, seed: int = 0) -> str:
    """A random Llama (hidden 64, 2 layers, GQA; tests/test_lm_data.py's tiny BPE tokenizer) saved as an HF
    folder. initializer_range 0.1 instead of 0.02: with 0.02 the frozen random lm_head caps the logits at
    about +-1.3, so no adapter can bring the loss much below uniform and every rank stalls alike."""
    from tests.test_lm_data import tiny_llama

    return tiny_llama(os.path.join(root, f"llama{seed}"), seed=seed, hidden_size=64, intermediate_size=128,
                      initializer_range=0.1)


def lora_lm_config(model_dir: str, corpus: str, *, rank: int, rslora: bool, alpha: float = 8.0,
                   lr: float = 3e-3, steps: int = 60, seed: int = 0) -> Any:
    """Causal-LM LoRA on every linear layer (not lm_head), constant LR, no weight decay, no dropout."""
    from ftjax.config import default_config

    return _set(default_config(), **{
        "model.name_or_path": model_dir, "model.task": "causal_lm",
        "data.source": f"files:{corpus}", "data.lm.documents": "line", "data.max_len": 32,
        "optim.lr": lr, "optim.schedule.type": "constant", "optim.weight_decay": 0.0,
        "optim.lora.rank": rank, "optim.lora.alpha": alpha, "optim.lora.rslora": rslora,
        "optim.lora.targets": "all-linear", "optim.lora.dropout": 0.0,
        "train.batch_size": 8, "train.steps": steps, "train.seed": seed, "train.compilation_cache": "",
        "train.progress": False, "forgetting.monitors": (),
    })


def lora_lm_losses(cfg: Any, workdir: str, last: int = 10) -> dict[str, float]:
    """Trains cfg's run for train.steps steps on one device (no eval, no checkpoints): the mean training
    loss of the last `last` steps, the first step's loss and the validation loss at the end."""
    import jax
    import numpy as np

    from ftjax import sharding as sharding_lib
    from ftjax.run import Run

    run = Run(cfg, workdir, devices=jax.devices()[:1])
    batches, losses = run.data.train_iterator(), []
    for step in range(cfg.train.steps):
        batch = sharding_lib.shard_batch(next(batches), run.mesh)
        with jax.set_mesh(run.mesh):
            run.state, metrics = run.train_step_for(step)(run.state, batch, run.key)
        losses.append(float(metrics["loss"]))
    return {"first": losses[0], "train": float(np.mean(losses[-last:])),
            "val": float(run.evaluate("validation")["loss"])}


def check_rslora(ranks=RANKS, seeds=(0,), steps: int = 60, lr: float = 3e-3, alpha: float = 8.0) -> dict:
    _quiet()
    root = tempfile.mkdtemp(prefix="research_rslora_")
    rows = []
    for seed in seeds:
        model_dir = tiny_decoder(root, seed)
        for rslora in (True, False):
            for rank in ranks:
                t0 = time.time()
                cfg = lora_lm_config(model_dir, str(CORPUS), rank=rank, rslora=rslora, alpha=alpha, lr=lr,
                                     steps=steps, seed=seed)
                out = lora_lm_losses(cfg, os.path.join(root, f"s{seed}_{'rs' if rslora else 'std'}_r{rank}"))
                rows.append({"seed": seed, "rslora": rslora, "rank": rank, **out,
                             "scale": alpha / (math.sqrt(rank) if rslora else rank), "seconds": time.time() - t0})
                print(f"  seed {seed} {'alpha/sqrt(r)' if rslora else 'alpha/r'} r={rank}: "
                      f"train {out['train']:.4f} val {out['val']:.4f} ({time.time() - t0:.0f}s)", flush=True)
    print(f"\nrsLoRA: final training loss (mean of the last 10 of {steps} steps), alpha {alpha}, lr {lr}, "
          f"all-linear; step-1 loss {rows[0]['first']:.3f}")
    print("| seed | rank | alpha/sqrt(r): train | val | alpha/r: train | val |\n|---|---|---|---|---|---|")
    by = {(r["seed"], r["rslora"], r["rank"]): r for r in rows}
    for seed in seeds:
        for rank in ranks:
            a, b = by[seed, True, rank], by[seed, False, rank]
            print(f"| {seed} | {rank} | {a['train']:.4f} | {a['val']:.4f} | {b['train']:.4f} | {b['val']:.4f} |")
    summary = {}
    for rslora in (True, False):
        name = "rslora" if rslora else "standard"
        spreads = [by[s, rslora, ranks[0]]["train"] - by[s, rslora, ranks[-1]]["train"] for s in seeds]
        monotone = [all(by[s, rslora, r1]["train"] > by[s, rslora, r2]["train"]
                        for r1, r2 in itertools.pairwise(ranks)) for s in seeds]
        summary[name] = {"gain_lowest_to_highest_rank": spreads, "monotone": monotone}
        print(f"{name}: loss(r={ranks[0]}) - loss(r={ranks[-1]}) = {', '.join(f'{x:.4f}' for x in spreads)}; "
              f"falls monotonically with rank: {monotone}")
    return {"rows": rows, "summary": summary, "steps": steps, "lr": lr, "alpha": alpha}


# --------------------------------------------------------------------------------------------------------
# Gradual unfreezing + discriminative LR vs plain fine-tuning


def minilm_recipe(arg: str = "quick") -> Any:
    spec = importlib.util.spec_from_file_location("minilm_food_reviews", ROOT / "configs" / "minilm_food_reviews.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# ULMFiT-style: the head first, then the top two layers, the middle two, the rest (4 compiled phases).
GRADUAL = {
    "optim.train_only": "head",
    "optim.unfreeze": (("0.25ep", r".*/layer/[45]/.*"), ("0.5ep", r".*/layer/[23]/.*"), ("1ep", r".*")),
    "optim.layer_lr_decay": 0.8,
}


def food_config(seed: int, max_examples: int, epochs: float, **overrides: Any) -> Any:
    return _set(minilm_recipe("quick"), **{
        "data.max_examples": max_examples, "data.max_len": 32, "data.validation_fraction": 0.05,
        "optim.lr": 3e-4, "train.batch_size": 16, "train.epochs": epochs, "train.seed": seed,
        "train.progress": False, "train.checkpoint.keep": 1, "forgetting.monitors": (), **overrides,
    })


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def check_unfreezing(seeds=range(5), max_examples: int = 320, epochs: float = 2.0) -> dict:
    from ftjax import trainer

    _quiet()
    root = tempfile.mkdtemp(prefix="research_unfreeze_")
    acc: dict[str, list[float]] = {"plain": [], "gradual": []}
    rows = []
    for seed in seeds:
        for name, overrides in (("plain", {}), ("gradual", GRADUAL)):
            t0 = time.time()
            cfg = food_config(seed, max_examples, epochs, **overrides)
            summary = trainer.train(cfg, os.path.join(root, f"{name}_{seed}"))
            a = float(summary["test"]["accuracy"])
            acc[name].append(a)
            rows.append({"seed": seed, "variant": name, "test_accuracy": a, "test_loss": summary["test"]["loss"],
                         "val_accuracy": summary["val"]["accuracy"], "seconds": time.time() - t0})
            print(f"  seed {seed} {name}: test accuracy {a:.4f} ({time.time() - t0:.0f}s)", flush=True)
    print(f"\nUnfreezing: MiniLM, {max_examples} food reviews, max_len 32, {epochs:g} epochs, batch 16, lr 3e-4; "
          f"gradual = {GRADUAL}")
    print("| seed | plain | gradual + LLRD 0.8 |\n|---|---|---|")
    for i, seed in enumerate(seeds):
        print(f"| {seed} | {acc['plain'][i]:.4f} | {acc['gradual'][i]:.4f} |")
    stats = {}
    for name, xs in acc.items():
        m, s = _mean_std(xs)
        stats[name] = {"mean": m, "std": s, "min": min(xs), "max": max(xs)}
    for key in ("mean", "std", "min", "max"):
        print(f"| {key} | {stats['plain'][key]:.4f} | {stats['gradual'][key]:.4f} |")
    n = len(acc["plain"])
    se = math.sqrt((stats["plain"]["std"] ** 2 + stats["gradual"]["std"] ** 2) / n)
    diffs = [g - p for g, p in zip(acc["gradual"], acc["plain"])]
    d_mean, d_std = _mean_std(diffs)
    verdict = stats["gradual"]["mean"] >= stats["plain"]["mean"] - se
    print(f"mean(gradual) - mean(plain) = {d_mean:+.4f} (paired per-seed differences: std {d_std:.4f}, "
          f"wins {sum(d > 0 for d in diffs)}/{n}); standard error of the difference {se:.4f}; "
          f"at least as good (>= plain - 1 SE): {verdict}")
    return {"rows": rows, "stats": stats, "se_diff": se, "mean_diff": d_mean, "at_least_as_good": verdict}


# --------------------------------------------------------------------------------------------------------
# LoRA vs full fine-tuning: forgetting at equal validation loss


def read_metrics(workdir: str) -> tuple[dict[int, float], dict[int, dict]]:
    """metrics.jsonl of a run: {step: val loss}, {step: forgetting scalars}."""
    val, forget = {}, {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            split, step = rec.get("split"), rec.get("step")
            if split == "val" and "loss" in rec:
                val[step] = float(rec["loss"])
            elif split == "forgetting":
                forget[step] = {k: v for k, v in rec.items() if k not in ("split", "step", "time")}
    return val, forget


def at_target(val: dict[int, float], target: float) -> int | None:
    """The first eval step whose validation loss is <= target."""
    return next((s for s in sorted(val) if val[s] <= target), None)


def compare_forgetting(workdirs: dict[str, str]) -> dict:
    """Reads each run's metrics; target = the highest of the runs' best validation losses (so each run
    reaches it); the forgetting scalars of each run at its first eval at or below the target."""
    curves = {name: read_metrics(w) for name, w in workdirs.items()}
    target = max(min(v for s, v in val.items() if s > 0) for val, _ in curves.values())
    out = {"target_val_loss": target}
    for name, (val, forget) in curves.items():
        step = at_target(val, target)
        out[name] = {"step": step, "val_loss": val[step], **forget.get(step, {})}
    return out


FORGET_RUNS = {
    "full": {"optim.lr": 3e-4},
    "lora": {"optim.lr": 2e-3, "optim.lora.rank": 8, "optim.lora.alpha": 16.0, "optim.lora.targets": "all-linear"},
}


def check_forgetting(seed: int = 0, max_examples: int = 320, epochs: float = 2.0, eval_every: int = 5) -> dict:
    from ftjax import trainer

    _quiet()
    root = tempfile.mkdtemp(prefix="research_forget_")
    workdirs = {}
    for name, overrides in FORGET_RUNS.items():
        t0 = time.time()
        cfg = food_config(seed, max_examples, epochs, **{
            "forgetting.monitors": ("weight_drift", "cka"), "train.eval_every": eval_every, **overrides})
        workdirs[name] = os.path.join(root, name)
        summary = trainer.train(cfg, workdirs[name])
        print(f"  {name}: test accuracy {summary['test']['accuracy']:.4f} ({time.time() - t0:.0f}s)", flush=True)
    result = compare_forgetting(workdirs)
    print(f"\nForgetting at equal validation loss (target {result['target_val_loss']:.4f}: the highest best "
          "val loss of the two runs), MiniLM on food reviews")
    print("| run | step | val loss | CKA mean | CKA min | weight drift total |\n|---|---|---|---|---|---|")
    for name in FORGET_RUNS:
        r = result[name]
        print(f"| {name} | {r['step']} | {r['val_loss']:.4f} | {r.get('cka/mean', float('nan')):.4f} | "
              f"{r.get('cka/min', float('nan')):.4f} | {r.get('drift/total', float('nan')):.4g} |")
    result["lora_forgets_less"] = result["lora"].get("cka/mean", 0) > result["full"].get("cka/mean", 1)
    print(f"LoRA forgets less (higher mean CKA at equal loss): {result['lora_forgets_less']}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", choices=("rslora", "unfreezing", "forgetting", "all"), default="all")
    p.add_argument("--seeds", type=int, default=5, help="unfreezing: seeds per variant")
    p.add_argument("--rslora_seeds", type=int, default=1, help="rslora: tiny models (model + train seed)")
    p.add_argument("--max_examples", type=int, default=320)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--output_json", default="")
    args = p.parse_args()
    results = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv}
    if args.check in ("rslora", "all"):
        results["rslora"] = check_rslora(seeds=tuple(range(args.rslora_seeds)))
    if args.check in ("unfreezing", "all"):
        results["unfreezing"] = check_unfreezing(range(args.seeds), args.max_examples, args.epochs)
    if args.check in ("forgetting", "all"):
        results["forgetting"] = check_forgetting(0, args.max_examples, args.epochs)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
