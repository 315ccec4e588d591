"""Encoder-decoder data (model.task="seq2seq"): (source, target) text pairs, tokenised once, batched one pair
per row for teacher forcing.

A row holds the source (`input_ids`, `attention_mask`; data.max_len tokens), the target as `labels` (the
target's tokens with its eos, -100 where padded; data.seq2seq.max_target_len tokens) and the decoder inputs
`decoder_input_ids` = labels shifted one to the right after the model's decoder_start_token_id (padding
where the labels are -100), with `decoder_attention_mask`. Each batch is padded to the first of a few
(source, target) length pairs that fits it (data.seq2seq.buckets), so a run compiles few programs. The
validation sources generated from at each eval (ftjax/callbacks/seq2seq_eval.py) ride along on the bundle
as `bundle.seq2seq_eval` (`EvalSources`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from ftjax import hf
from ftjax.data import batching, splits, text
from ftjax.data.bundle import DataBundle, Maker, assemble
from ftjax.data.batching import IGNORE  # a padding position (no loss)
from ftjax.data.errors import DataError
from ftjax.data.sources import RawSplit

Pair = tuple[int, int]  # (source length, target length) of a padded batch.


@dataclasses.dataclass
class EvalSources:
    """The validation examples generated from at each eval: source token ids (truncated as in training),
    the source texts (without data.seq2seq.source_prefix) and the reference targets."""

    ids: list[np.ndarray]
    sources: list[str]
    references: list[str]
    source_lengths: tuple[int, ...]  # the source lengths of the bucket pairs (generation pads to these)


def build(
    cfg: ml_collections.ConfigDict,
    tokenizer: Any,
    *,
    process_index: int = 0,
    process_count: int = 1,
    decoder_start_token_id: int | None = None,
) -> DataBundle:
    """The DataBundle of a seq2seq run (see the module docstring); `decoder_start_token_id` defaults to the
    model folder's config.json (cfg.model.name_or_path)."""
    d, t = cfg.data, cfg.train
    s = d.seq2seq
    if tokenizer is None:
        raise DataError("model.task='seq2seq' is a text task: ftjax.tasks.build_data needs the model's tokenizer")
    start = decoder_start_token_id if decoder_start_token_id is not None else _decoder_start(cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = splits.layout(t, process_index, process_count)
    raw = splits.read(d, splits.roles(d))
    splits.hold_out(raw, d, t.seed)
    src_col, tgt_col = columns(d, raw["train"])
    stats: dict[str, Any] = {"examples": {r: len(x) for r, x in raw.items()}}
    sources, targets = {}, {}
    for role, split in raw.items():
        src_texts, empty = text._as_texts(text.column(split, "seq2seq.source_field", src_col))
        tgt_texts, empty_t = text._as_texts(text.column(split, "seq2seq.target_field", tgt_col))
        sources[role] = tokenize(tokenizer, [s.source_prefix + x for x in src_texts], d.max_len, target=False)
        targets[role] = tokenize(tokenizer, tgt_texts, s.max_target_len, target=True)
        if empty or empty_t:
            logging.warning("data: %d %s examples have an empty source or target cell (read as '')",
                            empty + empty_t, role)
    lengths = {r: sources[r].lengths + targets[r].lengths for r in raw}
    pairs = choose_pairs(sources["train"].lengths, targets["train"].lengths, s.buckets, d.max_len,
                         s.max_target_len, rows.batch, t.seed, d.length_grouping)
    makers: dict[str, Maker] = {
        r: Seq2SeqBatcher(sources[r], targets[r], pairs, pad_id, start, rows.rows(r)) for r in raw
    }
    stats.update(_stats(sources, targets, pairs, rows.batch, t.seed, d.length_grouping))
    bundle = assemble(
        fingerprint=splits.fingerprint(raw),
        lengths=lengths,
        makers=makers,
        layout=rows,
        seed=t.seed,
        grouping=d.length_grouping,
        threads=2,
        label_names=[],
        bucket_lengths=tuple(sorted({p[0] for p in pairs})),
        stats=stats,
        seq2seq_pairs=pairs,
        seq2seq_eval=eval_sources(raw["validation"], src_col, tgt_col, sources["validation"], s.eval_examples,
                                  pairs),
    )
    logging.info("data (seq2seq): %s; %d steps/epoch of %d; (source, target) buckets %s", stats["examples"],
                 bundle.steps_per_epoch, rows.batch, list(pairs))
    return bundle


def _decoder_start(cfg: ml_collections.ConfigDict) -> int:
    """decoder_start_token_id of the model folder's config.json (T5, Marian: the pad id; BART: eos)."""
    config = hf.read_config_json(hf.resolve(cfg.model.name_or_path))
    start = config.get("decoder_start_token_id")
    if start is None:
        raise DataError(f"model.name_or_path={cfg.model.name_or_path!r}: config.json has no "
                        "decoder_start_token_id, which seq2seq teacher forcing starts the decoder with; add it")
    return int(start)


def columns(d: ml_collections.ConfigDict, split: RawSplit) -> tuple[str, str]:
    """(source column, target column): data.seq2seq.source_field / target_field, else the prompt /
    completion columns of instruction JSONL (data.lm.prompt_field / completion_field)."""
    names = [str(c) for c in split.frame.columns]
    s = d.seq2seq
    if s.source_field in names and s.target_field in names:
        return s.source_field, s.target_field
    if d.lm.prompt_field in names and d.lm.completion_field in names:
        return d.lm.prompt_field, d.lm.completion_field
    raise DataError(
        f"data.seq2seq.source_field={s.source_field!r} / target_field={s.target_field!r}: {split.origin} has "
        f"no such columns (nor {d.lm.prompt_field!r} / {d.lm.completion_field!r}); available columns: {names}. "
        "Fix: set data.seq2seq.source_field and target_field"
    )


def tokenize(tokenizer: Any, texts: list[str], max_len: int, *, target: bool) -> text.Tokens:
    """Token ids of `texts` (as targets: `text_target=`, e.g. Marian's target vocabulary), cut to max_len
    by the tokenizer (which keeps the closing eos); ragged, as text.Tokens."""
    key = "text_target" if target else "text"
    ids = list(tokenizer(**{key: texts}, truncation=False, verbose=False,
                         return_attention_mask=False)["input_ids"]) if texts else []
    long = [i for i, x in enumerate(ids) if len(x) > max_len]
    cut_tokens = sum(len(ids[i]) - max_len for i in long)
    if long:
        cut = tokenizer(**{key: [texts[i] for i in long]}, truncation=True, max_length=max_len, verbose=False,
                        return_attention_mask=False)["input_ids"]
        for j, i in enumerate(long):
            ids[i] = cut[j]
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    flat = np.fromiter((tok for x in ids for tok in x), np.int32, count=int(offsets[-1]))
    return text.Tokens(flat, np.zeros(len(flat), np.int8), offsets, len(long), cut_tokens, 0)


def _round(x: np.ndarray, cap: int) -> np.ndarray:
    return np.minimum(-(-np.maximum(x, 1) // 8) * 8, cap)


def batch_maxima(plan: np.ndarray, src: np.ndarray, tgt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Longest source and target of each batch (row) of a plan (PAD rows count 1)."""
    real = plan >= 0
    rows = np.maximum(plan, 0)
    return np.where(real, src[rows], 1).max(1), np.where(real, tgt[rows], 1).max(1)


def choose_pairs(src: np.ndarray, tgt: np.ndarray, spec: Any, max_len: int, max_target_len: int, batch: int,
                 seed: int, grouping: int) -> tuple[Pair, ...]:
    """The (source, target) padded shapes: the explicit pairs of `spec`, or `spec` pairs (multiples of 8)
    from the longest source and target of the batches of epoch 0: the batches sorted by size and cut into
    `spec` groups, pair j covering groups 0..j; the last pair is (max_len, max_target_len)."""
    last = (int(max_len), int(max_target_len))
    if not isinstance(spec, int):
        return tuple((int(a), int(b)) for a, b in spec)
    plan = batching.train_plan(src + tgt, batch, seed, 0, grouping)
    ms, mt = batch_maxima(plan, src, tgt)
    ms, mt = _round(ms, max_len), _round(mt, max_target_len)
    order = np.argsort(ms + mt, kind="stable")
    pairs: list[Pair] = []
    for j in range(1, spec):
        done = order[: len(order) * j // spec]  # the batches of groups 0..j-1
        if len(done):
            pair = (int(ms[done].max()), int(mt[done].max()))
            if pair != last and (not pairs or pair != pairs[-1]):
                pairs.append(pair)
    return tuple(pairs) + (last,)


def pick_pair(pairs: tuple[Pair, ...], longest_source: int, longest_target: int) -> Pair:
    """The first pair that holds both lengths (the last always does: it is the truncation limit)."""
    for pair in pairs:
        if pair[0] >= longest_source and pair[1] >= longest_target:
            return pair
    return pairs[-1]


class Seq2SeqBatcher:
    """Builds this process's share of a global batch of (source, target) rows, padded to the batch's pair."""

    def __init__(self, src: text.Tokens, tgt: text.Tokens, pairs: tuple[Pair, ...], pad_id: int, start_id: int,
                 share: slice):
        self.src, self.tgt, self.pairs, self.share = src, tgt, pairs, share
        self.pad_id, self.start_id = int(pad_id), int(start_id)
        self.src_lengths, self.tgt_lengths = src.lengths, tgt.lengths

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        real = rows[rows >= 0]
        if len(real):
            s_len, t_len = pick_pair(self.pairs, int(self.src_lengths[real].max()),
                                     int(self.tgt_lengths[real].max()))
        else:
            s_len, t_len = self.pairs[0]  # same on every process: the pair depends on the global rows.
        mine = rows[self.share]
        b = len(mine)
        ids = np.full((b, s_len), self.pad_id, np.int32)
        mask = np.zeros((b, s_len), np.int32)
        labels = np.full((b, t_len), IGNORE, np.int32)
        weights = np.zeros(b, np.float32)
        for j, r in enumerate(mine):
            if r < 0:
                mask[j, 0] = 1  # padding rows attend to one token: no all-masked softmax anywhere.
                continue
            s, e = self.src.offsets[r], self.src.offsets[r + 1]
            ids[j, : e - s], mask[j, : e - s] = self.src.ids[s:e], 1
            s, e = self.tgt.offsets[r], self.tgt.offsets[r + 1]
            labels[j, : e - s] = self.tgt.ids[s:e]
            weights[j] = 1.0
        decoder_ids = shift_right(labels, self.start_id, self.pad_id)
        decoder_mask = np.zeros((b, t_len), np.int32)
        decoder_mask[:, 0] = 1
        decoder_mask[:, 1:] = labels[:, :-1] != IGNORE
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids,
                "decoder_attention_mask": decoder_mask, "labels": labels, "weights": weights}


def shift_right(labels: np.ndarray, start_id: int, pad_id: int) -> np.ndarray:
    """Teacher-forcing decoder inputs (numpy, as transformers' shift_tokens_right): labels shifted one to the
    right after start_id, ignored (-100) labels replaced by pad_id."""
    shifted = np.concatenate([np.full_like(labels[:, :1], start_id), labels[:, :-1]], axis=1)
    return np.where(shifted == IGNORE, pad_id, shifted).astype(np.int32)


def eval_sources(split: RawSplit, src_col: str, tgt_col: str, tokens: text.Tokens, n: int,
                 pairs: tuple[Pair, ...]) -> EvalSources:
    """The first n validation examples (all when fewer), for generation-based evaluation."""
    n = min(int(n), len(split))
    frame = split.frame.head(n)
    sources, _ = text._as_texts(frame[src_col].tolist())
    references, _ = text._as_texts(frame[tgt_col].tolist())
    ids = [tokens.ids[tokens.offsets[i]: tokens.offsets[i + 1]] for i in range(n)]
    return EvalSources(ids, sources, references, tuple(sorted({p[0] for p in pairs})))


def _stats(sources: dict[str, text.Tokens], targets: dict[str, text.Tokens], pairs: tuple[Pair, ...],
           batch: int, seed: int, grouping: int) -> dict[str, Any]:
    """Truncation counts, train length summary, and the real-token fraction of epoch 0's padded batches."""
    src, tgt = sources["train"].lengths, targets["train"].lengths
    plan = batching.train_plan(src + tgt, batch, seed, 0, grouping)
    ms, mt = batch_maxima(plan, src, tgt)
    shapes = np.asarray([pick_pair(pairs, a, b) for a, b in zip(ms, mt)])
    real = np.where(plan >= 0, (src + tgt)[np.maximum(plan, 0)], 0).sum()
    for role, source in sources.items():
        for what, tok, limit in (("sources", source, "data.max_len"),
                                 ("targets", targets[role], "data.seq2seq.max_target_len")):
            if tok.truncated:
                logging.warning("data: %d %s %s were longer than %s and were truncated (%d tokens cut)",
                                tok.truncated, role, what, limit, tok.truncated_tokens)
    return {
        "bucket_pairs": [list(p) for p in pairs],
        "truncated_sources": {r: x.truncated for r, x in sources.items()},
        "truncated_targets": {r: x.truncated for r, x in targets.items()},
        "train_tokens": {"source_mean": float(src.mean()), "source_max": int(src.max()),
                         "target_mean": float(tgt.mean()), "target_max": int(tgt.max())},
        "real_token_fraction": float(real / max(1, (shapes.sum(1) * batch).sum())),
    }
