"""Catastrophic-forgetting math (no I/O besides reading the reference text): linear CKA between two
models' representations, relative weight drift per layer group, the fixed MLM masking of the reference
text, and the reference text itself (a packaged English corpus or any data source).

The callbacks that run these at each evaluation live in `ftjax.callbacks.forgetting`.
"""

from __future__ import annotations

import glob
import importlib.resources
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ftjax import params as params_lib
from ftjax import stacking
from ftjax.data import sources
from ftjax.data import text as text_lib
from ftjax.data.errors import DataError

CORPUS = "forgetting_corpus.txt"  # package data: ~80 short generic English sentences written for ftjax.
_HIGHEST = jax.lax.Precision.HIGHEST

# ----------------------------------------------------------------------------------------------------
# Linear CKA (Kornblith et al. 2019): CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) on
# column-centred features; 1 for the same representation up to an orthogonal transform and a scale.


def linear_cka(x: jax.Array, y: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Linear CKA of features x [..., D1] and y [..., D2] over the same examples (all leading dims are
    examples, e.g. [B, L] tokens); `weights` [...] of 0/1 keeps only the real tokens. float32 math."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    y = y.reshape(-1, y.shape[-1]).astype(jnp.float32)
    w = jnp.ones(x.shape[0], jnp.float32) if weights is None else weights.reshape(-1).astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    # Centre over the kept rows only, then zero the others (w is 0/1, so one product suffices).
    xc = (x - jnp.matmul(w, x, precision=_HIGHEST) / n) * w[:, None]
    yc = (y - jnp.matmul(w, y, precision=_HIGHEST) / n) * w[:, None]
    cross = jnp.sum(jnp.square(jnp.matmul(yc.T, xc, precision=_HIGHEST)))
    norm_x = jnp.linalg.norm(jnp.matmul(xc.T, xc, precision=_HIGHEST))
    norm_y = jnp.linalg.norm(jnp.matmul(yc.T, yc, precision=_HIGHEST))
    return cross / jnp.maximum(norm_x * norm_y, jnp.finfo(jnp.float32).tiny)


def layer_cka(anchor: list[jax.Array], current: list[jax.Array], weights: list[jax.Array]) -> jax.Array:
    """Per-layer CKA [num_layers] of hidden states stacked [num_layers, B, L, D], one array per reference
    batch (the batches are concatenated: CKA centres over all reference tokens at once)."""
    a = jnp.concatenate(anchor, axis=1)
    c = jnp.concatenate(current, axis=1)
    w = jnp.concatenate(weights, axis=0)
    return jnp.stack([linear_cka(a[i], c[i], w) for i in range(a.shape[0])])


# ----------------------------------------------------------------------------------------------------
# Weight drift: ||W - W0|| / ||W0|| per group of params (embeddings, each layer, the rest).


def depth_groups(depths: dict[str, int], num_layers: int) -> tuple[list[str], dict[str, int]]:
    """(group names, path -> group index) from param depths (ftjax.param_table: 0 embeddings, i + 1 layer
    i, num_layers + 1 the rest): "embeddings", "layer_0" ... and "head" (head, pooler, final norm)."""
    def name(depth: int) -> str:
        if depth == 0:
            return "embeddings"
        return f"layer_{depth - 1}" if depth <= num_layers else "head"

    names = sorted({name(d) for d in depths.values()}, key=lambda n: (n != "embeddings", n == "head",
                                                                       int(n[6:]) if n[6:].isdigit() else 0))
    index = {n: i for i, n in enumerate(names)}
    return names, {path: index[name(d)] for path, d in depths.items()}


def drift_sums(params: Any, anchor: Any, group_of: dict[str, int], groups: int, stacks: dict | None = None
               ) -> jax.Array:
    """[groups, 2]: per group, sum ||W - W0||^2 and sum ||W0||^2 over the anchor's params (float32);
    jit it: one reduction over the tree. Params absent from `group_of` count in no group. `group_of` is keyed
    by per-layer paths: a scanned stack's params (`stacks`, ftjax.stacking) count layer by layer."""
    stacks = stacks or {}
    flat_p = stacking.unstack(params_lib.flatten(params), stacks)
    flat_a = stacking.unstack(params_lib.flatten(anchor), stacks)
    diff = [jnp.float32(0.0)] * groups
    ref = [jnp.float32(0.0)] * groups
    for path, w0 in flat_a.items():
        g = group_of.get(path)
        if g is None:
            continue
        w0 = jnp.asarray(w0, jnp.float32)
        diff[g] = diff[g] + jnp.sum(jnp.square(jnp.asarray(flat_p[path], jnp.float32) - w0))
        ref[g] = ref[g] + jnp.sum(jnp.square(w0))
    return jnp.stack([jnp.stack(diff), jnp.stack(ref)], axis=-1)


def drift_values(sums: np.ndarray, names: list[str]) -> dict[str, float]:
    """{"drift/total", "drift/max", "drift/<group>"}: relative L2 distances (absolute where ||W0|| = 0)."""
    sums = np.asarray(sums, np.float64)

    def ratio(diff: float, ref: float) -> float:
        return math.sqrt(diff / ref) if ref > 0 else math.sqrt(diff)

    per_group = {f"drift/{n}": ratio(*sums[i]) for i, n in enumerate(names)}
    total = ratio(float(sums[:, 0].sum()), float(sums[:, 1].sum()))
    return {"drift/total": total, "drift/max": max(per_group.values(), default=0.0), **per_group}


# ----------------------------------------------------------------------------------------------------
# The reference text and its fixed masking.


def default_corpus() -> list[str]:
    """The packaged reference corpus: one short English text per line."""
    text = importlib.resources.files("ftjax").joinpath(CORPUS).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _txt_lines(spec: str) -> list[str] | None:
    """`files:` .txt path, glob or folder -> one text per non-empty line; None when it names no .txt."""
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        paths = sorted(glob.glob(os.path.join(path, "*.txt")))
    else:
        paths = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
    paths = [p for p in paths if p.lower().endswith(".txt") and os.path.isfile(p)]
    if not paths:
        return None
    lines = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            lines += [line.strip() for line in f if line.strip()]
    return lines


def reference_texts(cfg: ml_collections.ConfigDict) -> list[str]:
    """forgetting.max_examples texts from forgetting.reference ("" = the packaged corpus; else a source
    read like data.source: .txt files one text per line, tables/tfds/hf by reference_field)."""
    f = cfg.forgetting
    texts = None
    if not f.reference:
        texts = default_corpus()
    elif f.reference.startswith("files:"):
        texts = _txt_lines(f.reference.partition(":")[2])
    if texts is None:
        d = ml_collections.ConfigDict(cfg.data.to_dict())
        d.source, d.train_split = f.reference, f.reference_split
        raw = sources.load_splits(d, ("train",))["train"]
        field = f.reference_field or cfg.data.text_field
        texts = [str(v) for v in text_lib.column(raw, "text_field", field) if isinstance(v, str) and v.strip()]
    texts = texts[: f.max_examples]
    if not texts:
        raise DataError(f"forgetting.reference={f.reference!r} holds no text: point it at text or use \"\"")
    return texts


def encode(tokenizer: Any, texts: list[str], max_len: int, rows_multiple: int, rows: int) -> list[dict]:
    """The reference as fixed batches of `rows` rows (rounded up to rows_multiple), one padded length (the
    longest text rounded up to 8, <= max_len): input_ids, attention_mask, token_type_ids and `maskable`
    (real, non-special tokens). Rows past the texts are padding (attention_mask 0)."""
    enc = tokenizer(texts, truncation=True, max_length=max_len, return_special_tokens_mask=True)
    length = min(max_len, -(-max(len(ids) for ids in enc["input_ids"]) // 8) * 8)
    rows = -(-rows // rows_multiple) * rows_multiple
    total = -(-len(texts) // rows) * rows
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((total, length), pad, np.int32)
    mask = np.zeros((total, length), np.int32)
    special = np.ones((total, length), bool)
    for i, (row, spec) in enumerate(zip(enc["input_ids"], enc["special_tokens_mask"])):
        ids[i, : len(row)], mask[i, : len(row)], special[i, : len(row)] = row, 1, np.asarray(spec, bool)
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
              "maskable": (mask > 0) & ~special}
    return [{k: v[s : s + rows] for k, v in arrays.items()} for s in range(0, total, rows)]


def mask_tokens(input_ids: np.ndarray, maskable: np.ndarray, mask_id: int, vocab_size: int,
                prob: float = 0.15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """HF DataCollatorForLanguageModeling's masking, fixed by `seed`: each maskable token is chosen with
    `prob`; of those 80% become mask_id, 10% a random token, 10% stay. Returns (masked ids, labels: the
    original id where chosen, -100 elsewhere). At least one token is chosen."""
    rng = np.random.default_rng(seed)
    chosen = (rng.random(input_ids.shape) < prob) & maskable
    if not chosen.any() and maskable.any():
        chosen.flat[np.flatnonzero(maskable)[0]] = True
    labels = np.where(chosen, input_ids, -100).astype(np.int32)
    replaced = (rng.random(input_ids.shape) < 0.8) & chosen
    randomized = (rng.random(input_ids.shape) < 0.5) & chosen & ~replaced
    ids = np.where(replaced, mask_id, input_ids)
    ids = np.where(randomized, rng.integers(0, vocab_size, input_ids.shape), ids).astype(np.int32)
    return ids, labels


def worse_when_higher(name: str) -> bool:
    """Direction of a forgetting scalar: CKA, accuracy and F1 drop as a model forgets; the rest rise."""
    leaf = name.rsplit("/", 1)[-1]
    return not (name.startswith("cka") or leaf in ("accuracy", "macro_f1"))
