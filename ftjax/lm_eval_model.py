"""lm-evaluation-harness over ftjax: an lm_eval model ("ftjax") that scores and generates with the JAX model
(fixed batch, length buckets, one jitted program per bucket; ftjax.generate for decoding), tokenising as
lm-eval's own HF backend does, and `evaluate_workdir` behind --mode=eval --lm_eval."""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from ftjax import fileio, hf, models
from ftjax import params as params_lib
from ftjax import workdir as workdir_lib
from ftjax.errors import UserError
from ftjax.generate import generate_ids

try:
    import lm_eval
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models import utils as model_utils
except ImportError:  # the optional extra: --mode=eval --lm_eval says how to install it
    lm_eval = None
    TemplateLM = object

    def register_model(*names):
        return lambda cls: cls

DEFAULT_MAX_LENGTH = 2048  # lm-eval's HF backend's, when neither config nor tokenizer names a length
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF backend's
MIN_BUCKET = 16  # scored rows are right-padded to a power of two >= this (capped at max_length)


class LMEvalError(UserError, ValueError):
    """A user error of --lm_eval: the package missing, an unknown task, a run that is not a causal LM."""


def _require_lm_eval() -> None:
    if lm_eval is None:
        raise LMEvalError("--lm_eval needs lm-evaluation-harness: pip install 'ftjax[lm_eval]' (or lm-eval)")


def bucket_length(n: int, max_length: int) -> int:
    """The padded length of a row of n tokens: the next power of two >= MIN_BUCKET, at most max_length."""
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return max(n, min(size, max_length))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, ids, mask, targets, scored):
    """Per row: the sum of log p(target) over the scored positions, and whether every scored target is the
    argmax (lm-eval's is_greedy). ids / mask / targets / scored are [B, L]; targets = ids shifted left."""
    model = nnx.merge(graphdef, state)
    logits = model(input_ids=ids, attention_mask=mask)["logits"].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(jnp.where(scored, picked, 0.0), axis=-1), jnp.all(greedy | ~scored, axis=-1)


def stop_token_ids(folder: str | None, hf_config: Any) -> list[int]:
    """The ids generation stops at, as transformers' generate takes them: config.json's eos_token_id and
    generation_config.json's (instruct models often add an end-of-turn token there)."""
    ids: list[int] = []
    sources = [hf_config.eos_token_id]
    path = os.path.join(folder, "generation_config.json") if folder else None
    if path and os.path.isfile(path):
        sources.append(fileio.read_json(path).get("eos_token_id"))
    for value in sources:
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


