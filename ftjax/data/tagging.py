"""Token classification data (model.task="token_classification", e.g. NER): sentences of words with one tag per
word, from CoNLL files or from rows holding a list of words and a list of tags, turned into sub-word rows whose
label sits on the first sub-word of each word (-100 on the others and on special tokens, as HF's run_ner does).

Why a builder of its own: the text tasks tokenise a string and carry one label per example; here the words are
given (tokenised with the fast tokenizer's is_split_into_words, mapped back with word_ids), labels are per token,
and truncation at data.max_len loses words, which the stats count. Batches are one sentence per row padded to a
few length buckets, as for the other text tasks: input_ids, attention_mask, token_type_ids, labels [B, L] and
weights [B]. Label names: the dataset's ClassLabel names, else the sorted tags of train (ids in that order).
"""

from __future__ import annotations

import json
import math
from typing import Any

import ml_collections
import numpy as np
import pandas as pd
from absl import logging

from ftjax.config import ConfigError
from ftjax.data import batching, splits
from ftjax.data.bundle import DataBundle, Maker, assemble
from ftjax.data.batching import IGNORE  # a position without a label
from ftjax.data.errors import DataError
from ftjax.data.sources import RawSplit

CONLL_EXTS = (".conll", ".txt")  # files: sources read as CoNLL (besides JSONL / CSV / Parquet rows)
DOCSTART = "-DOCSTART-"
_CHUNK = 4096  # sentences tokenised per call


# ---------------------------------------------------------------- reading


def read_conll(path: str, tokens_field: str, tags_field: str) -> pd.DataFrame:
    """A CoNLL file's sentences as rows {tokens_field: [word], tags_field: [tag]}: one word per line, columns split
    on whitespace, the word first and its tag last; blank lines end a sentence; -DOCSTART- lines are skipped."""
    words: list[list[str]] = []
    tags: list[list[str]] = []
    sentence: tuple[list[str], list[str]] = ([], [])

    def close() -> None:
        if sentence[0]:
            words.append(sentence[0])
            tags.append(sentence[1])

    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            columns = line.split()
            if not columns or columns[0] == DOCSTART:
                close()
                sentence = ([], [])
                continue
            if len(columns) < 2:
                raise DataError(f"{path}:{number}: {line.strip()!r} has no tag column; a CoNLL line is a word, "
                                "optional columns and its tag, separated by whitespace (blank lines between sentences)")
            sentence[0].append(columns[0])
            sentence[1].append(columns[-1])
    close()
    return pd.DataFrame({tokens_field: pd.Series(words, dtype=object), tags_field: pd.Series(tags, dtype=object)})


def _as_list(value: Any, where: str, field: str, name: str) -> list:
    """A cell holding a sequence (a list, a numpy array from Parquet, or a JSON list in a CSV cell) as a list."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    raise DataError(f"data.{field}={name!r}: {where} is not a list (got {type(value).__name__}); each row needs a "
                    "list of words and a list of tags of the same length")


def _tag_name(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating)) and float(value).is_integer()):
        return str(int(value))
    return str(value)


def sentences(split: RawSplit, d: ml_collections.ConfigDict) -> tuple[list[list[str]], list[list[Any]]]:
    """(words, tags) of each row of a split, checked: lists of equal length, words as strings."""
    for field in ("tokens_field", "tags_field"):
        if d[field] not in split.frame.columns:
            raise DataError(f"data.{field}={d[field]!r}: no such column in {split.origin}; available columns: "
                            f"{[str(c) for c in split.frame.columns]}. Fix: set data.{field} to one of them")
    words, tags = [], []
    for row, (w, t) in enumerate(zip(split.frame[d.tokens_field], split.frame[d.tags_field])):
        where = f"row {row} of {split.origin}"
        w = [str(x) for x in _as_list(w, where, "tokens_field", d.tokens_field)]
        t = _as_list(t, where, "tags_field", d.tags_field)
        if len(w) != len(t):
            raise DataError(f"{where}: {len(w)} words but {len(t)} tags (data.tokens_field={d.tokens_field!r}, "
                            f"data.tags_field={d.tags_field!r}); every word needs one tag")
        words.append(w)
        tags.append(t)
    return words, tags


def label_names(train_tags: list[list[Any]], source_names: list[str] | None) -> list[str]:
    """id -> tag: the source's ClassLabel names, else the tags seen in train, sorted (numerically when all look
    like integers)."""
    if source_names is not None:
        return list(source_names)
    seen = {_tag_name(t) for tags in train_tags for t in tags}
    if seen and all(s.lstrip("-").isdigit() for s in seen):
        return sorted(seen, key=int)
    return sorted(seen)


def encode_tags(tags: list[list[Any]], names: list[str], origin: str, source_names: bool) -> list[np.ndarray]:
    """Each sentence's tag ids (source_names: the tags are already ids into `names`); a tag train never had is a
    DataError listing the unseen ones."""
    if source_names:
        out = [np.asarray(t, np.int64).reshape(-1) for t in tags]
        bad = sorted({int(x) for t in out for x in t[(t < 0) | (t >= len(names))]})
        if bad:
            raise DataError(f"data.tags_field: {origin} has tag ids {bad[:10]} outside the dataset's {len(names)} "
                            "tag names")
        return [t.astype(np.int32) for t in out]
    index = {n: i for i, n in enumerate(names)}
    unseen: dict[str, int] = {}
    out = []
    for t in tags:
        ids = np.empty(len(t), np.int32)
        for j, value in enumerate(t):
            name = _tag_name(value)
            ids[j] = index.get(name, -1)
            if ids[j] < 0:
                unseen[name] = unseen.get(name, 0) + 1
        out.append(ids)
    if unseen:
        raise DataError(f"data.tags_field: {origin} has tags never seen in train: {dict(sorted(unseen.items())[:10])} "
                        f"(train has {names[:20]}). Fix: use splits with the same tag set, or map those tags")
    return out


# ---------------------------------------------------------------- tokenising


class TaggedTokens:
    """Ragged sub-word rows of one split: sentence i is ids[offsets[i]:offsets[i + 1]] with its labels (a tag id on
    each word's first sub-word, IGNORE elsewhere) and token type ids; what tokenising and max_len lost."""

    def __init__(self, ids: list[list[int]], types: list[list[int]], labels: list[list[int]], truncated: int,
                 truncated_words: int, empty_words: int):
        lengths = np.fromiter((len(x) for x in ids), np.int64, count=len(ids))
        self.offsets = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        total = int(self.offsets[-1])
        self.ids = np.fromiter((t for x in ids for t in x), np.int32, count=total)
        self.type_ids = np.fromiter((t for x in types for t in x), np.int8, count=total)
        self.labels = np.fromiter((t for x in labels for t in x), np.int32, count=total)
        self.truncated, self.truncated_words, self.empty_words = truncated, truncated_words, empty_words
        self.words = int((self.labels != IGNORE).sum())

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)

    def __len__(self) -> int:
        return len(self.offsets) - 1


