"""Replay's reservoir memory: fill, bound, uniform inclusion, per-class reservoirs, errors."""

from __future__ import annotations

import pytest
import torch

from litplug.plugins.replay.functional import ReservoirMemory, reservoir_slots


def test_reservoir_fills_in_order_then_never_exceeds_capacity() -> None:
    memory = ReservoirMemory(capacity=10)
    memory.add(torch.arange(6.0)[:, None], torch.zeros(6, dtype=torch.long), task=0)
    assert len(memory) == 6 and memory.inputs[:6, 0].tolist() == [0, 1, 2, 3, 4, 5]
    memory.add(torch.arange(6.0, 100.0)[:, None], torch.zeros(94, dtype=torch.long), task=1)
    assert len(memory) == 10 and int(memory.seen[0]) == 100


def test_every_stream_item_is_kept_with_probability_capacity_over_n() -> None:
    """Algorithm R: after n items each one is in the reservoir with probability k/n."""
    generator = torch.Generator().manual_seed(0)
    kept = torch.zeros(50)
    trials = 2000
    for _ in range(trials):
        memory = ReservoirMemory(capacity=5)
        memory.add(
            torch.arange(50.0)[:, None], torch.zeros(50, dtype=torch.long), task=0, generator=generator
        )
        kept[memory.inputs[:, 0].long()] += 1
    rate = kept / trials
    assert torch.allclose(rate, torch.full((50,), 5 / 50), atol=0.035), rate
    assert rate[:5].mean() < 0.2  # the first items are not favoured


def test_slots_while_filling_are_positions() -> None:
    assert reservoir_slots(0, 4, capacity=10, generator=None).tolist() == [0, 1, 2, 3]


def test_per_class_reservoirs_keep_capacity_per_class() -> None:
    memory = ReservoirMemory(capacity=3, num_classes=2)
    labels = torch.tensor([0] * 20 + [1] * 2)
    memory.add(torch.randn(22, 4), labels, task=0)
    stored = memory.labels[memory.filled]
    assert (stored == 0).sum() == 3 and (stored == 1).sum() == 2
    with pytest.raises(ValueError, match="outside"):
        memory.add(torch.randn(1, 4), torch.tensor([5]), task=0)


def test_sampling_returns_stored_triples_and_refuses_an_empty_memory() -> None:
    memory = ReservoirMemory(capacity=4)
    with pytest.raises(ValueError, match="empty"):
        memory.sample(2)
    memory.add(torch.tensor([[1.0], [2.0]]), torch.tensor([3, 4]), task=7)
    inputs, labels, tasks = memory.sample(16)
    assert set(inputs[:, 0].tolist()) <= {1.0, 2.0}
    assert all(int(label) == int(x) + 2 for x, label in zip(inputs[:, 0], labels, strict=True))
    assert tasks.eq(7).all()
    with pytest.raises(ValueError, match="capacity"):
        ReservoirMemory(capacity=0)
