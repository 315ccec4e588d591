"""Preference pairs (model.task="preference"): rows of `prompt`, `chosen`, `rejected`, each a string or a list of
chat messages (rendered with the tokenizer's chat template), tokenised once and batched pair by pair.

A batch row is one pair: `input_ids`, `attention_mask` and `response_mask` [B, 2, L] (index 0 the chosen
sequence, 1 the rejected; prompt + response, the loss only on the response tokens) and `weights` [B], so the
two halves of a pair always sit on the same device and in the same step. A batch is padded to the first
length bucket (data.buckets) that holds its longest sequence. Strings: the prompt is tokenised with the
tokenizer's special tokens, a response without them and ended by eos. Messages: the prompt is rendered with
the generation prompt, a response is what the template adds for the assistant turn(s) after it
(`documents.chat_pieces`). Sequences longer than data.max_len keep their start (the prompt) and lose the end of
the response (counted in the stats); a pair whose response would vanish is an error naming the row.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from ftjax.data import batching, documents, splits, text
from ftjax.data.bundle import DataBundle, Maker, assemble
from ftjax.data.errors import DataError
from ftjax.data.sources import RawSplit

FIELDS = ("prompt", "chosen", "rejected")


class PairTokens:
    """Per pair: the (prompt + response) ids of chosen and rejected, and where each response starts."""

    def __init__(self, ids: list[tuple[np.ndarray, np.ndarray]], starts: list[tuple[int, int]], truncated: int):
        self.ids, self.starts, self.truncated = ids, starts, truncated
        self.lengths = np.asarray([max(len(c), len(r)) for c, r in ids], np.int64)

    def __len__(self) -> int:
        return len(self.ids)


def _messages(value: Any) -> list[dict] | None:
    """A list of chat messages (also from its JSON string), or None for plain text."""
    if isinstance(value, str):
        stripped = value.lstrip()
        if not stripped.startswith("["):
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, (list, tuple, np.ndarray)) and all(isinstance(m, dict) for m in value):
        return [dict(m) for m in value]
    return None


def _encode(tokenizer: Any, s: str, special: bool) -> list[int]:
    return list(tokenizer(s, add_special_tokens=special)["input_ids"])


def _pair(tokenizer: Any, prompt: Any, response: Any, where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one side of a pair."""
    prompt_msgs, response_msgs = _messages(prompt), _messages(response)
    if prompt_msgs is None and response_msgs is None:
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise DataError(f"{where}: prompt and response must be strings or lists of chat messages, got "
                            f"{type(prompt).__name__} and {type(response).__name__}")
        eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
        return _encode(tokenizer, prompt, True), _encode(tokenizer, response, False) + eos
    if prompt_msgs is None or response_msgs is None:
        raise DataError(f"{where}: the prompt and the responses must both be chat messages or both be strings")
    pieces = documents.chat_pieces(tokenizer, prompt_msgs + response_msgs, where)
    first_reply = next(i for i, (_, is_reply) in enumerate(pieces) if is_reply)
    prompt_text = "".join(t for t, _ in pieces[:first_reply])
    response_text = "".join(t for t, _ in pieces[first_reply:])
    return _encode(tokenizer, prompt_text, False), _encode(tokenizer, response_text, False)


def tokenize(tokenizer: Any, split: RawSplit, columns: dict[str, str], max_len: int) -> PairTokens:
    """The PairTokens of a split's rows (truncated to max_len, keeping the start)."""
    cols = {k: text.column(split, f"preference.{k}_field", name) for k, name in columns.items()}
    ids, starts, truncated = [], [], 0
    for row in range(len(split)):
        where = f"row {row} of {split.origin}"
        sides, side_starts = [], []
        for side in ("chosen", "rejected"):
            p, r = _pair(tokenizer, cols["prompt"][row], cols[side][row], f"{where} ({side})")
            if not r:
                raise DataError(f"{where}: the {side} response is empty; every pair needs both responses")
            if len(p) >= max_len:
                raise DataError(f"{where}: the prompt alone has {len(p)} tokens, data.max_len={max_len} leaves no "
                                "room for the response; raise data.max_len or shorten the prompt")
            full = p + r
            truncated += len(full) > max_len
            sides.append(np.asarray(full[:max_len], np.int32))
            side_starts.append(len(p))
        ids.append((sides[0], sides[1]))
        starts.append((side_starts[0], side_starts[1]))
    return PairTokens(ids, starts, truncated)


