"""The training step (one jit-compiled pure function over sharded state) and the fit loop around it.

`make_train_step` differentiates only the trainable params (the frozen ones are closed over), sums
gradients over micro-batches with `lax.scan`, draws dropout keys from `fold_in(seed, step)` inside the
step, and applies the optax chain. `fit` adds data, evaluation, early stopping, checkpoints, logs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from ftjax import distributed
from ftjax import params as params_lib
from ftjax import sharding as sharding_lib

State = dict[str, Any]  # {"step": int32 scalar, "params": nested dict, "opt_state": optax state}

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values", "segment_ids")


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss, mismatched workdir); the message names what was kept."""


# ----------------------------------------------------------------------------------------------------
# Losses: (logits, batch) -> per-example loss [B] (already averaged over tokens for token tasks).


def classification_loss(logits: jax.Array, batch: dict, label_smoothing: float = 0.0) -> jax.Array:
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    labels = jax.nn.one_hot(batch["labels"], num_classes)
    if not isinstance(label_smoothing, (int, float)) or label_smoothing:  # a traced rate: population mode
        labels = optax.smooth_labels(labels, label_smoothing)
    return optax.softmax_cross_entropy(logits, labels)


def token_loss_sum(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example (sum of token losses, number of labelled tokens); label -100 is ignored, as in HF."""
    logits = logits.astype(jnp.float32)
    valid = labels != -100
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    loss = jnp.where(valid, loss, 0.0)
    return loss.sum(-1), valid.sum(-1).astype(jnp.float32)


def causal_lm_loss_sum(
    logits: jax.Array, labels: jax.Array, segment_ids: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """token_loss_sum with HF's shift: logits at t predict labels[t + 1] (labels are the input ids, -100
    where no loss); with packed rows (segment_ids) never across a document boundary."""
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], -100)], axis=1)
    if segment_ids is not None:
        same = segment_ids[:, 1:] == segment_ids[:, :-1]
        same = jnp.concatenate([same, jnp.zeros_like(same[:, :1])], axis=1)
        targets = jnp.where(same, targets, -100)
    return token_loss_sum(logits, targets)


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in INPUT_KEYS if k in batch}


def loss_and_weight(logits: jax.Array, batch: dict, task: str, label_smoothing: float) -> tuple[jax.Array, jax.Array]:
    """(weighted loss sum, weight sum) of a batch; the step's loss is their ratio over all micro-batches."""
    w = batch["weights"].astype(jnp.float32)
    if task == "causal_lm":
        loss_sum, tokens = causal_lm_loss_sum(logits, batch["labels"], batch.get("segment_ids"))
        return (loss_sum * w).sum(), (tokens * w).sum()
    if task in ("token_classification", "masked_lm"):
        loss_sum, tokens = token_loss_sum(logits, batch["labels"])
        return (loss_sum * w).sum(), (tokens * w).sum()
    per_example = classification_loss(logits, batch, label_smoothing)
    return (per_example * w).sum(), w.sum()


# ----------------------------------------------------------------------------------------------------
# The step.


@dataclasses.dataclass(frozen=True)
class StepConfig:
    task: str
    grad_accum: int = 1
    label_smoothing: float = 0.0


