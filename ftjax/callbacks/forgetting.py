"""Catastrophic-forgetting monitors, computed at each validation and logged as split "forgetting"
(metrics.jsonl, TensorBoard, plots/forgetting.png), summarised in summary.json, with an optional budget.

Monitors (config `forgetting.*`; the math is `ftjax.forgetting`):
  weight_drift  ||W - W0|| / ||W0|| per layer group (embeddings, layer_i, head) and in total, against a
                copy of the loaded weights kept on device (sharded like the params); LoRA: merged weights.
  cka           linear CKA per layer between the loaded model's hidden states on the reference text
                (computed once, at the start) and the current model's, over the real tokens.
  pretrain      the pre-training objective on the reference text: masked-LM loss for encoders through the
                checkpoint's MLM head (frozen at its loaded values, on top of the current encoder; a fixed
                seeded 15% masking), causal-LM loss and perplexity for decoders (their lm_head). Skipped,
                with one log line, when the checkpoint has no such head.
  retain        forgetting.retain's old-task eval sets scored with this run's eval step (same label set).
A budget (forgetting.budget, budget_metric, budget_action) warns or stops the run when the metric has
worsened by more than the budget since step 0 (the loaded model).
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ftjax import forgetting as lib
from ftjax import hf, models
from ftjax import metrics as metrics_lib
from ftjax import params as params_lib
from ftjax import sharding as sharding_lib
from ftjax import tasks as tasks_lib
from ftjax.config import ConfigError
from ftjax.data.structure import model_inputs
from ftjax.loop import STOPPED_EARLY, Callback, Loop
from ftjax.models import registry
from ftjax.run import compute_dtype
from ftjax.tasks.causal_lm import causal_lm_loss_sum
from ftjax.tasks.tokens import token_loss_sum

SPLIT = "forgetting"


def _on_device(batch: dict, mesh: Any) -> dict:
    """A global reference batch (the same on every process) as sharded arrays: each process its rows."""
    rows, count, index = batch["input_ids"].shape[0], jax.process_count(), jax.process_index()
    local = slice(index * rows // count, (index + 1) * rows // count)
    return sharding_lib.shard_batch({k: v[local] for k, v in batch.items()}, mesh)


class WeightDrift:
    """Relative L2 distance of the current (LoRA: merged) weights from the loaded ones, per layer group.
    Params the checkpoint lacked (a new task head) have no pre-trained value and count in no group."""

    def __init__(self, run: Any):
        new = set(getattr(run.model, "load_report", {}).get("initialized", ()))
        depths = {p: r.depth for p, r in run.optimizer.table.items()}
        top = max(depths.values(), default=1)  # num_layers + 1: heads, pooler, final norm
        depths = {p: d for p, d in depths.items() if p not in new}
        self.names, group_of = lib.depth_groups(depths, top - 1)
        export = run.model.export_params
        with jax.set_mesh(run.mesh):
            self.anchor = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, export(p)))(run.state["params"])
        stacks = run.model.stacks()
        self.fn = jax.jit(lambda p, a: lib.drift_sums(export(p), a, group_of, len(self.names), stacks),
                          out_shardings=sharding_lib.replicated(run.mesh))

    def values(self, params: Any) -> dict[str, float]:
        return lib.drift_values(jax.device_get(self.fn(params, self.anchor)), self.names)


class HiddenCKA:
    """Per-layer linear CKA between the loaded model's hidden states (kept from the start) and the current
    model's, on the reference batches' real tokens."""

    def __init__(self, run: Any, batches: list[dict]):
        graphdef, rest = run.graphdef, run.rest

        def hidden(params, batch):
            model = params_lib.merge(graphdef, params, rest)
            out = model(**model_inputs(batch), deterministic=True, output_hidden_states=True)
            return jnp.stack(out["hidden_states"])

        self.mesh = run.mesh
        self.hidden = jax.jit(hidden)
        self.cka = jax.jit(lib.layer_cka, out_shardings=sharding_lib.replicated(run.mesh))
        with jax.set_mesh(run.mesh):
            self.batches = [_on_device(model_inputs(b), run.mesh) for b in batches]
            self.anchor = [self.hidden(run.state["params"], b) for b in self.batches]
        self.weights = [b["attention_mask"] for b in self.batches]
        self.names = ["embeddings"] + [f"layer_{i}" for i in range(self.anchor[0].shape[0] - 1)]

    def values(self, params: Any) -> dict[str, float]:
        with jax.set_mesh(self.mesh):
            current = [self.hidden(params, b) for b in self.batches]
            cka = np.asarray(jax.device_get(self.cka(self.anchor, current, self.weights)), np.float64)
        return {"cka/mean": float(cka.mean()), "cka/min": float(cka.min()),
                **{f"cka/{n}": float(v) for n, v in zip(self.names, cka)}}


def objective_task(model_type: str) -> str | None:
    """The pre-training objective of a family: masked_lm (encoders), causal_lm (decoders) or None."""
    tasks = registry.get(model_type).tasks
    return "masked_lm" if "masked_lm" in tasks else "causal_lm" if "causal_lm" in tasks else None


def _objective_batches(batches: list[dict], task: str, f: Any, tokenizer: Any, vocab: int) -> list[dict]:
    """Reference batches with labels: a fixed masking (MLM; labels on the chosen tokens) or the ids (LM)."""
    out = []
    for i, b in enumerate(batches):
        b = dict(b)
        if task == "masked_lm":
            b["input_ids"], b["labels"] = lib.mask_tokens(b["input_ids"], b["maskable"], tokenizer.mask_token_id,
                                                          vocab, f.mask_prob, f.seed + i)
        else:
            b["labels"] = np.where(b["attention_mask"] > 0, b["input_ids"], -100).astype(np.int32)
        out.append(b)
    return out


class PretrainObjective:
    """The pre-training loss of the current model on the reference text, through its own LM head (a run whose
    model has that head: causal_lm, preference, a distilled causal LM; LoRA adapters on) or the checkpoint's,
    loaded once and kept frozen. `load` returns None (and why) when the checkpoint has no such head."""

    def __init__(self, run: Any, task: str, batches: list[dict], fn: Callable, head: dict):
        self.task, self.mesh, self.head = task, run.mesh, head
        vocab = min(int(run.model.hf_config.vocab_size), len(run.tokenizer))
        batches = _objective_batches(batches, task, run.cfg.forgetting, run.tokenizer, vocab)
        with jax.set_mesh(run.mesh):
            self.batches = [_on_device({**model_inputs(b), "labels": b["labels"]}, run.mesh) for b in batches]
        label = {"masked_lm": token_loss_sum, "causal_lm": causal_lm_loss_sum}[task]

        def loss(params, head, batch):
            loss_sum, count = label(fn(params, head, model_inputs(batch)), batch["labels"])
            return loss_sum.sum(), count.sum()

        self.loss = jax.jit(loss, out_shardings=sharding_lib.replicated(run.mesh))

    @classmethod
    def load(cls, run: Any, batches: list[dict]) -> tuple[PretrainObjective | None, str]:
        cfg, model = run.cfg, run.model
        task = objective_task(model.hf_config.model_type)
        if task is None:
            return None, f"the {model.family} family has no masked or causal LM objective"
        if task == "masked_lm" and run.tokenizer.mask_token_id is None:
            return None, "the tokenizer has no mask token"
        if run.task.model_task == task:  # the run's model has this very head (a causal_lm or preference run):
            # its own forward pass, LoRA adapters on; no second copy of the checkpoint
            graphdef, rest = run.graphdef, run.rest
            fn = lambda p, head, x: params_lib.merge(graphdef, p, rest)(**x, deterministic=True)["logits"]
            return cls(run, task, batches, fn, {}), ""
        if not _checkpoint_has_head(cfg.model, registry.get(model.hf_config.model_type), task):
            return None, f"the checkpoint has no {task} head (no tensor matching its head pattern)"
        lm = models.from_pretrained(cfg.model.name_or_path, task=task, dtype=compute_dtype(cfg.model.dtype),
                                    param_dtype=cfg.model.param_dtype, allow_pickle=cfg.model.allow_pickle,
                                    seed=cfg.train.seed, mesh=run.mesh,
                                    scan_layers=cfg.model.scan_layers)  # stacked like the run's, path for path
        missing = lm.load_report["initialized"]
        if missing:
            return None, f"the checkpoint has no {task} head ({', '.join(missing[:4])} not in it)"
        graphdef, lm_params, rest = params_lib.split(lm)
        source = _backbone_sources(run, lm_params, registry.get(model.hf_config.model_type).prefix)
        head = {p: v for p, v in params_lib.flatten(lm_params).items() if source[p] is None}
        stray = [p for p in head if not re.fullmatch(lm.head_pattern, p)]
        if stray:
            raise ValueError(f"forgetting pretrain: {stray[:4]} of the {task} model match no param of the run")
        template = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lm_params)
        export = model.export_params

        def fn(params, head, inputs):
            flat = params_lib.flatten(export(params))
            tree = params_lib.map_with_path(lambda p, _: head[p] if source[p] is None else flat[source[p]],
                                            template)
            return params_lib.merge(graphdef, tree, rest)(**inputs, deterministic=True)["logits"]

        return cls(run, task, batches, fn, head), ""

    def values(self, params: Any) -> dict[str, float]:
        total = count = 0.0
        with jax.set_mesh(self.mesh):
            for batch in self.batches:
                loss_sum, n = jax.device_get(self.loss(params, self.head, batch))
                total, count = total + float(loss_sum), count + float(n)
        loss = total / max(count, 1.0)
        if self.task == "masked_lm":
            return {"mlm_loss": loss}
        return {"lm_loss": loss, "lm_perplexity": metrics_lib.perplexity(loss)}


def _checkpoint_has_head(model_cfg: Any, family: Any, task: str) -> bool:
    """Whether the checkpoint holds the task's head (read from the weight files' index, no tensor loaded);
    a decoder whose lm_head is tied to its embeddings always has one."""
    hf_config = hf.load_config(hf.resolve(model_cfg.name_or_path))
    if task == "causal_lm" and getattr(hf_config, "tie_word_embeddings", True):
        return True
    names = hf.open_weights(hf.resolve(model_cfg.name_or_path), allow_pickle=model_cfg.allow_pickle).names()
    pattern = re.compile(family.head_patterns[task])
    return any(pattern.fullmatch(family.rename_key(n).replace(".", "/")) for n in names)


def _backbone_sources(run: Any, lm_params: Any, prefix: str) -> dict[str, str | None]:
    """For each param path of the LM model, the run's (exported) param holding it, or None (its head)."""
    current = set(params_lib.flatten(jax.eval_shape(run.model.export_params, run.state["params"])))

    def find(path: str) -> str | None:
        for candidate in (path, f"{prefix}/{path}", path.removeprefix(prefix + "/")):
            if candidate in current:
                return candidate
        return None

    return {p: find(p) for p in params_lib.flatten(lm_params)}


