"""Language-model data (model.task="causal_lm"): plain text or instruction JSONL, packed into max_len rows.

Each row holds several documents: `segment_ids` (1.. per document, 0 = padding) and per-document
`position_ids` keep attention and the shifted loss inside a document; `labels` are the input ids with -100
where no loss is taken (prompts, padding). Also `write_samples`: a few generations at each evaluation.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import json
import math
import os
import types
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from ftjax.data import batching, sources
from ftjax.data.errors import DataError, DataFileNotFoundError

IGNORE = -100  # label of a token that takes no loss (HF's ignore_index)
_SAMPLE_PROMPT_TOKENS = 32  # text data: a sample prompt is a validation document's first tokens (at most)


@dataclasses.dataclass
class Document:
    """One tokenised document (or instruction example): ids and labels (ids, or IGNORE where no loss)."""

    ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [n]


@dataclasses.dataclass
class Packed:
    """Rows of max_len tokens, each holding whole documents (instruct) or pieces of them (text)."""

    input_ids: np.ndarray  # int32 [rows, L]; pad_id after the last document
    labels: np.ndarray  # int32 [rows, L]; IGNORE on prompts and padding
    segment_ids: np.ndarray  # int32 [rows, L]; 1, 2, ... per document in the row, 0 = padding
    position_ids: np.ndarray  # int32 [rows, L]; 0.. restarting at each document, 0 on padding
    documents: int  # documents packed
    truncated: int  # documents cut at max_len (instruct) or split across rows (text)
    dropped: int  # examples left with no labelled token to predict (instruct) and skipped

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def real_token_fraction(self) -> float:
        return float((self.segment_ids > 0).mean()) if len(self) else 0.0


def pack(docs: list[Document], max_len: int, *, split_long: bool, pad_id: int) -> Packed:
    """Greedy in-order packing. split_long (text): a document fills the row's remaining room and goes on in
    the next row (a new segment); else (instruct) a document that does not fit starts a new row and one
    longer than max_len is cut to max_len; one left without a labelled token after its first is dropped."""
    rows: list[list[Document]] = []
    current: list[Document] = []
    used = truncated = dropped = 0
    for doc in docs:
        if split_long:
            ids, labels = doc.ids, doc.labels
            if len(ids) > max_len - used:
                truncated += 1
            while len(ids):
                if used == max_len:
                    rows.append(current)
                    current, used = [], 0
                take = max_len - used
                current.append(Document(ids[:take], labels[:take]))
                used += len(current[-1].ids)
                ids, labels = ids[take:], labels[take:]
            continue
        ids, labels = doc.ids, doc.labels
        if len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            truncated += 1
        if not (labels[1:] != IGNORE).any():  # the first token is never predicted (nothing precedes it)
            dropped += 1
            continue
        if used + len(ids) > max_len:
            rows.append(current)
            current, used = [], 0
        current.append(Document(ids, labels))
        used += len(ids)
    if current:
        rows.append(current)
    n = len(rows)
    out = Packed(
        input_ids=np.full((n, max_len), pad_id, np.int32),
        labels=np.full((n, max_len), IGNORE, np.int32),
        segment_ids=np.zeros((n, max_len), np.int32),
        position_ids=np.zeros((n, max_len), np.int32),
        documents=len(docs) - dropped,
        truncated=truncated,
        dropped=dropped,
    )
    for r, row in enumerate(rows):
        start = 0
        for s, doc in enumerate(row, start=1):
            end = start + len(doc.ids)
            out.input_ids[r, start:end] = doc.ids
            out.labels[r, start:end] = doc.labels
            out.segment_ids[r, start:end] = s
            out.position_ids[r, start:end] = np.arange(end - start)
            start = end
    return out


class PackedBatcher:
    """This process's share of a global batch of packed rows; PAD plan rows become weight-0 rows."""

    def __init__(self, packed: Packed, pad_id: int, share: slice):
        self.packed, self.pad_id, self.share = packed, pad_id, share

    def __call__(self, plan_rows: np.ndarray) -> dict[str, np.ndarray]:
        mine = np.asarray(plan_rows)[self.share]
        real = mine >= 0
        p, length = self.packed, self.packed.input_ids.shape[1]
        b = len(mine)
        ids = np.full((b, length), self.pad_id, np.int32)
        labels = np.full((b, length), IGNORE, np.int32)
        segments = np.zeros((b, length), np.int32)
        positions = np.zeros((b, length), np.int32)
        idx = mine[real]
        ids[real], labels[real] = p.input_ids[idx], p.labels[idx]
        segments[real], positions[real] = p.segment_ids[idx], p.position_ids[idx]
        segments[~real, 0] = 1  # padding rows attend to one token: no all-masked softmax anywhere
        return {
            "input_ids": ids,
            "attention_mask": (segments > 0).astype(np.int32),
            "position_ids": positions,
            "segment_ids": segments,
            "labels": labels,
            "weights": real.astype(np.float32),
        }


