"""causal_lm documents: read plain .txt files or instruction tables (prompt/completion, chat messages), and
tokenise each example into a Document whose labels mark the tokens that take loss."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import ml_collections
import numpy as np
import pandas as pd

from ftjax.data import sources, splits
from ftjax.data.errors import DataError, DataFileNotFoundError
from ftjax.data.document_packing import IGNORE, Document
from ftjax.data.sources import RawSplit

_SAMPLE_PROMPT_TOKENS = 32  # text data: a sample prompt is a validation document's first tokens (at most)


def read(d: ml_collections.ConfigDict, wanted: tuple[str, ...]) -> tuple[dict[str, RawSplit], str]:
    """({role: RawSplit}, format): .txt files give one document per row in a data.text_field column and
    format "text"; tables (JSONL/CSV/Parquet, tfds, hf) give "text", "prompt_completion" or "chat"."""
    kind, _, spec = d.source.partition(":")
    txt = _txt_files(spec) if kind == "files" else None
    if txt is not None:
        texts = _txt_splits(d, txt, wanted)
        return {
            r: RawSplit(pd.DataFrame({d.text_field: v}), f"{d.source} ({r})") for r, v in texts.items()
        }, "text"
    raw = splits.read(d, wanted)
    return raw, _format(d, [str(c) for c in raw["train"].frame.columns], raw["train"].origin)


def tokenize(tokenizer: Any, fmt: str, split: RawSplit, d: ml_collections.ConfigDict) -> list[Document]:
    """The split's examples as Documents: every token of text, the completion, or the assistant replies."""
    items = split.frame.to_dict("records")
    if fmt == "text":
        texts = ["" if x.get(d.text_field) is None else str(x.get(d.text_field)) for x in items]
        return text_documents(tokenizer, texts, d.lm.add_eos)
    if fmt == "prompt_completion":
        prompts = [str(x[d.lm.prompt_field]) for x in items]
        completions = [str(x[d.lm.completion_field]) for x in items]
        return prompt_completion_documents(tokenizer, prompts, completions, d.lm.add_eos)
    return chat_documents(
        tokenizer, [x[d.lm.messages_field] for x in items], split.origin, d.lm.messages_field
    )


def sample_prompts(
    tokenizer: Any, fmt: str, split: RawSplit, docs: list[Document], d: ml_collections.ConfigDict
) -> list[str]:
    """Prompts of the first data.lm.num_samples examples of `split` (its Documents `docs`), for samples:
    the prompt, the chat up to its last assistant turn, or a text's first tokens."""
    if not d.lm.num_samples:
        return []
    n = d.lm.num_samples
    rows = split.frame.head(n).to_dict("records")
    return [_sample_prompt(tokenizer, fmt, row, d, doc) for row, doc in zip(rows, docs[:n], strict=True)]


# ------------------------------------------------------------------------------------------------------
# Reading: .txt files, or tables through ftjax.data.sources.


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
