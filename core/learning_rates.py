"""Scaling an optimizer's learning rates together with its schedulers' stored copies (pure torch).

A scheduler keeps lrs derived from the base lr (``base_lrs``, OneCycleLR's ``max_lrs``) and a param
group may keep several (``initial_lr``, ``max_lr``, ``min_lr``): changing only ``group["lr"]`` would
be undone by the next scheduler step. Used by LEGW's lr scaling and by ``LitplugModule.lr``.
"""

from __future__ import annotations

from typing import Any

#: Param-group keys that hold learning rates (OneCycleLR keeps max_lr/min_lr/initial_lr there).
GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
#: Scheduler attributes that hold learning rates derived from the base lr.
SCHEDULER_LR_ATTRS = ("base_lrs", "max_lrs", "_last_lr")


def scale_group_lrs(group: dict[str, Any], factor: float) -> None:
    """Multiply every learning rate a param group holds by ``factor``."""
    for key in GROUP_LR_KEYS:
        if group.get(key) is not None:  # a float, or a tensor lr (capturable optimizers)
            group[key] = group[key] * factor


def scale_scheduler_lrs(scheduler: Any, factor: float, seen: set[int]) -> None:
    """Multiply a scheduler's stored lrs (and its SequentialLR/ChainedScheduler children's) by
    ``factor``, each scheduler once (``seen`` holds the ids already scaled)."""
    if id(scheduler) in seen:
        return
    seen.add(id(scheduler))
    for attr in SCHEDULER_LR_ATTRS:
        values = getattr(scheduler, attr, None)
        if isinstance(values, list):
            setattr(scheduler, attr, [v * factor for v in values])
    for child in getattr(scheduler, "_schedulers", []) or []:
        scale_scheduler_lrs(child, factor, seen)


def set_first_group_lr(optimizer: Any, schedulers: list[Any], lr: float) -> None:
    """Make the first param group's lr ``lr``, scaling every group's lrs and the schedulers' stored
    lrs by the same factor: group ratios and the schedule's shape are kept."""
    factor = lr / float(optimizer.param_groups[0]["lr"])
    for group in optimizer.param_groups:
        scale_group_lrs(group, factor)
    seen: set[int] = set()
    for scheduler in schedulers:
        scale_scheduler_lrs(scheduler, factor, seen)
