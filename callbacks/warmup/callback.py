"""Linear learning-rate warmup and LEGW as Lightning callbacks that compose with any scheduler.

How the warmup composes: the callback registers torch optimizer step hooks. The pre-hook sets every
param group's ``lr`` to ``scheduled_lr * factor`` just before the step reads it, and the post-hook
puts the scheduled value back right after. Lightning steps the LR schedulers after the optimizer
step, so a chainable scheduler (StepLR, CosineAnnealingLR, ... which read ``group["lr"]``) never sees
the factor, and the checkpointed optimizer holds the scheduled lr. Torch hooks rather than Lightning
hooks pair the two exactly: a step that AMP's GradScaler skips runs neither hook.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeGuard

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

from litplug.core.errors import LitplugError
from litplug.core.learning_rates import scale_group_lrs, scale_scheduler_lrs

from .functional import (
    LR_SCALING_RULES,
    LRScaling,
    batch_ratio,
    epochs_to_steps,
    legw_lr_scale,
    legw_warmup_epochs,
    optimizer_steps_per_epoch,
    warmup_factor_at_step,
)

__all__ = ["LEGW", "LinearWarmup", "WarmupConfigError"]

# Marker stored in each param group LEGW scaled; it travels in the optimizer's state_dict, so a
# resumed run (or a second fit of the same optimizer) never scales the group twice.
LEGW_GROUP_KEY = "legw_lr_scale"


class WarmupConfigError(LitplugError, ValueError):
    """A warmup callback got an argument it cannot work with."""

    def __init__(self, callback: str, argument: str, problem: str) -> None:
        self.callback = callback
        self.argument = argument
        super().__init__(f"callback '{callback}': argument '{argument}' {problem}")


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class LinearWarmup(Callback):
    """Multiply the scheduled learning rate by a linear ramp over the first optimizer steps.

    The factor of optimizer step ``t`` (0-based) is ``start_factor + (1 - start_factor) *
    min(1, (t + 1) / W)``; from step ``W`` on the lr is exactly what the optimizer and scheduler say.

    Args:
        warmup_steps: warmup length ``W`` in optimizer steps.
        warmup_epochs: warmup length in epochs (fractions allowed); converted at train start to
            ``ceil(warmup_epochs * ceil(num_training_batches / accumulate_grad_batches))`` optimizer
            steps, i.e. with gradient accumulation it counts optimizer steps, not batches.
        start_factor: the ramp's value at progress 0, in ``[0, 1)``.

    Give exactly one of ``warmup_steps`` and ``warmup_epochs``. Progress (optimizer steps seen) is
    saved in checkpoints, so a resumed run continues the ramp where it stopped.
    """

    def __init__(
        self,
        warmup_steps: int | None = None,
        warmup_epochs: float | None = None,
        start_factor: float = 0.0,
    ) -> None:
        super().__init__()
        self._check_length(warmup_steps, warmup_epochs)
        if not _is_number(start_factor) or not 0.0 <= start_factor < 1.0:
            self._fail("start_factor", f"must be a number in [0, 1), got {start_factor!r}")
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.start_factor = float(start_factor)
        self.step = 0  # optimizer steps taken with this callback: the warmup progress
        self.total_steps: int | None = None  # W, resolved at train start
        self.last_factor = 1.0
        self.last_lr: float | None = None  # the first param group's lr in the last step
        self._logged_this_fit = False
        self._key_args: dict[str, Any] = {"warmup_steps": warmup_steps, "warmup_epochs": warmup_epochs}
        self._handles: list[RemovableHandle] = []
        self._primary: Optimizer | None = None
        self._pending: dict[int, tuple[Optimizer, list[Any]]] = {}

    @classmethod
    def example(cls) -> LinearWarmup:
        """A small instance for registry-wide tests: warmup over 3 optimizer steps."""
        return cls(warmup_steps=3)

    # -- validation -------------------------------------------------------------------------------

    def _fail(self, argument: str, problem: str) -> None:
        raise WarmupConfigError(type(self).__name__, argument, problem)

    def _check_length(self, warmup_steps: int | None, warmup_epochs: float | None) -> None:
        if (warmup_steps is None) == (warmup_epochs is None):
            self._fail(
                "warmup_steps/warmup_epochs",
                f"needs exactly one of the two set, got warmup_steps={warmup_steps!r}, "
                f"warmup_epochs={warmup_epochs!r}",
            )
        if warmup_steps is not None and (not _is_int(warmup_steps) or warmup_steps < 1):
            self._fail("warmup_steps", f"must be an integer >= 1, got {warmup_steps!r}")
        if warmup_epochs is not None and (not _is_number(warmup_epochs) or warmup_epochs <= 0):
            self._fail("warmup_epochs", f"must be a number > 0, got {warmup_epochs!r}")

    # -- warmup length ----------------------------------------------------------------------------

    def steps_per_epoch(self, trainer: L.Trainer) -> int:
        """Optimizer steps per training epoch on this trainer (gradient accumulation included)."""
        num_batches = trainer.num_training_batches
        if not math.isfinite(num_batches) or num_batches < 1:
            self._fail(
                "warmup_epochs",
                f"needs a train dataloader of known, nonzero length (num_training_batches is "
                f"{num_batches}); give warmup_steps instead",
            )
        return optimizer_steps_per_epoch(int(num_batches), int(trainer.accumulate_grad_batches))

    def resolve_warmup_steps(self, trainer: L.Trainer) -> int:
        """``W`` in optimizer steps: ``warmup_steps``, or ``warmup_epochs`` converted."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        assert self.warmup_epochs is not None
        return epochs_to_steps(self.warmup_epochs, self.steps_per_epoch(trainer))

    def factor(self, step: int | None = None) -> float:
        """The lr multiplier of optimizer step ``step`` (default: the next one); 1 after warmup."""
        step = self.step if step is None else step
        if self.total_steps is None or step >= self.total_steps:
            return 1.0
        return warmup_factor_at_step(step, self.total_steps, self.start_factor)

    @property
    def in_warmup(self) -> bool:
        return self.total_steps is None or self.step < self.total_steps

    # -- Lightning hooks --------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.total_steps = self.resolve_warmup_steps(trainer)
        total = trainer.estimated_stepping_batches
        if math.isfinite(total) and self.total_steps > total:
            rank_zero_warn(
                f"{type(self).__name__}: warmup of {self.total_steps} optimizer steps is longer than the "
                f"whole run ({int(total)} steps); the full learning rate is never reached"
            )
        _log_run_config(trainer, {"warmup/steps": self.total_steps, "warmup/start_factor": self.start_factor})
        self._logged_this_fit = False
        self._attach(trainer.optimizers)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # LearningRateMonitor reads group["lr"] outside the step, i.e. without the factor: log the
        # factor and the lr the step used here: during warmup, then once more (factor 1). A fit
        # resumed after warmup logs them once too, so that its metrics have the same keys.
        in_warmup_or_its_end = self.total_steps is not None and self.step <= self.total_steps
        if in_warmup_or_its_end or not self._logged_this_fit:
            self._logged_this_fit = True
            pl_module.log("warmup/factor", self.last_factor, on_step=True, on_epoch=False)
            if self.last_lr is not None:
                pl_module.log("warmup/lr", self.last_lr, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._detach()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._detach()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._detach()

    # -- optimizer step hooks ---------------------------------------------------------------------

    def _attach(self, optimizers: list[Optimizer]) -> None:
        self._detach()
        self._primary = optimizers[0] if optimizers else None
        for optimizer in optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def _detach(self) -> None:
        self._restore_all()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._primary = None

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        factor = self.factor()
        self.last_factor = factor
        if optimizer is self._primary:
            self.last_lr = optimizer.param_groups[0]["lr"] * factor  # first group: what is logged
        if factor == 1.0:
            return  # after warmup the scheduled lr is used untouched
        scheduled = [group["lr"] for group in optimizer.param_groups]
        self._pending[id(optimizer)] = (optimizer, scheduled)
        for group, lr in zip(optimizer.param_groups, scheduled, strict=True):
            group["lr"] = lr * factor

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._restore(id(optimizer))
        # With several optimizers (manual optimization) the first one's steps measure progress.
        if optimizer is self._primary:
            self.step += 1

    def _restore(self, key: int) -> None:
        entry = self._pending.pop(key, None)
        if entry is not None:
            optimizer, scheduled = entry
            for group, lr in zip(optimizer.param_groups, scheduled, strict=True):
                group["lr"] = lr

    def _restore_all(self) -> None:
        # Only non-empty if a step raised between the hooks: never leave the factor in group["lr"].
        for key in list(self._pending):
            self._restore(key)

    # -- checkpoint state -------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        # Built from constructor arguments only, so it is the same at load time and at save time.
        return self._generate_state_key(**self._key_args)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "warmup_steps": self.total_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])


