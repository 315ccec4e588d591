"""Knowledge distillation: the divergences between a teacher's and the student's output distributions (forward
KL, reverse KL, Jensen-Shannon, at a temperature) and the check that a teacher can teach this student (same
task, same vocabulary or labels). The teacher itself runs inside the train step (ftjax/tasks/distill.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ftjax.config import ConfigError

LOSSES = ("forward_kl", "reverse_kl", "jsd")


@dataclasses.dataclass(frozen=True)
class Spec:
    """distill.*: the divergence, the temperature and the task loss's weight alpha."""

    loss: str = "forward_kl"
    temperature: float = 2.0
    alpha: float = 0.5

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"distill.loss={self.loss!r}: one of {LOSSES}")


def spec_of(cfg: Any) -> Spec:
    d = cfg.distill
    return Spec(str(d.loss), float(d.temperature), float(d.alpha))


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis from log-probabilities (0 log 0 = 0)."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def divergence(teacher_logits: jax.Array, student_logits: jax.Array, loss: str, temperature: float) -> jax.Array:
    """Per-position divergence [...] of softmax(student / T) from softmax(teacher / T), in float32:
    forward_kl = KL(teacher || student) (Hinton et al.), reverse_kl = KL(student || teacher) (mode seeking, as
    MiniLLM), jsd = (KL(t || m) + KL(s || m)) / 2 with m their mixture (GKD's beta = 0.5)."""
    log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    if loss == "forward_kl":
        return _kl(log_t, log_s)
    if loss == "reverse_kl":
        return _kl(log_s, log_t)
    log_m = jnp.logaddexp(log_t, log_s) - jnp.log(2.0)
    return 0.5 * (_kl(log_t, log_m) + _kl(log_s, log_m))


def check_teacher(student: Any, teacher: Any, student_tokenizer: Any, teacher_tokenizer: Any,
                  teacher_path: str) -> None:
    """Refuses a teacher whose outputs are not over the student's classes: another task head, another
    vocabulary (size or tokens: a different tokenizer numbers the same text differently), other labels."""
    def fail(why: str) -> None:
        raise ConfigError("distill.teacher", teacher_path, f"cannot teach this student: {why}")

    if teacher.task != student.task:
        fail(f"it loads as a {teacher.task} model, the student as {student.task}")
    s_cfg, t_cfg = student.hf_config, teacher.hf_config
    if student.task in ("causal_lm", "seq2seq"):
        if int(t_cfg.vocab_size) != int(s_cfg.vocab_size):
            fail(f"its vocabulary has {t_cfg.vocab_size} entries, the student's {s_cfg.vocab_size}; distill between "
                 "models of one tokenizer")
        if student_tokenizer is not None and teacher_tokenizer is not None \
                and student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            fail("its tokenizer maps tokens to other ids than the student's; distill between models of one tokenizer")
    else:
        s_labels, t_labels = int(s_cfg.num_labels), int(t_cfg.num_labels)
        if s_labels != t_labels:
            fail(f"it has {t_labels} labels, the student {s_labels}")
        s_names, t_names = getattr(s_cfg, "id2label", None), getattr(t_cfg, "id2label", None)
        generic = all(str(v).startswith("LABEL_") for v in (t_names or {}).values())
        if s_names and t_names and not generic and {int(k): v for k, v in s_names.items()} != {
                int(k): v for k, v in t_names.items()}:
            fail(f"its labels {dict(t_names)} are not the student's {dict(s_names)} in the same order")