# ------------------------------------------------------------------------------------------------------
# Reading: .txt files, or tables (JSONL/CSV/Parquet, tfds, hf) through ftjax.data.sources.


def _txt_files(spec: str) -> list[str] | None:
    """The .txt files a files: source names (file, glob or folder), or None when it names no .txt file."""
    path = os.path.expanduser(spec)
    if any(c in path for c in "*?["):
        found = sorted(glob.glob(path, recursive=True))
    elif os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.txt")))
    else:
        found = [path] if os.path.isfile(path) else []
    txt = [f for f in found if f.lower().endswith(".txt")]
    return txt or None


def _split_documents(text: str, mode: str) -> list[str]:
    if mode == "file":
        return [text] if text.strip() else []
    if mode == "line":
        return [line for line in text.splitlines() if line.strip()]
    paragraphs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def _read_txt(paths: list[str], mode: str) -> list[str]:
    docs = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            docs.extend(_split_documents(f.read(), mode))
    return docs


def _txt_splits(d: ml_collections.ConfigDict, files: list[str], roles: tuple[str, ...]) -> dict[str, list]:
    """{role: [document text]}: train from the source's .txt files, eval/test from their split fields."""
    spec = os.path.expanduser(d.source.split(":", 1)[1])
    folder = spec if os.path.isdir(spec) else os.path.dirname(files[0])
    named = {}
    for role in roles:
        name = d[sources.SPLIT_FIELDS[role]]
        if role == "train" and os.path.isdir(spec):
            mine = [f for f in files if os.path.basename(f).split(".")[0].startswith(name)]
            others = [d[sources.SPLIT_FIELDS[r]] for r in roles if r != "train"]
            named[role] = mine or [
                f for f in files if not any(o and os.path.basename(f).startswith(o) for o in others)
            ]
        elif role == "train":
            named[role] = files
        else:
            pattern = (
                name if name.lower().endswith(".txt") or any(c in name for c in "*?[") else f"{name}*.txt"
            )
            pattern = pattern if os.path.isabs(pattern) else os.path.join(folder, pattern)
            named[role] = sorted(glob.glob(os.path.expanduser(pattern)))
            if not named[role]:
                field = sources.SPLIT_FIELDS[role]
                raise DataFileNotFoundError(
                    f"data.{field}={name!r}: no .txt file matches {pattern}; fix the name"
                )
    out = {role: _read_txt(paths, d.lm.documents) for role, paths in named.items()}
    for role, docs in out.items():
        if not docs:
            field = sources.SPLIT_FIELDS[role]
            raise DataError(
                f"data.{field}: {named[role]} hold no text (data.lm.documents={d.lm.documents!r})"
            )
    return out


def _column(frame: Any, name: str, field: str, origin: str) -> list:
    if name not in frame.columns:
        raise DataError(
            f"data.{field}={name!r}: no such column in {origin}; columns: {[str(c) for c in frame.columns]}. "
            f"Fix: set data.{field}"
        )
    return frame[name].tolist()


def _format(d: ml_collections.ConfigDict, columns: list[str], origin: str) -> str:
    lm = d.lm
    chat = lm.messages_field in columns
    pc = lm.prompt_field in columns and lm.completion_field in columns
    if lm.format == "instruct" or (lm.format == "auto" and (chat or pc)):
        if not (chat or pc):
            raise DataError(
                f"data.lm.format='instruct': {origin} has neither a {lm.messages_field!r} column nor "
                f"{lm.prompt_field!r} + {lm.completion_field!r} columns (it has {columns}); set "
                "data.lm.messages_field or data.lm.prompt_field / completion_field"
            )
        return "chat" if chat else "prompt_completion"
    if d.text_field not in columns:
        raise DataError(
            f"data.text_field={d.text_field!r}: no such column in {origin} (columns: {columns}); set "
            "data.text_field, or data.lm.prompt_field / completion_field / messages_field for instruct data"
        )
    return "text"


