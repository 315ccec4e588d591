"""Train-step time of each model family, ftjax (one jitted step: forward, backward, AdamW) vs transformers-
PyTorch (the same: forward, backward, torch.optim.AdamW step) on the same random model and batch, on CPU.

    python benchmarks/family_step_time.py                       # every family, hidden 256, 4 layers, 8 x 128
    python benchmarks/family_step_time.py --families=gemma2,mixtral --iters=5

Both sides start from the same weights (ftjax loads the folder transformers saved) in float32; the two are
timed interleaved (one step of each per repetition) so a busy machine slows both alike. Prints the median
step of each and the ratio ftjax / PyTorch (< 1: ftjax is faster), and the first step's losses (they agree).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

H, LAYERS, HEADS, KV, VOCAB = 256, 4, 8, 4, 8000


def configs() -> dict:
    """{family: (transformers config, ftjax task, AutoModel class name)} at one small shape."""
    import transformers as t

    dec = dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=512, pad_token_id=0)
    enc = dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, max_position_embeddings=512, pad_token_id=0, num_labels=2)
    lm, cls = "AutoModelForCausalLM", "AutoModelForSequenceClassification"
    return {
        "llama": (t.LlamaConfig(**dec), "causal_lm", lm),
        "gemma2": (t.Gemma2Config(**dec, head_dim=H // HEADS, sliding_window=64), "causal_lm", lm),
        "gemma3": (t.Gemma3TextConfig(**dec, head_dim=H // HEADS, sliding_window=64), "causal_lm", lm),
        "phi3": (t.Phi3Config(**dec), "causal_lm", lm),
        "mixtral": (t.MixtralConfig(**dec, num_local_experts=4, num_experts_per_tok=2), "causal_lm", lm),
        "qwen3_moe": (t.Qwen3MoeConfig(**{**dec, "intermediate_size": 2 * H}, moe_intermediate_size=H, num_experts=4,
                                        num_experts_per_tok=2, head_dim=H // HEADS), "causal_lm", lm),
        "modernbert": (t.ModernBertConfig(**{k: v for k, v in enc.items() if k != "max_position_embeddings"},
                                          local_attention=64), "classification", cls),
        "deberta-v2": (t.DebertaV2Config(**enc, relative_attention=True, position_buckets=64, pos_att_type=["p2c", "c2p"],
                                         position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True,
                                         type_vocab_size=0), "classification", cls),
    }


def _batch(task: str, batch: int, length: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (batch, length)).astype(np.int32)
    b = {"input_ids": ids, "attention_mask": np.ones_like(ids), "weights": np.ones(batch, np.float32)}
    b["labels"] = ids if task == "causal_lm" else rng.integers(0, 2, batch).astype(np.int32)
    return b


def ftjax_step(folder: str, task: str, batch: dict):
    import jax
    import jax.numpy as jnp

    from ftjax import models, optim
    from ftjax import params as params_lib
    from ftjax import step as step_lib
    from ftjax.config import default_config

    model = models.from_pretrained(folder, task=task)
    o = default_config().optim
    o.schedule.type = "constant"
    o.clip_norm = 0.0
    graphdef, params, rest = params_lib.split(model)
    opt = optim.build(o, params, total_steps=1000, steps_per_epoch=1000, head_pattern=model.head_pattern)
    state = {"step": jnp.int32(0), "params": params, "opt_state": opt.tx.init(params)}
    fn = jax.jit(step_lib.make_train_step(graphdef, rest, opt.tx, opt.trainable_at(0), step_lib.StepConfig(task)),
                 donate_argnums=(0,))
    key, holder = jax.random.key(0), {"state": state}

    def step():
        holder["state"], m = fn(holder["state"], batch, key)
        return float(jax.block_until_ready(m["loss"]))

    return step


def torch_step(folder: str, cls: str, task: str, batch: dict):
    import torch
    import transformers

    model = getattr(transformers, cls).from_pretrained(folder, attn_implementation="eager")
    model.train()
    for m in model.modules():  # dropout off on both sides (ftjax's configs keep HF's rates; the timing is the point)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    mask = torch.tensor(batch["attention_mask"])
    labels = torch.tensor(batch["labels"], dtype=torch.long)

    def step():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="", help="comma-separated (default: all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    import torch
    import transformers

    torch.manual_seed(0)
    table = configs()
    chosen = a.families.split(",") if a.families else list(table)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}; hidden {H}, {LAYERS} layers, batch {a.batch} x {a.length}, float32")
    print("| family | task | ftjax step ms | PyTorch step ms | ftjax / PyTorch | first losses (ftjax, torch) |")
    print("|---|---|---|---|---|---|")
    for name in chosen:
        cfg, task, cls = table[name]
        with tempfile.TemporaryDirectory() as folder:
            getattr(transformers, cls).from_config(cfg).save_pretrained(folder)
            batch = _batch(task, a.batch, a.length)
            ours, theirs = ftjax_step(folder, task, batch), torch_step(folder, cls, task, batch)
            first = (ours(), theirs())  # compiles ftjax's step; the same weights give the same first loss
            times = {"ftjax": [], "torch": []}
            for _ in range(a.iters):
                for side, fn in (("ftjax", ours), ("torch", theirs)):
                    t0 = time.perf_counter()
                    fn()
                    times[side].append(time.perf_counter() - t0)
        f, t = statistics.median(times["ftjax"]) * 1e3, statistics.median(times["torch"]) * 1e3
        print(f"| {name} | {task} | {f:.1f} | {t:.1f} | {f / t:.2f} | {first[0]:.4f}, {first[1]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
