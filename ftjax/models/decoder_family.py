"""What the decoder-only families (llama.py, gemma.py, gpt2.py; mixtral, qwen and phi3 through llama) share
beyond decoder.py: the task "base" model (the backbone itself) and the Family fields they all declare alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ftjax.models import common
from ftjax.models.decoder import DecoderTask
from ftjax.models.registry import Family, base_or_task

# base: no head; causal_lm: lm_head (absent when tied to the embedding); classification: score.
HEAD_PATTERNS = {"base": common.NO_HEAD, "causal_lm": r"lm_head/.*", "classification": r"score/.*"}


class BackboneTask(DecoderTask):
    """task "base": a decoder backbone itself as the task model (params without prefix), called as
    DecoderTask is. A family lists it first, then its backbone: `class LlamaBase(BackboneTask, LlamaModel)`."""

    def _forward(self, inputs, cache, *, deterministic, rngs):
        # The backbone's own call: the first __call__ after DecoderTask's line of the MRO (HFModel has none).
        return super(DecoderTask, self).__call__(inputs, cache, deterministic=deterministic, rngs=rngs)


def family(name: str, model_types: tuple[str, ...], base: type[BackboneTask],
           task_model: Callable[[Any, str, Any], DecoderTask], **fields: Any) -> Family:
    """A decoder family: task "base" is `base`, causal_lm and classification `task_model` (a DecoderTask, its
    backbone under `backbone_name`: the family's HF prefix); `fields`: the rest of the Family."""
    return Family(name=name, model_types=model_types, prefix=task_model.backbone_name,
                  build=base_or_task(base, task_model), head_patterns=HEAD_PATTERNS, **fields)
