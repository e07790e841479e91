"""Center loss (Wen et al. 2016) in pure torch: the penalty and the center update (no Lightning)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_center_update", "center_loss", "center_statistics", "update_centers"]


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
def center_statistics(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class sums of the features and counts ``n_j`` over the batch: ``([C, D], [C])``, float32.

    Sums over examples, so the statistics of several shards of a batch add up to the whole batch's
    (under DDP they are all-reduced with a sum before :func:`apply_center_update`).
    """
    features = features.detach().reshape(features.shape[0], -1)
    if features.dtype not in (torch.float32, torch.float64):  # bf16/fp16 under autocast: sum in fp32
        features = features.float()
    counts = torch.bincount(labels, minlength=num_classes).to(features.dtype)
    sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, labels, features)
    return sums, counts


@torch.no_grad()
def apply_center_update(
    centers: Tensor, sums: Tensor, counts: Tensor, alpha: float, frozen: Tensor | None = None
) -> Tensor:
    """``c_j <- c_j - alpha * (n_j c_j - sum_{y_i=j} h_i) / (1 + n_j)`` in place, from batch statistics.

    ``n_j c_j - sum h_i`` is Wen et al.'s ``sum_{y_i=j} (c_j - h_i)``. Classes with ``frozen[j]`` and
    classes without examples (``n_j = 0``) keep their centers. Returns ``centers``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    sums = sums.to(centers.device, centers.dtype)
    counts = counts.to(centers.device, centers.dtype)[:, None]
    delta = (counts * centers - sums) / (1.0 + counts)
    if frozen is not None:
        delta = delta.masked_fill(frozen[:, None].to(delta.device), 0.0)
    centers.sub_(alpha * delta)
    return centers


@torch.no_grad()
def update_centers(
    centers: Tensor, features: Tensor, labels: Tensor, alpha: float, frozen: Tensor | None = None
) -> Tensor:
    """Wen et al.'s update, in place: ``c_j <- c_j - alpha * sum_{y_i=j}(c_j - h_i) / (1 + n_j)``.

    Classes with ``frozen[j]`` keep their centers. Returns ``centers``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    sums, counts = center_statistics(features.to(centers.dtype), labels, centers.shape[0])
    return apply_center_update(centers, sums, counts, alpha, frozen)
