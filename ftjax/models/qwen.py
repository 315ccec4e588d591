"""Qwen2 and Qwen3 in Flax NNX: the Llama code (llama.py) with Qwen2's q/k/v biases, Qwen3's per-head q/k
RMSNorm, and per-layer sliding windows from layer_types; param paths mirror HF Qwen2/Qwen3 state_dict keys.
"""

from __future__ import annotations

import dataclasses

from ftjax.models import llama

# Everything but the names is Llama's: llama.arch_for and llama.layer_windows read the Qwen config fields.
FAMILY = dataclasses.replace(llama.FAMILY, name="qwen", model_types=("qwen2", "qwen3"))
