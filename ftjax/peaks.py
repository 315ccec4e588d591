"""The peak FLOP/s of devices, the denominator of MFU: the datasheet dense bf16 rate by device_kind for
accelerators, $FTJAX_PEAK_FLOPS to override, and on CPU a measured float32 matmul rate, the best this machine
has shown (a measurement under load reads low, so the highest one is kept)."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


# Dense (no 2:4 sparsity) bf16 peak FLOP/s per device, matched against jax's device_kind in order.
# NVIDIA's datasheets list the sparse figure with a footnote "Specifications are one-half lower without
# sparsity"; the numbers below are those halves. Google's Cloud TPU pages list bf16 per chip, and a jax TPU
# device is one chip (v4: one megacore chip; v5e/v5p/v6e: one TensorCore chip).
PEAKS: tuple[tuple[str, float, str], ...] = (
    # H200 SXM 989 TFLOPS (1,979 sparse), H200 NVL 835: nvidia.com/en-us/data-center/h200/
    (r"H200.*NVL", 835e12, "NVIDIA H200 NVL"),
    (r"H200", 989e12, "NVIDIA H200"),
    # H100 SXM 989 (1,979 sparse), PCIe 756 (1,513 sparse), NVL 835: nvidia.com/en-us/data-center/h100/
    (r"H100.*NVL", 835e12, "NVIDIA H100 NVL"),
    (r"H100.*PCI", 756e12, "NVIDIA H100 PCIe"),
    (r"H100", 989e12, "NVIDIA H100 SXM"),
    # A100 SXM and PCIe: 312 TFLOPS bf16 (624 sparse): nvidia.com/en-us/data-center/a100/
    (r"A100", 312e12, "NVIDIA A100"),
    # L4: 242 TFLOPS bf16 with sparsity -> 121 dense: nvidia.com/en-us/data-center/l4/
    (r"\bL4\b", 121e12, "NVIDIA L4"),
    # cloud.google.com/tpu/docs/v6e ("Peak compute per chip (bf16) 918 TFLOPs"); device_kind "TPU v6 lite"
    (r"TPU v6", 918e12, "TPU v6e"),
    # cloud.google.com/tpu/docs/v5e (197 TFLOPs bf16 per chip); device_kind "TPU v5 lite"
    (r"TPU v5 ?(lite|e)", 197e12, "TPU v5e"),
    # cloud.google.com/tpu/docs/v5p (459 TFLOPs bf16 per chip); device_kind "TPU v5" or "TPU v5p"
    (r"TPU v5", 459e12, "TPU v5p"),
    # cloud.google.com/tpu/docs/v4 (275 TFLOPs bf16 per chip)
    (r"TPU v4", 275e12, "TPU v4"),
)
PEAK_ENV = "FTJAX_PEAK_FLOPS"  # overrides the per-device peak (FLOP/s; on CPU, the whole host's)
_CPU_PEAK: float | None = None
MEASURED = "measured float32 matmul"  # the source of a peak measured here (it may be raised: remember_cpu_peak)


def table_peak(device_kind: str) -> tuple[float, str] | None:
    """(dense bf16 peak FLOP/s, the name it matched) for a jax device_kind, or None if unknown."""
    for pattern, peak, name in PEAKS:
        if re.search(pattern, device_kind, re.IGNORECASE):
            return peak, name
    return None


def measure_cpu_peak(n: int = 1024, seconds: float = 0.3, bursts: int = 3) -> float:
    """float32 FLOP/s of a jitted n x n matmul on the default CPU device (XLA's threads use every core): the
    best repetition of `bursts` bursts of about seconds / bursts each, a pause between them so that a burst
    of other work (a compile, another process) slows some of them, not all."""
    x = jnp.ones((n, n), jnp.float32)
    fn = jax.jit(lambda a: a @ a)
    fn(x).block_until_ready()  # compile and warm up
    best = math.inf
    for i in range(bursts):
        if i:
            time.sleep(0.05)
        deadline = time.perf_counter() + seconds / bursts
        while time.perf_counter() < deadline or best == math.inf:
            t0 = time.perf_counter()
            fn(x).block_until_ready()
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def _cpu_key() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()} | {os.cpu_count()} cores | jax {jax.__version__}"


def _peak_cache() -> str:
    root = os.environ.get("FTJAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ftjax")
    return os.path.join(root, "cpu_peak.json")


def remember_cpu_peak(flops_per_s: float) -> float:
    """The best float32 rate this machine has shown (kept per CPU model, core count and jax version in
    ~/.cache/ftjax/cpu_peak.json, or $FTJAX_CACHE_DIR): load can only lower a measurement, so the highest one is the peak. Returns
    the peak after adding `flops_per_s`; a cache that cannot be read or written only loses the memory."""
    global _CPU_PEAK
    path, key = _peak_cache(), _cpu_key()
    try:
        with open(path) as f:
            seen = json.load(f)
    except (OSError, ValueError):
        seen = {}
    best = max(float(seen.get(key, 0.0)), flops_per_s, _CPU_PEAK or 0.0)
    if best > float(seen.get(key, 0.0)):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump({**seen, key: best}, f)
            os.replace(path + ".tmp", path)
        except OSError:
            pass
    _CPU_PEAK = best
    return best


def device_peak(device: Any = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from): $FTJAX_PEAK_FLOPS, the datasheet table by
    device_kind, or on CPU a measured float32 matmul rate (for the whole host: the best of this measurement
    and the ones this machine made before, `remember_cpu_peak`). An unknown accelerator gives (nan, why)."""
    device = device if device is not None else jax.devices()[0]
    kind = str(getattr(device, "device_kind", "") or device.platform)
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]), f"${PEAK_ENV} ({kind})"
    found = table_peak(kind)
    if found is not None:
        return found[0], f"datasheet dense bf16: {found[1]} (device_kind {kind!r})"
    if device.platform == "cpu":
        peak = _CPU_PEAK if _CPU_PEAK is not None else remember_cpu_peak(measure_cpu_peak())
        return peak, f"{MEASURED} on this CPU ({os.cpu_count()} cores; best seen on this machine)"
    return math.nan, f"unknown device_kind {kind!r}: set ${PEAK_ENV}"


def total_peak(devices: Sequence[Any]) -> tuple[float, str]:
    """Peak FLOP/s of `devices` together (CPU devices share one host: its measured peak counts once)."""
    peak, source = device_peak(devices[0])
    if devices[0].platform == "cpu":
        return peak, source
    return peak * len(devices), f"{len(devices)} x {source}"