def _split_micro(batch: dict, grad_accum: int) -> dict:
    """[B, ...] -> [A, B/A, ...] taking rows a, a+A, ... for micro-batch a, so each device keeps its rows."""
    def split(x):
        b = x.shape[0]
        return x.reshape((b // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1)

    return {k: split(v) for k, v in batch.items()}


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformation,
    trainable: frozenset[str],
    step_cfg: StepConfig,
) -> Callable[[State, dict, jax.Array], tuple[State, dict]]:
    """A pure `train_step(state, batch, key) -> (state, metrics)`; jit it with shardings and donation.

    Only params whose path is in `trainable` are differentiated; the others enter the loss as constants,
    so XLA never computes their gradients (nor the activations' gradients below the lowest trainable op).
    """

    def is_trainable(path: str) -> bool:
        return path in trainable

    def loss_fn(train_params, frozen_params, micro, key):
        model = params_lib.merge(graphdef, params_lib.combine(train_params, frozen_params), rest)
        out = model(**model_inputs(micro), deterministic=False, rngs=nnx.Rngs(dropout=key))
        loss_sum, weight = loss_and_weight(out["logits"], micro, step_cfg.task, step_cfg.label_smoothing)
        return loss_sum, weight

    def train_step(state: State, batch: dict, key: jax.Array) -> tuple[State, dict]:
        train_params, frozen_params = params_lib.partition(state["params"], is_trainable)
        step_key = jax.random.fold_in(key, state["step"])
        loss_sum_fn = lambda tp, mb, k: loss_fn(tp, frozen_params, mb, k)

        if step_cfg.grad_accum == 1:
            (loss_sum, weight), grads = jax.value_and_grad(loss_sum_fn, has_aux=True)(train_params, batch, step_key)
        else:
            micro = _split_micro(batch, step_cfg.grad_accum)

            def body(carry, xs):
                grads_acc, loss_acc, weight_acc = carry
                index, mb = xs
                (loss_sum, weight), grads = jax.value_and_grad(loss_sum_fn, has_aux=True)(
                    train_params, mb, jax.random.fold_in(step_key, index)
                )
                grads_acc = jax.tree_util.tree_map(jnp.add, grads_acc, grads)
                return (grads_acc, loss_acc + loss_sum, weight_acc + weight), None

            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), train_params)
            init = (zeros, jnp.float32(0.0), jnp.float32(0.0))
            (grads, loss_sum, weight), _ = jax.lax.scan(
                body, init, (jnp.arange(step_cfg.grad_accum), micro)
            )
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree_util.tree_map(lambda g, p: (g / denom).astype(p.dtype), grads, train_params)
        grad_norm = optax.tree.norm(grads)
        # The optimizer sees the full tree; frozen leaves get zeros, which set_to_zero / the unfreeze gate
        # never read, so XLA drops them.
        full_grads = params_lib.combine(grads, jax.tree_util.tree_map(jnp.zeros_like, frozen_params))
        updates, opt_state = tx.update(full_grads, state["opt_state"], state["params"])
        train_updates, _ = params_lib.partition(updates, is_trainable)
        new_train = optax.apply_updates(train_params, train_updates)
        new_state = {
            "step": state["step"] + 1,
            "params": params_lib.combine(new_train, frozen_params),
            "opt_state": opt_state,
        }
        metrics = {
            "loss": loss_sum / denom,
            "grad_norm": grad_norm,
            # Checked on the host before any later checkpoint: a saved state never holds inf/NaN params.
            "param_norm": optax.tree.norm(new_train),
            "examples": batch["weights"].sum(),
        }
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State, task: str) -> Callable[[Any, dict], dict]:
    """`eval_step(params, batch) -> {"loss_sum", "weight"(, "confusion")}` with dropout off."""

    def eval_step(params, batch):
        model = params_lib.merge(graphdef, params, rest)
        out = model(**model_inputs(batch), deterministic=True)
        logits = out["logits"]
        loss_sum, weight = loss_and_weight(logits, batch, task, 0.0)
        result = {"loss_sum": loss_sum, "weight": weight}
        if task in ("classification", "image_classification"):
            # A [C, C] confusion matrix (rows: label, cols: prediction) is all the host needs for
            # accuracy and macro-F1, and being replicated it is readable on every process.
            num_classes = logits.shape[-1]
            w = batch["weights"].astype(jnp.float32)
            truth = jax.nn.one_hot(batch["labels"], num_classes) * w[:, None]
            pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
            result["confusion"] = truth.T @ pred
        return result

    return eval_step


# ----------------------------------------------------------------------------------------------------
# The fit loop.


