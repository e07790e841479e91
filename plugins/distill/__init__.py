"""Knowledge distillation from a frozen teacher checkpoint (ensemble, MIMO, EMA or plain)."""

from .functional import distillation_loss, soft_target_kl, teacher_agreement
from .plugin import (
    Distill,
    load_teacher,
    resolve_checkpoint_path,
    save_teacher_checkpoint,
    teacher_fingerprint,
)

__all__ = [
    "Distill",
    "distillation_loss",
    "load_teacher",
    "resolve_checkpoint_path",
    "save_teacher_checkpoint",
    "soft_target_kl",
    "teacher_agreement",
    "teacher_fingerprint",
]
