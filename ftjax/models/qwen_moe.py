"""Qwen3-MoE in Flax NNX: the Qwen3 code (llama.py with q/k norms) whose sparse layers (llama.sparse_layers:
decoder_sparse_step, mlp_only_layers) hold a mixture of experts under `mlp` (moe.py: router `gate`, experts
gate_proj / up_proj / down_proj of moe_intermediate_size, top-k renormalised only with norm_topk_prob) and the
rest a dense MLP of intermediate_size; the router's load-balancing loss joins the training loss. Not scannable
yet (see mixtral.py).
"""

from __future__ import annotations

import dataclasses

from ftjax.models import llama

FAMILY = dataclasses.replace(llama.FAMILY, name="qwen_moe", model_types=("qwen3_moe",), scannable=False)
