"""Seq2seq training step: ftjax (jitted) vs transformers-PyTorch on a random t5-small-shaped model, CPU.

    python benchmarks/seq2seq_step.py                    # t5-small shape, batch 8 x 128 source / 64 target
    python benchmarks/seq2seq_step.py --layers=2 --steps=3   # quicker

Both sides take the same step on the same batch in the same process: teacher-forced forward (decoder inputs
= labels shifted right), token-mean cross-entropy, backward, global-norm clipping at 1.0 and AdamW (lr 1e-4,
weight decay 0.01), float32. ftjax runs `ftjax.step.make_train_step` with the optax chain of
`ftjax.optim.build` (donated state); PyTorch runs T5ForConditionalGeneration(labels=...) + torch.optim.AdamW.
Prints the median step time of each, the ratio, and both first-step losses (equal up to float error).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from ftjax import models, optim
from ftjax import params as params_lib
from ftjax import step as step_lib
from ftjax.config import default_config


def make_batch(args: argparse.Namespace, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (args.batch, args.source_len)).astype(np.int32)
    labels = rng.integers(2, vocab, (args.batch, args.target_len)).astype(np.int32)
    labels[:, -1] = 1  # eos
    decoder = np.concatenate([np.zeros_like(labels[:, :1]), labels[:, :-1]], axis=1)  # start = pad = 0
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "decoder_input_ids": decoder,
            "decoder_attention_mask": np.ones_like(labels), "labels": labels,
            "weights": np.ones(args.batch, np.float32)}


def time_ftjax(folder: str, batch: dict, steps: int) -> tuple[list[float], float, float]:
    """Step times (s), the first loss and the compile time of ftjax's jitted train step."""
    model = models.from_pretrained(folder, task="seq2seq", dtype="float32")
    o = default_config().optim
    o.lr, o.weight_decay, o.clip_norm, o.schedule.type = 1e-4, 0.01, 1.0, "constant"
    graphdef, params, rest = params_lib.split(model)
    opt = optim.build(o, params, total_steps=steps + 2, steps_per_epoch=steps + 2, head_pattern=model.head_pattern)
    state = {"step": jnp.int32(0), "params": params, "opt_state": opt.tx.init(params)}
    fn = step_lib.make_train_step(graphdef, rest, opt.tx, opt.trainable_at(0), step_lib.StepConfig("seq2seq"))
    key, device_batch = jax.random.key(0), jax.device_put(batch)
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=(0,)).lower(state, device_batch, key).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, device_batch, key)  # warm-up
    first = float(metrics["loss"])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, device_batch, key)
        jax.block_until_ready(state["params"])
        times.append(time.perf_counter() - t0)
    return times, first, compile_s


def time_torch(folder: str, batch: dict, steps: int) -> tuple[list[float], float]:
    """Step times (s) and the first loss of transformers' T5 with torch AdamW."""
    model = transformers.T5ForConditionalGeneration.from_pretrained(folder).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, eps=1e-8)
    inputs = {k: torch.tensor(batch[k]).long() for k in ("input_ids", "attention_mask", "labels")}

    def one_step() -> float:
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first = one_step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t0)
    return times, first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--source_len", type=int, default=128)
    p.add_argument("--target_len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--output_json", default="")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = transformers.T5Config(num_layers=args.layers, num_decoder_layers=args.layers, dropout_rate=0.0,
                                decoder_start_token_id=0)  # t5-small: d_model 512, d_ff 2048, 8 heads
    with tempfile.TemporaryDirectory() as folder:
        transformers.T5ForConditionalGeneration(cfg).save_pretrained(folder)
        batch = make_batch(args, cfg.vocab_size)
        jax_times, jax_loss, compile_s = time_ftjax(folder, batch, args.steps)
        torch_times, torch_loss = time_torch(folder, batch, args.steps)
    result = {
        "shape": f"t5-small ({args.layers}+{args.layers} layers), batch {args.batch} x {args.source_len} source / "
                 f"{args.target_len} target, float32",
        "ftjax_step_s": statistics.median(jax_times), "torch_step_s": statistics.median(torch_times),
        "torch_over_ftjax": statistics.median(torch_times) / statistics.median(jax_times),
        "ftjax_compile_s": compile_s, "first_loss": {"ftjax": jax_loss, "torch": torch_loss},
        "steps_timed": args.steps, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
    }
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
