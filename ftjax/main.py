"""Command-line entry point: parse flags, run one mode, turn user errors into one clear message.

    python -m ftjax.main --config=configs/minilm_food_reviews.py --workdir=/tmp/run [--config.optim.lr=1e-4]
    modes: train (default) | eval | export | dry_run | sweep (--sweep=configs/sweeps/X.py) | lr_find
           | compare (--workdir=A --workdir=B ... or --workdir='runs/lr_*'; no --config)
           | diagnose (what went wrong in WORKDIR's run and the flags to change; no --config)
           | refine (rounds of diagnose -> K candidates trained as one population -> keep the best;
             --rounds=R --population=K; WORKDIR/refine_report.md)
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys
from typing import Any

import jax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from ftjax import (
    averaging,
    cli_flags,
    distributed,  # registers --coordinator_address, --num_processes, --process_id, --cpu_devices
    dry_run,
    fileio,
    host_memory,
    lora,
    models,
    trainer,
)
from ftjax import workdir as workdir_lib
from ftjax.cli_flags import fail, recipes
from ftjax.distributed import DistributedConfigError
from ftjax.errors import UserError
from ftjax.loop import TrainingError
from ftjax.reporting import compare
from ftjax.run import Run
from ftjax.tune import diagnose, lr_find, refine, space, sweep
from ftjax.tune.report import REPORT

MODES = ("train", "eval", "export", "dry_run", "sweep", "lr_find", "compare", "diagnose", "refine")
# --help prints this module's docstring: with the recipes a first run can start from.
__doc__ = (__doc__ or "") + "\nrecipes (--config=PATH[:arg]; each file's docstring says its arg):\n" + "".join(
    f"    {name}\n" for name in recipes())

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file: configs/<recipe>.py[:arg]. Override any field with --config.a.b=value."
)
# Several --workdir (or a glob) only for --mode=compare; every other mode takes exactly one.
_WORKDIR = flags.DEFINE_multi_string("workdir", None, "Run directory: checkpoints, logs, plots, summary. "
                                     "--mode=compare: repeat it, or pass a glob ('runs/lr_*').")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "--mode=export: output folder (default WORKDIR/export).")
_STEP = flags.DEFINE_integer("step", None, "--mode=eval/export: checkpoint step (default: the best one).")
_WEIGHTS = flags.DEFINE_enum("weights", "raw", ("raw",) + averaging.KINDS, "--mode=eval/export: the trained "
                              "params (raw) or their average kept by train.ema.decay (ema) / train.swa.start (swa).")
_SWEEP = flags.DEFINE_string("sweep", None, "--mode=sweep: search space file configs/sweeps/<name>.py[:arg].")
_LR_MIN = flags.DEFINE_float("lr_min", 1e-7, "--mode=lr_find: first (lowest) learning rate.")
_LR_MAX = flags.DEFINE_float("lr_max", 1.0, "--mode=lr_find: last (highest) learning rate.")
_LR_STEPS = flags.DEFINE_integer("lr_steps", 100, "--mode=lr_find: steps of the ramp (per member).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "--mode=export: replace a non-empty --export_dir.")
_POPULATION = flags.DEFINE_integer("population", 0, "--mode=lr_find: K > 0 trains K constant LRs at once; "
                                   "--mode=refine: candidates per round (default 8); --mode=dry_run: also plan populations of "
                                   "1, 2, 4 ... K members (memory per chip, fit, step time on live devices).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "--mode=refine: rounds after the first run.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "--mode=dry_run: plan for this TPU slice instead of the live devices, compiled ahead of time "
    "here (needs libtpu): v5litepod-16 / v5e-16, v6e-8, v4-32, v5p-16 (gcloud's names: v4/v5p count TensorCores), "
    "a libtpu topology (v5e:4x4), or cpu:N.")
_LM_EVAL = flags.DEFINE_list("lm_eval", None, "--mode=eval: score the checkpoint on these lm-evaluation-harness "
                             "tasks (TASK[,TASK]; `lm-eval ls tasks` lists them) instead of the run's splits; "
                             "results under 'lm_eval' in WORKDIR/eval.json. Needs a causal_lm run.")
_LM_EVAL_LIMIT = flags.DEFINE_integer("lm_eval_limit", None, "--lm_eval: at most this many examples per task.")
_LM_EVAL_INCLUDE = flags.DEFINE_string("lm_eval_include", None, "--lm_eval: a folder of your own task YAMLs "
                                       "(lm-eval's include_path).")
_COMPARE_OUT = flags.DEFINE_string("compare_out", None, "--mode=compare: report folder (default: the first "
                                   "workdir's parent/compare).")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a user can cause; they end the run with their message, not a traceback."""
    # Every ftjax user error is a UserError; the OS's own errors about a path the user gave (a missing recipe,
    # workdir or file) are user errors too.
    return (UserError, FileNotFoundError, FileExistsError, NotADirectoryError)


