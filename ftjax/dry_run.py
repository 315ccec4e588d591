"""`--mode=dry_run`: what a run would do, before it does it. The run is built as shapes (`Run(purpose="plan")`:
config.json only, no weights or data), its real train and eval steps are compiled ahead of time for the live
devices or a TPU slice (libtpu's topology API, on any machine), and the per-chip memory, whether it fits,
the compile time and the FLOPs are printed beside the param table and written to WORKDIR/dry_run.json."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ftjax import distributed, fileio
from ftjax import flops as flops_lib
from ftjax import params as params_lib
from ftjax import sharding as sharding_lib
from ftjax import workdir as workdir_lib
from ftjax.config import remat_policy
from ftjax.errors import UserError
from ftjax.models import quantized
from ftjax.reporting import optimizer as optimizer_report


class TopologyError(UserError, ValueError):
    """--topology names no slice ftjax can plan for (the message lists the valid names)."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation as gcloud names its accelerator types: `gcloud_name`-N counts TensorCores (v4, v5p: 2
    per chip, one megacore jax device per chip) or chips (v5e, v6e: 1 TensorCore per chip)."""

    gcloud_name: str
    libtpu_name: str  # the prefix of libtpu's topology names ("v5e:4x4")
    counts: str  # "cores" or "chips"
    dims: int  # 2D (v5e, v6e) or 3D (v4, v5p) torus
    hbm_gib: float  # HBM per chip (cloud.google.com/tpu/docs/<generation>)
    kind: str  # a regex on jax's device_kind for live devices


GENERATIONS = (
    Generation("v4", "v4", "cores", 3, 32, r"TPU v4"),
    Generation("v5p", "v5p", "cores", 3, 95, r"TPU v5( ?p)?$"),
    Generation("v5litepod", "v5e", "chips", 2, 16, r"TPU v5 ?(lite|e)"),
    Generation("v6e", "v6e", "chips", 2, 32, r"TPU v6"),
)
ALIASES = {"v5e": "v5litepod"}
VALID = ("v4-N and v5p-N (N TensorCores, 2 per chip: v4-32 = 16 chips; N = 8, 16, 32, ...), v5litepod-N or "
         "v5e-N and v6e-N (N chips: 1, 4, 8, 16, ... 256), a libtpu topology (v5e:4x4, v5p:2x2x2), or cpu:N "
         "(N of this process's CPU devices)")


@dataclasses.dataclass
class Topology:
    """The devices a plan compiles for, with the HBM of each chip and where that number came from."""

    name: str
    devices: list
    hbm_bytes_per_chip: int | None
    memory_source: str
    libtpu_topology: str | None = None

    @property
    def chips(self) -> int:
        return len(self.devices)


def _grid(chips: int, dims: int) -> tuple[int, ...] | None:
    """The chip grid of a slice of `chips` (a power of two): v5e/v6e 2x2, 2x4, 4x4, ...; v4/v5p 2x2x1, 2x2x2,
    2x2x4, 2x4x4, 4x4x4, ... (each step doubles the last of the smallest dims, as gcloud's slices grow)."""
    if chips < 1 or chips & (chips - 1):
        return None
    grid = [1] * dims if dims == 2 or chips < 4 else [2, 2, 1]
    if dims == 3 and chips < 4:
        return None
    while math.prod(grid) < chips:
        i = max(j for j in range(dims) if grid[j] == min(grid))
        grid[i] *= 2
    return tuple(grid)


def _host_memory() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _hbm_of_kind(kind: str) -> int | None:
    for g in GENERATIONS:
        if re.search(g.kind, kind, re.IGNORECASE):
            return int(g.hbm_gib * 2**30)
    return None


def _libtpu_devices(name: str, megacore: bool) -> list:
    # libtpu takes a lock file per process unless told not to; a topology is only a description (no chip is
    # opened), so several planning processes (or one beside a job on a TPU VM) may load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # noqa: PLC0415 - loads libtpu: only for --topology

    kwargs = {"chip_config_name": "megacore"} if megacore else {}
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)
    except Exception as e:  # noqa: BLE001 - libtpu missing or refusing the name: one line for the user
        raise TopologyError(f"libtpu could not describe topology {name!r} ({str(e).splitlines()[0][:200]}); "
                            "is libtpu installed (pip install libtpu)?") from e