# ------------------------------------------------------------------------------------------------------
# Tokenising.


def _ids(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special, verbose=False, return_attention_mask=False)[
        "input_ids"
    ]


def _eos(tokenizer: Any, add_eos: bool) -> list[int]:
    return [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []


def text_documents(tokenizer: Any, texts: list[str], add_eos: bool) -> list[Document]:
    """Plain text: every token takes loss (labels = ids)."""
    eos = _eos(tokenizer, add_eos)
    out = []
    for ids in _ids(tokenizer, texts, True):
        arr = np.asarray(list(ids) + eos, np.int32)
        out.append(Document(arr, arr.copy()))
    return out


def prompt_completion_documents(
    tokenizer: Any, prompts: list[str], completions: list[str], add_eos: bool
) -> list[Document]:
    """prompt (with the tokenizer's special tokens, e.g. BOS) + completion (+ eos); loss on the completion."""
    eos = _eos(tokenizer, add_eos)
    out = []
    for p, c in zip(_ids(tokenizer, prompts, True), _ids(tokenizer, completions, False)):
        c = list(c) + eos
        ids = np.asarray(list(p) + c, np.int32)
        labels = np.asarray([IGNORE] * len(p) + c, np.int32)
        out.append(Document(ids, labels))
    return out


def chat_pieces(tokenizer: Any, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """The chat-template rendering cut into (text, is_assistant_reply) pieces, in order.

    Each assistant turn's text is what the template adds for it after the generation prompt; checked to be
    a prefix-consistent rendering (else a DataError: the template rewrites earlier turns).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"{where}: chat messages need the tokenizer's chat_template, and this tokenizer has none; use "
            "prompt/completion columns or a tokenizer with a chat template"
        )
    messages = [dict(m) for m in messages]

    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) if msgs else ""

    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (before.startswith(done) and upto.startswith(before)):
            raise DataError(
                f"{where}: the chat template does not render turn {i} as a continuation of earlier ones"
            )
        pieces += [(before[len(done) :], False), (upto[len(before) :], True)]
        done = upto
    if not any(is_reply for _, is_reply in pieces):
        raise DataError(f"{where}: a conversation has no assistant message to learn from")
    full = render(messages, False)
    if full.startswith(done) and len(full) > len(done):
        pieces.append((full[len(done) :], False))
    return [(t, r) for t, r in pieces if t]


def chat_documents(tokenizer: Any, conversations: list[Any], origin: str, field: str) -> list[Document]:
    """Chat messages rendered with the tokenizer's chat template; loss on the assistant replies only."""
    out = []
    for row, conv in enumerate(conversations):
        where = f"data.lm.messages_field={field!r}: row {row} of {origin}"
        if isinstance(conv, str):
            conv = json.loads(conv)
        if not isinstance(conv, (list, tuple, np.ndarray)) or not all(isinstance(m, dict) for m in conv):
            raise DataError(
                f"{where}: expected a list of {{'role', 'content'}} messages, got {type(conv).__name__}"
            )
        pieces = chat_pieces(tokenizer, list(conv), where)
        ids, labels = [], []
        for text, is_reply in pieces:
            tok = _ids(tokenizer, [text], False)[0]
            ids += tok
            labels += tok if is_reply else [IGNORE] * len(tok)
        out.append(Document(np.asarray(ids, np.int32), np.asarray(labels, np.int32)))
    return out


def _sample_prompt(
    tokenizer: Any, fmt: str, frame_row: dict, d: ml_collections.ConfigDict, doc: Document
) -> str:
    if fmt == "prompt_completion":
        return str(frame_row[d.lm.prompt_field])
    if fmt == "chat":
        messages = [dict(m) for m in frame_row[d.lm.messages_field]]
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        return tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
    n = min(_SAMPLE_PROMPT_TOKENS, max(1, len(doc.ids) // 2))
    return tokenizer.decode(doc.ids[:n], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------------
# The bundle.


def build(
    cfg: ml_collections.ConfigDict, tokenizer: Any, *, process_index: int = 0, process_count: int = 1
) -> Any:
    """The DataBundle of a causal_lm run: packed rows of data.max_len tokens (see the module docstring)."""
    from ftjax.data import DataBundle

    d, t = cfg.data, cfg.train
    batch, eval_batch = t.batch_size, t.eval_batch_size or 2 * t.batch_size
    if tokenizer is None:
        raise DataError("model.task='causal_lm' is a text task: ftjax.data.build needs the model's tokenizer")
    roles = ("train",) + (("validation",) if d.eval_split else ()) + (("test",) if d.test_split else ())
    kind, _, spec = d.source.partition(":")
    txt = _txt_files(spec) if kind == "files" else None
    rows: dict[str, list[dict]] = {}
    if txt is not None:
        fmt = "text"
        docs_text = _txt_splits(d, txt, roles)
        rows = {r: [{"text": x} for x in v] for r, v in docs_text.items()}
        origins = {r: f"{d.source} ({r})" for r in rows}
    else:
        raw = sources.load_splits(d, roles)
        origins = {r: s.origin for r, s in raw.items()}
        for role, split in raw.items():
            if len(split) == 0:
                field = sources.SPLIT_FIELDS[role]
                raise DataError(
                    f"data.{field}={d[field]!r}: {split.origin} has no examples; point it at data"
                )
        fmt = _format(d, [str(c) for c in raw["train"].frame.columns], raw["train"].origin)
        rows = {r: s.frame.to_dict("records") for r, s in raw.items()}

    if "validation" not in rows:  # hold out documents (before packing), as ftjax.data does for examples
        train = rows["train"]
        split = batching.holdout_indices(len(train), d.validation_fraction, t.seed)
        if split is None:
            raise DataError(
                f"data.train_split: {origins['train']} has {len(train)} document(s), too few to hold out a "
                "validation split; set data.eval_split or data.lm.documents='paragraph'/'line'"
            )
        held, kept = split
        rows["validation"] = [train[i] for i in held]
        rows["train"] = [train[i] for i in kept]
        origins["validation"] = f"{origins['train']} (held-out {d.validation_fraction:g})"
    if d.max_examples:
        rows["train"] = rows["train"][: d.max_examples]

    def tokenize(role: str) -> list[Document]:
        items = rows[role]
        if fmt == "text":
            field = "text" if txt is not None else d.text_field
            texts = ["" if x.get(field) is None else str(x.get(field)) for x in items]
            return text_documents(tokenizer, texts, d.lm.add_eos)
        if fmt == "prompt_completion":
            prompts = [str(x[d.lm.prompt_field]) for x in items]
            completions = [str(x[d.lm.completion_field]) for x in items]
            return prompt_completion_documents(tokenizer, prompts, completions, d.lm.add_eos)
        return chat_documents(
            tokenizer, [x[d.lm.messages_field] for x in items], origins[role], d.lm.messages_field
        )

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    share = slice(process_index * batch // process_count, (process_index + 1) * batch // process_count)
    eval_share = slice(
        process_index * eval_batch // process_count, (process_index + 1) * eval_batch // process_count
    )
    docs = {role: tokenize(role) for role in rows}
    packed = {role: pack(v, d.max_len, split_long=fmt == "text", pad_id=pad_id) for role, v in docs.items()}
    for role, p in packed.items():
        if len(p) == 0:
            field = sources.SPLIT_FIELDS[role]
            raise DataError(
                f"data.{field}: no {role} example has a token to learn from ({p.dropped} dropped: prompts "
                f"that "
                f"fill data.max_len={d.max_len}); raise data.max_len or check the completion column"
            )
    makers: dict[str, Callable[[np.ndarray], dict]] = {
        role: PackedBatcher(p, pad_id, share if role == "train" else eval_share) for role, p in packed.items()
    }
    lengths = {role: np.full(len(p), d.max_len, np.int32) for role, p in packed.items()}

    def train_plan(epoch: int) -> np.ndarray:
        return batching.train_plan(lengths["train"], batch, t.seed, epoch, 0)

    plans = {r: batching.eval_plan(lengths[r], eval_batch) for r in packed if r != "train"}
    prompts = []
    if d.lm.num_samples:
        for item, doc in list(zip(rows["validation"], docs["validation"]))[: d.lm.num_samples]:
            prompts.append(_sample_prompt(tokenizer, fmt, item, d, doc))
    stats: dict[str, Any] = {
        "format": fmt,
        "documents": {r: p.documents for r, p in packed.items()},
        "rows": {r: len(p) for r, p in packed.items()},
        "tokens": {r: int((p.segment_ids > 0).sum()) for r, p in packed.items()},
        "loss_tokens": {r: int((p.labels != IGNORE).sum()) for r, p in packed.items()},
        ("split_across_rows" if fmt == "text" else "truncated"): {r: p.truncated for r, p in packed.items()},
        "dropped": {r: p.dropped for r, p in packed.items()},
        "real_token_fraction": packed["train"].real_token_fraction,
        "bucket_lengths": [d.max_len],
    }
    for role, p in packed.items():
        if fmt != "text" and p.truncated:
            logging.warning(
                "data: %d %s examples are longer than data.max_len=%d and were truncated",
                p.truncated,
                role,
                d.max_len,
            )
        if p.dropped:
            logging.warning(
                "data: %d %s examples have no completion token within data.max_len=%d; skipped",
                p.dropped,
                role,
                d.max_len,
            )
    steps = math.ceil(len(packed["train"]) / batch)
    logging.info(
        "data (causal_lm, %s): %s; %d steps/epoch of %d rows x %d tokens", fmt, stats, steps, batch, d.max_len
    )
    return DataBundle(
        label_names=[],
        num_examples={r: len(p) for r, p in packed.items()},
        steps_per_epoch=steps,
        batch_size=batch,
        eval_batch_size=eval_batch,
        bucket_lengths=(d.max_len,),
        stats=stats,
        _plans=plans,
        _train_plan=train_plan,
        _makers=makers,
        _threads=2,
        sample_prompts=prompts,
    )


# ------------------------------------------------------------------------------------------------------
# Sample generations at evaluation time.

_NOTED = {"missing": False}


def generate_fn() -> Callable | None:
    """`ftjax.generate(model, tokenizer, prompts, max_new_tokens, ...)` if it exists, else None."""
    import ftjax

    fn = getattr(ftjax, "generate", None)
    if fn is None:
        try:
            fn = importlib.import_module("ftjax.generate")
        except ModuleNotFoundError as e:
            if e.name != "ftjax.generate":
                raise
            return None
    if isinstance(fn, types.ModuleType):
        fn = getattr(fn, "generate", None)
    return fn if callable(fn) else None


def write_samples(run: Any, step: int) -> str | None:
    """Generates from the first data.lm.num_samples validation prompts with the current params and writes
    WORKDIR/samples/step_<step>.jsonl; returns its path (None when off, or ftjax.generate is missing)."""
    import jax

    from ftjax import params as params_lib

    lm = run.cfg.data.lm
    prompts = list(getattr(run.data, "sample_prompts", []))[: lm.num_samples]
    if not lm.num_samples or not prompts:
        return None
    generate = generate_fn()
    if generate is None:
        if not _NOTED["missing"]:
            logging.info("samples: skipped (ftjax.generate is not available in this install)")
            _NOTED["missing"] = True
        return None
    model = params_lib.merge(run.graphdef, run.state["params"], run.rest)
    try:
        with jax.set_mesh(run.mesh):
            outputs = generate(model, run.tokenizer, prompts, max_new_tokens=lm.sample_max_new_tokens)
    except Exception as e:  # noqa: BLE001 (samples are a diagnostic: a failure is reported, the run goes on)
        logging.warning(
            "samples: generation failed at step %d (%s: %s); training goes on", step, type(e).__name__, e
        )
        return None
    if not run.primary:
        return None
    path = os.path.join(run.workdir, "samples", f"step_{step:06d}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(
            json.dumps({"step": step, "prompt": p, "generation": str(out)}) + "\n"
            for p, out in zip(prompts, outputs)
        )
    return path