class LEGW(LinearWarmup):
    """Linear-Epoch Gradual Warmup (You et al. 2019): scale a recipe tuned at batch ``B0`` to batch ``B``.

    At train start, with ``k = B / B0`` and ``B = per-device batch * world_size *
    accumulate_grad_batches``, every param group's lr (the lr tuned at ``B0``) is multiplied once by
    ``sqrt(k)`` ("sqrt"), ``k`` ("linear") or 1 ("none"), and the linear warmup lasts
    ``k * base_warmup_epochs`` epochs (the same number of optimizer steps as at ``B0``). Scheduler
    base lrs are scaled with the groups, so the whole schedule is scaled; absolute floors
    (``eta_min``, ReduceLROnPlateau ``min_lr``) are left as configured.

    Args:
        base_batch_size: ``B0``, the global batch size the optimizer's lr was tuned for.
        base_warmup_epochs: ``w0``, the warmup length in epochs at ``B0``.
        lr_scaling: peak-lr rule: "sqrt" (LEGW), "linear" or "none".
        start_factor: the warmup ramp's value at progress 0, in ``[0, 1)``.
        global_batch_size: ``B`` override; by default it is computed from the trainer and the
            datamodule's ``batch_size`` (or the train dataloader's). A DDP callback can also call
            :meth:`set_global_batch_size` before training starts.

    The scale is recorded in each param group (key ``legw_lr_scale``) and in the callback state,
    so it is never applied twice, on resume or otherwise.
    """

    def __init__(
        self,
        base_batch_size: int,
        base_warmup_epochs: float,
        lr_scaling: LRScaling = "sqrt",
        start_factor: float = 0.0,
        global_batch_size: int | None = None,
    ) -> None:
        if not _is_int(base_batch_size) or base_batch_size < 1:
            self._fail("base_batch_size", f"must be an integer >= 1, got {base_batch_size!r}")
        if not _is_number(base_warmup_epochs) or base_warmup_epochs <= 0:
            self._fail("base_warmup_epochs", f"must be a number > 0, got {base_warmup_epochs!r}")
        if lr_scaling not in LR_SCALING_RULES:
            self._fail("lr_scaling", f"must be one of {list(LR_SCALING_RULES)}, got {lr_scaling!r}")
        super().__init__(warmup_epochs=float(base_warmup_epochs), start_factor=start_factor)
        self.base_batch_size = base_batch_size
        self.base_warmup_epochs = float(base_warmup_epochs)
        self.lr_scaling: LRScaling = lr_scaling
        self.global_batch_size: int | None = None
        if global_batch_size is not None:
            self.set_global_batch_size(global_batch_size)
        self.resolved_global_batch_size: int | None = None
        self.k: float | None = None
        self.lr_scale: float | None = None
        self._restored: dict[str, Any] | None = None
        self._key_args = {
            "base_batch_size": base_batch_size,
            "base_warmup_epochs": self.base_warmup_epochs,
            "lr_scaling": lr_scaling,
        }

    @classmethod
    def example(cls) -> LEGW:
        """A small instance for registry-wide tests: B0 = 16, half an epoch of warmup at B0."""
        return cls(base_batch_size=16, base_warmup_epochs=0.5)

    def set_global_batch_size(self, global_batch_size: int) -> None:
        """Fix ``B`` (examples per optimizer step over all devices) instead of computing it."""
        if not _is_int(global_batch_size) or global_batch_size < 1:
            self._fail("global_batch_size", f"must be an integer >= 1, got {global_batch_size!r}")
        self.global_batch_size = global_batch_size

    def resolve_global_batch_size(self, trainer: L.Trainer) -> int:
        """``B``: the override, else per-device batch * world size * accumulate_grad_batches."""
        if self.global_batch_size is not None:
            return self.global_batch_size
        per_device = _per_device_batch_size(trainer)
        if per_device is None:
            self._fail(
                "global_batch_size",
                "is needed: the per-device batch size is neither trainer.datamodule.batch_size nor "
                "the train dataloader's batch_size; pass global_batch_size=B",
            )
        assert per_device is not None
        return per_device * int(trainer.world_size) * int(trainer.accumulate_grad_batches)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        global_batch = self.resolve_global_batch_size(trainer)
        k = batch_ratio(global_batch, self.base_batch_size)
        restored, self._restored = self._restored, None
        if restored is not None and restored.get("k") is not None and not math.isclose(restored["k"], k):
            # The optimizer state already holds lrs scaled for the checkpoint's batch: stay with it.
            rank_zero_warn(
                f"LEGW: resumed with global batch {global_batch}, but the checkpoint was scaled for "
                f"{restored['global_batch_size']}; keeping the checkpoint's k = {restored['k']:g}"
            )
            global_batch, k = int(restored["global_batch_size"]), float(restored["k"])
        self.resolved_global_batch_size = global_batch
        self.k = k
        self.lr_scale = legw_lr_scale(k, self.lr_scaling)
        self.warmup_epochs = legw_warmup_epochs(k, self.base_warmup_epochs)
        newly_scaled = _scale_learning_rates(trainer, self.lr_scale)
        super().on_train_start(trainer, pl_module)
        peak_lrs = [group["lr"] for opt in trainer.optimizers for group in opt.param_groups]
        rank_zero_info(
            f"LEGW: global batch {global_batch} = {k:g} x {self.base_batch_size}; lr x {self.lr_scale:.4g} "
            f"({self.lr_scaling}) -> {peak_lrs}{'' if newly_scaled else ' (already scaled)'}; warmup "
            f"{self.warmup_epochs:g} epochs = {self.total_steps} optimizer steps"
        )
        _log_run_config(
            trainer,
            {
                "legw/global_batch_size": global_batch,
                "legw/k": k,
                "legw/lr_scale": self.lr_scale,
                "legw/peak_lr": peak_lrs[0] if peak_lrs else None,
                "legw/warmup_epochs": self.warmup_epochs,
                "legw/warmup_steps": self.total_steps,
            },
        )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(global_batch_size=self.resolved_global_batch_size, k=self.k, lr_scale=self.lr_scale)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._restored = dict(state_dict)