def _first_subword_labels(word_ids: list[int | None], tags: np.ndarray) -> list[int]:
    labels, previous = [], None
    for w in word_ids:
        labels.append(IGNORE if w is None or w == previous else int(tags[w]))
        if w is not None:
            previous = w
    return labels


def tokenize(tokenizer: Any, words: list[list[str]], tags: list[np.ndarray], max_len: int) -> TaggedTokens:
    """Sub-word rows of sentences (see TaggedTokens): the fast tokenizer over the given words
    (is_split_into_words), truncated to max_len tokens; words cut off by the truncation are counted, as are
    words the tokenizer turns into no token at all (both lose their label, as in HF's run_ner)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("model.task='token_classification' needs a fast tokenizer (tokenizer.json in the model "
                        "folder): labels are placed through its word_ids()")
    ids, types, labels = [], [], []
    truncated = truncated_words = empty_words = 0
    for start in range(0, len(words), _CHUNK):
        chunk = words[start:start + _CHUNK]
        try:
            enc = tokenizer(chunk, is_split_into_words=True, truncation=False, verbose=False,
                            return_attention_mask=False)
        except (ValueError, AssertionError) as e:  # e.g. a BPE tokenizer built without add_prefix_space
            raise DataError(f"the tokenizer cannot take pre-split words ({str(e).splitlines()[0]}); a RoBERTa-style "
                            "BPE tokenizer needs add_prefix_space=true in its tokenizer_config.json") from e
        long = [i for i, x in enumerate(enc["input_ids"]) if len(x) > max_len]
        cut = None
        if long:
            cut = tokenizer([chunk[i] for i in long], is_split_into_words=True, truncation=True, max_length=max_len,
                            verbose=False, return_attention_mask=False)
        where = {i: j for j, i in enumerate(long)}
        for i in range(len(chunk)):
            full = {w for w in enc.word_ids(i) if w is not None}
            empty_words += len(chunk[i]) - len(full)
            source, k = (enc, i) if i not in where else (cut, where[i])
            word_ids = source.word_ids(k)
            if i in where:
                truncated += 1
                truncated_words += len(full) - len({w for w in word_ids if w is not None})
            row = source["input_ids"][k]
            ids.append(row)
            type_row = source.get("token_type_ids")
            types.append(type_row[k] if type_row is not None else [0] * len(row))
            labels.append(_first_subword_labels(word_ids, tags[start + i]))
    return TaggedTokens(ids, types, labels, truncated, truncated_words, empty_words)


# ---------------------------------------------------------------- batching


class TaggedBatcher:
    """This process's share of a global batch of sentences, padded to the batch's bucket: labels [B, L] with
    IGNORE on padding (padding rows: weight 0, one attended token)."""

    def __init__(self, tokens: TaggedTokens, buckets: tuple[int, ...], pad_id: int, share: slice):
        self.tokens, self.buckets, self.pad_id, self.share = tokens, buckets, pad_id, share

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        tok = self.tokens
        real = rows[rows >= 0]
        longest = int(tok.lengths[real].max()) if len(real) else 1
        length = self.buckets[int(np.searchsorted(self.buckets, longest))]  # same on every process
        mine = rows[self.share]
        b = len(mine)
        ids = np.full((b, length), self.pad_id, np.int32)
        types = np.zeros((b, length), np.int32)
        mask = np.zeros((b, length), np.int32)
        labels = np.full((b, length), IGNORE, np.int32)
        weights = np.zeros(b, np.float32)
        for j, r in enumerate(mine):
            if r < 0:
                mask[j, 0] = 1  # no all-masked softmax (NaN) anywhere
                continue
            s, e = tok.offsets[r], tok.offsets[r + 1]
            ids[j, : e - s] = tok.ids[s:e]
            types[j, : e - s] = tok.type_ids[s:e]
            mask[j, : e - s] = 1
            labels[j, : e - s] = tok.labels[s:e]
            weights[j] = 1.0
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels,
                "weights": weights}


def build(cfg: ml_collections.ConfigDict, tokenizer: Any, *, process_index: int = 0,
          process_count: int = 1) -> DataBundle:
    """The DataBundle of a token classification run (see the module docstring)."""
    d, t = cfg.data, cfg.train
    if tokenizer is None:
        raise DataError("model.task='token_classification' is a text task: ftjax.tasks.build_data needs the model's "
                        "tokenizer")
    rows = splits.layout(t, process_index, process_count)
    readers = {ext: lambda path: read_conll(path, d.tokens_field, d.tags_field) for ext in CONLL_EXTS}
    raw = splits.read(d, splits.roles(d), readers=readers, label_field=d.tags_field)
    source_names = raw["train"].label_names
    read = {role: sentences(split, d) for role, split in raw.items()}
    names = label_names(read["train"][1], source_names)  # from the full train split (before max_examples)
    if cfg.model.num_labels is not None and cfg.model.num_labels < len(names):
        raise ConfigError("model.num_labels", cfg.model.num_labels,
                          f"the data has {len(names)} tags ({names[:10]}); use None or >= {len(names)}")
    splits.hold_out(raw, d, t.seed, unit="sentence(s)")
    read = {role: sentences(split, d) for role, split in raw.items()}
    tokens = {}
    for role, (words, tags) in read.items():
        ids = encode_tags(tags, names, raw[role].origin, source_names is not None)
        tokens[role] = tokenize(tokenizer, words, ids, d.max_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_lengths = tokens["train"].lengths
    buckets = batching.choose_buckets(train_lengths, d.buckets, d.max_len)
    makers: dict[str, Maker] = {r: TaggedBatcher(tok, buckets, pad_id, rows.rows(r)) for r, tok in tokens.items()}
    stats = _stats(tokens, read, names, buckets, train_lengths, rows.batch, t.seed, d.length_grouping)
    bundle = assemble(
        fingerprint=splits.fingerprint(raw),
        lengths={r: tok.lengths for r, tok in tokens.items()},
        makers=makers,
        layout=rows,
        seed=t.seed,
        grouping=d.length_grouping,
        threads=2,
        label_names=names,
        bucket_lengths=buckets,
        stats=stats,
    )
    for role, tok in tokens.items():
        if tok.truncated:
            logging.warning("data: %d of %d %s sentences are longer than data.max_len=%d tokens and were truncated, "
                            "losing %d words (and their tags)", tok.truncated, len(tok), role, d.max_len,
                            tok.truncated_words)
        if tok.empty_words:
            logging.warning("data: %d %s words give no token (they have no label)", tok.empty_words, role)
    logging.info("data (token classification): %s sentences; %d steps/epoch of %d; tags %s; buckets %s",
                 stats["examples"], bundle.steps_per_epoch, rows.batch, names[:20], list(buckets))
    return bundle


def _stats(tokens: dict[str, TaggedTokens], read: dict[str, tuple], names: list[str], buckets: tuple[int, ...],
           train_lengths: np.ndarray, batch: int, seed: int, grouping: int) -> dict[str, Any]:
    """Sentences, words, what truncation lost, tag counts (words per tag and split), token lengths and padding."""
    real, padded = batching.padded_tokens(batching.train_plan(train_lengths, batch, seed, 0, grouping),
                                          train_lengths, buckets)
    tag_counts = {}
    for role, tok in tokens.items():
        counts = np.bincount(tok.labels[tok.labels != IGNORE], minlength=len(names))
        tag_counts[role] = {name: int(n) for name, n in zip(names, counts)}
    return {
        "examples": {r: len(tok) for r, tok in tokens.items()},
        "words": {r: sum(len(w) for w in read[r][0]) for r in tokens},
        "truncated": {r: tok.truncated for r, tok in tokens.items()},
        "truncated_words": {r: tok.truncated_words for r, tok in tokens.items()},
        "empty_words": {r: tok.empty_words for r, tok in tokens.items()},
        "tag_counts": tag_counts,
        "train_tokens": {"mean": float(train_lengths.mean()), "p50": int(np.percentile(train_lengths, 50)),
                         "p95": int(np.percentile(train_lengths, 95)), "max": int(train_lengths.max())},
        "bucket_lengths": list(buckets),
        "real_token_fraction": real / padded if padded else math.nan,
    }
