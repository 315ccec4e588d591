"""Population training: K runs that differ only in shape-free hyperparameters, trained in ONE compiled step.

Params and optimizer states are stacked on a leading member axis and the train step is `jax.vmap`ped over
them; each batch is shared by all members. Each member's LR schedule, layer-wise LR decay, weight decay and
label smoothing enter the step as arrays, so member k follows exactly the run its own config would make.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ftjax import config as config_lib
from ftjax import fileio, lora, models, optim, schedules
from ftjax import tasks as tasks_lib
from ftjax import params as params_lib
from ftjax import sharding as sharding_lib
from ftjax import workdir as workdir_lib
from ftjax.config import ConfigError
from ftjax.loop import Callback, fit
from ftjax.models import common
from ftjax.reporting.hparams import write_hparams
from ftjax.run import Run, check_batch_sizes, eval_every_of, total_steps_of
from ftjax.step import StepConfig, make_eval_step, make_train_step
from ftjax.tasks.preference import OBJECTIVE_CONSTANTS
from ftjax.trainer import hold_workdir, member_summary, standard_callbacks
from ftjax.tune import member_optim
from ftjax.workdir import flatten

# Fields a population may vary: each enters the one compiled step as a per-member array (LR tables, decay,
# smoothing, dropout thresholds, the loss constants of a task) or as the member's own last step.
DROPOUT_FIELDS = tuple(f"model.dropout.{kind}" for kind in models.DROPOUT_KEYS)
POPULATION_FIELDS = (
    "optim.lr",
    "optim.weight_decay",
    "optim.layer_lr_decay",
    "optim.schedule.type",
    "optim.schedule.warmup",
    "optim.schedule.decay",
    "optim.schedule.min_ratio",
    "optim.schedule.power",
    "optim.schedule.gamma",
    "optim.schedule.pct_start",
    "train.label_smoothing",
    # what trains and from when: the step differentiates the union, each member's gates and masks its own
    "optim.freeze",
    "optim.freeze_layers",
    "optim.train_only",
    "optim.unfreeze",
    "train.batch_size",  # each member's own batches, padded with weight-0 rows to the largest (MemberBatches)
    "optim.lora.rank",  # adapters padded with zeros to the largest rank (which keep zero gradients)
    "optim.lora.alpha",  # with the rank: each member's traced scale alpha / r
    "train.epochs",  # members end at their own step, each schedule stretched over its own run
    "train.steps",
    *DROPOUT_FIELDS,  # traced per-member rates (ftjax.models.common.traced_dropout)
    *OBJECTIVE_CONSTANTS,  # preference: beta, cDPO smoothing, SimPO gamma, ORPO lambda
)
# Why some natural candidates are not population fields (the error says so).
NOT_IN_POPULATION = {
    "train.seed": "members share the data order and init; sweep seeds sequentially",
}


class PopulationError(ConfigError):
    """A population cannot be built from this search space or config."""


def check_population_fields(fields: list[str]) -> None:
    for field in fields:
        if field in POPULATION_FIELDS:
            continue
        for prefix, why in NOT_IN_POPULATION.items():
            if field == prefix or field.startswith(prefix + "."):
                raise PopulationError(field, "population", f"cannot vary inside a population: {why}")
        raise PopulationError(
            field,
            "population",
            "changes shapes or the compiled program, so it cannot vary inside a population; population "
            f"fields are {', '.join(POPULATION_FIELDS)} (or sweep it with population=0)",
        )


def template_config(cfgs: list[ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
    """The shared run's config: LR 1 (constant), no weight decay, no LLRD, no smoothing; members scale it.

    A dropout rate the members differ in is set to their largest (so the shared model has that dropout and
    picks the attention kernel that has it); each member's own rates reach the step as traced values."""
    t = copy.deepcopy(cfgs[0])
    t.optim.lr = 1.0
    t.optim.weight_decay = 0.0
    t.optim.layer_lr_decay = 1.0
    t.optim.schedule.type = "constant"
    t.optim.groups = tuple(
        (rx, {k: v for k, v in dict(spec).items() if k in ("name", "frozen")}) for rx, spec in cfgs[0].optim.groups
    )
    t.train.label_smoothing = 0.0
    t.train.batch_size = max(c.train.batch_size for c in cfgs)  # the rows of a step (smaller members pad)
    t.optim.lora.rank = max(c.optim.lora.rank for c in cfgs)  # the adapters' shape (smaller ranks pad)
    for kind in models.DROPOUT_KEYS:
        rates = {c.model.dropout[kind] for c in cfgs}
        if len(rates) > 1:
            t.model.dropout[kind] = max([r for r in rates if r is not None] + [0.0]) or 0.1
    return t


