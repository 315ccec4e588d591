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
from flax import nnx

from ftjax import averaging as averaging_lib
from ftjax import config as config_lib
from ftjax import distill as distill_lib
from ftjax import distributed, fileio, hf, lora, models, optim
from ftjax import params as params_lib
from ftjax import sharding as sharding_lib
from ftjax import tasks as tasks_lib
from ftjax import workdir as workdir_lib
from ftjax.data import structure
from ftjax.loop import TrainingError
from ftjax.models import quantized
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


def eval_every_of(train_cfg: Any, steps_per_epoch: int, total_steps: int) -> int:
    """train.eval_every in steps: 0 is each epoch; a fraction or "N%" is of the run, "Nep" epochs (at least 1)."""
    unit, amount = config_lib.parse_duration(train_cfg.eval_every, "train.eval_every")
    if not amount:
        return steps_per_epoch
    return max(1, round(amount * {"steps": 1, "epochs": steps_per_epoch, "fraction": total_steps}[unit]))


def compute_dtype(name: str, platform: str | None = None) -> str:
    """model.dtype with "auto" resolved: bfloat16 on accelerators, float32 on CPU (`platform`: the run's
    devices', e.g. a TPU topology's when planning on a CPU; default: jax.default_backend())."""
    if name != "auto":
        return name
    return "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"


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
    if model_type in _POSITION_OFFSET and positions and tasks_lib.of(cfg).has_tokens:
        usable = int(positions) - _POSITION_OFFSET[model_type]
        if cfg.data.max_len > usable:
            raise config_lib.ConfigError(
                "data.max_len", cfg.data.max_len,
                f"{cfg.model.name_or_path} ({model_type}) has {usable} positions: set data.max_len <= {usable}",
            )


PURPOSES = ("train", "eval", "export", "plan")