class PairBatcher:
    """This process's share of a global batch of pairs, padded to the batch's bucket (see the module doc)."""

    def __init__(self, tokens: PairTokens, buckets: tuple[int, ...], pad_id: int, share: slice):
        self.tokens, self.buckets, self.pad_id, self.share = tokens, buckets, pad_id, share

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        real = rows[rows >= 0]
        longest = int(self.tokens.lengths[real].max()) if len(real) else 1
        length = self.buckets[int(np.searchsorted(self.buckets, longest))]  # same on every process
        mine = rows[self.share]
        b = len(mine)
        ids = np.full((b, 2, length), self.pad_id, np.int32)
        mask = np.zeros((b, 2, length), np.int32)
        response = np.zeros((b, 2, length), np.int32)
        weights = np.zeros(b, np.float32)
        for j, r in enumerate(mine):
            if r < 0:
                mask[j, :, 0] = 1  # padding pairs attend to one token: no all-masked softmax anywhere
                continue
            for side in range(2):
                seq, start = self.tokens.ids[r][side], self.tokens.starts[r][side]
                ids[j, side, : len(seq)] = seq
                mask[j, side, : len(seq)] = 1
                response[j, side, start : len(seq)] = 1
            weights[j] = 1.0
        return {"input_ids": ids, "attention_mask": mask, "response_mask": response, "weights": weights}


def columns(cfg: ml_collections.ConfigDict, split: RawSplit) -> dict[str, str]:
    """{role: column name} from preference.{prompt,chosen,rejected}_field, each checked to exist."""
    p = cfg.preference
    names = {role: p[f"{role}_field"] for role in FIELDS}
    missing = {role: n for role, n in names.items() if n not in split.frame.columns}
    if missing:
        role, name = next(iter(missing.items()))
        raise DataError(f"preference.{role}_field={name!r}: no such column in {split.origin} (columns: "
                        f"{', '.join(map(str, split.frame.columns))}); a preference file needs prompt, chosen and rejected")
    return names


def build(cfg: ml_collections.ConfigDict, tokenizer: Any, *, process_index: int = 0,
          process_count: int = 1) -> DataBundle:
    """The DataBundle of a preference run (see the module docstring)."""
    d, t = cfg.data, cfg.train
    if tokenizer is None:
        raise DataError("model.task='preference' is a text task: ftjax.tasks.build_data needs the model's tokenizer")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows = splits.layout(t, process_index, process_count)
    raw = splits.read(d, splits.roles(d))
    splits.hold_out(raw, d, t.seed)
    names = columns(cfg, raw["train"])
    tokens = {role: tokenize(tokenizer, split, names, d.max_len) for role, split in raw.items()}
    buckets = batching.choose_buckets(tokens["train"].lengths, d.buckets, d.max_len)
    makers: dict[str, Maker] = {r: PairBatcher(tokens[r], buckets, pad_id, rows.rows(r)) for r in raw}
    stats = {
        "pairs": {r: len(x) for r, x in tokens.items()},
        "truncated_sequences": {r: x.truncated for r, x in tokens.items()},
        "longest": {r: int(x.lengths.max()) for r, x in tokens.items()},
        "bucket_lengths": list(buckets),
    }
    bundle = assemble(
        fingerprint=splits.fingerprint(raw),
        lengths={r: x.lengths for r, x in tokens.items()},
        makers=makers,
        layout=rows,
        seed=t.seed,
        grouping=d.length_grouping,
        threads=2,
        label_names=[],
        bucket_lengths=buckets,
        stats=stats,
    )
    if any(stats["truncated_sequences"].values()):
        logging.warning("data (preference): sequences longer than data.max_len=%d lost the end of their response: "
                        "%s", d.max_len, stats["truncated_sequences"])
    logging.info("data (preference): %s pairs; %d steps/epoch of %d pairs; buckets %s", stats["pairs"],
                 bundle.steps_per_epoch, rows.batch, list(buckets))
    return bundle
