"""Deep ensembles: N independently initialised members trained in one run, probabilities averaged."""

from .functional import (
    MemberStack,
    disagreement,
    ensemble_log_probs,
    ensemble_nll,
    faster_path,
    make_members,
    member_seed,
    reinitialize,
    sequential_forward,
    sum_of_member_losses,
    time_forward_paths,
    vectorised_forward,
)
from .plugin import DeepEnsemble

__all__ = [
    "DeepEnsemble",
    "MemberStack",
    "disagreement",
    "ensemble_log_probs",
    "ensemble_nll",
    "faster_path",
    "make_members",
    "member_seed",
    "reinitialize",
    "sequential_forward",
    "sum_of_member_losses",
    "time_forward_paths",
    "vectorised_forward",
]