def _struct(x: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


class Run:
    """Mesh, data, model, optimizer and state of one fine-tune (or of a population's shared template).

    purpose "train" builds the data and records the run in WORKDIR/run.json under the resume policy
    (ftjax.workdir); "eval" builds the data and records nothing; "export" reads no data at all (labels and
    steps per epoch come from run.json), so a workdir can be exported without its training data.
    "plan" is the same run as shapes: it reads the model folder's config.json and nothing else (no weights,
    no tokenizer, no data); params, optimizer state (and EMA / SWA) are ShapeDtypeStructs with their
    shardings over `devices` (live ones, or a TPU topology's abstract devices: ftjax.dry_run), the batches
    come from the config (ftjax.data.structure), and the train / eval steps are the ones training jits, to
    be lowered and compiled ahead of time. Labels come from model.num_labels (or an earlier run.json).
    """

    def __init__(self, cfg: Any, workdir: str, *, devices: list | None = None, purpose: str = "train"):
        if purpose not in PURPOSES:
            raise ValueError(f"Run purpose={purpose!r}: one of {PURPOSES}")
        config_lib.validate(cfg)
        workdir_lib.check_workdir_path(workdir)
        workdir_lib.adopt_saved_structure(cfg, workdir)  # an older run keeps the layer layout it was built with
        self.cfg, self.workdir, self.purpose = cfg, workdir, purpose
        self.primary = distributed.is_primary()
        fileio.path(workdir).mkdir(parents=True, exist_ok=True)
        self.abstract = purpose == "plan"
        if not self.abstract:  # a plan measures its compile time: no cache hits
            setup_compilation_cache(cfg.train.compilation_cache)
        self.mesh = sharding_lib.make_mesh(cfg.mesh, devices)
        self.platform = self.mesh.devices.flat[0].platform
        sharding_lib.log_mesh(self.mesh)
        check_batch_sizes(cfg.train, sharding_lib.data_parallel_size(self.mesh))
        check_model_fits(cfg)
        self.task = tasks_lib.of(cfg)
        text = self.task.has_tokens and not self.abstract
        self.tokenizer = models.load_tokenizer(cfg.model.name_or_path) if text else None
        if purpose in ("export", "plan"):
            self.data = None
            saved = workdir_lib.read_run(workdir) or {}
            self.label_names = list(saved.get("labels", []))
            self.steps_per_epoch = int(saved.get("steps_per_epoch", 1))
            self.batch_layout = structure.from_config(cfg, self.task) if self.abstract else None
            if self.abstract and self.task.labelled and not (cfg.model.num_labels or self.label_names):
                raise config_lib.ConfigError(
                    "model.num_labels", None, f"a plan reads no data, so it cannot count the labels of "
                    f"model.task={cfg.model.task!r}: set model.num_labels (e.g. --config.model.num_labels=2)")
        else:
            self.data = tasks_lib.build_data(
                cfg, self.tokenizer, process_index=jax.process_index(), process_count=jax.process_count(),
                data_parallel=sharding_lib.data_parallel_size(self.mesh),
            )
            self.label_names, self.steps_per_epoch = list(self.data.label_names), self.data.steps_per_epoch
            self.batch_layout = self.data.batch_layout
        self.task = self.task.with_labels(self.label_names)  # e.g. token classification's entity tags
        self.model, self.head_pattern = self._load_model()  # the head's regex (what train_only=head trains)
        self.graphdef, params, self.rest = params_lib.split(self.model)
        # The task's frozen model (a distillation teacher, a preference reference under full fine-tuning).
        self.teacher = self._load_frozen(self.task.frozen_model) if self.task.frozen_model else None
        # The train step's arguments after (state, batch, key): the frozen model's params (not donated); the eval
        # step's after (params, batch): the same when the task's eval needs it.
        self.teacher_args = () if self.teacher is None else (self.teacher["params"],)
        self.eval_args = self.teacher_args if self.task.frozen_in_eval else ()
        self.total_steps = total_steps_of(cfg.train, self.steps_per_epoch)
        self.eval_every = eval_every_of(cfg.train, self.steps_per_epoch, self.total_steps)
        self.optimizer = optim.build(cfg.optim, params, total_steps=self.total_steps,
                                     steps_per_epoch=self.steps_per_epoch, head_pattern=self.head_pattern,
                                     stacks=self.model.stacks())
        self.averaging = averaging_lib.from_config(cfg.train, self.total_steps, self.steps_per_epoch)
        if purpose == "train":
            self._record()
        self._init_state(params)
        self.key = jax.random.key(cfg.train.seed) if not self.abstract else _struct(
            jax.eval_shape(lambda: jax.random.key(cfg.train.seed)), sharding_lib.replicated(self.mesh))
        self.step_cfg = StepConfig(self.task, cfg.train.grad_accum, cfg.train.label_smoothing,
                                   cfg.model.loss_chunk_tokens)
        self._train_steps: dict[tuple, Callable] = {}
        frozen = (self.teacher["graphdef"], self.teacher["rest"]) if self.eval_args else None
        self.eval_step = jax.jit(
            make_eval_step(self.graphdef, self.rest, self.task, cfg.model.loss_chunk_tokens, frozen=frozen),
            in_shardings=(self.param_shardings, sharding_lib.batch_sharding(self.mesh),
                          *((self.teacher["shardings"],) if frozen else ())),
            out_shardings=sharding_lib.replicated(self.mesh),
        )

    def _record(self) -> None:
        """run.json: refuses a resume that changes what cannot change, applies and logs the rest."""
        description = workdir_lib.describe(self.cfg, self.data.fingerprint, self.label_names,
                                           self.steps_per_epoch, self.data.stats)
        has_checkpoint = workdir_lib.has_checkpoint(self.workdir)
        # Every process has compared run.json before process 0 rewrites it.
        if self.primary:
            workdir_lib.check_resume(self.workdir, description, has_checkpoint)
        distributed.barrier("ftjax_workdir_checked")

    def model_options(self, cfg: Any) -> dict[str, Any]:
        """The arguments of `models.from_pretrained` for `cfg`'s model on this run's data and devices."""
        names = self.label_names
        d = cfg.model.dropout
        dropout = {k: d[k] for k in models.DROPOUT_KEYS if d[k] is not None}
        return dict(
            task=self.task.model_task,  # the head it trains (preference: a causal_lm model)
            num_labels=self.task.num_labels or cfg.model.num_labels or (len(names) if names else None),
            id2label=dict(enumerate(names)) if names else None,
            dropout=dropout or None,
            dtype=compute_dtype(cfg.model.dtype, self.platform),
            param_dtype=cfg.model.param_dtype,
            remat=cfg.model.remat,
            scan_layers=cfg.model.scan_layers,
            attention=cfg.model.attention,
            allow_pickle=cfg.model.allow_pickle,
            seed=cfg.train.seed,
            quantize=quantized.spec_of(cfg.optim.lora),  # QLoRA: the frozen base stored in 8 / 4 bits
        )

    def _load_model(self) -> tuple[Any, str | None]:
        """The model (with LoRA adapters when configured) and the regex of its task head."""
        cfg = self.cfg
        model = models.from_pretrained(
            cfg.model.name_or_path, **self.model_options(cfg),
            mesh=self.mesh,  # each tensor read alone and placed straight into its sharding
            abstract=self.abstract,  # a plan: config.json only, every param a ShapeDtypeStruct
        )
        # The top layers re-drawn with the model's init (Zhang et al. 2021); shapes unchanged, so a plan skips it.
        if cfg.model.reinit_layers and not self.abstract:
            reinit_top_layers(model, cfg.model.reinit_layers, cfg.optim.layer_pattern, cfg.train.seed)
        if not cfg.optim.lora.rank:
            return model, getattr(model, "head_pattern", None)
        # Adapters on the targeted Linear layers; the optimizer freezes everything else.
        if self.abstract:  # the adapters as shapes too (DoRA's magnitude would need the base weights)
            model = nnx.eval_shape(lambda m: lora.apply_lora(m, cfg.optim.lora, seed=cfg.train.seed), model)
        else:
            model = lora.apply_lora(model, cfg.optim.lora, seed=cfg.train.seed)
        return model, lora.optim_head_pattern(model)

    def _load_frozen(self, folder: str) -> dict[str, Any]:
        """The task's frozen model (distill.teacher, or the checkpoint again as a preference reference) loaded as
        a model of the trained task (its own head and labels), checked against the trained model, its params
        frozen and sharded by the same rules: {"model", "graphdef", "rest", "params", "shardings"}."""
        cfg = self.cfg
        teacher = models.from_pretrained(
            folder, task=self.task.model_task, dtype=compute_dtype(cfg.model.dtype, self.platform),
            param_dtype=cfg.model.param_dtype, remat=cfg.model.remat, scan_layers=cfg.model.scan_layers,
            attention=cfg.model.attention, allow_pickle=cfg.model.allow_pickle, mesh=self.mesh,
            abstract=self.abstract)
        text = self.task.has_tokens and not self.abstract
        tokenizer = models.load_tokenizer(folder) if text else None
        distill_lib.check_teacher(self.model, teacher, self.tokenizer, tokenizer, folder)
        graphdef, params, rest = params_lib.split(teacher)
        shardings = sharding_lib.param_shardings(params, teacher.logical_axes(), self.mesh,
                                                 head_dim=sharding_lib.head_dim_of(teacher))
        params = jax.tree_util.tree_map(_struct, params, shardings) if self.abstract \
            else jax.device_put(params, shardings)
        logging.info("frozen %s %s (%s, %.1fM params) beside the trained model",
                     "teacher" if cfg.distill.teacher else "reference", folder, teacher.hf_config.model_type,
                     params_lib.count(params) / 1e6)
        return {"model": teacher, "graphdef": graphdef, "rest": rest, "params": params, "shardings": shardings}

    def _init_state(self, params: Any) -> None:
        self.param_shardings = sharding_lib.param_shardings(params, self.model.logical_axes(), self.mesh,
                                                            head_dim=sharding_lib.head_dim_of(self.model))
        replicated = sharding_lib.replicated(self.mesh)

        def placed(fn: Callable, shardings: Any, *args: Any) -> Any:
            """fn(*args) computed into `shardings`; for a plan, its ShapeDtypeStructs with those shardings."""
            if self.abstract:
                return jax.tree_util.tree_map(_struct, jax.eval_shape(fn, *args), shardings)
            with jax.set_mesh(self.mesh):
                return jax.jit(fn, out_shardings=shardings)(*args)

        if self.abstract:
            params = jax.tree_util.tree_map(_struct, params, self.param_shardings)
        else:
            params = jax.device_put(params, self.param_shardings)
        opt_shardings = sharding_lib.like_params(jax.eval_shape(self.optimizer.tx.init, params), params,
                                                 self.param_shardings, self.mesh)
        opt_state = placed(self.optimizer.tx.init, opt_shardings, params)
        step = _struct(jnp.int32(0), replicated) if self.abstract else jax.device_put(jnp.int32(0), replicated)
        self.state = {"step": step, "params": params, "opt_state": opt_state}
        if self.averaging.on:  # EMA / SWA copies of the trained params, sharded like them
            averaged = self.optimizer.trainable_params_at(self.total_steps)  # every param trained at some step
            out = averaging_lib.shardings(self.averaging, self.param_shardings, averaged, replicated)
            self.state["avg"] = placed(lambda p: averaging_lib.init(self.averaging, p, averaged), out, params)
        self.state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.state)

    def train_step_for(self, step: int) -> Callable:
        """The compiled step for the trainable set at `step` (one program per unfreezing phase)."""
        trainable = self.optimizer.trainable_params_at(step)
        masks = self.optimizer.grad_masks_at(step)
        key = (trainable, tuple(sorted(masks.items())))
        if key not in self._train_steps:
            teacher = None if self.teacher is None else (self.teacher["graphdef"], self.teacher["rest"])
            fn = make_train_step(self.graphdef, self.rest, self.optimizer.tx, trainable, self.step_cfg,
                                 self.averaging if self.averaging.on else None, grad_masks=masks,
                                 teacher=teacher)
            extra = () if self.teacher is None else (self.teacher["shardings"],)
            self._train_steps[key] = jax.jit(
                fn,
                in_shardings=(self.state_shardings, sharding_lib.batch_sharding(self.mesh),
                              sharding_lib.replicated(self.mesh), *extra),
                out_shardings=(self.state_shardings, sharding_lib.replicated(self.mesh)),
                donate_argnums=(0,),
            )
        return self._train_steps[key]

    def batch_structs(self, kind: str, longest: bool = False) -> list[dict]:
        """Abstract global "train" or "eval" batches, sharded as shard_batch places them, one per padded
        length (seq2seq: per (source, target) pair; `longest`: only the largest), for compiling ahead of
        time; the structure is the data's own (ftjax.data.structure), from the config for a plan."""
        sharding = sharding_lib.batch_sharding(self.mesh)
        structures = self.batch_layout.structures(kind)
        return [{k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in s.items()}
                for s in (structures[-1:] if longest else structures)]

    def precompile(self, step: int) -> None:
        """Compiles the train step (for the trainable set at `step`) and the eval step for every bucket length
        at once, in threads (XLA compiles release the GIL), instead of one at a time mid-run as each length
        first appears; the jit caches then hold them."""
        t0 = time.time()
        train_fn = self.train_step_for(step)
        with jax.set_mesh(self.mesh):
            lowered = [train_fn.lower(self.state, b, self.key, *self.teacher_args)
                       for b in self.batch_structs("train")]
            lowered += [self.eval_step.lower(self.state["params"], b, *self.eval_args)
                        for b in self.batch_structs("eval")]
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(lowered), os.cpu_count() or 1)) as pool:
            list(pool.map(lambda program: program.compile(), lowered))
        logging.info("compiled %d programs (train + eval, %d lengths) in %.1fs", len(lowered),
                     len(lowered) // 2, time.time() - t0)

    def abstract_state(self) -> Any:
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state
        )

    def evaluate_members(self, eval_fn: Callable, params: Any, split: str, members: int | None,
                         args: tuple = ()) -> list[dict]:
        """Eval metrics over a whole split, one dict per member: `eval_fn(params, batch)` returns sums with a
        leading member axis when `members` is a count (a vmapped population), without when None (solo)."""
        sums: dict[str, np.ndarray] = {}
        with jax.set_mesh(self.mesh):
            for batch in self.data.eval_batches(split):
                out = jax.device_get(eval_fn(params, sharding_lib.shard_batch(batch, self.mesh), *args))
                for key, value in out.items():
                    value = np.asarray(value, np.float64)
                    value = value if members is not None else value[None]
                    sums[key] = sums[key] + value if key in sums else value
        if "weight" not in sums or not sums["weight"].any():
            raise TrainingError(f"the {split} split has no examples to evaluate")
        return [self.task.metrics(sums["loss_sum"][k], sums["weight"][k],
                                  {name: v[k] for name, v in sums.items() if name not in ("loss_sum", "weight")})
                for k in range(len(sums["weight"]))]

    def evaluate(self, split: str, params: Any = None) -> dict[str, float]:
        """Loss (and accuracy, macro-F1 for classification; perplexity for LMs) over a whole split."""
        params = self.state["params"] if params is None else params
        return self.evaluate_members(self.eval_step, params, split, None, self.eval_args)[0]
