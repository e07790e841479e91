"""``DistributedPlugins``: makes litplug plugins correct under Lightning's DDP strategies.

What the callback adds on top of what the core already does in every run:

- Learning-rate scaling by the global batch (``linear`` or ``sqrt`` against ``base_batch_size``),
  applied once (a resumed run does not scale again). When a LEGW warmup callback is configured
  the callback hands it the global batch instead, so the rate is scaled in exactly one place.
- A cross-rank agreement check of every plugin's state (and of the model's parameters) at each
  training epoch end and before a checkpoint is written: a plugin whose state drifted apart across
  ranks fails the run with its name and the offending key, instead of saving rank zero's copy as
  if it were everyone's. Plugins that declare ``rank_local_state = True`` are skipped.

What the core does without this callback: plugins that do not declare ``supports_ddp`` are refused
under DDP; what plugins compute in ``litplug_on_fit_start`` is broadcast from rank zero; litplug's
data modules shard each global batch contiguously across ranks (``use_distributed_sampler=False``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from litplug.core import distributed
from litplug.core.errors import LitplugError

LrScaling = Literal["none", "linear", "sqrt"]
_GROUP_MARKER = "litplug_ddp_lr_scale"
_GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
# BatchNorm statistics are per rank between DDP's buffer broadcasts, in a model or a plugin's network.
_PER_RANK_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class DistributedConfigError(LitplugError, ValueError):
    def __init__(self, argument: str, problem: str) -> None:
        super().__init__(f"callback 'DistributedPlugins': argument '{argument}' {problem}")


class StateDisagreementError(LitplugError, RuntimeError):
    """Plugin (or model) state differs across ranks."""


def lr_scale(global_batch: int, base_batch: int, scaling: LrScaling) -> float:
    """The learning-rate multiplier for a global batch against the batch the lr was tuned at."""
    k = global_batch / base_batch
    return {"none": 1.0, "linear": k, "sqrt": math.sqrt(k)}[scaling]


class DistributedPlugins(Callback):
    """Cross-rank correctness for litplug plugins: lr scaling by global batch, state agreement."""

    def __init__(
        self,
        lr_scaling: LrScaling = "none",
        base_batch_size: int | None = None,
        check_agreement: bool = True,
        agreement_rtol: float = 1e-6,
    ) -> None:
        if lr_scaling not in ("none", "linear", "sqrt"):
            raise DistributedConfigError(
                "lr_scaling", f"must be 'none', 'linear' or 'sqrt', got {lr_scaling!r}"
            )
        if lr_scaling != "none" and (base_batch_size is None or base_batch_size < 1):
            raise DistributedConfigError(
                "base_batch_size",
                f"must be an integer >= 1 when lr_scaling='{lr_scaling}', got {base_batch_size!r}",
            )
        if agreement_rtol < 0:
            raise DistributedConfigError("agreement_rtol", f"must be >= 0, got {agreement_rtol}")
        self.lr_scaling = lr_scaling
        self.base_batch_size = base_batch_size
        self.check_agreement = check_agreement
        self.agreement_rtol = agreement_rtol
        self.applied_scale: float | None = None
        self.scaled_for_batch: int | None = None  # the global batch applied_scale was computed for

    @classmethod
    def example(cls) -> DistributedPlugins:
        return cls(lr_scaling="sqrt", base_batch_size=64)

    # -- global batch and learning rate -----------------------------------------------------------

    @staticmethod
    def global_batch_size(trainer: L.Trainer) -> int:
        datamodule = getattr(trainer, "datamodule", None)
        per_device = getattr(datamodule, "batch_size", None)
        if not isinstance(per_device, int):
            raise DistributedConfigError(
                "base_batch_size",
                "needs a datamodule with an integer `batch_size` to compute the global batch",
            )
        return per_device * trainer.world_size * trainer.accumulate_grad_batches

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.lr_scaling == "none":
            return
        from litplug.callbacks.warmup import LEGW

        legw = [cb for cb in trainer.callbacks if isinstance(cb, LEGW)]  # type: ignore[attr-defined]
        if legw:
            raise DistributedConfigError(
                "lr_scaling",
                "must be 'none' when a LEGW callback is configured: LEGW already scales the rate by the "
                "global batch (set its lr_scaling instead)",
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from litplug.callbacks.warmup import LEGW

        global_batch = self.global_batch_size(trainer) if self._needs_batch(trainer) else None
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, LEGW) and global_batch is not None:
                callback.set_global_batch_size(global_batch)
        if self.lr_scaling == "none":
            return
        assert global_batch is not None and self.base_batch_size is not None
        if self.applied_scale is not None:  # scaled before a resume: the optimizer state has it
            self._warn_if_scaled_for_another_batch(global_batch)
            return
        scale = lr_scale(global_batch, self.base_batch_size, self.lr_scaling)
        _scale_learning_rates(trainer, scale)
        self.applied_scale, self.scaled_for_batch = scale, global_batch
        rank_zero_info(
            f"DistributedPlugins: global batch {global_batch} (x{trainer.world_size} devices); "
            f"lr x {scale:.4g} ({self.lr_scaling} against {self.base_batch_size})"
        )

    def _warn_if_scaled_for_another_batch(self, global_batch: int) -> None:
        saved = self.scaled_for_batch
        if saved is None or saved == global_batch:
            return
        assert self.base_batch_size is not None and self.applied_scale is not None
        rank_zero_warn(
            f"DistributedPlugins: resumed with global batch {global_batch}, but the learning rates in "
            f"the checkpoint were scaled x{self.applied_scale:.4g} for global batch {saved}; keeping "
            f"them (this batch alone would give x{lr_scale(global_batch, self.base_batch_size, self.lr_scaling):.4g}). "
            "Resume with the same devices and batch size to keep the recipe."
        )

    def _needs_batch(self, trainer: L.Trainer) -> bool:
        from litplug.callbacks.warmup import LEGW

        has_legw = any(isinstance(cb, LEGW) for cb in trainer.callbacks)  # type: ignore[attr-defined]
        return self.lr_scaling != "none" or has_legw

    # -- agreement --------------------------------------------------------------------------------

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.assert_agreement(pl_module, "train epoch end")

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.assert_agreement(pl_module, "checkpoint")

    def assert_agreement(self, pl_module: L.LightningModule, when: str) -> None:
        """Raise naming the plugin and key whose state differs across ranks (no-op in one process)."""
        if not (self.check_agreement and distributed.is_distributed()):
            return
        # Parameters only: BatchNorm running statistics legitimately differ between DDP's
        # broadcasts from rank zero (which keeps its own in checkpoints).
        local = {"model": distributed.checksums(dict(pl_module.named_parameters()))}
        for plugin in getattr(pl_module, "plugins", []):
            if not plugin.rank_local_state:
                sums = distributed.checksums(plugin.state_dict())
                local[f"plugin '{plugin.name}'"] = {
                    k: v for k, v in sums.items() if not k.endswith(_PER_RANK_BUFFERS)
                }
        gathered = distributed.gather_object(local)
        for owner, sums in gathered[0].items():
            for other_rank, other in enumerate(gathered[1:], start=1):
                for key, reference in sums.items():
                    value = other[owner].get(key)
                    if value is None or not _close(reference, value, self.agreement_rtol):
                        raise StateDisagreementError(
                            f"{owner}: state '{key}' differs between rank 0 and rank {other_rank} at {when} "
                            f"(checksums {reference} vs {value}); the plugin must average or broadcast it"
                        )

    # -- checkpointed state -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"applied_scale": self.applied_scale, "scaled_for_batch": self.scaled_for_batch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied_scale = state_dict.get("applied_scale")
        self.scaled_for_batch = state_dict.get("scaled_for_batch")  # absent in older checkpoints


def _close(a: tuple[float, float], b: tuple[float, float], rtol: float) -> bool:
    return all(math.isclose(x, y, rel_tol=rtol, abs_tol=1e-12) for x, y in zip(a, b, strict=True))


def _scale_learning_rates(trainer: L.Trainer, scale: float) -> None:
    """Multiply every param group's learning rates, and its schedulers' base rates, by ``scale``."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            if _GROUP_MARKER in group:
                continue
            for key in _GROUP_LR_KEYS:
                if group.get(key) is not None:
                    group[key] = group[key] * scale
            group[_GROUP_MARKER] = scale
    for config in trainer.lr_scheduler_configs:
        for attr in ("base_lrs", "_last_lr"):
            values = getattr(config.scheduler, attr, None)
            if isinstance(values, list):
                setattr(config.scheduler, attr, [v * scale for v in values])
