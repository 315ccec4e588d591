"""Marian (MarianMT, Opus-MT) in Flax NNX: BART's post-norm layers (bart.py) with sinusoidal positions
computed as HF does (sines in the first half of the features, cosines in the second; no param), the
sqrt(d_model) embedding scale, final_logits_bias, no layernorm_embedding, and one shared embedding or
(share_encoder_decoder_embeddings=false) one per stack, the decoder's being the tied lm_head.
"""

from __future__ import annotations

from typing import Any

from ftjax.models import bart, seq2seq
from ftjax.models.common import Ctx
from ftjax.models.registry import Family


def arch_for(cfg: Any) -> bart.Arch:
    shared = bool(getattr(cfg, "share_encoder_decoder_embeddings", True))
    return bart.Arch(learned_positions=False, layernorm_embedding=False, shared=shared)


def build(cfg: Any, task: str, ctx: Ctx) -> seq2seq.Seq2SeqLM:
    del task
    return bart.BartForConditionalGeneration(cfg, ctx, arch_for(cfg))


FAMILY = Family(
    name="marian",
    model_types=("marian",),
    prefix="model",
    build=build,
    head_patterns={"seq2seq": r"model/shared/.*|final_logits_bias"},  # see BartForConditionalGeneration.
    dropout_fields={"hidden": "dropout", "attention": "attention_dropout"},
    # The sinusoid tables (recomputed), the tied lm_head and fairseq version buffers. The stacks' embed_tokens
    # are params when not shared, so older checkpoints' tied copies of model.shared are reported as unused.
    ignore_keys=(r"model\.(encoder|decoder)\.embed_positions\.weight", r"lm_head\.weight",
                 r"model\.(encoder|decoder)\.version"),
    check_config=bart.check_config,
)
