"""Reservoir-sampling replay memory in pure torch (no Lightning).

The memory is a set of fixed-size tensors (inputs, labels, task ids) plus counters, so it can be
checkpointed as plain tensors. Two layouts:

- total: one reservoir of ``capacity`` slots over the whole stream (Vitter's algorithm R: the n-th
  sample seen replaces a uniformly drawn slot with probability ``capacity / n``), so the memory is a
  uniform sample of everything seen.
- per class: one reservoir of ``capacity`` slots for each class (class-balanced memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ReservoirMemory", "reservoir_slots"]


def reservoir_slots(seen_before: int, count: int, capacity: int, generator: torch.Generator | None) -> Tensor:
    """Slots for ``count`` new stream items after ``seen_before`` items (``-1``: not stored).

    Item ``k`` (0-based position ``n = seen_before + k`` in the stream) goes to slot ``n`` while the
    reservoir fills, then to a uniform slot in ``[0, n]`` that is kept only if ``< capacity``.
    """
    positions = torch.arange(seen_before, seen_before + count)
    draws = (torch.rand(count, generator=generator) * (positions + 1).double()).floor().long()
    slots = torch.where(positions < capacity, positions, draws)
    return torch.where(slots < capacity, slots, torch.full_like(slots, -1))


@dataclass
class ReservoirMemory:
    """Reservoir memory of ``(input, label, task)`` triples.

    Args:
        capacity: slots in total, or per class when ``num_classes`` is given.
        num_classes: ``None`` for one reservoir; otherwise one reservoir per class.
    """

    capacity: int
    num_classes: int | None = None
    inputs: Tensor | None = None
    labels: Tensor | None = None
    tasks: Tensor | None = None
    filled: Tensor | None = None  # bool per slot
    seen: Tensor | None = None  # items seen: [1] total or [num_classes] per class

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if self.seen is None:
            self.seen = torch.zeros(1 if self.num_classes is None else self.num_classes, dtype=torch.long)

    @property
    def slots(self) -> int:
        return self.capacity * (1 if self.num_classes is None else self.num_classes)

    def __len__(self) -> int:
        return 0 if self.filled is None else int(self.filled.sum())

    def _allocate(self, inputs: Tensor, labels: Tensor) -> None:
        self.inputs = inputs.new_zeros((self.slots, *inputs.shape[1:]))
        self.labels = labels.new_zeros(self.slots)
        self.tasks = torch.zeros(self.slots, dtype=torch.long, device=labels.device)
        self.filled = torch.zeros(self.slots, dtype=torch.bool, device=labels.device)

    def add(
        self, inputs: Tensor, labels: Tensor, task: int, generator: torch.Generator | None = None
    ) -> None:
        """Offer a batch to the reservoir (in order); draws come from ``generator`` or the global RNG."""
        inputs, labels = inputs.detach(), labels.detach()
        if self.inputs is None:
            self._allocate(inputs, labels)
        assert self.inputs is not None and self.labels is not None and self.tasks is not None
        assert self.filled is not None and self.seen is not None
        if self.num_classes is None:
            slots = reservoir_slots(int(self.seen[0]), len(labels), self.capacity, generator)
            self.seen[0] += len(labels)
        else:
            slots = torch.full((len(labels),), -1, dtype=torch.long)
            for cls in labels.unique(sorted=True).tolist():
                if not 0 <= cls < self.num_classes:
                    raise ValueError(f"label {cls} outside [0, {self.num_classes})")
                where = (labels == cls).nonzero().squeeze(1).cpu()
                local = reservoir_slots(int(self.seen[cls]), len(where), self.capacity, generator)
                self.seen[cls] += len(where)
                slots[where] = torch.where(local >= 0, local + cls * self.capacity, local)
        # Later items overwrite earlier ones that drew the same slot, as in the sequential algorithm.
        for index in (slots >= 0).nonzero().squeeze(1).tolist():
            slot = int(slots[index])
            self.inputs[slot] = inputs[index]
            self.labels[slot] = labels[index]
            self.tasks[slot] = task
            self.filled[slot] = True

    def sample(self, count: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``count`` stored triples drawn uniformly with replacement (global RNG by default)."""
        if len(self) == 0:
            raise ValueError("the replay memory is empty")
        assert self.filled is not None and self.inputs is not None
        assert self.labels is not None and self.tasks is not None
        stored = self.filled.nonzero().squeeze(1)
        picks = torch.randint(0, len(stored), (count,), generator=generator)
        index = stored[picks.to(stored.device)]
        return self.inputs[index], self.labels[index], self.tasks[index]

    def to(self, device: torch.device) -> ReservoirMemory:
        for name in ("inputs", "labels", "tasks", "filled"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def state_dict(self) -> dict[str, object]:
        return {
            "capacity": self.capacity,
            "num_classes": self.num_classes,
            "inputs": self.inputs,
            "labels": self.labels,
            "tasks": self.tasks,
            "filled": self.filled,
            "seen": self.seen,
        }

    @classmethod
    def from_state(cls, state: dict[str, object]) -> ReservoirMemory:
        return cls(**state)  # type: ignore[arg-type]
