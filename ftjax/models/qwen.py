"""Qwen2 and Qwen3 in Flax NNX: the Llama code (llama.py) with Qwen2's q/k/v biases, Qwen3's per-head q/k
RMSNorm, and per-layer sliding windows from layer_types; param paths mirror HF Qwen2/Qwen3 state_dict keys.
"""

from __future__ import annotations

from ftjax.models import llama
from ftjax.models.registry import Family

FAMILY = Family(
    name="qwen",
    model_types=("qwen2", "qwen3"),
    tasks=llama.TASKS,
    prefix="model",
    build=llama.build,
    head_patterns=llama.HEAD_PATTERNS,
    dropout_fields={"attention": "attention_dropout"},
    ignore_keys=llama.IGNORE_KEYS,
    check_config=llama.check_config,
)
