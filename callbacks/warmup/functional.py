"""Warmup and LEGW math in plain Python: no Lightning, no torch state.

Linear warmup multiplies the learning rate of optimizer step ``t`` (0-based) by

    factor(t) = start_factor + (1 - start_factor) * min(1, (t + 1) / W)

over ``W`` warmup steps, so the very first step already moves and step ``W - 1`` is the first at the
full learning rate. LEGW (You et al. 2019, "Large-batch training for LSTM and beyond") scales a
recipe tuned at batch ``B0`` to batch ``B = k * B0``: peak learning rate ``sqrt(k) * lr0`` and
warmup ``k * w0`` epochs, which is the same number of optimizer steps as at ``B0``.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

__all__ = [
    "LR_SCALING_RULES",
    "LRScaling",
    "batch_ratio",
    "epochs_to_steps",
    "legw_lr_scale",
    "legw_warmup_epochs",
    "optimizer_steps_per_epoch",
    "warmup_factor",
    "warmup_factor_at_step",
]

LRScaling = Literal["sqrt", "linear", "none"]
LR_SCALING_RULES: tuple[str, ...] = get_args(LRScaling)


def warmup_factor(progress: float, start_factor: float = 0.0) -> float:
    """Linear ramp from ``start_factor`` at ``progress`` 0 to 1 at ``progress`` >= 1."""
    clamped = min(max(progress, 0.0), 1.0)
    return start_factor + (1.0 - start_factor) * clamped


def warmup_factor_at_step(step: int, warmup_steps: int, start_factor: float = 0.0) -> float:
    """Factor for the optimizer step with 0-based index ``step`` in a warmup of ``warmup_steps``."""
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
    # (step + 1): a step taken at factor start_factor = 0 would be wasted.
    return warmup_factor((step + 1) / warmup_steps, start_factor)


def optimizer_steps_per_epoch(num_batches: int, accumulate_grad_batches: int = 1) -> int:
    """Optimizer steps in an epoch of ``num_batches`` batches.

    Lightning steps after every ``accumulate_grad_batches`` batches and once more at the end of an
    epoch for a final partial accumulation, hence the ceiling.
    """
    if num_batches < 1 or accumulate_grad_batches < 1:
        raise ValueError(
            "num_batches and accumulate_grad_batches must be >= 1, "
            f"got {num_batches} and {accumulate_grad_batches}"
        )
    return math.ceil(num_batches / accumulate_grad_batches)


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """Warmup ``epochs`` as a whole number of optimizer steps (rounded up, at least 1)."""
    # Subtract a hair before the ceiling so 0.3 * 10 (= 3.0000000000000004) stays 3.
    return max(1, math.ceil(epochs * steps_per_epoch - 1e-9))


def batch_ratio(global_batch_size: int, base_batch_size: int) -> float:
    """``k = B / B0``: how many times larger the global batch is than the tuned one."""
    if global_batch_size < 1 or base_batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got B={global_batch_size}, B0={base_batch_size}")
    return global_batch_size / base_batch_size


def legw_lr_scale(k: float, rule: LRScaling = "sqrt") -> float:
    """Peak learning-rate multiplier at ``k`` times the base batch: sqrt(k), k or 1."""
    if rule == "sqrt":
        return math.sqrt(k)
    if rule == "linear":
        return k
    if rule == "none":
        return 1.0
    raise ValueError(f"lr scaling rule must be one of {LR_SCALING_RULES}, got {rule!r}")


def legw_warmup_epochs(k: float, base_warmup_epochs: float) -> float:
    """Warmup length in epochs at ``k`` times the base batch: ``k * w0`` (constant in iterations)."""
    return k * base_warmup_epochs