def _first_dataloader(loaders: Any) -> DataLoader[Any] | None:
    """The first DataLoader in what ``trainer.train_dataloader`` returns (a loader or a collection)."""
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, Iterable) and isinstance(loaders, (list, tuple)):
        for item in loaders:
            found = _first_dataloader(item)
            if found is not None:
                return found
    return None


def _per_device_batch_size(trainer: L.Trainer) -> int | None:
    """Examples per batch per device: ``trainer.datamodule.batch_size``, else the train loader's."""
    # Lightning's DataConnector sets trainer.datamodule on the instance; Trainer does not declare it.
    datamodule = trainer.datamodule  # type: ignore[attr-defined]
    size = getattr(datamodule, "batch_size", None) if datamodule is not None else None
    if _is_int(size) and size > 0:
        return int(size)
    loader = _first_dataloader(trainer.train_dataloader)
    if loader is None:
        return None
    # A loader built with batch_sampler= has batch_size None; the sampler usually knows it.
    size = loader.batch_size
    if size is None:
        size = getattr(loader.batch_sampler, "batch_size", None)
    return int(size) if _is_int(size) and size > 0 else None


def _scale_learning_rates(trainer: L.Trainer, scale: float) -> bool:
    """Multiply every not-yet-scaled param group's lrs, and its schedulers' base lrs, by ``scale``.

    Returns whether anything was scaled (False on resume: the groups carry the marker already).
    """
    scaled_optimizers = []
    for optimizer in trainer.optimizers:
        fresh = [group for group in optimizer.param_groups if LEGW_GROUP_KEY not in group]
        for group in fresh:
            scale_group_lrs(group, scale)
            group[LEGW_GROUP_KEY] = scale
        if fresh:
            scaled_optimizers.append(optimizer)
    seen: set[int] = set()
    for config in trainer.lr_scheduler_configs:
        if any(getattr(config.scheduler, "optimizer", None) is opt for opt in scaled_optimizers):
            scale_scheduler_lrs(config.scheduler, scale, seen)
    return bool(scaled_optimizers)


def _log_run_config(trainer: L.Trainer, values: dict[str, Any]) -> None:
    for logger in trainer.loggers:
        logger.log_hyperparams(values)
