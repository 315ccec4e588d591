"""Packing for causal_lm: whole documents (or pieces of them) into rows of max_len tokens with segment and
position ids, and the batches of those rows; `labels` is IGNORE where a token takes no loss."""

from __future__ import annotations

import dataclasses

import numpy as np

from ftjax.data.batching import IGNORE  # a token that takes no loss


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
