"""Peak host memory of loading a checkpoint onto an 8-device mesh: the old path vs one tensor at a time.

    python benchmarks/load_memory.py                 # ~110M-param random BERT-base shape, fsdp=8 CPU mesh
    python benchmarks/load_memory.py --layers 4      # smaller and faster

Builds a random BERT-base-shaped HF checkpoint (transformers + torch, safetensors) in a temp folder, then loads
it in a fresh subprocess per variant and reports the peak RSS above the RSS after importing jax and ftjax
(VmHWM after resetting it; getrusage's ru_maxrss where that cannot be reset):
  old: the whole model.safetensors read into host memory (safetensors.numpy.load_file), every param made on the
       default device, then `jax.device_put` into the trainer's shardings (what ftjax did before);
  new: `models.from_pretrained(folder, mesh=mesh)`: one tensor read at a time, each placed straight into its
       sharding. On CPU the "devices" live in host memory, so both peaks include the model's own bytes once;
       the overhead column (peak minus the params' bytes) is what loading costs beyond holding the model.
The vocabulary is 30528 (BERT-base's 30522 padded to a multiple of 64) so the embedding's rows divide over
fsdp=8; 30522 would leave that table replicated on each of the 8 devices.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

VOCAB = 30528


def build_checkpoint(folder: str, layers: int) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=768, num_hidden_layers=layers,
                                  num_attention_heads=12, intermediate_size=3072)
    transformers.BertModel(cfg).save_pretrained(folder)


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def _baseline_mb() -> float:
    """The RSS now, after resetting the peak to it where Linux allows (/proc/self/clear_refs "5"): imports
    leave the high-water mark above the current RSS, which would hide the first loaded megabytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except OSError:
        return _peak_mb()


def _peak_mb() -> float:
    """Peak RSS: VmHWM (resettable), else getrusage's ru_maxrss (KiB on Linux)."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(variant: str, folder: str, devices: int) -> dict:
    """Loads `folder` once with `variant` and returns its peak RSS above the post-import baseline (MiB)."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh
    from safetensors.numpy import load_file

    from ftjax import hf, models
    from ftjax import params as params_lib
    from ftjax import sharding as sharding_lib

    mesh = Mesh(np.asarray(jax.devices()[:devices]).reshape(1, devices, 1), sharding_lib.MESH_AXES)
    base = _baseline_mb()
    start = time.perf_counter()
    if variant == "old":

        class WholeFile(hf.Weights):  # the old loader: every tensor in host memory until the model is built
            def read(self, key: str) -> np.ndarray:
                return self._loaded[key]

        path = os.path.join(folder, hf.SAFETENSORS)
        state = load_file(path)
        weights = WholeFile([path], {}, {k: v.shape for k, v in state.items()}, loaded=state)
        hf.open_weights = lambda folder, allow_pickle=False: weights
        del state
        model = models.from_pretrained(folder)
        del weights
        _, params, _ = params_lib.split(model)
        shardings = sharding_lib.param_shardings(params, model.logical_axes(), mesh,
                                                 head_dim=sharding_lib.head_dim_of(model))
        params = jax.device_put(params, shardings)  # what Run._init_state did
        nnx.update(model, params)
    else:
        model = models.from_pretrained(folder, mesh=mesh)
        _, params, _ = params_lib.split(model)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    return {"variant": variant, "peak_mb": _peak_mb() - base, "params_mb": nbytes / 2**20, "seconds": seconds}


def run_child(variant: str, folder: str, devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--folder", folder,
                          "--devices", str(devices)], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="BERT layers (12: ~110M params)")
    parser.add_argument("--devices", type=int, default=8, help="CPU devices of the fsdp mesh")
    parser.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.devices)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(tmp, args.layers)
        size = os.path.getsize(os.path.join(tmp, "model.safetensors")) / 2**20
        print(f"checkpoint: BERT-base shape, {args.layers} layers, model.safetensors {size:.0f} MiB; "
              f"mesh fsdp={args.devices} (CPU devices)")
        results = {v: run_child(v, tmp, args.devices) for v in ("old", "new")}
    for r in results.values():
        print(f"{r['variant']}: peak RSS +{r['peak_mb']:.0f} MiB (params {r['params_mb']:.0f} MiB, overhead "
              f"{r['peak_mb'] - r['params_mb']:.0f} MiB), {r['seconds']:.1f} s")
    old, new = results["old"], results["new"]
    print(f"peak ratio old/new: {old['peak_mb'] / new['peak_mb']:.2f}x; overhead ratio: "
          f"{(old['peak_mb'] - old['params_mb']) / max(new['peak_mb'] - new['params_mb'], 1.0):.1f}x")


if __name__ == "__main__":
    main()
