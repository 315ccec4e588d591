"""Steady-state step time and MFU of a Llama-shaped model (random weights, packed rows of seq_len tokens),
full fine-tune and LoRA, through ftjax's own train step (ftjax.step.make_train_step, jitted with the
trainer's shardings over all local devices, data x fsdp mesh).

    python benchmarks/mfu.py                      # ~1.1B (TinyLlama shape), seq 2048, bf16: for a GPU/TPU
    python benchmarks/mfu.py --preset cpu         # ~30M, seq 256, float32: what a 2-core CPU can run
    python benchmarks/mfu.py --output_json benchmarks/results/mfu.json

MFU = model FLOPs per step (ftjax.flops: matmuls of forward + backward, trainable-aware, real packed
tokens) / step time / the devices' peak (datasheet dense bf16 on GPU/TPU; a measured float32 matmul rate on
CPU, so there it reads as "% of this CPU's matmul peak").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from ftjax import flops as flops_lib
from ftjax import lora, models, optim, peaks
from ftjax import params as params_lib
from ftjax import sharding as sharding_lib
from ftjax import step as step_lib
from ftjax.config import default_config

PRESETS = {
    # TinyLlama-1.1B's shape: 22 layers, d 2048, GQA 32/4 heads, MLP 5632, vocab 32000.
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, vocab_size=32000, seq=2048, rows=8, dtype="bfloat16"),
    "cpu": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=1408, vocab_size=8000, seq=256, rows=4, dtype="float32"),
}


def packed_batch(rows: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows filled with documents of random lengths (segment ids 1..n, positions restarting per document)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (rows, seq), dtype=np.int32)
    seg, pos = np.zeros((rows, seq), np.int32), np.zeros((rows, seq), np.int32)
    for r in range(rows):
        start, doc = 0, 1
        while start < seq:
            n = int(min(seq - start, rng.integers(seq // 8, seq // 2)))
            seg[r, start:start + n], pos[r, start:start + n] = doc, np.arange(n)
            start, doc = start + n, doc + 1
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "segment_ids": seg, "position_ids": pos,
            "labels": ids.copy(), "weights": np.ones((rows,), np.float32)}


def measure(preset: dict, lora_rank: int, steps: int) -> dict:
    hf = transformers.LlamaConfig(**{k: v for k, v in preset.items() if k not in ("seq", "rows", "dtype")},
                                  max_position_embeddings=preset["seq"], tie_word_embeddings=False)
    model = models.from_config(hf, task="causal_lm", dtype=preset["dtype"], param_dtype="float32")
    o = default_config().optim
    o.schedule.type = "constant"
    head = model.head_pattern
    if lora_rank:
        o.lora.rank, o.lora.targets = lora_rank, r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        model = lora.apply_lora(model, o.lora)
        head = lora.optim_head_pattern(model)
    graphdef, params, rest = params_lib.split(model)
    opt = optim.build(o, params, total_steps=steps + 10, steps_per_epoch=steps + 10, head_pattern=head)
    cfg = default_config()
    cfg.mesh.data, cfg.mesh.fsdp = 1, -1
    mesh = sharding_lib.make_mesh(cfg.mesh, None)
    shardings = sharding_lib.param_shardings(params, model.logical_axes(), mesh,
                                             head_dim=sharding_lib.head_dim_of(model))
    params = jax.device_put(params, shardings)
    with jax.set_mesh(mesh):
        state = {"step": jnp.int32(0), "params": params, "opt_state": jax.jit(opt.tx.init)(params)}
    trainable = opt.trainable_at(0)
    fn = step_lib.make_train_step(graphdef, rest, opt.tx, trainable, step_lib.StepConfig("causal_lm"))
    batch = packed_batch(preset["rows"] * jax.device_count(), preset["seq"], preset["vocab_size"])
    batch = sharding_lib.shard_batch(batch, mesh)
    jitted = jax.jit(fn, donate_argnums=(0,))
    key = jax.random.key(0)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        compiled = jitted.lower(state, batch, key).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(2):  # warm-up
            state, m = compiled(state, batch, key)
        jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = compiled(state, batch, key)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    shape = flops_lib.batch_shape(jax.device_get(batch))
    model_flops = flops_lib.step_flops(model, trainable, shape).train
    peak, source = peaks.total_peak(jax.devices())
    return {"lora_rank": lora_rank, "params": sum(r.size for r in opt.table.values()),
            "trainable": sum(r.size for r in opt.table.values() if not r.frozen), "compile_s": compile_s,
            "step_s": step_s, "tokens_per_s": shape.tokens / step_s, "model_flops_per_step": model_flops,
            "achieved_flops_per_s": model_flops / step_s, "mfu": model_flops / step_s / peak,
            "peak_flops_per_s": peak, "peak_source": source, "loss": float(m["loss"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--output_json", default="")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    results = {"preset": args.preset, **preset, "devices": [d.device_kind for d in jax.devices()],
               "runs": [measure(preset, 0, args.steps), measure(preset, args.lora_rank, args.steps)]}
    for r in results["runs"]:
        what = f"LoRA r={r['lora_rank']}" if r["lora_rank"] else "full"
        print(f"{what:>10}: {r['params'] / 1e6:.0f}M params ({r['trainable'] / 1e6:.1f}M trainable), step "
              f"{r['step_s'] * 1e3:.0f} ms, {r['tokens_per_s']:.0f} tokens/s, MFU {100 * r['mfu']:.1f}% of "
              f"{r['peak_flops_per_s'] / 1e12:.3g} TFLOP/s ({r['peak_source']}), compile {r['compile_s']:.1f}s")
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