def _dropout_modules(model: Any) -> dict[str, common.Dropout]:
    """{module path: module} of a model's Dropout modules."""
    return {"/".join(map(str, path)): node for path, node in nnx.iter_graph(model)
            if isinstance(node, common.Dropout)}


def _stack(trees: list[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _stacked_sharding(s: Any, mesh) -> NamedSharding:
    spec = tuple(s.spec) if isinstance(s, NamedSharding) else ()
    return NamedSharding(mesh, P(None, *spec))


class Population:
    """K members of one run (a shared `Run` built from the template config), stepped together: the
    Stepper protocol of `ftjax.loop` with K members.

    `member_cfgs[k]` is member k's full config; they may differ only in POPULATION_FIELDS. `lr_tables`
    (optional, [K, T] per-step LR) replaces the members' schedules (the LR range test uses it).
    """

    def __init__(
        self,
        member_cfgs: list[ml_collections.ConfigDict],
        workdir: str,
        *,
        devices: list | None = None,
        lr_tables: np.ndarray | None = None,
        purpose: str = "train",
    ):
        if not member_cfgs:
            raise PopulationError("population", 0, "needs at least one member")
        check_population_fields(_differing_fields(member_cfgs))
        for cfg in member_cfgs:
            config_lib.validate(cfg)
        if tasks_lib.of(member_cfgs[0]).frozen_model:  # a distillation teacher or a full-FT preference reference
            if member_cfgs[0].distill.teacher:
                raise PopulationError("distill.teacher", member_cfgs[0].distill.teacher,
                                      "a population trains without a teacher; distil in solo runs (or sweep them)")
            raise PopulationError("optim.lora.rank", 0, "a preference loss with a reference model under full "
                                  "fine-tuning needs a frozen copy a population does not carry: set "
                                  "optim.lora.rank > 0 (the reference is then the base), or sweep with population=0")
        self.cfgs, self.members = member_cfgs, len(member_cfgs)
        self.batch_sizes = [int(c.train.batch_size) for c in member_cfgs]
        self.member_batches = len(set(self.batch_sizes)) > 1  # each member its own batches, stacked
        if self.member_batches and jax.process_count() > 1:
            raise PopulationError("train.batch_size", sorted(set(self.batch_sizes)), "members of different batch "
                                  "sizes are built on one process; sweep it (population=0) on several hosts")
        ranks = {int(c.optim.lora.rank) for c in member_cfgs}
        if 0 in ranks and len(ranks) > 1:
            raise PopulationError("optim.lora.rank", sorted(ranks), "members with LoRA (rank > 0) and without (0) "
                                  "train different params; sweep that choice (population=0)")
        self.run = run = Run(template_config(member_cfgs), workdir, devices=devices, purpose=purpose)
        for cfg in member_cfgs:
            check_batch_sizes(cfg.train, sharding_lib.data_parallel_size(run.mesh))
        # Each member's own epochs (of its own batch size) and length; the loop runs to the longest and stops each
        # member at its own end.
        self.member_sources = run.data.member_sources(self.batch_sizes) if self.member_batches else {}
        self.member_epoch_steps = [self.member_sources[b][2] if self.member_batches else run.steps_per_epoch
                                   for b in self.batch_sizes]
        self.member_steps = [total_steps_of(c.train, n) for c, n in zip(member_cfgs, self.member_epoch_steps)]
        self.total_steps = run.total_steps = max(self.member_steps)
        # Each member evaluates where its solo run would: train.eval_every in epochs or as a fraction of the run
        # is a different count of steps for members of other lengths or batch sizes.
        evals = [eval_every_of(c.train, n, s)
                 for c, n, s in zip(member_cfgs, self.member_epoch_steps, self.member_steps)]
        self.eval_every = run.eval_every = evals[0] if len(set(evals)) == 1 else tuple(evals)
        member_opts = [optim.build(cfg.optim, run.optimizer.abstract_params, total_steps=self.member_steps[k],
                                   steps_per_epoch=self.member_epoch_steps[k], head_pattern=run.head_pattern,
                                   stacks=run.model.stacks()) for k, cfg in enumerate(member_cfgs)]
        run.optimizer, label_starts = member_optim.union_optimizer(run.optimizer, member_opts)
        self.hparams, self.group_names = self._member_hparams(member_opts, lr_tables)
        self.hparams["label_start"] = label_starts
        self.hparams.update(self._dropout_hparams())
        self.hparams.update(self._task_constants())
        self.hparams.update(self._lora_scales())
        self.toward_pretrained = member_cfgs[0].optim.decay_toward == "pretrained"
        self._stack_state()
        self._steps: dict[frozenset, Callable] = {}
        self._eval = self._eval_fn()

    def _member_hparams(self, member_opts: list[optim.Optimizer], lr_tables: np.ndarray | None
                        ) -> tuple[dict, list[str]]:
        """Each member's own optimizer, built (and validated) from its config: its LR table per param
        group [G, T], and per param its LR multiplier, weight decay and the step it starts training at."""
        tables, mults, decays, starts = [], [], [], []
        for k, (cfg, opt) in enumerate(zip(self.cfgs, member_opts)):
            groups = list(opt.schedule_args)
            if lr_tables is not None:
                table = np.tile(np.asarray(lr_tables[k], np.float32)[None], (len(groups), 1))
            else:
                table = np.stack([
                    schedules.lr_curve(schedules.SCHEDULE_FNS[kind](args), np.arange(self.member_steps[k]))
                    for kind, args in opt.schedule_args.values()
                ]).astype(np.float32)
            # A shorter member's table is held at its last value (it has stopped by then).
            tables.append(np.pad(table, ((0, 0), (0, self.total_steps - table.shape[1])), mode="edge"))
            mults.append(opt.per_param(lambda r: np.float32(r.lr_mult)))
            decays.append(opt.per_param(lambda r: np.float32(r.weight_decay if r.decay else 0.0)))
            starts.append(opt.per_param(lambda r: np.int32(member_optim.start_of(r))))
            if k == 0:
                self.group_index = opt.per_param(lambda r, groups=groups: groups.index(r.group))
                if any(np.ndim(g) for g in jax.tree_util.tree_leaves(self.group_index)):
                    raise config_lib.ConfigError(
                        "optim.groups", cfg.optim.groups, "puts layers of one scanned stack in different groups, "
                        "which a population cannot share: set model.scan_layers=false")
        hparams = {
            "lr_table": np.stack(tables),
            "lr_mult": _stack(mults),
            "weight_decay": _stack(decays),
            "start": _stack(starts),
            "label_smoothing": np.asarray([c.train.label_smoothing for c in self.cfgs], np.float32),
        }
        return hparams, groups

    def _eval_fn(self) -> Callable:
        """`eval(params, batch)` of every member at once, each with its own loss constants (e.g. DPO's beta) and
        adapter scale."""
        run = self.run

        def member(params, hp, batch):
            task = run.task.with_constants(hp["task"]) if "task" in hp else run.task
            scale = lora.traced_scale(hp["lora_scale"]) if "lora_scale" in hp else contextlib.nullcontext()
            with scale:
                return make_eval_step(run.graphdef, run.rest, task, run.cfg.model.loss_chunk_tokens)(params, batch)

        own = {k: self.hp_device[k] for k in ("task", "lora_scale") if k in self.hp_device}
        vmapped = jax.jit(jax.vmap(member, in_axes=(0, 0, None)))
        return lambda params, batch: vmapped(params, own, batch)

    def _dropout_hparams(self) -> dict:
        """Per-member dropout as traced values: every Dropout module of the shared model whose rate is not the
        same in all members gets a slot, and each member its (threshold, keep probability) per slot, read from
        the model its own config builds (config.json only). {} when the members agree."""
        run = self.run
        if not any(len({c.model.dropout[k] for c in self.cfgs}) > 1 for k in models.DROPOUT_KEYS):
            return {}
        shared = _dropout_modules(run.model)
        rates = [{path: m.rate for path, m in _dropout_modules(models.from_pretrained(
            c.model.name_or_path, **run.model_options(c), abstract=True)).items()} for c in self.cfgs]
        slots = sorted(path for path, module in shared.items()
                       if len({r.get(path, module.rate) for r in rates} | {module.rate}) > 1)
        for i, path in enumerate(slots):
            shared[path].slot = i
        run.graphdef = params_lib.split(run.model)[0]  # the slots are static attributes of the graph
        logging.info("population: %d dropout modules take per-member rates", len(slots))
        return {"dropout_threshold": np.asarray([[common.drop_threshold(r[p]) for p in slots] for r in rates],
                                                np.uint32),
                "dropout_keep": np.asarray([[1.0 - r[p] for p in slots] for r in rates], np.float32)}

    def _task_constants(self) -> dict:
        """The task's loss constants the members differ in (e.g. preference.beta), one value per member."""
        fields = [f for f in self.run.task.constant_fields
                  if len({config_lib.get_field(c, f) for c in self.cfgs}) > 1]
        if not fields:
            return {}
        return {"task": {f: np.asarray([config_lib.get_field(c, f) for c in self.cfgs], np.float32)
                         for f in fields}}

    def _lora_scales(self) -> dict:
        """Each member's adapter scale alpha / r, when the members differ in LoRA rank or alpha ({} otherwise)."""
        lo = [c.optim.lora for c in self.cfgs]
        if len({(x.rank, x.alpha) for x in lo}) == 1:
            return {}
        return {"lora_scale": np.asarray([lora.scale_of(x.rank, x.alpha, x.rslora) for x in lo], np.float32)}

    def _member_lora_a(self) -> dict[str, np.ndarray]:
        """{lora_a path: [K, ...]} when members differ in rank: each member's own rank's init, zero-padded."""
        ranks = [int(c.optim.lora.rank) for c in self.cfgs]
        if len(set(ranks)) == 1 or self.run.abstract:
            return {}
        seed, top = int(self.cfgs[0].train.seed), max(ranks)
        by_rank = {r: lora.padded_lora_a(self.run.model, r, seed) for r in set(ranks) if r < top}
        template = params_lib.flatten(self.run.state["params"])
        return {path: np.stack([np.asarray(by_rank[r][path] if r < top else template[path]) for r in ranks])
                for path in next(iter(by_rank.values()))}

    def _stack_state(self) -> None:
        """The template's state stacked K times on a leading member axis (sharded like the template's); a plan's
        (`purpose="plan"`: ftjax.dry_run) as ShapeDtypeStructs."""
        run, k = self.run, self.members
        hp0 = self._hp0()

        def member_state(params):
            return {"step": jnp.zeros([], jnp.int32), "params": params,
                    "opt_state": self._tx(hp0, hp0["start"]).init(params)}

        params = run.state["params"]
        shapes = jax.eval_shape(member_state, params)
        repl = sharding_lib.replicated(run.mesh)
        shardings = {"step": repl, "params": run.param_shardings,
                     "opt_state": sharding_lib.like_params(shapes["opt_state"], params, run.param_shardings, run.mesh)}
        self.state_shardings = jax.tree_util.tree_map(lambda s: _stacked_sharding(s, run.mesh), shardings)
        if run.abstract:
            self.state = jax.tree_util.tree_map(
                lambda x, s: jax.ShapeDtypeStruct((k, *x.shape), x.dtype, sharding=s), shapes, self.state_shardings)
            self.hp_device = jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=repl), self.hparams)
        else:
            def stacked(params, member_a):
                members = params_lib.flatten(jax.tree_util.tree_map(lambda x: jnp.stack([x] * k), params))
                members.update(member_a)  # members of a smaller LoRA rank: their own adapters' init
                members = params_lib.unflatten(members)
                return {"step": jnp.zeros([k], jnp.int32), "params": members,
                        "opt_state": jax.vmap(lambda p: member_state(p)["opt_state"])(members)}

            with jax.set_mesh(run.mesh):
                self.state = jax.jit(stacked, out_shardings=self.state_shardings)(params, self._member_lora_a())
            self.hp_device = jax.device_put(self.hparams, repl)
        run.state = None  # the template's own state is not trained; free it.

    def _hp0(self) -> dict:
        return jax.tree_util.tree_map(lambda x: x[0], self.hparams)

    def _tx(self, hp: dict, started: Any) -> optax.GradientTransformation:
        """Member `hp`'s optimizer at a step where `started` (per param) says what it trains: its gates, its
        decay only on what has started, its LR table."""
        decay = jax.tree_util.tree_map(lambda w, s: w * s, hp["weight_decay"], started)
        return member_optim.member_tx(self.run.optimizer.tx_with_starts(hp["label_start"]), hp["lr_table"],
                                      hp["lr_mult"], decay, self.group_index, self.toward_pretrained)

    def _step_fn(self, step: int) -> Callable:
        run = self.run
        trainable = run.optimizer.trainable_params_at(step)  # the union: what any member trains now
        if trainable not in self._steps:
            def member(state, hp, active, batch, key):
                task = run.task.with_constants(hp["task"]) if "task" in hp else run.task
                step_cfg = StepConfig(task, run.cfg.train.grad_accum, hp["label_smoothing"],
                                      run.cfg.model.loss_chunk_tokens)
                # What this member trains at this step: the others' gradients are zeroed (its solo run
                # computes none), before clipping and norms.
                started = jax.tree_util.tree_map(lambda s: state["step"] >= s, hp["start"])
                masks = {path: flags for path, flags in params_lib.flatten(started).items() if path in trainable}
                fn = make_train_step(run.graphdef, run.rest, self._tx(hp, started), trainable, step_cfg,
                                     grad_masks=masks)
                with contextlib.ExitStack() as traced:  # the member's own dropout rates and adapter scale
                    if "dropout_threshold" in hp:
                        traced.enter_context(common.traced_dropout(hp["dropout_threshold"], hp["dropout_keep"]))
                    if "lora_scale" in hp:
                        traced.enter_context(lora.traced_scale(hp["lora_scale"]))
                    new, metrics = fn(state, batch, key)
                new = jax.tree_util.tree_map(lambda n, o: jnp.where(active, n, o), new, state)
                return new, metrics

            repl = sharding_lib.replicated(run.mesh)
            stacked = self.member_batches  # a batch per member [K, rows, ...], or one shared
            self._steps[trainable] = jax.jit(
                jax.vmap(member, in_axes=(0, 0, 0, 0 if stacked else None, None)),
                in_shardings=(self.state_shardings, repl, repl, sharding_lib.batch_sharding(run.mesh, stacked),
                              repl),
                out_shardings=(self.state_shardings, repl),
                donate_argnums=(0,),
            )
        return self._steps[trainable]

    def train_batches(self, epoch: int = 0, position: int = 0) -> Any:
        """The loop's batches from (epoch, position) of the shared run: one batch for all members, or, when
        they differ in batch size, each member's own (ftjax.data.batching.MemberBatches)."""
        data = self.run.data
        if self.member_batches:
            return data.member_train_iterator(self.member_sources, self.batch_sizes, epoch, position)
        return data.train_iterator(epoch, position)

    def step(self, step: int, batch: dict, active: np.ndarray) -> dict:
        """One optimizer step of every active member on its batch (`train_batches`); returns device metrics [K]."""
        fn = self._step_fn(step)
        with jax.set_mesh(self.run.mesh):
            self.state, metrics = fn(self.state, self.hp_device, jnp.asarray(active),
                                     sharding_lib.shard_batch(batch, self.run.mesh, self.member_batches),
                                     self.run.key)
        return metrics

    def evaluate(self, split: str) -> list[dict[str, float]]:
        """Each member's eval metrics over a whole split (one vmapped eval pass per batch)."""
        return self.run.evaluate_members(self._eval, self.state["params"], split, self.members)

    def params(self, member: int) -> Any:
        return jax.tree_util.tree_map(lambda x: x[member], self.state["params"])

    def lr_at(self, step: int) -> list[dict[str, float]]:
        """Each member's base LR per param group at `step` (before per-param multipliers)."""
        t = min(step, self.hparams["lr_table"].shape[-1] - 1)
        return [dict(zip(self.group_names, map(float, table[:, t]))) for table in self.hparams["lr_table"]]

    def member_model(self, member: int) -> Any:
        """Member `member`'s model for calls outside the step (e.g. LM samples): the shared model with its params
        and, when the members differ in LoRA rank or alpha, its adapters' own (static: their own compiled calls)."""
        run = self.run
        model = params_lib.merge(run.graphdef, self.params(member), run.rest)
        if "lora_scale" in self.hparams:
            own = self.cfgs[member].optim.lora
            for _, module in nnx.iter_graph(model):
                if isinstance(module, lora.LoRALinear):
                    module.rank, module.alpha = int(own.rank), float(own.alpha)
        return model

    def abstract_state(self) -> Any:
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)

    def precompile(self, step: int) -> None:
        """Nothing ahead of time: a population compiles its one vmapped step at the first step."""


