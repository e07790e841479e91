"""EWC and online EWC: diagonal-Fisher quadratic penalties for continual learning."""

from .functional import (
    ESTIMATORS,
    ewc_penalty,
    fisher_diagonal,
    fisher_diagonal_loop,
    merge_separate,
    online_update,
    quadratic_penalty,
)
from .plugin import EWC

__all__ = [
    "ESTIMATORS",
    "EWC",
    "ewc_penalty",
    "fisher_diagonal",
    "fisher_diagonal_loop",
    "merge_separate",
    "online_update",
    "quadratic_penalty",
]