def _restore_for_inference(run: Run, workdir: str) -> tuple[int, str, Any]:
    """(step, why that step, params) of the best checkpoint by the early-stopping metric (or --step),
    opened read-only: a training run writing beside it loses nothing."""
    es = run.cfg.train.early_stop
    ckpt = workdir_lib.checkpointer(workdir, run.cfg, metric=es.metric, mode=es.mode, primary=run.primary,
                                    read_only=True)
    try:
        if _STEP.value is not None:
            step, why = _STEP.value, "--step"
        elif (step := ckpt.best_step()) is not None:
            why = f"best val_{es.metric} ({es.mode})"
        else:
            step, why = ckpt.latest_step(), "latest (no checkpoint has a val metric)"
        if step is None:
            raise TrainingError(f"no checkpoint in {ckpt.directory}: train first (--mode=train)")
        state, _ = ckpt.restore(step, run.abstract_state())
    finally:
        ckpt.close()
    params = averaging.params_for(state, _WEIGHTS.value)
    if params is None:
        raise TrainingError(f"--weights={_WEIGHTS.value}: checkpoint step {step} holds no such average (set "
                            "train.ema.decay > 0 / train.swa.start for the run, or use --weights=raw)")
    print(f"checkpoint: step {step}, {why}, weights {_WEIGHTS.value}")
    return step, why, params


def _sweep(cfg, workdir: str) -> dict:
    if jax.process_count() > 1:
        raise DistributedConfigError(
            f"--mode=sweep runs in one process, not {jax.process_count()}: start each sweep worker as its own "
            "single-process job on the same sweep storage (a postgresql:// study shares the trials)"
        )
    if not _SWEEP.value:
        raise FileNotFoundError("--mode=sweep needs --sweep=configs/sweeps/<name>.py")
    command = [a for a in sys.argv[1:] if a.startswith("--config")]
    study = sweep.run_sweep(cfg, space.load_spec(_SWEEP.value), workdir, command=command)
    print(f"report: {os.path.join(workdir, REPORT)}")
    return {"study": study}


def _lr_find(cfg, workdir: str) -> dict:
    result = lr_find.lr_find(cfg, workdir, lr_min=_LR_MIN.value, lr_max=_LR_MAX.value, steps=_LR_STEPS.value,
                             population=_POPULATION.value)
    s = result["suggestion"]
    print(f"suggested lr: {s['lr']:.3g} ({s['method']}); plot: {os.path.join(workdir, workdir_lib.LR_FIND_PLOT)}")
    return result


def _train(cfg, workdir: str) -> dict:
    summary = trainer.train(cfg, workdir)
    for split in ("val", "test"):
        if split in summary:
            print(f"{split}: " + " ".join(f"{k}={v:.4f}" for k, v in summary[split].items()))
    if "last" in summary:  # the numbers above are the best checkpoint's
        last = summary["last"]
        print(f"test of the last weights (step {last['step']}; best step {summary['best_step']} above): "
              + " ".join(f"{k}={v:.4f}" for k, v in last["test"].items()))
    timing = summary["timing"]
    print(f"train examples/s: {timing['train_examples_per_second']:.1f}   wall: {timing['wall_seconds']:.0f}s")
    perf = summary.get("perf") or {}
    if perf:
        print(f"MFU: {100 * perf['mfu']:.1f}% of {perf['peak_flops_per_s'] / 1e12:.3g} TFLOP/s ({perf['peak_source']})"
              f"   time to first step: {perf['time_to_first_step_s']:.1f}s   compile: {perf['compile_s']:.1f}s")
    return summary


def _dry_run(cfg, workdir: str) -> dict:
    """The run as shapes (config.json only, no weights or data), compiled for --topology or the live devices."""
    return dry_run.dry_run(cfg, workdir, _TOPOLOGY.value, _POPULATION.value)


def _eval(cfg, workdir: str) -> dict:
    if _LM_EVAL.value:
        # lm-eval (an optional extra) is imported only for this mode.
        from ftjax import lm_eval_model

        try:
            return lm_eval_model.evaluate_workdir(cfg, workdir, _LM_EVAL.value, restore=_restore_for_inference,
                                                  limit=_LM_EVAL_LIMIT.value, include_path=_LM_EVAL_INCLUDE.value)
        except lm_eval_model.LMEvalError as e:
            fail(str(e))
    run = Run(cfg, workdir, purpose="eval")
    step, why, params = _restore_for_inference(run, workdir)
    result = {"step": step, "checkpoint": why, "val": run.evaluate("validation", params)}
    if run.data.has_split("test"):
        result["test"] = run.evaluate("test", params)
    if run.primary:
        workdir_lib.update_eval(workdir, result)  # an earlier --lm_eval result stays beside it
    print(json.dumps(result, indent=1))
    return result


