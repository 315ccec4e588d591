"""Mixtral in Flax NNX: the Llama code (llama.py) with every layer's MLP a sparse mixture of experts (moe.py:
`block_sparse_moe` = a top-k router `gate` and experts w1 / w3 / w2, one HF key per expert), Mistral's sliding
window on every layer, and the router's load-balancing loss (router_aux_loss_coef) added to the training loss.
Not scannable yet: a scanned stack would nest the experts' stack inside the layers' (ftjax.stacking has one).
"""

from __future__ import annotations

import dataclasses

from ftjax.models import llama

FAMILY = dataclasses.replace(llama.FAMILY, name="mixtral", model_types=("mixtral",), scannable=False)
