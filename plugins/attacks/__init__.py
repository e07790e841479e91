"""Adversarial attacks (FGSM, PGD; L-inf, L2; CE and margin losses) and the ``robust_eval`` plugin."""

from .functional import (
    AttackConfigError,
    attack_loss,
    check_attack_arguments,
    evaluation_attack_context,
    fgsm,
    frozen_batchnorm_stats,
    input_gradient,
    margin_loss,
    model_mode,
    pgd,
    project,
    random_start,
)
from .plugin import ATTACKS, RobustEvaluation, robust_accuracies, run_named_attack

__all__ = [
    "ATTACKS",
    "AttackConfigError",
    "RobustEvaluation",
    "attack_loss",
    "check_attack_arguments",
    "evaluation_attack_context",
    "fgsm",
    "frozen_batchnorm_stats",
    "input_gradient",
    "margin_loss",
    "model_mode",
    "pgd",
    "project",
    "random_start",
    "robust_accuracies",
    "run_named_attack",
]
