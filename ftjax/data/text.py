"""Turn raw columns into model inputs: texts tokenised once per split (truncation counted), labels to ids.

Tokens are kept ragged (one flat int32 array plus offsets) so batches pad only to their bucket length.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

from ftjax.data.errors import DataError
from ftjax.data.sources import RawSplit

_CHUNK = 8192  # rows tokenised per call (bounds the memory of python lists).
_INT = re.compile(r"^-?\d+$")


def column(split: RawSplit, field: str, name: str) -> list[Any]:
    """The values of column `name` (config field data.`field`), or a DataError listing the columns."""
    if name not in split.frame.columns:
        raise DataError(
            f"data.{field}={name!r}: no such column in {split.origin}; available columns: "
            f"{[str(c) for c in split.frame.columns]}. Fix: set data.{field} to one of them"
        )
    return split.frame[name].tolist()


@dataclasses.dataclass
class Tokens:
    """Ragged token ids of one split: example i is flat[offsets[i]:offsets[i + 1]]."""

    ids: np.ndarray  # int32 [total tokens]
    type_ids: np.ndarray  # int8 [total tokens]
    offsets: np.ndarray  # int64 [n + 1]
    truncated: int  # examples longer than max_len (cut to max_len)
    truncated_tokens: int  # tokens cut off in all
    empty_texts: int  # missing cells read as ""

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)


def _as_texts(values: list[Any]) -> tuple[list[str], int]:
    out, empty = [], 0
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append("")
            empty += 1
        elif isinstance(v, (bytes, np.bytes_)):
            out.append(bytes(v).decode("utf-8", errors="replace"))
        else:
            out.append(v if isinstance(v, str) else str(v))
    return out, empty


def tokenize(tokenizer: Any, texts: list[Any], pairs: list[Any] | None, max_len: int) -> Tokens:
    """Tokenises whole columns with the HF fast tokenizer; texts longer than max_len are truncated."""
    texts, empty = _as_texts(texts)
    if pairs is not None:
        pairs, empty_pairs = _as_texts(pairs)
        empty += empty_pairs
    ids, types = [], []
    truncated = truncated_tokens = 0
    for start in range(0, len(texts), _CHUNK):
        a = texts[start : start + _CHUNK]
        b = pairs[start : start + _CHUNK] if pairs is not None else None
        enc = tokenizer(a, b, truncation=False, verbose=False, return_attention_mask=False)
        chunk_ids = enc["input_ids"]
        chunk_types = enc.get("token_type_ids")
        long = [i for i, x in enumerate(chunk_ids) if len(x) > max_len]
        if long:
            truncated += len(long)
            truncated_tokens += sum(len(chunk_ids[i]) - max_len for i in long)
            cut = tokenizer(
                [a[i] for i in long],
                [b[i] for i in long] if b is not None else None,
                truncation=True,
                max_length=max_len,
                verbose=False,
                return_attention_mask=False,
            )
            for j, i in enumerate(long):
                chunk_ids[i] = cut["input_ids"][j]
                if chunk_types is not None:
                    chunk_types[i] = cut["token_type_ids"][j]
        ids.extend(chunk_ids)
        types.extend(chunk_types if chunk_types is not None else ([0] * len(x) for x in chunk_ids))
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
    flat_types = np.fromiter((t for x in types for t in x), dtype=np.int8, count=int(offsets[-1]))
    return Tokens(flat, flat_types, offsets, truncated, truncated_tokens, empty)


def _label_name(value: Any, origin: str, row: int, field_value: str) -> str:
    """A label's canonical name: ints and integral floats as "3", strings as they are."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(
            f"data.label_field={field_value!r}: row {row} of {origin} has no label; fill or drop it"
        )
    if isinstance(value, (float, np.floating)):
        if float(value).is_integer():
            return str(int(value))
        raise DataError(
            f"data.label_field={field_value!r}: row {row} of {origin} has the non-integer label {value!r}; "
            "classification needs class labels (regression is not supported)"
        )
    return str(value)


def label_names(values: list[Any], origin: str, field_value: str) -> list[str]:
    """Sorted class names seen in train: numerically when all look like integers, else as strings."""
    names = {_label_name(v, origin, i, field_value) for i, v in enumerate(values)}
    if all(_INT.match(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def encode_labels(
    values: list[Any], names: list[str], origin: str, field_value: str, source_names: bool = False
) -> np.ndarray:
    """Label ids (int32); a label missing from train's names is a DataError listing the unseen ones.

    With `source_names` (tfds/hf ClassLabel) the values are already ids into `names`.
    """
    if source_names:
        ids = np.asarray(values, dtype=np.int64)
        bad = sorted(set(ids[(ids < 0) | (ids >= len(names))].tolist()))
        if bad:
            raise DataError(
                f"data.label_field={field_value!r}: {origin} has label ids {bad[:10]} outside the dataset's "
                f"{len(names)} classes"
            )
        return ids.astype(np.int32)
    index = {n: i for i, n in enumerate(names)}
    out = np.empty(len(values), dtype=np.int32)
    unseen: dict[str, int] = {}
    for i, v in enumerate(values):
        name = _label_name(v, origin, i, field_value)
        if name in index:
            out[i] = index[name]
        else:
            unseen[name] = unseen.get(name, 0) + 1
    if unseen:
        raise DataError(
            f"data.label_field={field_value!r}: {origin} has labels never seen in train: "
            f"{dict(sorted(unseen.items())[:10])} (train has {names[:20]}). Fix: use splits with the same "
            "label set, or map/drop those rows"
        )
    return out