class RetainSet:
    """An old task's labelled eval set, scored by the run's eval step (loss, accuracy, macro-F1). Its label
    set must be the run's: a retain set is scored with the current task head, which only means something
    for the same labels (for another task, the pretrain monitor measures what was forgotten)."""

    def __init__(self, run: Any, name: str, source: str, split: str = ""):
        cfg = copy.deepcopy(run.cfg)
        kind, _, spec = source.partition(":")
        split = split or (spec if kind == "files" else "validation")
        cfg.data.source, cfg.data.train_split, cfg.data.eval_split = source, split, split
        cfg.data.test_split, cfg.data.max_examples = "", 0
        self.name, self.run = name, run
        self.bundle = tasks_lib.build_data(cfg, run.tokenizer, process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     data_parallel=sharding_lib.data_parallel_size(run.mesh))
        if list(self.bundle.label_names) != list(run.label_names):
            raise ConfigError("forgetting.retain", name,
                              f"{source} has labels {list(self.bundle.label_names)[:10]}, the run "
                              f"{list(run.label_names)[:10]}: a retain set is scored with this run's head, so "
                              "it needs the same label set; for another task use the pretrain monitor")

    def values(self, params: Any) -> dict[str, float]:
        run, sums = self.run, {}
        with jax.set_mesh(run.mesh):
            for batch in self.bundle.eval_batches("validation"):
                out = jax.device_get(run.eval_step(params, sharding_lib.shard_batch(batch, run.mesh)))
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + np.asarray(value, np.float64)
        result = run.task.metrics(sums["loss_sum"], sums["weight"],
                                  {k: v for k, v in sums.items() if k not in ("loss_sum", "weight")})
        return {f"retain/{self.name}/{k}": v for k, v in result.items()}


