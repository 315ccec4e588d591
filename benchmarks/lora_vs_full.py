"""Full fine-tuning vs LoRA on a ~100M-parameter Llama-shaped random model: step time and compiled memory.

    python benchmarks/lora_vs_full.py                      # ~110M params, batch 2 x 128 tokens, 3 steps
    python benchmarks/lora_vs_full.py --layers=4 --steps=2  # quicker

Memory is XLA's compiled memory_analysis() of the jitted train step (arguments + outputs + temporaries,
minus donated/aliased buffers): params, optimizer state, gradients and activations as the step sees them.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def build_step(model, lora_rank: int, batch: dict, steps: int):
    from ftjax import lora, optim
    from ftjax import step as step_lib
    from ftjax import params as params_lib
    from ftjax.config import default_config

    o = default_config().optim
    o.schedule.type = "constant"
    if lora_rank:
        o.lora.rank = lora_rank
        o.lora.targets = r".*/(q_proj|v_proj)"
        lora.apply_lora(model, o.lora)
    graphdef, params, rest = params_lib.split(model)
    head = lora.optim_head_pattern(model) if lora_rank else model.head_pattern
    opt = optim.build(o, params, total_steps=steps + 1, steps_per_epoch=steps + 1, head_pattern=head)
    state = {"step": jnp.int32(0), "params": params, "opt_state": opt.tx.init(params)}
    fn = step_lib.make_train_step(graphdef, rest, opt.tx, opt.trainable_at(0), step_lib.StepConfig("causal_lm"))
    jitted = jax.jit(fn, donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    total = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    trainable = sum(r.size for r in opt.table.values() if not r.frozen)
    return (
        compiled,
        state,
        {
            "params": sum(r.size for r in opt.table.values()),
            "trainable": trainable,
            "opt_state_bytes": opt.state_bytes(),
            "temp_bytes": mem.temp_size_in_bytes,
            "argument_bytes": mem.argument_size_in_bytes,
            "output_bytes": mem.output_size_in_bytes,
            "peak_bytes": total,
            "compile_s": compile_s,
        },
    )


def run(name: str, args, lora_rank: int) -> dict:
    import transformers

    from ftjax import models

    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    model = models.from_config(cfg, task="causal_lm")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "labels": ids,
        "weights": np.ones(args.batch, np.float32),
    }
    compiled, state, info = build_step(model, lora_rank, batch, args.steps)
    key = jax.random.key(0)
    state, m = compiled(state, batch, key)  # warm-up
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch, key)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    info["step_s"] = float(np.median(times))
    info["name"] = name
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--mlp", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args()
    full = run("full", args, 0)
    lo = run(f"lora r={args.rank} (q,v)", args, args.rank)
    mib = 2**20
    print(
        f"{jax.devices()[0].platform} x{jax.device_count()}; {full['params'] / 1e6:.1f}M params; "
        f"batch {args.batch} x {args.seq} tokens"
    )
    print(
        f"{'':22} {'trainable':>12} {'step s':>8} {'peak MiB':>9} {'temp MiB':>9} {'opt state MiB':>14} "
        f"{'compile s':>9}"
    )
    for r in (full, lo):
        print(
            f"{r['name']:22} {r['trainable']:>12,} {r['step_s']:>8.3f} {r['peak_bytes'] / mib:>9.1f} "
            f"{r['temp_bytes'] / mib:>9.1f} {r['opt_state_bytes'] / mib:>14.1f} {r['compile_s']:>9.1f}"
        )
    print(
        f"lora / full: step time {lo['step_s'] / full['step_s']:.2f}x, peak memory "
        f"{lo['peak_bytes'] / full['peak_bytes']:.2f}x, temp memory {lo['temp_bytes'] / full['temp_bytes']:.2f}x, "
        f"optimizer state {lo['opt_state_bytes'] / full['opt_state_bytes']:.4f}x"
    )


if __name__ == "__main__":
    main()