def setup_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache, shared by all workdirs, so a second run starts fast."""
    if not path:
        return
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def total_steps_of(train_cfg: Any, steps_per_epoch: int) -> int:
    if train_cfg.steps:
        return int(train_cfg.steps)
    return max(1, math.ceil(train_cfg.epochs * steps_per_epoch))


def eval_every_of(train_cfg: Any, steps_per_epoch: int) -> int:
    return int(train_cfg.eval_every) or steps_per_epoch


class Run:
    """Everything one fine-tune needs, built from the config: mesh, data, model, optimizer, state."""

    def __init__(self, cfg: Any, workdir: str, *, devices: list | None = None):
        from ftjax import config as config_lib
        from ftjax import data as data_lib
        from ftjax import models, optim

        config_lib.validate(cfg)
        self.cfg, self.workdir = cfg, workdir
        self.primary = distributed.is_primary()
        os.makedirs(workdir, exist_ok=True)
        setup_compilation_cache(cfg.train.compilation_cache)

        self.mesh = sharding_lib.make_mesh(cfg.mesh, devices)
        sharding_lib.log_mesh(self.mesh)
        dp = sharding_lib.data_parallel_size(self.mesh)
        t = cfg.train
        if t.batch_size % (dp * t.grad_accum):
            raise config_lib.ConfigError(
                "train.batch_size",
                t.batch_size,
                f"the global batch must be divisible by data-parallel devices ({dp}) x train.grad_accum "
                f"({t.grad_accum}) = {dp * t.grad_accum}",
            )
        eval_bs = t.eval_batch_size or 2 * t.batch_size
        if eval_bs % dp:
            raise config_lib.ConfigError(
                "train.eval_batch_size", eval_bs, f"must be divisible by the {dp} data-parallel devices"
            )

        self.tokenizer = models.load_tokenizer(cfg.model.name_or_path) if cfg.model.task != "image_classification" else None
        self.data = data_lib.build(
            cfg, self.tokenizer, process_index=jax.process_index(), process_count=jax.process_count()
        )
        self._check_workdir()
        d = cfg.model.dropout
        dropout = {k: d[k] for k in ("hidden", "attention", "classifier") if d[k] is not None}
        num_labels = cfg.model.num_labels or (self.data.num_labels if self.data.label_names else None)
        self.model = models.from_pretrained(
            cfg.model.name_or_path,
            task=cfg.model.task,
            num_labels=num_labels,
            id2label=dict(enumerate(self.data.label_names)) if self.data.label_names else None,
            dropout=dropout or None,
            dtype=cfg.model.dtype,
            param_dtype=cfg.model.param_dtype,
            remat=cfg.model.remat,
            allow_pickle=cfg.model.allow_pickle,
            seed=t.seed,
        )
        head_pattern = getattr(self.model, "head_pattern", None)
        if cfg.optim.lora.rank:  # adapters on the targeted Linear layers; optim freezes everything else.
            from ftjax import lora as lora_lib

            self.model = lora_lib.apply_lora(self.model, cfg.optim.lora, seed=t.seed)
            head_pattern = lora_lib.optim_head_pattern(self.model)
        self.graphdef, params, self.rest = params_lib.split(self.model)
        self.steps_per_epoch = self.data.steps_per_epoch
        self.total_steps = total_steps_of(t, self.steps_per_epoch)
        self.eval_every = eval_every_of(t, self.steps_per_epoch)
        self.optimizer = optim.build(
            cfg.optim,
            params,
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
            head_pattern=head_pattern,
        )
        self.param_shardings = sharding_lib.param_shardings(params, self.model.logical_axes(), self.mesh,
                                                             head_dim=sharding_lib.head_dim_of(self.model))
        params = jax.device_put(params, self.param_shardings)
        opt_shardings = sharding_lib.like_params(jax.eval_shape(self.optimizer.tx.init, params), params,
                                                 self.param_shardings, self.mesh)
        with jax.set_mesh(self.mesh):
            opt_state = jax.jit(self.optimizer.tx.init, out_shardings=opt_shardings)(params)
        self.state = {"step": jax.device_put(jnp.int32(0), sharding_lib.replicated(self.mesh)),
                      "params": params, "opt_state": opt_state}
        self.state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.state)
        self.key = jax.random.key(t.seed)
        self.step_cfg = StepConfig(cfg.model.task, t.grad_accum, t.label_smoothing)
        self._train_steps: dict[frozenset, Callable] = {}
        eval_fn = make_eval_step(self.graphdef, self.rest, cfg.model.task)
        self.eval_step = jax.jit(
            eval_fn,
            in_shardings=(self.param_shardings, sharding_lib.batch_sharding(self.mesh)),
            out_shardings=sharding_lib.replicated(self.mesh),
        )

    # -- workdir identity: a rerun resumes; a different model in the same workdir is an error.
    def _check_workdir(self) -> None:
        cfg = self.cfg
        info = {
            "model": cfg.model.name_or_path,
            "task": cfg.model.task,
            "labels": list(self.data.label_names),
        }
        path = os.path.join(self.workdir, "run.json")
        exists = os.path.exists(path)
        if exists:
            with open(path) as f:
                old = json.load(f)
            for key in ("model", "task", "labels"):
                if old.get(key) != info[key]:
                    raise TrainingError(
                        f"workdir {self.workdir} holds a run with {key}={old.get(key)!r}, but this config "
                        f"has {key}={info[key]!r}. Use another --workdir, or delete {self.workdir} to start over."
                    )
        # Every process has looked at run.json before process 0 (re)writes it: none reads a half-written one.
        distributed.barrier("ftjax_workdir_checked")
        if not exists and self.primary:
            with open(path, "w") as f:
                json.dump(info, f, indent=1)
            with open(os.path.join(self.workdir, "labels.json"), "w") as f:
                json.dump(dict(enumerate(self.data.label_names)), f, indent=1)
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(cfg.to_json_best_effort(indent=1))

    def train_step_for(self, step: int) -> Callable:
        """The compiled step for the trainable set at `step` (one program per unfreezing phase)."""
        trainable = self.optimizer.trainable_at(step)
        if trainable not in self._train_steps:
            fn = make_train_step(self.graphdef, self.rest, self.optimizer.tx, trainable, self.step_cfg)
            self._train_steps[trainable] = jax.jit(
                fn,
                in_shardings=(self.state_shardings, sharding_lib.batch_sharding(self.mesh),
                              sharding_lib.replicated(self.mesh)),
                out_shardings=(self.state_shardings, sharding_lib.replicated(self.mesh)),
                donate_argnums=(0,),
            )
        return self._train_steps[trainable]

    def precompile(self, step: int) -> None:
        """Compiles the train step (for the trainable set at `step`) and the eval step for every bucket length
        at once, in threads (XLA compiles release the GIL), instead of one at a time mid-run as each length
        first appears; the jit caches then hold them."""
        t0 = time.time()
        probe = next(iter(self.data.train_iterator(0, 0)))
        seq_len = probe["input_ids"].shape[1] if "input_ids" in probe else None
        lengths = tuple(self.data.bucket_lengths or ()) or (seq_len,)
        sharding = sharding_lib.batch_sharding(self.mesh)
        processes = jax.process_count()

        def batch_struct(rows: int, length: int | None) -> dict:
            out = {}
            for key, value in probe.items():
                shape = (rows * processes,) + value.shape[1:]
                if seq_len is not None and value.ndim >= 2 and value.shape[1] == seq_len:
                    shape = (shape[0], length) + value.shape[2:]
                out[key] = jax.ShapeDtypeStruct(shape, value.dtype, sharding=sharding)
            return out

        train_rows = probe[next(iter(probe))].shape[0]
        eval_rows = self.data.eval_batch_size // processes
        train_fn = self.train_step_for(step)
        with jax.set_mesh(self.mesh):
            lowered = [train_fn.lower(self.state, batch_struct(train_rows, n), self.key) for n in lengths]
            lowered += [self.eval_step.lower(self.state["params"], batch_struct(eval_rows, n)) for n in lengths]
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(lowered), os.cpu_count() or 1)) as pool:
            list(pool.map(lambda program: program.compile(), lowered))
        logging.info("compiled %d programs (train + eval, lengths %s) in %.1fs", len(lowered), lengths,
                     time.time() - t0)

    def abstract_state(self) -> Any:
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state
        )

    def evaluate(self, split: str, params: Any = None) -> dict[str, float]:
        """Loss (and accuracy, macro-F1 for classification; perplexity for LMs) over a whole split."""
        from ftjax import metrics as metrics_lib

        params = self.state["params"] if params is None else params
        loss_sum, weight, confusion = 0.0, 0.0, None
        for batch in self.data.eval_batches(split):
            out = jax.device_get(self.eval_step(params, sharding_lib.shard_batch(batch, self.mesh)))
            loss_sum += float(out["loss_sum"])
            weight += float(out["weight"])
            if "confusion" in out:
                confusion = out["confusion"] if confusion is None else confusion + out["confusion"]
        if weight == 0:
            raise TrainingError(f"the {split} split has no examples to evaluate")
        result = {"loss": loss_sum / weight}
        if confusion is not None:
            result.update(metrics_lib.confusion_metrics(np.asarray(confusion)))
        if self.cfg.model.task == "causal_lm":
            result["perplexity"] = float(math.exp(min(result["loss"], 50.0)))
        return result


def _install_sigterm() -> Callable[[], bool]:
    flag = {"set": False}

    def handler(signum, frame):
        logging.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
        flag["set"] = True

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (tests): no handler.
        pass
    return lambda: flag["set"]


def fit(
    cfg: Any, workdir: str, *, devices: list | None = None, stop_after: int | None = None,
    on_eval: Callable[[int, dict], bool] | None = None,
) -> dict[str, Any]:
    """Fine-tunes per `cfg` in `workdir`, resuming from its latest checkpoint; returns the summary.

    `devices` restricts the mesh (default: all devices of all processes); `stop_after` ends the loop
    after that many steps of this call (tests use it to simulate a crash). `on_eval(step, val_metrics)`
    is called after each eval (and its checkpoint); returning True stops the run there (sweep pruning).
    """
    from ftjax import checkpoint as checkpoint_lib
    from ftjax import metrics as metrics_lib

    t_start = time.time()
    run = Run(cfg, workdir, devices=devices)
    t = cfg.train
    es = t.early_stop
    writer = metrics_lib.MetricWriter(workdir, enabled=run.primary)
    ckpt = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=t.checkpoint.keep,
        best_metric=f"val_{es.metric}",
        best_mode=es.mode,
        async_save=t.checkpoint.async_save,
        primary_host=run.primary,
    )
    stopper = metrics_lib.EarlyStopper(es.metric, es.mode, es.patience, es.min_delta)
    overfit = metrics_lib.OverfitMonitor(t.overfit_patience)
    data_state = {"epoch": 0, "position": 0}
    timing = {"train_seconds": 0.0, "train_examples": 0.0, "eval_seconds": 0.0}
    window = {"loss": 0.0, "n": 0}  # training losses since the last logged line
    last_train_loss: float | None = None

    start = ckpt.latest_step()
    if start is not None:
        run.state, meta = ckpt.restore(start, run.abstract_state())
        data_state = meta["data"]
        stopper.load_state_dict(meta["early_stop"])
        overfit.load_state_dict(meta["overfit"])
        window.update(meta["log_window"])
        last_train_loss = meta["last_train_loss"]
        timing = meta.get("timing", timing)
        logging.info("resumed from %s at step %d", ckpt.directory, start)
    else:
        start = 0
    writer.truncate_after(start)
    if run.primary:
        run.optimizer.plot_lr(os.path.join(workdir, "plots", "lr_schedule.png"))
    logging.info("%d steps (%d per epoch), eval every %d, global batch %d", run.total_steps,
                 run.steps_per_epoch, run.eval_every, t.batch_size)

    if t.precompile and start < run.total_steps:
        run.precompile(start)
    batches = run.data.train_iterator(**data_state)
    sigterm = _install_sigterm()
    progress = metrics_lib.Progress(run.total_steps, start, enabled=run.primary and t.progress)
    pending: list[tuple[int, dict]] = []  # metrics of dispatched steps not yet read back (async dispatch)

    def save(step: int, metrics: dict | None = None) -> None:
        meta = {"data": batches.state(), "early_stop": stopper.state_dict(), "overfit": overfit.state_dict(),
                "timing": timing, "log_window": window, "last_train_loss": last_train_loss}
        ckpt.save(step, run.state, meta, metrics=metrics, force=True)

    def drain(upto_all: bool) -> None:
        """Reads back step metrics; a NaN/inf loss stops the run naming the step and the last checkpoint."""
        nonlocal last_train_loss
        while pending and (upto_all or len(pending) > 1):
            step, m = pending.pop(0)
            m = jax.device_get(m)
            loss = float(m["loss"])
            if not (math.isfinite(loss) and math.isfinite(float(m["param_norm"]))):
                ckpt.wait()
                last = ckpt.latest_step()
                where = f"step {last} in {ckpt.directory}" if last is not None else "none was saved yet"
                what = f"loss is {loss}" if not math.isfinite(loss) else "the update made params inf/nan"
                raise TrainingError(
                    f"{what} at step {step + 1}; stopping. Last good checkpoint: {where}. "
                    "Lower optim.lr, lengthen optim.schedule.warmup, or set optim.clip_norm."
                )
            window["loss"] += loss
            window["n"] += 1
            timing["train_examples"] += float(m["examples"])
            progress.update(step + 1, float(m["examples"]), loss)
            if (step + 1) % t.log_every == 0 or step + 1 == run.total_steps:
                last_train_loss = window["loss"] / window["n"]
                writer.write(step + 1, "train", {"loss": last_train_loss, "grad_norm": float(m["grad_norm"])})
                writer.write(step + 1, "lr", run.optimizer.lr_at(step))
                window.update(loss=0.0, n=0)

    step = start
    stopped_early = stopped_by_hook = False
    t_loop = time.time()
    while step < run.total_steps and not stopper.should_stop and not stopped_by_hook:
        batch = sharding_lib.shard_batch(next(batches), run.mesh)
        train_step = run.train_step_for(step)
        with jax.set_mesh(run.mesh):
            run.state, m = train_step(run.state, batch, run.key)
        pending.append((step, m))
        step += 1
        drain(upto_all=False)
        at_eval = step % run.eval_every == 0 or step == run.total_steps
        if at_eval:
            drain(upto_all=True)
            timing["train_seconds"] += time.time() - t_loop
            t_eval = time.time()
            val = run.evaluate("validation")
            writer.write(step, "val", val)
            if cfg.model.task == "causal_lm":  # a few generations into WORKDIR/samples/ (skipped if none).
                from ftjax.data import lm as lm_lib

                lm_lib.write_samples(run, step)
            _, stop = stopper.update(step, val)
            if last_train_loss is not None:
                warning = overfit.update(last_train_loss, val["loss"])
                if warning:
                    logging.warning("step %d: %s", step, warning)
                writer.write(step, "gap", {"val_minus_train_loss": val["loss"] - last_train_loss})
            progress.write(f"step {step}: " + " ".join(f"val_{k}={v:.4f}" for k, v in val.items()))
            save(step, metrics={f"val_{k}": v for k, v in val.items()})
            timing["eval_seconds"] += time.time() - t_eval
            t_loop = time.time()
            stopped_by_hook = on_eval is not None and bool(on_eval(step, val))
            if stop:
                stopped_early = True
                logging.info("early stopping at step %d: best %s=%.4f at step %d", step, es.metric,
                             stopper.best_value, stopper.best_step)
        elif t.checkpoint.every and step % t.checkpoint.every == 0:
            drain(upto_all=True)
            save(step)
        if distributed.sync_flag(sigterm()):  # every process saves the same step
            drain(upto_all=True)
            save(step)
            ckpt.wait()
            distributed.barrier("preempt_save")
            logging.warning("SIGTERM: saved step %d in %s; rerun the same command to resume", step, ckpt.directory)
            raise SystemExit(143)
        if stop_after is not None and step - start >= stop_after:
            drain(upto_all=True)
            ckpt.wait()
            progress.close()
            return {"interrupted_at": step}
    drain(upto_all=True)
    timing["train_seconds"] += time.time() - t_loop
    progress.close()

    # The end: the best checkpoint is restored and evaluated on test.
    ckpt.wait()
    best = ckpt.best_step()
    if best is not None and best != step:
        run.state, _ = ckpt.restore(best, run.abstract_state())
    summary: dict[str, Any] = {
        "steps": step,
        "best_step": best,
        "stopped_early": stopped_early,
        "stopped_by_hook": stopped_by_hook,
        "best_val": {es.metric: stopper.best_value},
        "num_examples": dict(run.data.num_examples),
        "data_stats": run.data.stats,
    }
    summary["val"] = run.evaluate("validation")
    if run.data.has_split("test"):
        summary["test"] = run.evaluate("test")
        writer.write(step, "test", summary["test"])
    summary["timing"] = {
        **timing,
        "wall_seconds": time.time() - t_start,
        # Real (non-padding) examples over the training loop's wall time, evaluation excluded.
        "train_examples_per_second": timing["train_examples"] / max(timing["train_seconds"], 1e-9),
    }
    writer.close()
    ckpt.wait()
    ckpt.close()
    if run.primary:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=float)
        metrics_lib.plot_run(workdir)
    return summary
