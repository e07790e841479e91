"""Knowledge distillation loss in pure torch (Hinton, Vinyals & Dean 2015).

``loss = (1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))``

``s`` are the student's logits, ``t`` the teacher's logits. The ``T^2`` keeps the soft term's
gradient on the same scale as the hard term's when ``T`` changes (soft-target gradients shrink
as ``1 / T^2``). For an ensemble or MIMO teacher, whose prediction is a mean of probabilities, the
teacher "logits" are its log-probabilities ``log p_bar``: ``softmax(log p_bar / T)`` is ``p_bar``
at ``T = 1`` and a sharpened/flattened version of it otherwise (a valid choice because softmax is
invariant to the per-example constant that separates logits from log-probabilities).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["distillation_loss", "soft_target_kl", "teacher_agreement"]

IGNORE_INDEX = -100


def _flatten(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``[..., C]`` -> ``[N, C]`` (sequences flattened), positions with target ``-100`` dropped."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student outputs {tuple(student_logits.shape)} and teacher outputs "
            f"{tuple(teacher_logits.shape)} differ: the teacher must predict the same classes"
        )
    classes = student_logits.shape[-1]
    student = student_logits.reshape(-1, classes)
    teacher = teacher_logits.reshape(-1, classes)
    flat_targets = targets.reshape(-1)
    keep = flat_targets != IGNORE_INDEX
    return student[keep], teacher[keep], flat_targets[keep]


def soft_target_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(t / T) || softmax(s / T))`` averaged over examples ``[N, C]`` (no ``T^2``)."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    return F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> tuple[Tensor, Tensor]:
    """``((1 - alpha) * CE, alpha * T^2 * KL)``: the hard and soft terms (their sum is the loss).

    Shapes ``[..., C]`` with integer targets ``[...]``; sequence positions with target ``-100`` are
    left out of both terms. The teacher is detached.
    """
    student, teacher, flat_targets = _flatten(student_logits, teacher_logits, targets)
    hard = F.cross_entropy(student, flat_targets)
    soft = soft_target_kl(student, teacher, temperature) * temperature**2
    return (1.0 - alpha) * hard, alpha * soft


def teacher_agreement(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
    """Fraction of (non-ignored) positions where student and teacher predict the same class."""
    student, teacher, _ = _flatten(student_logits, teacher_logits, targets)
    if student.shape[0] == 0:
        return torch.zeros((), device=student.device)
    return student.argmax(-1).eq(teacher.argmax(-1)).float().mean()
