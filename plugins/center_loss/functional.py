"""Center loss (Wen et al. 2016) in pure torch: the penalty and the center update (no Lightning)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["center_loss", "update_centers"]


def center_loss(features: Tensor, labels: Tensor, centers: Tensor, strength: float) -> Tensor:
    """``(strength / 2) * mean_i ||h_i - c_{y_i}||^2``; the centers are constants here (detached).

    Args:
        features: ``[B, D]`` features.
        labels: ``[B]`` integer classes.
        centers: ``[C, D]`` class centers.
        strength: lambda, >= 0.
    """
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    if features.shape[0] == 0:
        return features.new_zeros(())
    diff = features - centers.detach()[labels]
    return 0.5 * strength * diff.pow(2).sum(dim=1).mean()


@torch.no_grad()
def update_centers(
    centers: Tensor, features: Tensor, labels: Tensor, alpha: float, frozen: Tensor | None = None
) -> Tensor:
    """Wen et al.'s update, in place: ``c_j <- c_j - alpha * sum_{y_i=j}(c_j - h_i) / (1 + n_j)``.

    Classes with ``frozen[j]`` keep their centers. Returns ``centers``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    features = features.detach().to(centers.dtype)
    counts = torch.bincount(labels, minlength=centers.shape[0]).to(centers.dtype)
    sums = torch.zeros_like(centers).index_add_(0, labels, features)
    delta = (counts[:, None] * centers - sums) / (1.0 + counts[:, None])
    if frozen is not None:
        delta = delta.masked_fill(frozen[:, None].to(delta.device), 0.0)
    centers.sub_(alpha * delta)
    return centers
