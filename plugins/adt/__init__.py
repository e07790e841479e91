"""Adversarial distributional training (Dong et al. 2020) as the ``adt`` plugin."""

from .functional import (
    EncoderNet,
    GeneratorNet,
    adt_exp_inputs,
    amortized_inputs,
    grad_reverse,
    implicit_entropy_penalty,
    signed_adam_step,
    tanh_gaussian_entropy,
    tanh_gaussian_sample,
)
from .plugin import VARIANTS, AdversarialDistributionalTraining

__all__ = [
    "VARIANTS",
    "AdversarialDistributionalTraining",
    "EncoderNet",
    "GeneratorNet",
    "adt_exp_inputs",
    "amortized_inputs",
    "grad_reverse",
    "implicit_entropy_penalty",
    "signed_adam_step",
    "tanh_gaussian_entropy",
    "tanh_gaussian_sample",
]
