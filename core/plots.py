"""Reliability diagrams: calibration bins consistent with the core ECE, a matplotlib figure saved as
PNG in the run directory, and logged to Weights & Biases when a ``WandbLogger`` is attached.

The binning is exactly torchmetrics' ``MulticlassCalibrationError`` (which :mod:`litplug.core.metrics`
uses for ECE): top-1 confidence, ``n_bins`` equal-width bins ``[lo, hi)`` from
``torch.bucketize(conf, linspace(0, 1, n_bins + 1), right=True) - 1``, so a confidence of exactly
1.0 falls into an extra slot of its own. :func:`expected_calibration_error` over these bins equals
the core metric; the diagram draws that extra slot merged into the last bar.

Usage from a plugin (collect evaluation probabilities, draw at the end of the test epoch)::

    recorder = ReliabilityRecorder()
    recorder.update(log_probs.exp(), targets)             # in litplug_eval_step
    recorder.save(module, name="ensemble_test")           # in litplug_on_eval_end
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CalibrationBins",
    "ReliabilityRecorder",
    "calibration_bins",
    "expected_calibration_error",
    "log_image_to_wandb",
    "plot_reliability_diagram",
    "module_run_directory",
    "save_reliability_diagram",
]

DEFAULT_BINS = 15  # the core metric's n_bins


@dataclass(frozen=True)
class CalibrationBins:
    """Per-bin mean confidence, accuracy and example count (``n_bins + 1`` slots, see module doc)."""

    edges: Tensor  # [n_bins + 1]
    confidence: Tensor  # [n_bins + 1]
    accuracy: Tensor  # [n_bins + 1]
    count: Tensor  # [n_bins + 1]

    @property
    def total(self) -> int:
        return int(self.count.sum().item())


def calibration_bins(probs: Tensor, targets: Tensor, n_bins: int = DEFAULT_BINS) -> CalibrationBins:
    """Top-1 calibration bins of class probabilities ``[N, C]`` against integer targets ``[N]``."""
    if probs.ndim != 2 or targets.shape != probs.shape[:1]:
        raise ValueError(
            f"expected probs [N, C] and targets [N], got {tuple(probs.shape)} and {tuple(targets.shape)}"
        )
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs = probs.detach().float().cpu()
    targets = targets.detach().cpu()
    confidence, prediction = probs.max(dim=1)
    correct = prediction.eq(targets).float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype)
    index = torch.bucketize(confidence, edges, right=True) - 1
    count = torch.zeros(n_bins + 1).scatter_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros(n_bins + 1).scatter_add_(0, index, confidence)
    acc_sum = torch.zeros(n_bins + 1).scatter_add_(0, index, correct)
    safe = count.clamp_min(1)
    return CalibrationBins(edges=edges, confidence=conf_sum / safe, accuracy=acc_sum / safe, count=count)


def expected_calibration_error(bins: CalibrationBins) -> float:
    """``sum_b |acc_b - conf_b| * n_b / N``: the L1 ECE, equal to the core's torchmetrics ECE."""
    total = bins.count.sum()
    if total == 0:
        return 0.0
    return float(((bins.accuracy - bins.confidence).abs() * bins.count / total).sum())


def _merged_for_display(bins: CalibrationBins) -> tuple[Tensor, Tensor, Tensor]:
    """Fold the confidence == 1.0 slot into the last visible bin (count-weighted)."""
    count = bins.count[:-1].clone()
    conf_sum = (bins.confidence * bins.count)[:-1].clone()
    acc_sum = (bins.accuracy * bins.count)[:-1].clone()
    count[-1] += bins.count[-1]
    conf_sum[-1] += bins.confidence[-1] * bins.count[-1]
    acc_sum[-1] += bins.accuracy[-1] * bins.count[-1]
    safe = count.clamp_min(1)
    return count, conf_sum / safe, acc_sum / safe


def plot_reliability_diagram(
    bins: CalibrationBins, path: str | Path, title: str = "Reliability diagram"
) -> Path:
    """Draw accuracy per confidence bin (bars), the gap to the diagonal, and the bin counts; save PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; a no-op when a backend is already set
    import matplotlib.pyplot as plt

    count, confidence, accuracy = _merged_for_display(bins)
    edges = bins.edges
    width = float(edges[1] - edges[0])
    centers = (edges[:-1] + width / 2).numpy()
    filled = (count > 0).numpy()
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    top.bar(centers[filled], accuracy.numpy()[filled], width=width, edgecolor="black", label="accuracy")
    gap = (confidence - accuracy).numpy()
    top.bar(
        centers[filled],
        gap[filled],
        bottom=accuracy.numpy()[filled],
        width=width,
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ece = expected_calibration_error(bins)
    top.set_title(f"{title}\nECE {ece:.4f}, {bins.total} examples")
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers, count.numpy(), width=width, color="tab:gray", edgecolor="black")
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("examples")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def module_run_directory(module: Any) -> Path:
    """The run directory of a LightningModule's trainer (``core/run_dir.py``), else the working
    directory. No collective: called on rank zero only."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return Path.cwd()
    from litplug.core.run_dir import run_directory  # imports Lightning, which this module avoids

    return run_directory(trainer)


def log_image_to_wandb(module: Any, key: str, path: Path) -> bool:
    """Log the PNG at ``path`` under ``key`` to every attached ``WandbLogger``; True if one was found."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return False
    from lightning.pytorch.loggers import WandbLogger

    logged = False
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)])
            logged = True
    return logged


def save_reliability_diagram(
    module: Any, probs: Tensor, targets: Tensor, name: str, n_bins: int = DEFAULT_BINS
) -> Path | None:
    """Save ``<run dir>/reliability_<name>.png`` and log it to W&B; rank zero only (else ``None``)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and not trainer.is_global_zero:
        return None
    bins = calibration_bins(probs, targets, n_bins)
    path = plot_reliability_diagram(
        bins, module_run_directory(module) / f"reliability_{name}.png", title=name
    )
    log_image_to_wandb(module, f"reliability/{name}", path)
    return path


class ReliabilityRecorder:
    """Collects evaluation probabilities and targets (on the CPU) for one reliability diagram."""

    def __init__(self) -> None:
        self.probs: list[Tensor] = []
        self.targets: list[Tensor] = []

    def reset(self) -> None:
        self.probs.clear()
        self.targets.clear()

    def update(self, probs: Tensor, targets: Tensor) -> None:
        """Add probabilities ``[..., C]`` and targets ``[...]`` (positions with target -100 dropped)."""
        flat_probs = probs.detach().reshape(-1, probs.shape[-1])
        flat_targets = targets.detach().reshape(-1)
        keep = flat_targets != -100
        self.probs.append(flat_probs[keep].float().cpu())
        self.targets.append(flat_targets[keep].cpu())

    def save(self, module: Any, name: str, n_bins: int = DEFAULT_BINS) -> Path | None:
        """Draw and save the diagram of everything collected, then reset; ``None`` if empty."""
        if not self.probs:
            return None
        probs, targets = torch.cat(self.probs), torch.cat(self.targets)
        self.reset()
        if targets.numel() == 0:
            return None
        return save_reliability_diagram(module, probs, targets, name, n_bins)
