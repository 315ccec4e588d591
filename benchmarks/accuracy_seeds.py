"""Is ftjax's main job as accurate as HF Trainer's? One seed cannot say: on the 1,000 test reviews one run's
accuracy moves by ~0.01 with the seed alone. This runs the main job (ftjax) and benchmarks/peer_hf_trainer.py
for several seeds, each pair on the same training rows (the seed picks the validation hold-out, the head's
init and the data order in both), and prints per seed and on average: test accuracy, train examples/s
(evaluation excluded) and their ratio, with the mean accuracy difference and its paired standard error.

    python benchmarks/accuracy_seeds.py --seeds 0,1,2,3 --epochs 1 --output_json /tmp/accuracy_seeds.json

The ftjax runs share one persistent compilation cache, so all but the first start warm. With more than one
epoch ftjax restores the checkpoint with the best validation loss (train.early_stop.metric) and HF Trainer
keeps its last weights (this peer keeps Trainer's defaults): both of ftjax's numbers are compared, the best
checkpoint's and the last weights' (summary.json "last").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from main_job_cold_warm import ftjax_run, peer_run


def mean_and_sem(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for one value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3", help="comma-separated train.seed values (default 0,1,2,3)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max_examples", type=int, default=0, help="train rows (0 = all); a smoke run: 64")
    p.add_argument("--output_json", default="")
    args = p.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds={args.seeds!r}: give comma-separated integers, e.g. 0,1,2,3")
    if not seeds:
        p.error("--seeds is empty: give at least one seed, e.g. 0")
    root = tempfile.mkdtemp(prefix="ftjax_accuracy_seeds_")
    cache = os.path.join(root, "jax_cache")
    rows = []
    for seed in seeds:
        ours = ftjax_run(os.path.join(root, f"ftjax_seed{seed}"), cache, args.epochs, args.max_examples, seed)
        peer = peer_run(root, args.epochs, args.max_examples, seed)
        rows.append({"seed": seed, "ftjax": ours, "hf_trainer": peer})
        print(f"seed {seed}: test accuracy ftjax {ours['test_accuracy']:.4f} (last weights "
              f"{ours['last_test_accuracy']:.4f}) vs HF Trainer {peer['test_accuracy']:.4f}; train examples/s "
              f"{ours['train_examples_per_s']:.2f} vs {peer['train_examples_per_s_excl_eval']:.2f}", flush=True)
    ours_acc = [r["ftjax"]["test_accuracy"] for r in rows]
    ours_last = [r["ftjax"]["last_test_accuracy"] for r in rows]
    peer_acc = [r["hf_trainer"]["test_accuracy"] for r in rows]
    diff, diff_sem = mean_and_sem([a - b for a, b in zip(ours_acc, peer_acc)])
    diff_last, diff_last_sem = mean_and_sem([a - b for a, b in zip(ours_last, peer_acc)])
    ours_rate = statistics.fmean(r["ftjax"]["train_examples_per_s"] for r in rows)
    peer_rate = statistics.fmean(r["hf_trainer"]["train_examples_per_s_excl_eval"] for r in rows)
    summary = {
        "seeds": seeds,
        "epochs": args.epochs,
        "ftjax_test_accuracy_mean_sem": mean_and_sem(ours_acc),
        "ftjax_last_weights_test_accuracy_mean_sem": mean_and_sem(ours_last),
        "hf_trainer_test_accuracy_mean_sem": mean_and_sem(peer_acc),
        "accuracy_difference_mean_sem": (diff, diff_sem),
        "last_weights_accuracy_difference_mean_sem": (diff_last, diff_last_sem),
        "ftjax_train_examples_per_s_mean": ours_rate,
        "hf_trainer_train_examples_per_s_mean": peer_rate,
        "throughput_ratio": ours_rate / peer_rate,
    }
    print("\nseed  ftjax acc (last)  HF acc  ftjax ex/s  HF ex/s  ratio")
    for r in rows:
        a, b = r["ftjax"], r["hf_trainer"]
        print(f"{r['seed']:>4}  {a['test_accuracy']:.4f} ({a['last_test_accuracy']:.4f})  {b['test_accuracy']:.4f}  "
              f"{a['train_examples_per_s']:>10.2f}  {b['train_examples_per_s_excl_eval']:>7.2f}  "
              f"{a['train_examples_per_s'] / b['train_examples_per_s_excl_eval']:.2f}x")
    m, s = summary["ftjax_test_accuracy_mean_sem"]
    pm, ps = summary["hf_trainer_test_accuracy_mean_sem"]
    print(f"mean test accuracy: ftjax {m:.4f} ± {s:.4f}, HF Trainer {pm:.4f} ± {ps:.4f} (± = standard error); "
          f"ftjax - HF = {diff:+.4f} ± {diff_sem:.4f} (paired by seed)")
    if ours_last != ours_acc:
        lm, ls = summary["ftjax_last_weights_test_accuracy_mean_sem"]
        print(f"ftjax's last weights: {lm:.4f} ± {ls:.4f}; minus HF = {diff_last:+.4f} ± {diff_last_sem:.4f}")
    print(f"mean train examples/s: ftjax {ours_rate:.2f}, HF Trainer {peer_rate:.2f}: {ours_rate / peer_rate:.2f}x")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"runs": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