def build_monitors(run: Any) -> tuple[list[Any], list[str]]:
    """The configured monitors of a run, and a line for each one skipped (and why)."""
    f, monitors, skipped = run.cfg.forgetting, [], []
    if "weight_drift" in f.monitors:
        monitors.append(WeightDrift(run))
    wants_text = [m for m in ("cka", "pretrain") if m in f.monitors]
    if wants_text and run.tokenizer is None:
        skipped += [f"{m}: needs reference text; {run.cfg.model.task} models have no tokenizer" for m in wants_text]
    elif wants_text:
        max_len = min(f.max_len, run.cfg.data.max_len)
        rows_multiple = math.lcm(sharding_lib.data_parallel_size(run.mesh), jax.process_count())
        batches = lib.encode(run.tokenizer, lib.reference_texts(run.cfg), max_len, rows_multiple, f.batch_size)
        if "cka" in f.monitors:
            try:
                monitors.append(HiddenCKA(run, batches))
            except TypeError as e:  # a family whose call has no output_hidden_states (seq2seq so far)
                skipped.append(f"cka: {run.model.family} models do not return hidden states ({e})")
        if "pretrain" in f.monitors:
            objective, why = PretrainObjective.load(run, batches)
            monitors.append(objective) if objective is not None else skipped.append(f"pretrain: {why}")
    monitors += [RetainSet(run, *entry) for entry in f.retain]
    return monitors, skipped