@register_model("ftjax")
class FtjaxLM(TemplateLM):
    """lm_eval's LM interface over an ftjax causal LM. Build it from an HF folder (`pretrained=`, as
    `lm_eval.simple_evaluate(model="ftjax", model_args="pretrained=DIR")` does) or from a loaded `model` and
    `tokenizer` (the trained params of a workdir: `evaluate_workdir`; `folder`: the base model's HF folder, whose
    generation_config.json may add stop ids). dtype: the compute dtype ("auto": float32 on CPU, bfloat16 on
    accelerators)."""

    backend = "causal"

    def __init__(self, pretrained: str | None = None, *, model: Any = None, tokenizer: Any = None,
                 batch_size: int | str | None = 8, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, add_bos_token: bool | None = None,
                 dtype: str = "float32", mesh: Any = None, seed: int = 1234, folder: str | None = None,
                 **unused: Any):
        _require_lm_eval()
        super().__init__()
        if model is None:
            if not pretrained:
                raise LMEvalError("FtjaxLM needs pretrained=HF_FOLDER (or a loaded model and tokenizer)")
            if dtype == "auto":
                dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
            folder = hf.resolve(str(pretrained))
            model = models.from_pretrained(folder, task="causal_lm", dtype=dtype, scan_layers=True)
            tokenizer = tokenizer or models.load_tokenizer(folder)
        if getattr(model, "task", None) != "causal_lm":
            raise LMEvalError(f"lm-eval scores causal LMs (task causal_lm); this model has task "
                              f"{getattr(model, 'task', None)!r}")
        if tokenizer is None:
            raise LMEvalError("FtjaxLM needs the model's tokenizer")
        unused.pop("device", None), unused.pop("max_batch_size", None)  # lm_eval's CLI passes them to every model
        if unused:
            logging.warning("ftjax lm_eval model: ignoring arguments %s", sorted(unused))
        self.model, self.tokenizer = model, model_utils.configure_pad_token(tokenizer, model_config=model.hf_config)
        self.graphdef, self.state = nnx.split(model)
        self.mesh, self.seed, self.add_bos_token = mesh, seed, add_bos_token
        self.stop_ids = stop_token_ids(folder, model.hf_config)  # folder: the model's, for generation_config.json
        self._batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(
            batch_size)
        self._max_length = int(max_length) if max_length else model_utils.resolve_max_length(
            model.hf_config, self.tokenizer, default=DEFAULT_MAX_LENGTH)
        self._max_gen_toks = int(max_gen_toks)
        vocab = int(model.hf_config.vocab_size)
        pad = self.tokenizer.pad_token_id
        # Padding ids must exist in the embedding (a pad token the tokenizer added may not); they are masked.
        self.pad_id = int(pad) if pad is not None and 0 <= pad < vocab else int(self.eot_token_id or 0)

    # ---- what lm_eval asks of a model ----
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """As lm-eval's HF backend: the tokenizer's own special tokens (or add_bos_token's choice), none when
        the string already starts with the prefix token."""
        special = model_utils._add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and model_utils.has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def _context_encode(self, string: str) -> list[int]:
        """A generation prompt's tokens, as the HF backend's tok_batch_encode makes them."""
        if model_utils.has_bos_prefix(string, getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        else:
            special = {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token}
        return list(self.tokenizer(string, **special)["input_ids"])

    def _on_mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    # ---- scoring ----
    def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, is it the greedy continuation) per (key, context ids,
        continuation ids), context + continuation left-truncated to max_length + 1 tokens as the HF backend
        does; rows sorted by length, batched by batch_size and right-padded to a length bucket."""
        rows = []
        for _, context, continuation in requests:
            if not continuation or len(continuation) > self.max_length:
                raise LMEvalError(f"a continuation of {len(continuation)} tokens cannot be scored with "
                                  f"max_length={self.max_length}")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[1:], len(continuation)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        bs = self.batch_size
        progress = _progress(len(rows), "ftjax loglikelihood", disable_tqdm)
        for start in range(0, len(order), bs):
            chunk = order[start:start + bs]
            length = bucket_length(max(len(rows[i][0]) for i in chunk), self.max_length)
            ids = np.full((bs, length), self.pad_id, np.int32)
            targets = np.full((bs, length), self.pad_id, np.int32)
            mask, scored = np.zeros((bs, length), np.int32), np.zeros((bs, length), bool)
            mask[:, 0] = 1  # rows that only fill the batch see one token
            for r, i in enumerate(chunk):
                inputs, shifted, n = rows[i]
                ids[r, :len(inputs)], targets[r, :len(inputs)], mask[r, :len(inputs)] = inputs, shifted, 1
                scored[r, len(inputs) - n:len(inputs)] = True
            with self._on_mesh():
                logp, greedy = jax.device_get(_score(self.graphdef, self.state, ids, mask, targets, scored))
            for r, i in enumerate(chunk):
                answer = (float(logp[r]), bool(greedy[r]))
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            progress.update(len(chunk))
        progress.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood in disjoint windows of max_length tokens (the first conditioned on
        the prefix token), as lm-eval's HF backend computes it; all windows of all texts batched together."""
        windows, owners = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[k] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ----
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations through ftjax.generate's KV-cache decoder, max_gen_toks
        new tokens at most, stopping at eos, cut at the first of `until` (plus the eos text) as the HF backend
        cuts them. Requests are grouped by their generation settings, sorted by prompt length and batched."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str | None] = [None] * len(requests)
        eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        progress = _progress(len(requests), "ftjax generate_until", disable_tqdm)
        for members in groups.values():
            settings = model_utils.normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            until = model_utils.handle_stop_sequences(settings.pop("until", None), eos=eos_text)
            max_gen_toks = int(settings.pop("max_gen_toks"))
            sample = bool(settings.pop("do_sample", False))
            temperature = float(settings.pop("temperature", 0.0) or 0.0)
            temperature = temperature if sample else 0.0  # greedy unless do_sample, as the HF backend
            top_p = float(settings.pop("top_p", 1.0) or 1.0)
            if settings:
                logging.warning("ftjax lm_eval model: generation settings %s are not supported; ignored",
                                sorted(settings))
            max_context = self.max_length - max_gen_toks
            if max_context <= 0:
                raise LMEvalError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in max_length="
                                  f"{self.max_length}")
            prompts = {i: self._context_encode(requests[i].args[0])[-max_context:] for i in members}
            ordered = sorted(members, key=lambda i: -len(prompts[i]))
            for start in range(0, len(ordered), self.batch_size):
                chunk = ordered[start:start + self.batch_size]
                texts = self._generate(
                    [prompts[i] for i in chunk], max_gen_toks, temperature, top_p, seed=self.seed + start)
                for i, text in zip(chunk, texts):
                    text = model_utils.postprocess_generated_text(text, until, None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(chunk))
        progress.close()
        return results  # type: ignore[return-value]

    def _generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                  seed: int) -> list[str]:
        """The decoded new text of each prompt: left-padded to a power-of-two length bucket in a batch of
        batch_size rows (the last real one repeated), generated with ftjax.generate.generate_ids."""
        rows = prompts + [prompts[-1]] * (self.batch_size - len(prompts))
        length = bucket_length(max(len(p) for p in rows), self.max_length - max_new_tokens)
        ids = np.full((len(rows), length), self.pad_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for r, p in enumerate(rows):
            ids[r, length - len(p):], mask[r, length - len(p):] = p, 1
        with self._on_mesh():
            out = generate_ids(self.model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, eos_token_id=self.stop_ids or None,
                               pad_token_id=self.pad_id)
        return [self.tokenizer.decode(out[r, length:].tolist(), skip_special_tokens=True)
                for r in range(len(prompts))]


def _progress(total: int, desc: str, disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=disable or total == 0)


def task_manager(include_path: str | None = None) -> Any:
    """lm-eval's TaskManager: its own tasks, plus the task YAMLs under include_path."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path and not os.path.exists(include_path):
        raise LMEvalError(f"--lm_eval_include={include_path} does not exist: pass a folder of task YAMLs")
    return TaskManager(include_path=include_path or None)


def check_tasks(names: Sequence[str], manager: Any) -> list[str]:
    """The task names (globs allowed, or YAML paths) after checking lm-eval knows each one."""
    unknown = [n for n in names if not manager.match_tasks([n]) and not os.path.isfile(n)]
    if unknown:
        close = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        hints = "; ".join(f"{n!r} (did you mean {', '.join(c)}?)" if c else repr(n) for n, c in close.items())
        raise LMEvalError(f"--lm_eval: unknown lm-eval task {hints}. List the names with `lm-eval ls tasks` "
                          "(add --include_path DIR for your own), or define it in a YAML under --lm_eval_include=DIR")
    return list(names)


def evaluate(lm: Any, tasks: Sequence[str], *, limit: float | None = None, include_path: str | None = None,
             manager: Any = None, log_samples: bool = False, **kwargs: Any) -> dict:
    """lm_eval.simple_evaluate of `lm` on `tasks` (checked first; include_path adds local task YAMLs)."""
    _require_lm_eval()
    manager = manager or task_manager(include_path)
    return lm_eval.simple_evaluate(model=lm, tasks=check_tasks(tasks, manager), task_manager=manager, limit=limit,
                                   log_samples=log_samples, **kwargs)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def evaluate_workdir(cfg: Any, workdir: str, tasks: Sequence[str], *, restore: Callable[[Any, str], tuple],
                     limit: int | None = None, include_path: str | None = None, batch_size: int = 8,
                     manager: Any = None) -> dict:
    """--mode=eval --lm_eval: the run's checkpoint (restore(run, workdir) -> (step, why, params): the best one,
    or --step) scored on lm-eval tasks; the results go under "lm_eval" in WORKDIR/eval.json and print as a
    table."""
    _require_lm_eval()
    if jax.process_count() > 1:
        raise LMEvalError(f"--lm_eval runs in one process, not {jax.process_count()}: export the run "
                          "(--mode=export) or evaluate it from a single host")
    manager = manager or task_manager(include_path)
    check_tasks(tasks, manager)  # before the checkpoint is read
    from ftjax.run import Run  # the run's modules, only when the mode runs

    run = Run(cfg, workdir, purpose="export")  # the model and tokenizer without the training data
    if getattr(run.model, "task", None) != "causal_lm":  # causal_lm runs, and preference runs (a causal LM tuned)
        raise LMEvalError(f"--lm_eval scores causal language models: this run (model.task={cfg.model.task!r}) "
                          f"trains a {getattr(run.model, 'task', None)} model; evaluate a model.task=causal_lm run")
    step, why, params = restore(run, workdir)
    model = params_lib.merge(run.graphdef, params, run.rest)
    lm = FtjaxLM(model=model, tokenizer=run.tokenizer, mesh=run.mesh, batch_size=batch_size, seed=cfg.train.seed,
                 folder=hf.resolve(cfg.model.name_or_path))
    out = evaluate(lm, tasks, limit=limit, manager=manager)
    record = {"step": step, "checkpoint": why, "tasks": list(tasks), "limit": limit,
              "lm_eval_version": getattr(lm_eval, "__version__", None),
              **{k: _jsonable(out.get(k, {})) for k in ("results", "groups", "versions", "n-shot",
                                                         "higher_is_better")}}
    if run.primary:
        workdir_lib.update_eval(workdir, {workdir_lib.LM_EVAL_KEY: record})
    print(lm_utils.make_table(out))
    if out.get("groups"):
        print(lm_utils.make_table(out, "groups"))
    print(f"lm_eval results: {fileio.path(workdir) / workdir_lib.EVAL_FILE} [{workdir_lib.LM_EVAL_KEY!r}]")
    return record


__all__ = ["FtjaxLM", "LMEvalError", "check_tasks", "evaluate", "evaluate_workdir", "task_manager"]
