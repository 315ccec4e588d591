"""The README's main job (MiniLM on the food reviews) end to end, cold and warm: the first run starts with an
empty persistent compilation cache, the second (a fresh workdir) reuses it. Prints each run's wall time,
train examples/s, time to first step, compile seconds, compiled programs and MFU (from summary.json), and
with --peer the HF Trainer run of benchmarks/peer_hf_trainer.py on the same data, for the ratios.

    python benchmarks/main_job_cold_warm.py --epochs 1 --peer [--peer_reuse_memory]
    python benchmarks/main_job_cold_warm.py --epochs 1 --max_examples 256     # quicker

--peer_reuse_memory also runs HF Trainer with glibc malloc configured (through its environment variables) the
way ftjax's train.reuse_host_memory configures it, to show how much of the ratio that setting is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ftjax_run(workdir: str, cache: str, epochs: float, max_examples: int = 0, seed: int = 0) -> dict:
    """The main job (`python -m ftjax.main --config=configs/minilm_food_reviews.py`) in a subprocess; its
    numbers from summary.json."""
    cmd = [sys.executable, "-m", "ftjax.main", "--config=configs/minilm_food_reviews.py", f"--workdir={workdir}",
           f"--config.train.epochs={epochs}", f"--config.train.compilation_cache={cache}",
           f"--config.train.seed={seed}", "--config.train.progress=False"]
    if max_examples:
        cmd.append(f"--config.data.max_examples={max_examples}")
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = time.time() - t0
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    perf = summary.get("perf", {})
    return {"wall_s": wall, "train_examples_per_s": summary["timing"]["train_examples_per_second"],
            "test_accuracy": summary.get("test", {}).get("accuracy"),
            # The last weights' (HF Trainer reports its last): summary["last"] exists when the best step is earlier.
            "last_test_accuracy": summary.get("last", summary).get("test", {}).get("accuracy"),
            "val_accuracy": summary.get("val", {}).get("accuracy"), "best_step": summary.get("best_step"),
            "time_to_first_step_s": perf.get("time_to_first_step_s"),
            "loop_begin_to_first_step_s": perf.get("loop_begin_to_first_step_s"), "compile_s": perf.get("compile_s"),
            "programs_compiled": perf.get("programs_compiled"), "mfu": perf.get("mfu")}


# glibc's environment spelling of what ftjax.host_memory sets with mallopt (train.reuse_host_memory).
REUSE_MEMORY_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def peer_run(root: str, epochs: float, max_examples: int = 0, seed: int = 0, reuse_memory: bool = False) -> dict:
    """benchmarks/peer_hf_trainer.py in a subprocess (its JSON result, plus the subprocess's wall time)."""
    out = os.path.join(root, f"peer_seed{seed}{'_reuse' if reuse_memory else ''}.json")
    cmd = [sys.executable, "benchmarks/peer_hf_trainer.py", "--epochs", str(epochs), "--seed", str(seed),
           "--output_json", out]
    if max_examples:
        cmd += ["--max_examples", str(max_examples)]
    t0 = time.time()
    env = {**os.environ, **(REUSE_MEMORY_ENV if reuse_memory else {})}
    subprocess.run(cmd, cwd=REPO, check=True, env=env)
    with open(out) as f:
        result = json.load(f)
    result["wall_s"] = time.time() - t0
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max_examples", type=int, default=0)
    p.add_argument("--peer", action="store_true", help="also run HF Trainer (benchmarks/peer_hf_trainer.py)")
    p.add_argument("--peer_reuse_memory", action="store_true",
                   help="also run HF Trainer with glibc malloc set as train.reuse_host_memory sets it for ftjax")
    p.add_argument("--output_json", default="")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="ftjax_cold_warm_")
    cache = os.path.join(root, "jax_cache")
    results = {"cold": ftjax_run(os.path.join(root, "cold"), cache, args.epochs, args.max_examples),
               "warm": ftjax_run(os.path.join(root, "warm"), cache, args.epochs, args.max_examples)}
    if args.peer:
        results["hf_trainer"] = peer_run(root, args.epochs, args.max_examples)
    if args.peer_reuse_memory:
        results["hf_trainer_reuse_memory"] = peer_run(root, args.epochs, args.max_examples, reuse_memory=True)
    for name, r in results.items():
        print(f"{name:>10}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in r.items() if not isinstance(v, (dict, list))))
    if args.peer:
        hf = results["hf_trainer"]
        hf_rate = hf["train_examples_per_s_excl_eval"]  # ftjax's rate excludes eval too
        for name in ("cold", "warm"):
            r = results[name]
            print(f"{name}: {r['train_examples_per_s'] / hf_rate:.2f}x HF Trainer's train examples/s, "
                  f"{hf['wall_s'] / r['wall_s']:.2f}x its wall time")
            if "hf_trainer_reuse_memory" in results:
                hf_reuse = results["hf_trainer_reuse_memory"]["train_examples_per_s_excl_eval"]
                print(f"{name}: {r['train_examples_per_s'] / hf_reuse:.2f}x HF Trainer with the same malloc settings")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
