"""Everything one fine-tune needs, built from its config: mesh, data, model, optimizer, sharded state and
the compiled train/eval steps. Steppers (solo, population) and the CLI modes stand on a `Run`."""

from __future__ import annotations

import concurrent.futures
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ftjax import averaging as averaging_lib
from ftjax import config as config_lib
from ftjax import data as data_lib
from ftjax import distributed, fileio, hf, lora, models, optim
from ftjax import metrics as metrics_lib
from ftjax import params as params_lib
from ftjax import sharding as sharding_lib
from ftjax import workdir as workdir_lib
from ftjax.loop import TrainingError
from ftjax.reinit import reinit_top_layers
from ftjax.step import StepConfig, make_eval_step, make_train_step


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


def compute_dtype(name: str) -> str:
    """model.dtype with "auto" resolved: bfloat16 on accelerators, float32 on CPU."""
    if name != "auto":
        return name
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def check_batch_sizes(train_cfg: Any, data_parallel: int) -> None:
    t = train_cfg
    if t.batch_size % (data_parallel * t.grad_accum):
        raise config_lib.ConfigError(
            "train.batch_size",
            t.batch_size,
            f"the global batch must be divisible by data-parallel devices ({data_parallel}) x train.grad_accum "
            f"({t.grad_accum}) = {data_parallel * t.grad_accum}",
        )
    eval_bs = t.eval_batch_size or 2 * t.batch_size
    if eval_bs % data_parallel:
        raise config_lib.ConfigError(
            "train.eval_batch_size", eval_bs, f"must be divisible by the {data_parallel} data-parallel devices"
        )


# Families whose learned absolute position table caps the sequence length (RoPE families have no table).
_POSITION_OFFSET = {"bert": 0, "distilbert": 0, "gpt2": 0, "roberta": 2, "xlm-roberta": 2, "camembert": 2}


def check_model_fits(cfg: Any) -> None:
    """The model folder holds a config (checked before the tokenizer, whose errors would mislead), and
    data.max_len fits its learned position table (past it, the lookup would read garbage or NaN)."""
    folder = hf.resolve(cfg.model.name_or_path)
    config = hf.read_config_json(folder)
    model_type = config["model_type"]
    positions = config.get("max_position_embeddings", config.get("n_positions"))
    if model_type in _POSITION_OFFSET and positions and cfg.model.task != "image_classification":
        usable = int(positions) - _POSITION_OFFSET[model_type]
        if cfg.data.max_len > usable:
            raise config_lib.ConfigError(
                "data.max_len", cfg.data.max_len,
                f"{cfg.model.name_or_path} ({model_type}) has {usable} positions: set data.max_len <= {usable}",
            )


_TARGET_KEYS = ("labels", "decoder_input_ids", "decoder_attention_mask")  # seq2seq: target-length arrays


