"""Replay: the reservoir memory (fill, bound, uniform inclusion, per-class, errors) and the plugin in a run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import Callback

from litplug.core.continual import ContinualLearning, fit_continual
from litplug.core.data.continual import SplitDigitsDataModule
from litplug.core.models import MLP
from litplug.core.module import LitplugModule
from litplug.plugins.replay import Replay
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


# -- the plugin inside a real run ------------------------------------------------------------------


def _two_split_tasks() -> SplitDigitsDataModule:
    return SplitDigitsDataModule(
        classes_per_task=5, scenario="class", epochs_per_task=1, batch_size=32, seed=0
    )


def _row_labels(data: SplitDigitsDataModule) -> dict[tuple[float, ...], int]:
    """Every training input of both tasks (as a tuple) -> its label."""
    data.setup()
    rows = {}
    for task in range(data.num_tasks):
        for inputs, targets in data.task_loader(task, "train"):
            for x, y in zip(inputs, targets, strict=True):
                rows[tuple(x.tolist())] = int(y)
    return rows


class _EpochOfBatch(Callback):
    def __init__(self) -> None:
        self.epochs: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self.epochs.append(int(trainer.current_epoch))


def test_replay_mixes_memory_samples_into_the_next_tasks_batches_and_checkpoints_its_memory(
    tmp_path: Path,
) -> None:
    data = _two_split_tasks()
    rows = _row_labels(data)
    task0_classes = set(data.task_classes[0])
    L.seed_everything(0)
    model = MLP(64, [32], 10)
    seen_by_model: list[torch.Tensor] = []
    model.register_forward_pre_hook(
        lambda m, args: seen_by_model.append(args[0].detach().clone()) if m.training else None
    )
    module = LitplugModule(
        model,
        plugins=[Replay(memory_size=40, replay_batch_size=16)],
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
    )
    epochs = _EpochOfBatch()
    trainer = quiet_trainer(
        callbacks=[ContinualLearning(results_file=None, heatmap=False), epochs], limit_val_batches=0
    )
    fit_continual(module, _two_split_tasks(), trainer=trainer)
    assert len(seen_by_model) == len(epochs.epochs)
    task1 = [x for x, epoch in zip(seen_by_model, epochs.epochs, strict=True) if epoch == 1]
    assert task1, "no task-1 batches"
    replayed_old = 0
    for index, x in enumerate(task1):
        labels = [rows[tuple(row.tolist())] for row in x]  # every row is a real training example
        new, replayed = labels[:-16], labels[-16:]
        assert (len(new) == 32 or index == len(task1) - 1) and all(y not in task0_classes for y in new)
        replayed_old += sum(y in task0_classes for y in replayed)
        if index == 0:  # the memory holds only task 0 when task 1 starts
            assert all(y in task0_classes for y in replayed), replayed
    assert replayed_old > 0.4 * 16 * len(task1)  # the reservoir still holds a good share of task 0

    plugin = module.get_plugin("replay")
    path = tmp_path / "replay.ckpt"
    trainer.save_checkpoint(path)
    fresh = LitplugModule(MLP(64, [32], 10), plugins=[Replay(memory_size=40, replay_batch_size=16)])
    fresh.on_load_checkpoint(torch.load(path, weights_only=False))
    restored = fresh.get_plugin("replay")
    assert restored.current_task == plugin.current_task == 1
    assert len(restored.memory) == len(plugin.memory) == 40
    for field in ("inputs", "labels", "tasks", "filled", "seen"):
        assert torch.equal(getattr(restored.memory, field), getattr(plugin.memory, field)), field
    assert set(plugin.memory.tasks[plugin.memory.filled].tolist()) == {0, 1}


def test_replay_leaves_evaluation_batches_alone() -> None:
    plugin = Replay(memory_size=8, replay_batch_size=4)

    class _Module:
        model = None
        num_classes = 10

    batch = (torch.randn(5, 3), torch.arange(5))
    assert plugin.litplug_transform_batch(_Module(), batch, "train") is None  # fills, nothing to replay yet
    mixed = plugin.litplug_transform_batch(_Module(), batch, "train")
    assert mixed[0].shape[0] == 9 and mixed[1].shape[0] == 9
    assert plugin.litplug_transform_batch(_Module(), batch, "val") is None
