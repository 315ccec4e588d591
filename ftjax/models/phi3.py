"""Phi-3 in Flax NNX: the Llama code (llama.py, Arch.fused_qkv / fused_gate_up) with param paths that mirror HF
Phi3Model / Phi3For{CausalLM,SequenceClassification} state_dict keys. qkv_proj ([q | k | v]) and gate_up_proj
([gate | up]) stay fused as the checkpoint stores them, so they load and export as they are (and LoRA adapts
each as one Linear, as PEFT does; ftjax.sharding keeps their packed output dim off `tensor`). RoPE: partial
rotary and longrope with its short/long factors and attention factor (decoder.rope_parameters / rope_long;
ftjax.generate re-prefills where a sequence outgrows original_max_position_embeddings, as transformers does),
a sliding window on every layer when the config sets one, and resid_pdrop on both residual branches.
"""

from __future__ import annotations

import dataclasses

from ftjax.models import llama

FAMILY = dataclasses.replace(
    llama.FAMILY, name="phi3", model_types=("phi3",),
    dropout_fields={"hidden": "resid_pdrop", "attention": "attention_dropout"},
)