class Run:
    """Mesh, data, model, optimizer and state of one fine-tune (or of a population's shared template).

    purpose "train" builds the data and records the run in WORKDIR/run.json under the resume policy
    (ftjax.workdir); "eval" builds the data and records nothing; "export" reads no data at all (labels and
    steps per epoch come from run.json), so a workdir can be exported without its training data.
    """

    def __init__(self, cfg: Any, workdir: str, *, devices: list | None = None, purpose: str = "train"):
        if purpose not in ("train", "eval", "export"):
            raise ValueError(f"Run purpose={purpose!r}: 'train', 'eval' or 'export'")
        config_lib.validate(cfg)
        workdir_lib.check_workdir_path(workdir)
        workdir_lib.adopt_saved_structure(cfg, workdir)  # an older run keeps the layer layout it was built with
        self.cfg, self.workdir, self.purpose = cfg, workdir, purpose
        self.primary = distributed.is_primary()
        fileio.path(workdir).mkdir(parents=True, exist_ok=True)
        setup_compilation_cache(cfg.train.compilation_cache)
        self.mesh = sharding_lib.make_mesh(cfg.mesh, devices)
        sharding_lib.log_mesh(self.mesh)
        check_batch_sizes(cfg.train, sharding_lib.data_parallel_size(self.mesh))
        check_model_fits(cfg)
        image = cfg.model.task == "image_classification"
        self.tokenizer = None if image else models.load_tokenizer(cfg.model.name_or_path)
        if purpose == "export":
            self.data = None
            saved = workdir_lib.read_run(workdir) or {}
            self.label_names = list(saved.get("labels", []))
            self.steps_per_epoch = int(saved.get("steps_per_epoch", 1))
        else:
            self.data = data_lib.build(
                cfg, self.tokenizer, process_index=jax.process_index(), process_count=jax.process_count(),
                data_parallel=sharding_lib.data_parallel_size(self.mesh),
            )
            self.label_names, self.steps_per_epoch = list(self.data.label_names), self.data.steps_per_epoch
        self.model, head_pattern = self._load_model()
        self.graphdef, params, self.rest = params_lib.split(self.model)
        self.total_steps = total_steps_of(cfg.train, self.steps_per_epoch)
        self.eval_every = eval_every_of(cfg.train, self.steps_per_epoch)
        self.optimizer = optim.build(cfg.optim, params, total_steps=self.total_steps,
                                     steps_per_epoch=self.steps_per_epoch, head_pattern=head_pattern,
                                     stacks=self.model.stacks())
        self.averaging = averaging_lib.from_config(cfg.train, self.total_steps, self.steps_per_epoch)
        if purpose == "train":
            self._record()
        self._init_state(params)
        self.key = jax.random.key(cfg.train.seed)
        self.step_cfg = StepConfig(cfg.model.task, cfg.train.grad_accum, cfg.train.label_smoothing)
        self._train_steps: dict[tuple, Callable] = {}
        self.eval_step = jax.jit(
            make_eval_step(self.graphdef, self.rest, cfg.model.task),
            in_shardings=(self.param_shardings, sharding_lib.batch_sharding(self.mesh)),
            out_shardings=sharding_lib.replicated(self.mesh),
        )

    def _record(self) -> None:
        """run.json: refuses a resume that changes what cannot change, applies and logs the rest."""
        description = workdir_lib.describe(self.cfg, self.data.fingerprint, self.label_names,
                                           self.steps_per_epoch)
        has_checkpoint = workdir_lib.has_checkpoint(self.workdir)
        # Every process has compared run.json before process 0 rewrites it.
        if self.primary:
            workdir_lib.check_resume(self.workdir, description, has_checkpoint)
        distributed.barrier("ftjax_workdir_checked")

    def _load_model(self) -> tuple[Any, str | None]:
        """The model (with LoRA adapters when configured) and the regex of its task head."""
        cfg, names = self.cfg, self.label_names
        d = cfg.model.dropout
        dropout = {k: d[k] for k in ("hidden", "attention", "classifier") if d[k] is not None}
        model = models.from_pretrained(
            cfg.model.name_or_path,
            task=cfg.model.task,
            num_labels=cfg.model.num_labels or (len(names) if names else None),
            id2label=dict(enumerate(names)) if names else None,
            dropout=dropout or None,
            dtype=compute_dtype(cfg.model.dtype),
            param_dtype=cfg.model.param_dtype,
            remat=cfg.model.remat,
            scan_layers=cfg.model.scan_layers,
            allow_pickle=cfg.model.allow_pickle,
            seed=cfg.train.seed,
            mesh=self.mesh,  # each tensor read alone and placed straight into its sharding
        )
        if cfg.model.reinit_layers:  # the top layers re-drawn with the model's init (Zhang et al. 2021)
            reinit_top_layers(model, cfg.model.reinit_layers, cfg.optim.layer_pattern, cfg.train.seed)
        if not cfg.optim.lora.rank:
            return model, getattr(model, "head_pattern", None)
        # Adapters on the targeted Linear layers; the optimizer freezes everything else.
        model = lora.apply_lora(model, cfg.optim.lora, seed=cfg.train.seed)
        return model, lora.optim_head_pattern(model)

    def _init_state(self, params: Any) -> None:
        self.param_shardings = sharding_lib.param_shardings(params, self.model.logical_axes(), self.mesh,
                                                            head_dim=sharding_lib.head_dim_of(self.model))
        params = jax.device_put(params, self.param_shardings)
        opt_shardings = sharding_lib.like_params(jax.eval_shape(self.optimizer.tx.init, params), params,
                                                 self.param_shardings, self.mesh)
        with jax.set_mesh(self.mesh):
            opt_state = jax.jit(self.optimizer.tx.init, out_shardings=opt_shardings)(params)
        self.state = {"step": jax.device_put(jnp.int32(0), sharding_lib.replicated(self.mesh)),
                      "params": params, "opt_state": opt_state}
        if self.averaging.on:  # EMA / SWA copies of the trained params, sharded like them
            averaged = self.optimizer.trainable_params_at(self.total_steps)  # every param trained at some step
            out = averaging_lib.shardings(self.averaging, self.param_shardings, averaged,
                                          sharding_lib.replicated(self.mesh))
            with jax.set_mesh(self.mesh):
                self.state["avg"] = jax.jit(lambda p: averaging_lib.init(self.averaging, p, averaged),
                                            out_shardings=out)(params)
        self.state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.state)

    def train_step_for(self, step: int) -> Callable:
        """The compiled step for the trainable set at `step` (one program per unfreezing phase)."""
        trainable = self.optimizer.trainable_params_at(step)
        masks = self.optimizer.grad_masks_at(step)
        key = (trainable, tuple(sorted(masks.items())))
        if key not in self._train_steps:
            fn = make_train_step(self.graphdef, self.rest, self.optimizer.tx, trainable, self.step_cfg,
                                 self.averaging if self.averaging.on else None, grad_masks=masks)
            self._train_steps[key] = jax.jit(
                fn,
                in_shardings=(self.state_shardings, sharding_lib.batch_sharding(self.mesh),
                              sharding_lib.replicated(self.mesh)),
                out_shardings=(self.state_shardings, sharding_lib.replicated(self.mesh)),
                donate_argnums=(0,),
            )
        return self._train_steps[key]

    def batch_structs(self, rows: int | None) -> list[dict]:
        """Abstract global batches of `rows` rows per process (None: a training batch's), one per bucket
        length (seq2seq: per (source, target) length pair), for compiling ahead of time."""
        probe = next(iter(self.data.train_iterator(0, 0)))
        rows = probe[next(iter(probe))].shape[0] if rows is None else rows
        seq_len = probe["input_ids"].shape[1] if "input_ids" in probe else None
        pairs = getattr(self.data, "seq2seq_pairs", None)
        lengths = list(pairs) if pairs else [(n, None) for n in (tuple(self.data.bucket_lengths or ()) or (seq_len,))]
        sharding = sharding_lib.batch_sharding(self.mesh)
        structs = []
        for source, target in lengths:
            out = {}
            for key, value in probe.items():
                shape = (rows * jax.process_count(),) + value.shape[1:]
                if target is not None and value.ndim >= 2 and key in _TARGET_KEYS:
                    shape = (shape[0], target) + value.shape[2:]
                elif value.ndim >= 2 and (target is not None or (seq_len is not None and value.shape[1] == seq_len)):
                    shape = (shape[0], source) + value.shape[2:]
                out[key] = jax.ShapeDtypeStruct(shape, value.dtype, sharding=sharding)
            structs.append(out)
        return structs

    def precompile(self, step: int) -> None:
        """Compiles the train step (for the trainable set at `step`) and the eval step for every bucket length
        at once, in threads (XLA compiles release the GIL), instead of one at a time mid-run as each length
        first appears; the jit caches then hold them."""
        t0 = time.time()
        eval_rows = self.data.eval_batch_size // jax.process_count()
        train_fn = self.train_step_for(step)
        with jax.set_mesh(self.mesh):
            lowered = [train_fn.lower(self.state, b, self.key) for b in self.batch_structs(None)]
            lowered += [self.eval_step.lower(self.state["params"], b) for b in self.batch_structs(eval_rows)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(lowered), os.cpu_count() or 1)) as pool:
            list(pool.map(lambda program: program.compile(), lowered))
        logging.info("compiled %d programs (train + eval, %d lengths) in %.1fs", len(lowered),
                     len(lowered) // 2, time.time() - t0)

    def abstract_state(self) -> Any:
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state
        )

    def evaluate_members(self, eval_fn: Callable, params: Any, split: str, members: int | None) -> list[dict]:
        """Eval metrics over a whole split, one dict per member: `eval_fn(params, batch)` returns sums with a
        leading member axis when `members` is a count (a vmapped population), without when None (solo)."""
        sums: dict[str, np.ndarray] = {}
        with jax.set_mesh(self.mesh):
            for batch in self.data.eval_batches(split):
                out = jax.device_get(eval_fn(params, sharding_lib.shard_batch(batch, self.mesh)))
                for key, value in out.items():
                    value = np.asarray(value, np.float64)
                    value = value if members is not None else value[None]
                    sums[key] = sums[key] + value if key in sums else value
        if "weight" not in sums or not sums["weight"].any():
            raise TrainingError(f"the {split} split has no examples to evaluate")
        confusion = sums.get("confusion")
        return [
            metrics_lib.eval_metrics(sums["loss_sum"][k], sums["weight"][k],
                                     None if confusion is None else confusion[k], self.cfg.model.task)
            for k in range(len(sums["weight"]))
        ]

    def evaluate(self, split: str, params: Any = None) -> dict[str, float]:
        """Loss (and accuracy, macro-F1 for classification; perplexity for LMs) over a whole split."""
        params = self.state["params"] if params is None else params
        return self.evaluate_members(self.eval_step, params, split, None)[0]