def _differing_fields(cfgs: list[ml_collections.ConfigDict]) -> list[str]:
    flats = [flatten(c) for c in cfgs]
    return sorted({k for f in flats[1:] for k in f if f.get(k) != flats[0].get(k)})


def train_population(
    member_cfgs: list[ml_collections.ConfigDict],
    workdir: str,
    member_dirs: list[str],
    *,
    callbacks: list[Callback] = (),
    metric: str = "loss",
    mode: str = "min",
    devices: list | None = None,
) -> list[dict[str, Any]]:
    """Trains the members together through the one loop; returns one summary per member (with "status").

    A member stops on its own early-stopping rule (by `metric`, `mode`), a NaN loss, or a `callbacks`
    entry (e.g. `Pruning`); stopped members keep their state and no longer count. Each member's
    metrics.jsonl and summary.json go to member_dirs[k]; the population's checkpoints (all members: SIGTERM
    save and exact resume, like a solo run) to WORKDIR/checkpoints, so rerunning the call resumes.
    """
    t_start = time.time()
    lock = hold_workdir(workdir)
    try:
        return _train_population(member_cfgs, workdir, member_dirs, callbacks, metric, mode, devices, t_start)
    finally:
        lock.release()


def _train_population(member_cfgs, workdir, member_dirs, callbacks, metric, mode, devices, t_start):
    pop = Population(member_cfgs, workdir, devices=devices)
    run = pop.run
    for cfg, d in zip(member_cfgs, member_dirs):
        fileio.write_json(fileio.path(d) / workdir_lib.MEMBER_CONFIG_FILE, flatten(cfg))
    ckpt = workdir_lib.checkpointer(run.workdir, run.cfg, primary=run.primary)
    cbs = standard_callbacks(run, ckpt, member_dirs, metric=metric, mode=mode, solo=False, extra=list(callbacks))
    loop = fit(pop, pop.train_batches, cbs)
    ckpt.close()
    if loop.interrupted:
        return [{"interrupted_at": loop.step} for _ in member_dirs]
    early = cbs.early
    summaries = []
    for k in range(pop.members):
        summary = {**member_summary(loop, cbs, k, min(loop.step, pop.member_steps[k]), early.stoppers[k].best_step),
                   "val": early.best_results[k] or {},
                   "timing": {"wall_seconds": time.time() - t_start, "population_size": pop.members}}
        if run.primary:
            fileio.write_json(fileio.path(member_dirs[k]) / workdir_lib.SUMMARY_FILE, summary)
            write_hparams(member_dirs[k], member_cfgs[k], summary)
        summaries.append(summary)
    return summaries