def topology(name: str) -> Topology:
    """The devices of `--topology=NAME` (see VALID); a TPU slice's are libtpu's abstract devices, one per chip."""
    text = name.strip().lower()
    if m := re.fullmatch(r"cpu:(\d+)", text):
        n, devices = int(m.group(1)), jax.devices("cpu")
        if n < 1 or len(devices) < n:
            raise TopologyError(f"--topology={name}: this process has {len(devices)} CPU devices; start it with "
                                f"--cpu_devices={max(n, 1)} (or XLA_FLAGS=--xla_force_host_platform_device_count)")
        return Topology(name, devices[:n], _host_memory() // n, f"host RAM / {n} CPU devices")
    by_libtpu = {g.libtpu_name: g for g in GENERATIONS}
    if m := re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", text):
        gen = by_libtpu.get(m.group(1))
        if gen is None or len(m.group(2).split("x")) != gen.dims:
            raise TopologyError(f"--topology={name!r} is not known; valid: {VALID}")
        devices = _libtpu_devices(text, megacore=gen.counts == "cores")
        return Topology(name, devices, int(gen.hbm_gib * 2**30), f"table: TPU {gen.libtpu_name} {gen.hbm_gib:g} GiB "
                        "HBM per chip", text)
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
    gens = {g.gcloud_name: g for g in GENERATIONS}
    gen = gens.get(ALIASES.get(m.group(1), m.group(1))) if m else None
    if gen is None:
        raise TopologyError(f"--topology={name!r} is not known; valid: {VALID}")
    n = int(m.group(2))
    chips = n // 2 if gen.counts == "cores" else n
    grid = _grid(chips, gen.dims) if gen.counts == "chips" or n % 2 == 0 else None
    if grid is None:
        raise TopologyError(f"--topology={name!r}: {gen.gcloud_name}-N counts {gen.counts}, and {n} is not a slice "
                            f"size ftjax knows; valid: {VALID}")
    libtpu = f"{gen.libtpu_name}:{'x'.join(map(str, grid))}"
    devices = _libtpu_devices(libtpu, megacore=gen.counts == "cores")
    return Topology(name, devices, int(gen.hbm_gib * 2**30),
                    f"table: TPU {gen.libtpu_name} {gen.hbm_gib:g} GiB HBM per chip", libtpu)


def live_topology() -> Topology:
    """This process's devices (all processes' for a multi-host run): HBM from memory_stats' bytes_limit where
    the backend reports it, else the TPU table by device_kind; CPU devices share the host's RAM."""
    devices = jax.devices()
    first = devices[0]
    if first.platform == "cpu":
        local = len(jax.local_devices())
        return Topology(f"cpu:{len(devices)}", devices, _host_memory() // local, f"host RAM / {local} CPU devices")
    try:
        stats = first.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends do not implement it
        stats = {}
    if stats.get("bytes_limit"):
        return Topology(f"live:{first.device_kind}x{len(devices)}", devices, int(stats["bytes_limit"]),
                        "device memory_stats bytes_limit")
    hbm = _hbm_of_kind(first.device_kind)
    return Topology(f"live:{first.device_kind}x{len(devices)}", devices, hbm,
                    "table by device_kind" if hbm else "unknown (no memory_stats)")


# ----------------------------------------------------------------------------------------------------
# The plan: compile, measure, judge.


def _gib(n: float) -> str:
    """Bytes as GiB, or MiB below 1 GiB (a small plan's parts would all read 0.00 GiB)."""
    return f"{n / 2**30:,.2f} GiB" if abs(n) >= 2**30 else _mib(n)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs (its shard of each leaf)."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(tuple(x.shape)) if sharding is not None else tuple(x.shape)
        # A PRNG key (threefry) is two uint32 words.
        itemsize = 8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.dtype(x.dtype).itemsize
        total += math.prod(shape) * itemsize
    return int(total)


def _flops_of(lowered: Any) -> float | None:
    """Matmul FLOPs of one step of the whole mesh: the lowered (not yet partitioned) program's dots, each loop
    body (the scanned layers) times its trip count, remat's recomputation included (ftjax.flops)."""
    try:
        return flops_lib.hlo_matmul_flops(lowered.as_text(dialect="hlo"))
    except (ValueError, KeyError) as e:  # an HLO construct the counter does not read: no number, not a guess
        logging.warning("dry_run: could not count the HLO FLOPs (%s)", e)
        return None


_SIZE = r"([\d.]+)([KMGT]?)i?B?"
_OOM_TEMP = re.compile(r"memory required for HLO temporaries \(" + _SIZE + r"\)")
_OOM_USED = re.compile(r"Used " + _SIZE + r" of " + _SIZE + r" hbm")
_OOM_AVAILABLE = re.compile(r"available HBM \(" + _SIZE + r"\)")


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** "_KMGT".index(unit or "_"))


def _out_of_memory(error: Exception, arguments: int) -> dict[str, Any] | None:
    """The TPU compiler refuses a program that does not fit its chip's HBM (XLA error E1000); its message is
    the verdict: the memory it needed (temporaries beside the arguments, or the whole program), and the HBM it
    had. None for any other error."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text or not re.search(r"HbmOom|out of memory", text, re.IGNORECASE):
        return None
    out: dict[str, Any] = {"out_of_memory": text.strip().splitlines()[0][:400], "arguments": arguments,
                           "output": 0, "alias": 0}
    if m := _OOM_TEMP.search(text):
        out["temp"] = _bytes(*m.groups())
        out["peak_bytes"] = arguments + out["temp"]
    elif m := _OOM_USED.search(text):
        out["peak_bytes"] = _bytes(*m.groups()[:2])
        out["temp"] = max(out["peak_bytes"] - arguments, 0)
    if m := _OOM_AVAILABLE.search(text) or _OOM_USED.search(text):
        out["compiler_hbm_bytes"] = _bytes(*m.groups()[-2:])
    return out


def _compile(fn: Any, args: tuple, mesh: Any) -> dict[str, Any]:
    """Lowers and compiles `fn` for `args` (ShapeDtypeStructs) on `mesh`: seconds, memory and FLOPs per device.
    A TPU program that does not fit is refused by the compiler: its message gives the memory instead."""
    return _compiled(fn, args, mesh)[0]


def _compiled(fn: Any, args: tuple, mesh: Any) -> tuple[dict[str, Any], Any]:
    """`_compile`'s numbers and the compiled program (None when the compiler refused it)."""
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = fn.lower(*args)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            compiled, refused = None, _out_of_memory(e, per_device_bytes(args))
            if refused is None:
                raise
    out: dict[str, Any] = {"compile_seconds": round(time.perf_counter() - t0, 3), "hlo_flops": _flops_of(lowered)}
    if compiled is None:
        return {**out, **refused}, None
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if (cost or {}).get("flops", -1) >= 0:  # XLA's own count: one device's, a loop body (the scan) counted once
        out["xla_cost_analysis_flops_per_device"] = float(cost["flops"])
    stats = compiled.memory_analysis()
    if stats is not None:
        parts = {"arguments": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
                 "alias": stats.alias_size_in_bytes, "temp": stats.temp_size_in_bytes,
                 "generated_code": stats.generated_code_size_in_bytes}
        out.update({k: int(v) for k, v in parts.items()})
        # The outputs that alias donated arguments take no new memory (MaxText's train_compile sums the same).
        out["peak_bytes"] = out["arguments"] + out["output"] - out["alias"] + out["temp"]
    return out, compiled


def _model_flops(run: Any, rows: int, seq_len: int | None) -> float | None:
    try:
        shape = flops_lib.Shape(rows, seq_len or 0)
        return float(flops_lib.step_flops(run.model, run.optimizer.trainable_at(0), shape).train)
    except ValueError:  # a family without a FLOP count (seq2seq ones)
        return None


def suggestion(run: Any, parts: dict[str, int], peak: int, hbm: int) -> str:
    """One line on what to change, from the part of the per-chip peak that dominates: the state (params,
    optimizer state, averages: more fsdp, LoRA) or the step's temporaries (activations: remat, grad_accum).
    State that alone exceeds the HBM is said so: no activation setting can fix it. Each idea is to re-plan."""
    cfg, mesh, chips = run.cfg, dict(run.mesh.shape), run.mesh.devices.size
    state = parts["params"] + parts["optimizer_state"] + parts["averages"]
    temp = parts["temp"]
    ideas: list[tuple[int, str]] = []
    state_alone = state > hbm
    if state > 0.3 * peak or state_alone:
        shardable = chips // mesh["tensor"]
        if mesh["fsdp"] < shardable:
            spread = state * mesh["fsdp"] / shardable
            ideas.append((state, f"more fsdp: mesh.fsdp={shardable} mesh.data=1 (params and optimizer state over "
                                 f"{shardable} chips: about {_gib(spread)} per chip instead of {_gib(state)})"))
        if not cfg.optim.lora.rank:
            ideas.append((state, "LoRA (optim.lora.rank=16): no gradients or optimizer state for the frozen base"))
        elif not cfg.optim.lora.quantize_base:
            ideas.append((parts["params"], "QLoRA: optim.lora.quantize_base=nf4 stores the frozen base Linears in 4 "
                                           "bits (about 1/7 of float32, 1/3.5 of bfloat16)"))
        elif str(cfg.model.param_dtype) == "float32":
            ideas.append((parts["params"], f"model.param_dtype=bfloat16: params stored in bfloat16, the adapters too (the base "
                                           f"{_gib(parts['params'] / 2)} per chip instead of {_gib(parts['params'])})"))
        if state_alone:
            need = 2 ** math.ceil(math.log2(max(state * mesh["fsdp"] / (0.6 * hbm), 1)))
            ideas.append((state, f"a slice of at least {need} chips with mesh.fsdp={need}"))
    if temp > 0.3 * peak and not state_alone:
        if remat_policy(cfg.model.remat) != "full":
            ideas.append((temp, f"model.remat=full (now {remat_policy(cfg.model.remat)}): each layer recomputed "
                                "in the backward pass, only layer inputs kept"))
        batch, accum = int(cfg.train.batch_size), int(cfg.train.grad_accum)
        dp = sharding_lib.data_parallel_size(run.mesh)
        # Micro-batches shrink the activations about in proportion: enough of them that state + temp / (k /
        # accum) leaves 10% of the HBM free, the next that divides the batch evenly over the data axes.
        room = 0.9 * hbm - state
        k = accum * 2 ** max(1, math.ceil(math.log2(temp / room))) if room > 0 else accum * 2
        while k <= batch // dp and batch % (dp * k):
            k *= 2
        vocab = getattr(getattr(run.model, "config", None), "vocab_size", None)
        if cfg.model.task in ("causal_lm", "seq2seq") and not cfg.model.loss_chunk_tokens and vocab:
            rows = max(int(cfg.train.eval_batch_size or 2 * batch), batch) // dp
            logits = rows * int(cfg.data.max_len) * int(vocab) * 4
            ideas.append((logits, f"model.loss_chunk_tokens=8192 (the loss from the hidden states in chunks: no "
                                  f"[rows, length, vocab] float32 logits, up to {_gib(logits)} per chip here)"))
        if k <= batch // dp and batch % (dp * k) == 0:
            ideas.append((temp, f"a smaller per-chip batch: train.grad_accum={k} (the global batch of {batch} in "
                                f"{k} micro-batches of {batch // k}: {batch // k // dp} rows per chip at a time)"))
    ideas.sort(key=lambda kv: -kv[0])
    if state_alone:
        what = (f"params + optimizer state alone take {_gib(state)} per chip, more than the HBM (remat or "
                "grad_accum cannot fix that)")
    else:
        what = "mostly " + ("state (params + optimizer state)" if state >= temp
                            else "temp (activations, gradients, workspace)")
    fixes = "; or ".join(i for _, i in ideas) or f"a slice with more than {chips} chips"
    return f"does not fit: per-chip peak {_gib(peak)} > HBM {_gib(hbm)}, {what}; try (and re-plan): {fixes}"


def plan(run: Any, topo: Topology) -> dict[str, Any]:
    """Compiles the train step (the trainable set at step 0) and the eval step for the longest batches ahead of
    time on the run's mesh and returns the plan (what dry_run.json holds)."""
    cfg, mesh = run.cfg, run.mesh
    train_batch = run.batch_structs("train", longest=True)[0]
    eval_batch = run.batch_structs("eval", longest=True)[0]
    train = _compile(run.train_step_for(0), (run.state, train_batch, run.key, *run.teacher_args), mesh)
    evaluation = _compile(run.eval_step, (run.state["params"], eval_batch, *run.eval_args), mesh)
    parts = {
        "params": per_device_bytes(run.state["params"]),
        "optimizer_state": per_device_bytes(run.state["opt_state"]),
        "averages": per_device_bytes(run.state.get("avg", {})),
        "batch": per_device_bytes(train_batch),
        **{k: train.get(k) for k in ("arguments", "output", "alias", "temp", "generated_code")},
    }
    peaks = [p["peak_bytes"] for p in (train, evaluation) if "peak_bytes" in p]
    peak = max(peaks) if peaks else None
    hbm = topo.hbm_bytes_per_chip
    fits = None if peak is None or hbm is None else bool(peak <= hbm)
    refused = [f"{name}: {p['out_of_memory']}" for name, p in (("train", train), ("eval", evaluation))
               if "out_of_memory" in p]
    if refused:  # the TPU compiler's own verdict (it knows the usable HBM and its padding): does not fit
        fits = False
    layout, chips = run.batch_layout, mesh.devices.size
    rows = layout.train_rows
    hlo = train["hlo_flops"]
    model = _model_flops(run, rows, layout.seq_len)
    device = mesh.devices.flat[0]
    result = {
        "topology": topo.name,
        "libtpu_topology": topo.libtpu_topology,
        "platform": device.platform,
        "device_kind": str(getattr(device, "device_kind", device.platform)),
        "chips": chips,
        "hbm_bytes_per_chip": hbm,
        "hbm_source": topo.memory_source,
        "per_chip_peak_bytes": peak,
        "parts": parts,
        "fits": fits,
        "margin_bytes": None if fits is None or peak is None else int(hbm - peak),
        "compiler_refused": refused,
        "suggestion": suggestion(run, {**parts, "temp": parts["temp"] or 0}, peak, hbm) if fits is False and peak
        else None,
        "compile_seconds": round(train["compile_seconds"] + evaluation["compile_seconds"], 3),
        "programs": {"train": train, "eval": evaluation},
        "hlo_flops_per_step": hlo,
        "hlo_flops_note": "matmul FLOPs of the train step's lowered program (all chips together; scanned "
                          "layers x their count; remat's recomputation included); fused kernels (splash attention) "
                          "hide theirs: plan with model.attention=xla to see them",
        "model_flops_per_step": model,
        "hlo_to_model_flops": None if not hlo or not model else round(hlo / model, 4),
        "mesh": dict(mesh.shape),
        "batch": int(cfg.train.batch_size),
        "batch_rows": rows,
        "eval_batch_rows": layout.eval_rows,
        "grad_accum": int(cfg.train.grad_accum),
        "seq_len": layout.seq_len,
        "batch_structure": {k: [list(v.shape), str(v.dtype)] for k, v in train_batch.items()},
        "task": cfg.model.task,
        "remat": remat_policy(cfg.model.remat),
        "scan_layers": bool(cfg.model.scan_layers),
        "dtype": str(cfg.model.dtype),
        "param_dtype": str(cfg.model.param_dtype),
        "lora_rank": int(cfg.optim.lora.rank),
        "quantize_base": str(cfg.optim.lora.quantize_base),
        "params_total": params_lib.count(run.state["params"]),
    }
    if run.primary:
        fileio.write_json(fileio.path(run.workdir) / workdir_lib.DRY_RUN_FILE, result)
    return result


def extras(run: Any) -> list[str]:
    """The hyperparameters outside the param table: re-initialised layers and weight averaging."""
    cfg, avg, lines = run.cfg, run.averaging, []
    per_copy = _mib(params_lib.nbytes(run.state["avg"].get("ema", run.state["avg"].get("swa")))) if avg.on else ""
    spec = quantized.spec_of(cfg.optim.lora)
    if spec is not None:
        count, stored, full = quantized.storage(run.model, cfg.model.param_dtype)
        lines.append(f"QLoRA base: {count} Linear kernels stored {spec.qtype} (block {spec.block}"
                     f"{', double-quantised scales' if spec.double else ''}): {_mib(stored)} instead of {_mib(full)} "
                     f"in {cfg.model.param_dtype} ({full / max(stored, 1):.1f}x less; total, before sharding)")
    if cfg.model.reinit_layers:
        lines.append(f"re-initialised before fine-tuning (model.reinit_layers={cfg.model.reinit_layers}, seed "
                     f"{cfg.train.seed}): the top {cfg.model.reinit_layers} layers of each stack and any pooler")
    if avg.ema_decay > 0:
        lines.append(f"EMA of the trained params: decay {avg.ema_decay:g} "
                     f"(about the last {1 / (1 - avg.ema_decay):.0f} steps), evaluated as val_ema; {per_copy} "
                     "kept (total, with the params' sharding)")
    if avg.swa_start is not None:
        lines.append(f"SWA of the trained params: mean of the snapshots from step {avg.swa_start} every "
                     f"{avg.swa_every} steps, evaluated as val_swa; {per_copy} kept (total)")
    return lines


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The plan in a few lines: slice, memory per chip and its parts, fits, compile time, FLOPs."""
    p, hbm, peak = result["parts"], result["hbm_bytes_per_chip"], result["per_chip_peak_bytes"]
    lines = [f"plan for {result['topology']} ({result['chips']} x {result['device_kind']}"
             + (f", libtpu {result['libtpu_topology']}" if result["libtpu_topology"] else "") + f"), mesh {result['mesh']}, "
             f"batch {result['batch']} ({result['batch_rows']} rows) x length {result['seq_len']}, grad_accum "
             f"{result['grad_accum']}, remat {result['remat']}"]
    programs = result["programs"]
    peaking = max(programs, key=lambda k: programs[k].get("peak_bytes") or 0)
    if p.get("arguments") is not None:
        train_peak = programs["train"].get("peak_bytes")
        lines.append(f"per chip, train step: {_gib(train_peak) if train_peak else 'unknown'} = arguments "
                     f"{_gib(p['arguments'])} (params {_gib(p['params'])}, optimizer state "
                     f"{_gib(p['optimizer_state'])}, averages {_gib(p['averages'])}, batch {_mib(p['batch'])}) + "
                     f"temp {_gib(p['temp'] or 0)} + new outputs {_mib((p['output'] or 0) - (p['alias'] or 0))}")
    if peak is not None and peaking != "train":
        q = programs[peaking]
        lines.append(f"per chip, {peaking} step: {_gib(peak)} (the peak) = arguments {_gib(q['arguments'])} + temp "
                     f"{_gib(q.get('temp') or 0)} + new outputs {_mib(q['output'] - q['alias'])}")
    if result["fits"] is not None:
        verdict = "fits" if result["fits"] else "DOES NOT FIT"
        margin = "" if result["margin_bytes"] is None else f": margin {_gib(result['margin_bytes'])}"
        lines.append(f"{verdict} in {_gib(hbm)} per chip ({result['hbm_source']}){margin}")
    lines += [f"the TPU compiler refused the {refusal}" for refusal in result["compiler_refused"]]
    if result["suggestion"]:
        lines.append(result["suggestion"])
    flops = []
    if result["hlo_flops_per_step"]:
        flops.append(f"HLO {result['hlo_flops_per_step']:.4g}")
    if result["model_flops_per_step"]:
        flops.append(f"model {result['model_flops_per_step']:.4g}")
    if result["hlo_to_model_flops"]:
        flops.append(f"ratio {result['hlo_to_model_flops']:.3f}")
    lines.append(f"compiled train + eval steps in {result['compile_seconds']:.1f}s; FLOPs per step: "
                 + (", ".join(flops) or "not reported"))
    return lines


def report(run: Any, result: dict[str, Any] | None = None) -> str:
    """The optimizer's param table, each param's sharding, per-device memory of params and optimizer state,
    and (given a plan's `result`) the compiled steps' per-chip peak, fit and FLOPs."""
    lines = [optimizer_report.describe(run.optimizer), ""]
    rows = sharding_lib.describe(run.state["params"], run.param_shardings)
    width = max(len(r[0]) for r in rows)
    lines.append(f"{'param':<{width}}  {'shape':<18} {'spec':<28} per-device")
    for path, shape, spec, nbytes in rows:
        lines.append(f"{path:<{width}}  {shape!s:<18} {spec:<28} {_mib(nbytes)}")
    param_bytes = sum(r[3] for r in rows)
    opt_bytes = per_device_bytes(run.state["opt_state"])
    extra = extras(run)
    lines += ["", *extra] if extra else []
    steps = (f"{run.total_steps} steps, {run.steps_per_epoch} per epoch" if run.data is not None or run.cfg.train.steps
             else "steps per epoch: known once the data is read")
    lines += [
        "",
        f"mesh {dict(run.mesh.shape)}; {steps}",
        f"per-device memory: params {_mib(param_bytes)}, optimizer state {_mib(opt_bytes)}",
    ]
    if result is not None:
        lines += summary_lines(result)
        lines.append(f"plan: {fileio.path(run.workdir) / workdir_lib.DRY_RUN_FILE}")
    if run.primary:
        path = os.path.join(run.workdir, workdir_lib.PLOTS_DIR, workdir_lib.LR_SCHEDULE_PLOT)
        optimizer_report.plot_lr(run.optimizer, path)
        lines.append(f"LR schedule plot: {path}")
    return "\n".join(lines)


def population_sizes(size: int) -> list[int]:
    """The population sizes a plan compiles: 1, then doublings, then `size` itself (at most 5 programs)."""
    sizes = sorted({1, size} | {2**i for i in range(1, max(size.bit_length() - 1, 1))})
    return sizes if len(sizes) <= 5 else sizes[:2] + sizes[-3:]


def _timed_steps(compiled: Any, args: tuple, mesh: Any, repeats: int = 3) -> float:
    """Median seconds of `compiled` (a train step donating its first argument, the state) on arguments of ones
    materialised with `args`' shardings (what the values are does not change the time)."""
    def ones(x):
        return jax.jit(lambda: jnp.ones(x.shape, x.dtype), out_shardings=x.sharding)()

    with jax.set_mesh(mesh):
        state, *rest = jax.tree_util.tree_map(ones, args)
        times = []
        for i in range(repeats + 1):  # the first call warms up
            t0 = time.perf_counter()
            state, metrics = compiled(state, *rest)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def plan_population(cfg: Any, workdir: str, topo: Topology, size: int) -> dict[str, Any]:
    """`--mode=dry_run --population=K`: the population's train step (ftjax/tune/population.py) compiled for 1,
    2, 4, ... K members of `cfg` on the plan's devices: per-chip peak memory and its parts, the fit, and on live
    devices the measured step time (members that differ in shape-free fields compile this same program; a
    batch-size population's steps are those of its largest batch). Written to WORKDIR/dry_run.json under
    "population"."""
    from ftjax.tune.population import Population  # noqa: PLC0415 - population imports run, which imports us

    live = topo.libtpu_topology is None
    rows = []
    for k in population_sizes(size):
        pop = Population([cfg] * k, workdir, devices=topo.devices, purpose="plan")
        run = pop.run
        repl = sharding_lib.replicated(run.mesh)
        args = (pop.state, pop.hp_device, jax.ShapeDtypeStruct((k,), jnp.bool_, sharding=repl),
                run.batch_structs("train", longest=True)[0], run.key)
        out, compiled = _compiled(pop._step_fn(0), args, run.mesh)
        row = {"members": k, "params": per_device_bytes(pop.state["params"]),
               "optimizer_state": per_device_bytes(pop.state["opt_state"]),
               **{key: out.get(key) for key in ("peak_bytes", "temp", "compile_seconds", "out_of_memory")}}
        hbm = topo.hbm_bytes_per_chip
        row["fits"] = None if hbm is None or row["peak_bytes"] is None else bool(row["peak_bytes"] <= hbm)
        if "out_of_memory" in out:
            row["fits"] = False
        if live and compiled is not None and row["fits"] is not False:
            row["step_seconds"] = _timed_steps(compiled, args, run.mesh)
            row["seconds_per_member"] = row["step_seconds"] / k
        rows.append(row)
    result = {"topology": topo.name, "hbm_bytes_per_chip": topo.hbm_bytes_per_chip, "live": live, "sizes": rows}
    if distributed.is_primary():
        path = fileio.path(workdir) / workdir_lib.DRY_RUN_FILE
        saved = fileio.read_json(path) if path.exists() else {}
        fileio.write_json(path, {**saved, "population": result})
    return result


def population_lines(result: dict[str, Any]) -> list[str]:
    """The population plan as a table: per K, memory per chip, fit and (live) step time."""
    lines = [f"population plan on {result['topology']} (per chip; members x the solo step's state; step time "
             + ("measured here" if result["live"] else "not measured: an abstract slice") + "):",
             f"{'K':>4}  {'peak':>10}  {'params':>10}  {'opt state':>10}  {'fits':>5}  {'step s':>8}  {'s/member':>8}"]
    for r in result["sizes"]:
        peak = _gib(r["peak_bytes"]) if r["peak_bytes"] else "refused"
        fits = {True: "yes", False: "NO", None: "?"}[r["fits"]]
        step = f"{r['step_seconds']:.3f}" if "step_seconds" in r else "-"
        each = f"{r['seconds_per_member']:.3f}" if "seconds_per_member" in r else "-"
        lines.append(f"{r['members']:>4}  {peak:>10}  {_gib(r['params']):>10}  {_gib(r['optimizer_state']):>10}  "
                     f"{fits:>5}  {step:>8}  {each:>8}")
    return lines


def dry_run(cfg: Any, workdir: str, topology_name: str | None = None, population: int = 0) -> dict[str, Any]:
    """`--mode=dry_run [--topology=NAME] [--population=K]`: the plan of `cfg` on a TPU slice (or the live
    devices), printed and written to WORKDIR/dry_run.json; with K, also a population's (`plan_population`);
    returns the plan with the printed report under "report"."""
    from ftjax.run import Run  # noqa: PLC0415 - run imports this module's users; keep the import graph acyclic

    topo = topology(topology_name) if topology_name else live_topology()
    run = Run(cfg, workdir, purpose="plan", devices=topo.devices)
    result = plan(run, topo)
    text = report(run, result)
    if population > 0:
        result["population"] = plan_population(cfg, workdir, topo, population)
        text += "\n" + "\n".join(population_lines(result["population"]))
    print(text)
    return {**result, "report": text}
