"""Pod plans for 1B-70B decoders, made on any CPU: the real train step of each fine-tune compiled ahead of
time for TPU slices (libtpu's compiler, `--mode=dry_run --topology`), from published config.json values only.

    python benchmarks/pod_plan.py [--quick] [--out benchmarks/pod_plan.md]

For Llama-3.2-1B, Llama-3.1-8B, Qwen3-8B and Llama-3.1-70B (no weights: a folder with config.json), full
fine-tuning and LoRA (rank 16 on q/k/v/o), seq 4096 packed, remat full, bf16 compute, on v5e, v5p and v6e
slices: fits, per-chip peak, compile seconds, HLO/model FLOP ratio; and the compile seconds of the same step
unrolled (model.scan_layers=false) for the smaller models. Needs `pip install -e '.[plan]'` (libtpu).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Published config.json values (the models' hub pages), the fields the NNX families read.
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
MODELS = {
    "Llama-3.2-1B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 32.0}),
    "Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
    "Qwen3-8B": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
                     rope_theta=1000000.0),
    "Llama-3.1-70B": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                          max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                          rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
}
SLICES = ("v5litepod-16", "v5p-16", "v6e-16")
QUICK_SLICES = ("v5litepod-16", "v5p-16")


def write_model(folder: str, values: dict) -> str:
    """A model folder holding only config.json, as transformers would save it."""
    import transformers

    values = dict(values)
    kind = values.pop("model_type")
    cls = transformers.Qwen3Config if kind == "qwen3" else transformers.LlamaConfig
    cfg = cls(**values, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.save_pretrained(folder)
    return folder


def plan_config(model_dir: str, lora: int, batch: int, seq: int, scan: bool, fsdp: int, remat: str = "full",
                attention: str = "auto"):
    from ftjax.config import default_config

    c = default_config()
    c.model.name_or_path = model_dir
    c.model.task = "causal_lm"
    c.model.dtype = "bfloat16"
    c.model.remat = remat
    c.model.attention = attention
    c.model.loss_chunk_tokens = 8192  # no [rows, 4096, vocab] float32 logits (4 GiB per 2 rows at 128k)
    c.model.scan_layers = scan
    c.data.source = "files:/nonexistent/plan-only.txt"  # an abstract plan reads no data
    c.data.max_len = seq
    c.data.lm.packing = True
    c.optim.lora.rank = lora
    c.optim.lora.alpha = 2.0 * lora if lora else 16.0
    c.optim.lora.targets = r".*/(q_proj|k_proj|v_proj|o_proj)"
    c.train.batch_size = batch
    c.train.steps = 100
    c.train.compilation_cache = ""
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, fsdp, 1
    return c


def one_plan(cfg, topology: str) -> dict:
    """What `--mode=dry_run --topology=TOPOLOGY` computes (and writes to a scratch workdir's dry_run.json)."""
    from ftjax import dry_run
    from ftjax.run import Run

    workdir = tempfile.mkdtemp(prefix="pod_plan_")
    t0 = time.time()
    topo = dry_run.topology(topology)
    plan = dry_run.plan(Run(cfg, workdir, purpose="plan", devices=topo.devices), topo)
    plan["wall_seconds"] = round(time.time() - t0, 1)
    return plan


def _chips_of(topology: str) -> int:
    """Chips of a slice name, as --topology reads it (v4/v5p names count TensorCores: 2 per chip)."""
    from ftjax import dry_run

    return dry_run.topology(topology).chips


def _row(plan: dict, **labels) -> dict:
    keys = ("chips", "fits", "per_chip_peak_bytes", "hbm_bytes_per_chip", "compile_seconds", "hlo_flops_per_step",
            "model_flops_per_step", "hlo_to_model_flops", "suggestion", "wall_seconds")
    return {**labels, **{k: plan.get(k) for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two slices, no unrolled compiles")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "pod_plan.md"))
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "pod_plan.json"))
    args = parser.parse_args()
    import jax

    root = tempfile.mkdtemp(prefix="pod_models_")
    folders = {name: write_model(os.path.join(root, name), values) for name, values in MODELS.items()}
    slices = QUICK_SLICES if args.quick else SLICES
    rows, depth, flops = [], [], []

    def log(row: dict) -> dict:
        print(json.dumps(row), flush=True)
        return row

    # 1. Every model, full and LoRA, on each slice: 8 rows of 4096 tokens per chip.
    for name, folder in folders.items():
        for lora in (0, 16):
            for topology in slices + (("v5p-64",) if name == "Llama-3.1-70B" and not args.quick else ()):
                chips = _chips_of(topology)
                cfg = plan_config(folder, lora, batch=8 * chips, seq=4096, scan=True, fsdp=chips)
                row = _row(one_plan(cfg, topology), model=name, mode=f"LoRA r{lora}" if lora else "full",
                           topology=topology, batch=8 * chips)
                if lora == 0 and topology == "v5p-16" and name != "Llama-3.1-70B" and not args.quick:
                    unrolled = one_plan(plan_config(folder, 0, batch=8 * chips, seq=4096, scan=False, fsdp=chips),
                                        topology)
                    row["compile_seconds_unrolled"] = unrolled["compile_seconds"]
                rows.append(log(row))
    # 2. Compile time against depth: Llama-3.1-8B's layer at 2 layers, scanned and unrolled (32 layers: the
    # Llama-3.1-8B full v5p-16 row above, the same config).
    eight_b = next((r for r in rows if r["model"] == "Llama-3.1-8B" and r["mode"] == "full"
                    and r["topology"] == "v5p-16"), None)
    if eight_b:
        depth += [{"layers": 32, "scan_layers": True, "compile_seconds": eight_b["compile_seconds"]},
                  {"layers": 32, "scan_layers": False, "compile_seconds": eight_b.get("compile_seconds_unrolled")}]
    for layers in (2,):
        folder = write_model(os.path.join(root, f"8B-{layers}L"), {**MODELS["Llama-3.1-8B"], "num_hidden_layers": layers})
        for scan in (True, False) if not args.quick else (True,):
            plan = one_plan(plan_config(folder, 0, batch=64, seq=4096, scan=scan, fsdp=8), "v5p-16")
            depth.append(log({"layers": layers, "scan_layers": scan, "compile_seconds": plan["compile_seconds"],
                              "programs": {k: v["compile_seconds"] for k, v in plan["programs"].items()}}))
    # 3. FLOPs: XLA attention (its matmuls visible), remat none and full.
    for remat in ("none", "full"):
        plan = one_plan(plan_config(folders["Llama-3.1-8B"], 0, batch=64, seq=4096, scan=True, fsdp=8, remat=remat,
                                    attention="xla"), "v5p-16")
        flops.append(log(_row(plan, model="Llama-3.1-8B", remat=remat, attention="xla", topology="v5p-16")))
    header = (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; jax {jax.__version__}, "
              f"libtpu {_version('libtpu')}; {time.strftime('%Y-%m-%d')}")
    with open(args.json, "w") as f:
        json.dump({"machine": header, "rows": rows, "depth": depth, "flops": flops}, f, indent=1)
    text = table(rows, depth, flops, header)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def table(rows: list[dict], depth: list[dict], flops: list[dict], header: str) -> str:
    gib = lambda b: f"{b / 2**30:.1f}" if b else "-"  # noqa: E731
    lines = [f"Pod plans ({header}): `--mode=dry_run --topology=SLICE`, seq 4096 packed, 8 rows per chip, bf16 "
             "compute over float32 params, remat full, scanned layers, chunked loss, splash attention (its FLOPs "
             "are hidden from the HLO count).", "",
             "| model | mode | slice | chips | batch | fits | peak GiB/chip | HBM GiB | compile s | compile s unrolled "
             "| HLO/model FLOPs | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("hlo_to_model_flops")
        lines.append(f"| {r['model']} | {r['mode']} | {r['topology']} | {r['chips']} | {r['batch']} | "
                     f"{'yes' if r['fits'] else 'no'} | {gib(r['per_chip_peak_bytes'])} | "
                     f"{gib(r['hbm_bytes_per_chip'])} | {r['compile_seconds']:.1f} | "
                     f"{r.get('compile_seconds_unrolled') or '-'} | {f'{ratio:.3f}' if ratio else '-'} | "
                     f"{r['wall_seconds']} |")
    advice = [f"- {r['model']} {r['mode']} on {r['topology']}: {r['suggestion']}" for r in rows if r["suggestion"]]
    lines += ["", "What the plans that do not fit say:", "", *advice] if advice else []
    if depth:
        lines += ["", "Compile seconds (train + eval steps) against depth, Llama-3.1-8B layers, v5p-16:", "",
                  "| layers | scanned | unrolled |", "|---|---|---|"]
        for layers in sorted({d["layers"] for d in depth}):
            got = {d["scan_layers"]: d["compile_seconds"] for d in depth if d["layers"] == layers}
            lines.append(f"| {layers} | {got.get(True, '-')} | {got.get(False, '-')} |")
    if flops:
        lines += ["", "HLO against model FLOPs with XLA attention (its matmuls visible), Llama-3.1-8B full, v5p-16:",
                  "", "| remat | HLO FLOPs/step | model FLOPs/step | ratio |", "|---|---|---|---|"]
        for r in flops:
            lines.append(f"| {r['remat']} | {r['hlo_flops_per_step']:.4g} | {r['model_flops_per_step']:.4g} | "
                         f"{r['hlo_to_model_flops']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
