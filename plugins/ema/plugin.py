"""The EMA plugin: update an averaged copy after each optimizer step, evaluate with it."""

from __future__ import annotations

import itertools
from typing import Any, cast

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from litplug.core import distributed
from litplug.core.hookspecs import hookimpl
from litplug.core.plugin import Plugin

from .functional import make_averaged_model


class EMA(Plugin):
    """Exponential moving average of the weights, swapped in for validation and test (a temporal ensemble).

    Polyak & Juditsky 1992; as used by e.g. Tarvainen & Valpola 2017 (mean teacher) and most modern
    training recipes. Built on ``torch.optim.swa_utils.AveragedModel`` (what Lightning's
    ``EMAWeightAveraging`` uses); see the README for why the Lightning callback itself is not used.

    Args:
        decay: EMA decay ``d`` in ``theta_ema <- d theta_ema + (1 - d) theta`` (0.99 to 0.9999 usual).
        warmup: ramp the decay as ``min(d, (1 + t) / (10 + t))`` (``t`` = updates so far), so short
            runs do not evaluate an average dominated by the first weights.
        update_every_n_steps: update after every n-th optimizer step.
        start_step: first optimizer step (0-based) that updates the average; the first update
            copies the weights.
        use_buffers: average the buffers too (BatchNorm running statistics then match the averaged
            weights); otherwise the live buffers are used with the averaged parameters.
    """

    name = "ema"
    run_after = ("ensemble", "mimo")  # average whatever model the surgery built

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        use_buffers: bool = True,
    ) -> None:
        self.check_range("decay", decay, low=0.0, high=1.0, high_inclusive=False)
        self.check(
            isinstance(update_every_n_steps, int) and update_every_n_steps >= 1,
            "update_every_n_steps",
            f"must be an integer >= 1, got {update_every_n_steps!r}",
        )
        self.check(
            isinstance(start_step, int) and start_step >= 0,
            "start_step",
            f"must be an integer >= 0, got {start_step!r}",
        )
        self.decay = decay
        self.warmup = warmup
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self.use_buffers = use_buffers
        self.averaged: AveragedModel | None = None
        self.last_update_step = -1
        self._pending_state: dict[str, Tensor] | None = None
        self._backup: list[Tensor] | None = None

    @classmethod
    def example(cls) -> EMA:
        return cls(decay=0.9)

    # -- the averaged copy (plugin-owned: not registered in the LightningModule) --------------------

    # The hooks get the LitplugModule, whose ``model`` is an nn.Module; read through LightningModule's
    # ``__getattr__`` mypy only sees ``Tensor | Module``, hence the casts (no runtime effect).
    def _ensure_averaged(self, module: L.LightningModule) -> AveragedModel:
        if self.averaged is None:
            self.averaged = make_averaged_model(
                cast(nn.Module, module.model), self.decay, self.warmup, self.use_buffers
            )
            if self._pending_state is not None:
                self.averaged.load_state_dict(self._pending_state)
                self._pending_state = None
        self.averaged.to(module.device)
        return self.averaged

    def _tensors(self, model: nn.Module) -> list[Tensor]:
        if self.use_buffers:
            return list(itertools.chain(model.parameters(), model.buffers()))
        return list(model.parameters())

    def has_average(self) -> bool:
        """Whether at least one update has happened (a restored average counts)."""
        if self._pending_state is not None:
            return int(self._pending_state["n_averaged"]) > 0
        return self.averaged is not None and int(self.averaged.n_averaged) > 0

    @property
    def num_updates(self) -> int:
        if self._pending_state is not None:
            return int(self._pending_state["n_averaged"])
        return 0 if self.averaged is None else int(self.averaged.n_averaged)

    # -- training ---------------------------------------------------------------------------------

    @hookimpl
    def litplug_on_fit_start(self, module: L.LightningModule) -> None:
        self._ensure_averaged(module)

    def should_update(self, step_index: int) -> bool:
        """Update after optimizer step ``step_index`` (0-based)?"""
        if step_index < self.start_step:
            return False
        return (step_index - self.start_step) % self.update_every_n_steps == 0

    @hookimpl
    def litplug_on_train_batch_end(self, module: L.LightningModule) -> None:
        # Fired before ModelCheckpoint's on_train_batch_end (see the hookspec), so a checkpoint
        # saved at this step holds this step's update.
        self._update_if_due(module)

    def _update_if_due(self, module: L.LightningModule) -> None:
        step = int(module.global_step)  # optimizer steps taken, this batch's included
        if step <= self.last_update_step:
            return  # already done, or gradient accumulation: no optimizer step since the last update
        if self.should_update(step - 1):
            averaged = self._ensure_averaged(module)
            averaged.update_parameters(cast(nn.Module, module.model))
            if self.use_buffers and distributed.is_distributed():
                self._broadcast_averaged_buffers(averaged)
        self.last_update_step = step

    @staticmethod
    def _broadcast_averaged_buffers(averaged: AveragedModel) -> None:
        # Under DDP each rank's BatchNorm statistics come from its own shard. DDP makes the live
        # model's buffers rank zero's at every forward; the average gets the same rule, else each
        # rank evaluates with its own statistics and a resumed rank (which loads rank zero's
        # checkpoint) would continue from another history than the one it had.
        # One collective per dtype, not one per buffer: this runs after every update. Integer
        # buffers (num_batches_tracked) count steps, equal on every rank.
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for buffer in averaged.module.buffers():
            if buffer.is_floating_point():
                by_dtype.setdefault(buffer.dtype, []).append(buffer)
        with torch.no_grad():
            for buffers in by_dtype.values():
                flat = distributed.broadcast_(torch.cat([b.reshape(-1) for b in buffers]))
                for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
                    buffer.copy_(value.view_as(buffer))

    # -- evaluation: swap the average in, and the training weights back --------------------------

    @hookimpl
    def litplug_on_eval_start(self, module: L.LightningModule) -> None:
        if not self.has_average() or self._backup is not None:
            return  # nothing averaged yet (e.g. the sanity check): evaluate the live weights
        averaged = self._ensure_averaged(module)
        live = self._tensors(cast(nn.Module, module.model))
        self._backup = [t.detach().clone() for t in live]
        with torch.no_grad():
            for target, source in zip(live, self._tensors(averaged.module), strict=True):
                target.copy_(source)

    @hookimpl
    def litplug_on_eval_end(self, module: L.LightningModule) -> dict[str, float] | None:
        if not self._restore_training_weights(module):
            return None
        return {"ema_updates": float(self.num_updates)}

    @hookimpl
    def litplug_on_eval_interrupted(self, module: L.LightningModule) -> None:
        self._restore_training_weights(module)

    def _restore_training_weights(self, module: L.LightningModule) -> bool:
        """Copy the training weights saved at eval start back; ``False`` if none were swapped out."""
        if self._backup is None:
            return False
        with torch.no_grad():
            for target, saved in zip(self._tensors(cast(nn.Module, module.model)), self._backup, strict=True):
                target.copy_(saved)
        self._backup = None
        return True

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._pending_state is not None:
            averaged = dict(self._pending_state)
        elif self.averaged is not None:
            averaged = {k: v.detach().clone() for k, v in self.averaged.state_dict().items()}
        else:
            averaged = {}
        return {"last_update_step": self.last_update_step, "averaged": averaged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_update_step = int(state["last_update_step"])
        averaged = state["averaged"]
        if not averaged:
            return
        if self.averaged is not None:
            self.averaged.load_state_dict(averaged)
        else:  # built lazily once the module (and its device) is known
            self._pending_state = dict(averaged)
