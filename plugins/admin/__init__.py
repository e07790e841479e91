"""Admin initialisation for post-LN transformers (Liu et al. 2020)."""

from .functional import (
    AdminModelError,
    ProfileResult,
    add_residual_scales,
    closed_form_omega,
    fill_residual_scales,
    fold_omegas_into_weights,
    post_ln_sublayers,
    profile_omegas,
    residual_scales,
)
from .plugin import Admin

__all__ = [
    "Admin",
    "AdminModelError",
    "ProfileResult",
    "add_residual_scales",
    "closed_form_omega",
    "fill_residual_scales",
    "fold_omegas_into_weights",
    "post_ln_sublayers",
    "profile_omegas",
    "residual_scales",
]