def _export(cfg, workdir: str) -> dict:
    """An HF folder (LoRA adapters merged in), plus the adapter alone in PEFT format under adapter/."""
    run = Run(cfg, workdir, purpose="export")
    step, why, params = _restore_for_inference(run, workdir)
    out = _EXPORT_DIR.value or str(fileio.path(workdir) / workdir_lib.EXPORT_DIR)
    # With params sharded over several hosts no process holds them whole: gather them to every process.
    params = multihost_utils.process_allgather(params, tiled=True) if jax.process_count() > 1 else (
        jax.device_get(params))
    record = {"workdir": str(fileio.path(workdir)), "step": step, "checkpoint": why, "weights": _WEIGHTS.value}
    if run.primary:
        models.save_pretrained(run.model, out, tokenizer=run.tokenizer, params=params,
                               overwrite=_OVERWRITE.value)
        if cfg.optim.lora.rank:
            lora.export_peft(run.model, fileio.path(out) / "adapter", params,
                             base_model_name_or_path=cfg.model.name_or_path, overwrite=True,
                             also_trained=cfg.optim.lora.also_train)
        fileio.write_json(fileio.path(out) / "ftjax_export.json", record)
    print(f"exported step {step} ({why}) to {out}")
    return {**record, "export_dir": out}


def _compare(cfg, workdirs: list[str]) -> dict:
    path = compare.write_compare(workdirs, _COMPARE_OUT.value)
    print(f"comparison: {path}")
    return {"report": str(path)}


def _diagnose(cfg, workdir: str) -> dict:
    """Reads the workdir's files only (a finished, interrupted or failed run): findings, plots, flags."""
    result = diagnose.diagnose(workdir)
    print("\n".join(diagnose.summary_lines(result)))
    print(f"report: {fileio.path(workdir) / workdir_lib.DIAGNOSIS_FILE}")
    return result


def _refine(cfg, workdir: str) -> dict:
    state = refine.refine(cfg, workdir, rounds=_ROUNDS.value, population_size=_POPULATION.value or 8)
    if "flags" in state:
        print(f"refine: best validation {state['metric']} {state['best']['value']:.4g}; flags: "
              f"{state['flags'] or '(the config as given)'}")
    print(f"report: {fileio.path(workdir) / refine.REPORT_FILE}")
    return state


MODE_FNS = {"train": _train, "eval": _eval, "export": _export, "dry_run": _dry_run, "sweep": _sweep,
            "lr_find": _lr_find, "compare": _compare, "diagnose": _diagnose,
            "refine": _refine}


def run_mode(mode: str, cfg, workdir: str) -> dict:
    return MODE_FNS[mode](cfg, workdir)


class _QuietLibraries:
    """Drops INFO chatter of orbax and friends (dozens of lines per checkpoint); warnings still show."""

    NOISY = ("orbax", "jax/_src", "etils", "tensorstore")

    def filter(self, record) -> bool:
        if "did not provide metrics" in record.getMessage():  # periodic (non-eval) saves have no val metric
            return False
        if record.levelno >= std_logging.WARNING:
            return True
        return not any(part in record.pathname for part in self.NOISY)


def usage_problem(argv: list[str]) -> str | None:
    """What is wrong with the flags themselves (absl parsed them), before anything runs."""
    if len(argv) > 1:
        return f"unexpected arguments: {argv[1:]} (flags are --name=value; see --help)"
    if not _WORKDIR.value:
        return "--workdir is required: the run's folder (local or gs://), e.g. --workdir=/tmp/ftjax_run"
    if _MODE.value != "compare" and len(_WORKDIR.value) > 1:
        return (f"--mode={_MODE.value} takes one --workdir, got {len(_WORKDIR.value)}: {_WORKDIR.value} "
                "(several are for --mode=compare)")
    if _CONFIG.value is None and _MODE.value not in ("eval", "export", "dry_run", "compare", "diagnose"):
        return (f"--mode={_MODE.value} needs --config=configs/RECIPE.py (eval, export, dry_run and diagnose read "
                f"WORKDIR/run.json); recipes: {', '.join(recipes()) or 'none found'}")
    if (_LM_EVAL.value or _LM_EVAL_LIMIT.value is not None or _LM_EVAL_INCLUDE.value) and _MODE.value != "eval":
        return f"--lm_eval (and --lm_eval_limit, --lm_eval_include) go with --mode=eval, not --mode={_MODE.value}"
    if (_LM_EVAL_LIMIT.value is not None or _LM_EVAL_INCLUDE.value) and not _LM_EVAL.value:
        return "--lm_eval_limit and --lm_eval_include go with --lm_eval=TASK[,TASK]"
    if _TOPOLOGY.value and _MODE.value != "dry_run":
        return f"--topology plans a run: it goes with --mode=dry_run, not --mode={_MODE.value}"
    return None


def main(argv) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    problem = usage_problem(argv)
    if problem:
        fail(problem)
    try:
        if _MODE.value == "compare":  # reads finished runs' files only: no devices, no config
            run_mode("compare", _CONFIG.value, _WORKDIR.value)
            return
        if _MODE.value == "diagnose":  # reads the run's files only (its config from run.json)
            run_mode("diagnose", None, _WORKDIR.value[0])
            return
        workdir = _WORKDIR.value[0]
        cfg = _CONFIG.value if _CONFIG.value is not None else workdir_lib.saved_config(workdir)
        if cfg.train.reuse_host_memory:
            host_memory.reuse_freed_memory()  # before JAX starts its backend's threads
        distributed.init_from_flags()  # before anything touches JAX devices
        run_mode(_MODE.value, cfg, workdir)
    except user_errors() as e:
        fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=cli_flags.parse)
