"""Ghost batch norm (Hoffer et al. 2017): BatchNorm statistics per small ghost batch of a large batch."""

from .functional import GhostBatchNorm, ghost_batch_norm, ghost_batch_sizes
from .plugin import GhostBatchNormPlugin, replace_batchnorms

__all__ = [
    "GhostBatchNorm",
    "GhostBatchNormPlugin",
    "ghost_batch_norm",
    "ghost_batch_sizes",
    "replace_batchnorms",
]
