"""What the BERT-style encoder families (bert.py, roberta.py, distilbert.py, deberta.py) share: the call of
their task models, HF's uniform inputs in and one head's logits out, and the token-classification head.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from ftjax.models import common
from ftjax.models.common import Ctx, Dropout, HFModel


class EncoderTask(HFModel):
    """Base of the encoder task models (classification, token_classification, masked_lm). A family gives
    `_encode` (its backbone), `_classify` (its sequence head) and `_masked_lm` (its tied LM head); the token
    head is `classifier(dropout(x))` on every token for all of them (`_init_classifier`)."""

    def _init_classifier(self, size: int, rate: float, cfg: Any, ctx: Ctx) -> None:
        """dropout -> classifier (HF's names): the token-classification head (and BERT's sequence head)."""
        self.dropout = Dropout(rate)
        self.classifier = common.linear(size, cfg.num_labels, ctx, ("embed", None))

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, segment_ids, segment_starts, *,
                deterministic, rngs) -> tuple[jax.Array, jax.Array | None]:
        """(the last hidden state [B, L, H], the backbone's pooled output or None)."""
        raise NotImplementedError

    def _classify(self, x, pooled, segment_starts, *, deterministic, rngs) -> jax.Array:
        raise NotImplementedError

    def _masked_lm(self, x) -> jax.Array:
        raise NotImplementedError

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 pixel_values=None, segment_ids=None, segment_starts=None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None, output_hidden_states: bool = False) -> dict:
        """logits [B, C] (classification; [B, S, C] for packed rows: segment_ids, segment_starts), [B, L, C]
        or [B, L, V] per token; output_hidden_states adds "hidden_states" (embeddings + each layer's output,
        [B, L, H] each)."""
        kw = {"deterministic": deterministic, "rngs": rngs}
        common.check_packed(self.task, segment_ids, segment_starts)
        with common.collect_hidden_states(output_hidden_states) as hidden:
            x, pooled = self._encode(input_ids, attention_mask, token_type_ids, position_ids, segment_ids,
                                     segment_starts, **kw)
        if self.task == "classification":
            logits = self._classify(x, pooled, segment_starts, **kw)
        elif self.task == "token_classification":
            logits = self.classifier(self.dropout(x, **kw))
        else:
            logits = self._masked_lm(x)
        return common.with_hidden_states({"logits": logits}, hidden)
