"""``GhostBatchNormPlugin``: swap every BatchNorm1d/2d/3d for :class:`GhostBatchNorm` (thin hooks)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from litplug.core.hookspecs import hookimpl
from litplug.core.plugin import Plugin

from .functional import PARTITIONS, GhostBatchNorm, Partition

__all__ = ["GhostBatchNormPlugin", "replace_batchnorms"]

#: Exactly the layers that are replaced; SyncBatchNorm and other _BatchNorm subclasses are left alone.
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _is_plain_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, BATCHNORM_TYPES) and not isinstance(module, GhostBatchNorm)


def replace_batchnorms(
    model: nn.Module, ghost_batch_size: int, partition: Partition = "contiguous"
) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d in ``model`` by a :class:`GhostBatchNorm`, in place.

    Parameters and buffers are shared with the replaced layers, so names, values and identities are
    unchanged. Existing ghost layers are left alone (idempotent). Returns ``model``, or the new layer
    when ``model`` itself is a BatchNorm (which cannot be replaced in place). ``partition``: which
    examples share a ghost batch (:data:`~.functional.Partition`).
    """
    if _is_plain_batchnorm(model):
        return GhostBatchNorm.from_batchnorm(model, ghost_batch_size, partition=partition)  # type: ignore[arg-type]
    # Collect first: replacing while iterating named_modules would mutate what is iterated.
    targets = [(name, m) for name, m in model.named_modules() if name and _is_plain_batchnorm(m)]
    for name, bn in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        ghost = GhostBatchNorm.from_batchnorm(bn, ghost_batch_size, partition=partition)  # type: ignore[arg-type]
        setattr(parent, child, ghost)
    return model


def _first_batch_size(batch: Any) -> int | None:
    """Examples in a raw ``(inputs, targets)`` batch, when the inputs are a tensor."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    return int(inputs.shape[0]) if isinstance(inputs, Tensor) and inputs.dim() > 0 else None


class GhostBatchNormPlugin(Plugin):
    """Ghost batch norm: normalise small ghost batches inside a large batch (Hoffer et al. 2017).

    Every ``BatchNorm1d/2d/3d`` of the model becomes a :class:`GhostBatchNorm` (same parameter and
    buffer names, so checkpoints and optimizers are unaffected). Training normalises each ghost
    batch of ``ghost_batch_size`` examples with its own statistics; evaluation uses the running
    statistics exactly like BatchNorm.

    Args:
        ghost_batch_size: examples per ghost batch (paper: 128); at least 2 and at most the
            per-device batch size.
        allow_no_batchnorm: accept a model without BatchNorm (the plugin then does nothing)
            instead of failing at setup.
        partition: which examples share a ghost batch: ``"contiguous"`` (chunks of
            ``ghost_batch_size`` consecutive examples, as ``torch.chunk``; the faster one on CPU) or
            ``"strided"`` (examples ``k, k + m, ...``; the faster one on GPU, see the README).
    """

    name = "ghost_bn"

    def __init__(
        self,
        ghost_batch_size: int = 32,
        allow_no_batchnorm: bool = False,
        partition: Partition = "contiguous",
    ) -> None:
        self.check(
            isinstance(ghost_batch_size, int) and not isinstance(ghost_batch_size, bool),
            "ghost_batch_size",
            f"must be an integer >= 2, got {ghost_batch_size!r}",
        )
        self.check_range("ghost_batch_size", ghost_batch_size, low=2)
        self.check(partition in PARTITIONS, "partition", f"must be one of {PARTITIONS}, got {partition!r}")
        self.ghost_batch_size = ghost_batch_size
        self.partition: Partition = partition
        self.allow_no_batchnorm = allow_no_batchnorm
        self.requires = () if allow_no_batchnorm else ("batchnorm",)

    @classmethod
    def example(cls) -> GhostBatchNormPlugin:
        """Ghost batches of 8 (the registry-wide tests then pick a model with BatchNorm)."""
        return cls(ghost_batch_size=8)

    # -- hooks ------------------------------------------------------------------------------------

    @hookimpl
    def litplug_check_setup(self, trainer: Trainer) -> None:
        """Reject a ghost batch larger than the per-device batch, and synchronised BatchNorm.

        The per-device batch is ``trainer.datamodule.batch_size`` when there is a datamodule with
        an integer ``batch_size``; otherwise the first training batch is checked at fit start.
        """
        if getattr(trainer.strategy, "_layer_sync", None) is not None:
            self.check(
                False,
                "ghost_batch_size",
                "cannot be combined with Trainer(sync_batchnorm=True): it would turn the ghost layers "
                "into SyncBatchNorm over the global batch; set sync_batchnorm=False",
            )
        datamodule = getattr(trainer, "datamodule", None)
        batch_size = getattr(datamodule, "batch_size", None) if datamodule is not None else None
        if isinstance(batch_size, int):
            self._check_batch(batch_size, "datamodule.batch_size")

    @hookimpl
    def litplug_configure_model(self, model: nn.Module) -> nn.Module:
        return replace_batchnorms(model, self.ghost_batch_size, self.partition)

    @hookimpl
    def litplug_on_fit_start(self, module: LightningModule, sample_batch: Any) -> None:
        """Without a datamodule batch size, check the first training batch instead."""
        datamodule = getattr(module.trainer, "datamodule", None)
        if isinstance(getattr(datamodule, "batch_size", None), int):
            return  # already checked at setup
        batch_size = _first_batch_size(sample_batch)
        if batch_size is not None:
            self._check_batch(batch_size, "first training batch")

    def _check_batch(self, batch_size: int, source: str) -> None:
        self.check(
            self.ghost_batch_size <= batch_size,
            "ghost_batch_size",
            f"is {self.ghost_batch_size}, larger than the per-device batch size {batch_size} ({source}); "
            f"use a ghost_batch_size between 2 and {batch_size}",
        )
