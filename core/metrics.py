"""Classification metrics shared by the core and plugins: accuracy, NLL, ECE, Brier score.

Pure torch + torchmetrics, no Lightning import. Inputs are log-probabilities ``[N, C]`` or
``[N, T, C]`` with integer targets; positions whose target equals ``IGNORE_INDEX`` are skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

IGNORE_INDEX = -100


def flatten_classes(log_probs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten sequence outputs to ``[N, C]`` / ``[N]`` and drop ignored positions."""
    log_probs = log_probs.reshape(-1, log_probs.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    if not bool(keep.all()):
        log_probs, targets = log_probs[keep], targets[keep]
    return log_probs, targets


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for integer targets (sequence outputs flattened), mean squared error otherwise."""
    if targets.is_floating_point():
        return F.mse_loss(outputs.reshape(targets.shape), targets)
    return F.cross_entropy(
        outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def brier_score(probs: Tensor, targets: Tensor) -> Tensor:
    """Mean over examples of the squared distance between ``probs`` and the one-hot target."""
    one_hot = F.one_hot(targets, probs.shape[-1]).to(probs.dtype)
    return (probs - one_hot).pow(2).sum(-1).mean()


def nll(log_probs: Tensor, targets: Tensor) -> Tensor:
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean()


class ClassificationMetrics(nn.Module):
    """Epoch-level accuracy, NLL, ECE (15 bins, L1) and Brier score for one stage."""

    def __init__(self, num_classes: int, ece_bins: int = 15) -> None:
        super().__init__()
        self.collection = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                "ece": MulticlassCalibrationError(num_classes=num_classes, n_bins=ece_bins, norm="l1"),
            }
        )
        self.nll = MeanMetric()
        self.brier = MeanMetric()

    @torch.no_grad()
    def update(self, log_probs: Tensor, targets: Tensor) -> None:
        log_probs, targets = flatten_classes(log_probs.detach().float(), targets)
        if targets.numel() == 0:
            return
        probs = log_probs.exp()
        self.collection.update(probs, targets)
        self.nll.update(nll(log_probs, targets), weight=targets.numel())
        self.brier.update(brier_score(probs, targets), weight=targets.numel())

    def metrics(self) -> dict[str, Metric]:
        """The metric objects, for ``LightningModule.log`` to compute, sync and reset per epoch."""
        return {**dict(self.collection.items()), "nll": self.nll, "brier": self.brier}

    @staticmethod
    def attribute_of(name: str) -> str:
        """The attribute path, within this module, of the metric :meth:`metrics` calls ``name``."""
        return name if name in ("nll", "brier") else f"collection.{name}"