def _budget_metric(name: str, baseline: dict[str, float]) -> str:
    """forgetting.budget_metric with "auto" resolved: the pretraining loss (LM perplexity), else cka/mean,
    else the total weight drift; an unknown name is an error listing the logged ones."""
    if name == "auto":
        return next((m for m in ("mlm_loss", "lm_perplexity", "cka/mean", "drift/total") if m in baseline), "")
    if name not in baseline:
        raise ConfigError("forgetting.budget_metric", name, f"one of the logged scalars {sorted(baseline)}")
    return name


class Forgetting(Callback):
    """Runs the monitors on the loaded model (step 0: the baseline, also logged when the run starts fresh)
    and at each validation; writes them through the MetricLogger's writer as split "forgetting", keeps the
    last and worst values (summary.json) and applies the budget."""

    def __init__(self, run: Any, logger: Any):
        self.run, self.logger, self.f = run, logger, run.cfg.forgetting
        t0 = time.time()
        self.monitors, self.skipped = build_monitors(run)
        for line in self.skipped:
            logging.info("forgetting monitor skipped: %s", line)
        self.baseline = self.measure(run.state["params"])  # the loaded weights: restore comes later
        logging.info("forgetting monitors ready in %.1fs (step-0 values computed)", time.time() - t0)
        self.metric = _budget_metric(self.f.budget_metric, self.baseline) if self.f.budget else ""
        if self.f.budget and not self.metric:
            logging.warning("forgetting.budget=%g is off: no monitor logs a metric it can watch", self.f.budget)
        self.last: dict[str, float] = {}
        self.worst: dict[str, float] = {}
        self.exceeded: dict[str, Any] | None = None
        self.seconds: list[float] = []

    def measure(self, params: Any) -> dict[str, float]:
        values: dict[str, float] = {}
        for monitor in self.monitors:
            values.update(monitor.values(params))
        return values

    def on_begin(self, loop: Loop) -> None:
        if loop.step == 0 and self.baseline:
            self._record(loop, self.baseline)

    def on_eval(self, loop: Loop, split: str, results: list[dict[str, float]]) -> None:
        if split != "validation" or not self.monitors:
            return
        t0 = time.time()
        with loop.timed("eval_seconds"), loop.timed("forgetting_seconds"):
            values = self.measure(loop.stepper.params(0))
        self.seconds.append(time.time() - t0)
        self._record(loop, values)
        shown = {k: v for k, v in values.items() if k.count("/") <= 1 and not re.search(r"layer_\d", k)}
        logging.info("forgetting at step %d (%.2fs): %s", loop.step, self.seconds[-1],
                     ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        self._check_budget(loop, values)

    def _record(self, loop: Loop, values: dict[str, float]) -> None:
        writer = self.logger.writers[0]
        writer.write(loop.step, SPLIT, values)
        writer.flush()
        self.last = {"step": loop.step, **values}
        for key, value in values.items():
            old = self.worst.get(key)
            if old is None or math.isnan(value) or (value > old) == lib.worse_when_higher(key) and value != old:
                self.worst[key] = value

    def _check_budget(self, loop: Loop, values: dict[str, float]) -> None:
        if not self.metric or self.exceeded is not None or self.metric not in values:
            return
        base, value, budget = self.baseline[self.metric], values[self.metric], float(self.f.budget)
        if lib.worse_when_higher(self.metric):
            limit = base * (1 + budget) if base > 0 else budget
            over = not value <= limit
        else:
            limit = base * (1 - budget)
            over = not value >= limit
        if not over:
            return
        stop = self.f.budget_action == "stop"
        self.exceeded = {"step": loop.step, "metric": self.metric, "value": value, "step0": base,
                         "limit": limit, "action": self.f.budget_action}
        logging.warning("forgetting budget exceeded at step %d: %s = %.4g, step 0 %.4g, limit %.4g "
                        "(forgetting.budget=%g); %s", loop.step, self.metric, value, base, limit, budget,
                        "stopping the run (forgetting.budget_action='stop')" if stop else
                        "training goes on (forgetting.budget_action='warn')")
        if stop:
            loop.stop_member(0, STOPPED_EARLY)
            loop.request_stop(f"forgetting budget: {self.metric}")

    def summary(self) -> dict[str, Any]:
        """For summary.json: step-0, last and worst values, the budget's verdict, the cost per eval."""
        return {"step0": self.baseline, "last": self.last, "worst": self.worst,
                "budget": {"metric": self.metric, "budget": float(self.f.budget), "exceeded": self.exceeded},
                "seconds_per_eval": float(np.mean(self.seconds)) if self.seconds else None,
                "skipped": self.skipped}

    def state_dict(self) -> dict:
        return {"last": self.last, "worst": self.worst, "exceeded": self.exceeded, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.last, self.worst = dict(state["last"]), dict(state["worst"])
        self.exceeded, self.seconds = state["exceeded"], list(state["seconds"])
