"""The losses of FastBERT's two training stages, as small standalone functions.

Shapes: S students (layers 1 .. L-1), B rows, N labels. Logits may be any float dtype; every
loss is computed in at least float32 (bf16/fp16 logits are upcast) from ``log_softmax``, so it
stays finite when a probability underflows to 0. Every loss is a scalar: the mean over the batch, summed over students.

- ``teacher_loss``: stage 1, cross-entropy of the teacher (last branch) with the labels.
- ``distillation_loss``: stage 2, every student learns the teacher's distribution
  (the paper's Eq. 5-6, or the reverse KL of the public reference code).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Direction = Literal["paper", "reverse"]
DIRECTIONS: tuple[str, ...] = ("paper", "reverse")


def teacher_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the teacher with the labels, averaged over the batch.

    logits: (B, N) float; labels: (B,) int64 class indices. Returns a scalar.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"teacher_loss expects logits (B, N) and labels (B,), got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    return F.cross_entropy(_upcast(logits), labels)  # ()


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, direction: Direction
) -> torch.Tensor:
    """Self-distillation: KL divergence between every student and the teacher, no temperature.

    student_logits: (S, B, N); teacher_logits: (B, N), detached here (the teacher is a fixed
    target, no gradient reaches it). Returns a scalar: the sum over students of the
    batch-mean KL.

    ``direction="paper"``: KL(p_s || p_t) = sum_i p_s(i) (log p_s(i) - log p_t(i)), the
    paper's Eq. 5-6. ``direction="reverse"``: KL(p_t || p_s), what the official public code
    computes.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if student_logits.dim() != 3 or teacher_logits.dim() != 2 or student_logits.shape[1:] != teacher_logits.shape:
        raise ValueError(
            f"distillation_loss expects student_logits (S, B, N) and teacher_logits (B, N), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    log_s = F.log_softmax(_upcast(student_logits), dim=-1)  # (S, B, N)
    log_t = F.log_softmax(_upcast(teacher_logits.detach()), dim=-1)[None]  # (1, B, N)
    if direction == "paper":
        kl = (log_s.exp() * (log_s - log_t)).sum(-1)  # (S, B)
    else:
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (S, B)
    return kl.mean(dim=1).sum()  # ()


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32, or float64 when they already are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))
