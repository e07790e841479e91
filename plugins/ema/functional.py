"""Exponential moving average of weights, in pure torch, on top of ``torch.optim.swa_utils``.

``theta_ema <- d_t * theta_ema + (1 - d_t) * theta`` after each optimizer step, with
``theta_ema`` initialised to a copy of the weights at the first update (``AveragedModel`` copies
when it has averaged nothing yet). Because the average starts from real weights, not from zero, it
needs no Adam-style bias correction (``/(1 - d^t)`` corrects a zero start). What it can need in
short runs is warmup: with ``d = 0.999`` the average remembers the random start for thousands of
steps, so by default the decay ramps up as in TensorFlow's ``ExponentialMovingAverage`` with
``num_updates``: ``d_t = min(d, (1 + t) / (10 + t))``, ``t`` the number of updates averaged so far.

Integer buffers (BatchNorm's ``num_batches_tracked``) cannot be averaged; they are copied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["ema_decay", "ema_multi_avg_fn", "ema_update_reference", "make_averaged_model"]

# AveragedModel's contract: the tensor groups may come as lists or tuples (it passes lists today).
TensorList = list[Tensor] | tuple[Tensor, ...]
MultiAvgFn = Callable[[TensorList, TensorList, Tensor | int], None]


def ema_decay(decay: float, num_updates: int, warmup: bool) -> float:
    """The decay used at update number ``num_updates`` (1 for the first update after the copy)."""
    if not warmup:
        return decay
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


def ema_multi_avg_fn(decay: float, warmup: bool) -> MultiAvgFn:
    """``multi_avg_fn`` for :class:`AveragedModel`: one fused ``lerp`` per dtype/device group.

    ``torch.optim.swa_utils.get_ema_multi_avg_fn`` does the same without warmup (and rounds integer
    buffers through a float blend); this one adds the warmup and copies integer tensors.
    """

    @torch.no_grad()
    def update(averaged: TensorList, current: TensorList, num_averaged: Tensor | int) -> None:
        weight = 1.0 - ema_decay(decay, int(num_averaged), warmup)
        if averaged[0].is_floating_point() or averaged[0].is_complex():
            torch._foreach_lerp_(averaged, current, weight)
        else:
            torch._foreach_copy_(averaged, current)

    return update


def make_averaged_model(model: nn.Module, decay: float, warmup: bool, use_buffers: bool) -> AveragedModel:
    """An :class:`AveragedModel` (a deep copy of ``model``) updated by :func:`ema_multi_avg_fn`."""
    return AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(decay, warmup), use_buffers=use_buffers)


def ema_update_reference(averaged: Tensor, current: Tensor, decay: float) -> Tensor:
    """The formula, written out: ``decay * averaged + (1 - decay) * current`` (for tests)."""
    return decay * averaged + (1.0 - decay) * current
