"""Language-model data (model.task="causal_lm"): plain text or instruction JSONL, packed into max_len rows.

Each row holds several documents: `segment_ids` (1.. per document, 0 = padding) and per-document
`position_ids` keep attention and the shifted loss inside a document; `labels` are the input ids with -100
where no loss is taken (prompts, padding). Reading and tokenising: ftjax/data/documents.py; packing:
ftjax/data/document_packing.py.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from absl import logging

from ftjax.data import documents, sources, splits
from ftjax.data.bundle import DataBundle, Maker, assemble
from ftjax.data.errors import DataError
from ftjax.data.document_packing import IGNORE, Packed, PackedBatcher, pack


def build(
    cfg: ml_collections.ConfigDict, tokenizer: Any, *, process_index: int = 0, process_count: int = 1
) -> DataBundle:
    """The DataBundle of a causal_lm run: packed rows of data.max_len tokens (see the module docstring)."""
    d, t = cfg.data, cfg.train
    if tokenizer is None:
        raise DataError("model.task='causal_lm' is a text task: ftjax.tasks.build_data needs the model's tokenizer")
    rows = splits.layout(t, process_index, process_count)
    raw, fmt = documents.read(d, splits.roles(d))
    # Hold out documents (before packing), as for examples.
    splits.hold_out(raw, d, t.seed, unit="document(s)", fix=" or data.lm.documents='paragraph'/'line'")
    docs = {role: documents.tokenize(tokenizer, fmt, split, d) for role, split in raw.items()}
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    packed = {role: pack(v, d.max_len, split_long=fmt == "text", pad_id=pad_id) for role, v in docs.items()}
    for role, p in packed.items():
        if len(p) == 0:
            field = sources.SPLIT_FIELDS[role]
            raise DataError(
                f"data.{field}: no {role} example has a token to learn from ({p.dropped} dropped: prompts "
                f"that fill data.max_len={d.max_len}); raise data.max_len or check the completion column"
            )
    makers: dict[str, Maker] = {role: PackedBatcher(p, pad_id, rows.rows(role)) for role, p in packed.items()}
    stats = _stats(fmt, packed, d.max_len)
    bundle = assemble(
        fingerprint=splits.fingerprint(raw),
        lengths={role: np.full(len(p), d.max_len, np.int32) for role, p in packed.items()},
        makers=makers,
        layout=rows,
        seed=t.seed,
        grouping=0,
        threads=2,
        label_names=[],
        bucket_lengths=(d.max_len,),
        stats=stats,
        sample_prompts=documents.sample_prompts(tokenizer, fmt, raw["validation"], docs["validation"], d),
    )
    logging.info(
        "data (causal_lm, %s): %s; %d steps/epoch of %d rows x %d tokens",
        fmt,
        stats,
        bundle.steps_per_epoch,
        rows.batch,
        d.max_len,
    )
    return bundle


def _stats(fmt: str, packed: dict[str, Packed], max_len: int) -> dict[str, Any]:
    """Documents, rows and (loss) tokens per split; warns of truncated and dropped examples."""
    for role, p in packed.items():
        if fmt != "text" and p.truncated:
            logging.warning(
                "data: %d %s examples are longer than data.max_len=%d and were truncated",
                p.truncated,
                role,
                max_len,
            )
        if p.dropped:
            logging.warning(
                "data: %d %s examples have no completion token within data.max_len=%d; skipped",
                p.dropped,
                role,
                max_len,
            )
    return {
        "format": fmt,
        "documents": {r: p.documents for r, p in packed.items()},
        "rows": {r: len(p) for r, p in packed.items()},
        "tokens": {r: int((p.segment_ids > 0).sum()) for r, p in packed.items()},
        "loss_tokens": {r: int((p.labels != IGNORE).sum()) for r, p in packed.items()},
        ("split_across_rows" if fmt == "text" else "truncated"): {r: p.truncated for r, p in packed.items()},
        "dropped": {r: p.dropped for r, p in packed.items()},
        "real_token_fraction": packed["train"].real_token_fraction,
        "bucket_lengths": [max_len],
    }
