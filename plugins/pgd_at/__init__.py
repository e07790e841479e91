"""PGD adversarial training (Madry et al. 2018) as the ``pgd_at`` plugin."""

from .functional import AttackMode, adversarial_training_inputs
from .plugin import PGDAdversarialTraining

__all__ = ["AttackMode", "PGDAdversarialTraining", "adversarial_training_inputs"]
