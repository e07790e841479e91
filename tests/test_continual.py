"""Task sequences, the TaskHeads wrapper, accuracy-matrix metrics and the continual driver."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import KillAtStep, Killed, assert_same_state, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from litplug.core.continual import (
    ContinualLearning,
    ContinualResults,
    ContinualSetupError,
    TaskHeads,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    fit_continual,
)
from litplug.core.data import DigitsDataModule
from litplug.core.data.continual import (
    PermutedDigitsDataModule,
    SplitDigitsDataModule,
    TaskListDataModule,
)
from litplug.core.hookspecs import hookimpl
from litplug.core.models import MLP
from litplug.core.module import LitplugModule
from litplug.core.plugin import Plugin
from litplug.plugins.ewc import EWC

# -- metrics --------------------------------------------------------------------------------------

MATRIX = [[0.9], [0.6, 0.8], [0.5, 0.7, 1.0]]


def test_matrix_metrics_match_hand_computation() -> None:
    assert average_accuracy(MATRIX) == pytest.approx((0.5 + 0.7 + 1.0) / 3)
    # forgetting: task 0 best 0.9 -> 0.5 (0.4), task 1 best 0.8 -> 0.7 (0.1)
    assert average_forgetting(MATRIX) == pytest.approx(0.25)
    assert backward_transfer(MATRIX) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert average_forgetting([[0.7]]) == 0.0 and backward_transfer([[0.7]]) == 0.0


def test_forgetting_uses_the_best_earlier_accuracy_not_the_first() -> None:
    matrix = [[0.5], [0.9, 0.8], [0.4, 0.8, 0.9]]  # task 0 improved after task 1, then dropped
    assert average_forgetting(matrix) == pytest.approx(((0.9 - 0.4) + 0.0) / 2)


def test_results_table_and_dict() -> None:
    results = ContinualResults([row[:] for row in MATRIX], num_tasks=3, scenario="class")
    table = results.table()
    assert "avg_acc" in table and "0.700" in table
    data = results.to_dict()
    assert data["accuracy_matrix"] == MATRIX and data["tasks_trained"] == 3


def test_bad_matrix_is_rejected() -> None:
    with pytest.raises(ValueError):
        average_accuracy([[0.5], [0.5]])  # row 1 lacks task 1


# -- task sequences -------------------------------------------------------------------------------


def test_split_digits_tasks_are_disjoint_seeded_and_hold_only_their_classes() -> None:
    data = SplitDigitsDataModule(seed=3)
    classes = data.task_classes
    assert len(classes) == 5 and all(len(c) == 2 for c in classes)
    assert sorted(c for task in classes for c in task) == list(range(10))
    assert SplitDigitsDataModule(seed=3).task_classes == classes
    assert SplitDigitsDataModule(seed=4).task_classes != classes
    assert SplitDigitsDataModule(shuffle_classes=False).task_classes[0] == [0, 1]
    for task, labels in enumerate(classes):
        for split in ("train", "val", "test"):
            y = data.task_dataset(task, split).tensors[1]
            assert set(y.unique().tolist()) == set(labels)


def test_permuted_digits_permutations_are_fixed_distinct_and_keep_labels() -> None:
    data = PermutedDigitsDataModule(num_tasks=3, seed=1, form="image")
    again = PermutedDigitsDataModule(num_tasks=3, seed=1)
    assert torch.equal(data.permutations, again.permutations)
    assert torch.equal(data.permutations[0], torch.arange(64))
    assert not torch.equal(data.permutations[1], data.permutations[2])
    x0, y0 = data.task_dataset(0, "train").tensors
    x2, y2 = data.task_dataset(2, "train").tensors
    assert x0.shape[1:] == (1, 8, 8) and torch.equal(y0, y2)
    assert torch.equal(x0.reshape(len(x0), 64)[:, data.permutations[2]], x2.reshape(len(x2), 64))
    assert data.scenario == "domain" and data.task_classes[1] == list(range(10))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classes_per_task": 3}, "divide"),
        ({"scenario": "domain"}, "task- or class-incremental"),
        ({"epochs_per_task": 0}, "epochs_per_task"),
        ({"scenario": "joint"}, "scenario"),
    ],
)
def test_split_digits_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SplitDigitsDataModule(**kwargs)


def test_epoch_schedule_maps_epochs_to_tasks() -> None:
    data = PermutedDigitsDataModule(num_tasks=3, epochs_per_task=2)
    assert [data.task_of_epoch(e) for e in range(7)] == [0, 0, 1, 1, 2, 2, 2]
    assert [data.is_last_epoch_of_task(e) for e in range(6)] == [False, True, False, True, False, True]
    assert data.total_epochs == 6


# -- TaskHeads ------------------------------------------------------------------------------------


def test_task_heads_mask_other_tasks_and_give_their_rows_no_gradient() -> None:
    torch.manual_seed(0)
    heads = TaskHeads(nn.Linear(4, 6), task_classes=[[0, 1], [2, 3], [4, 5]])
    x = torch.randn(5, 4)
    heads.use_task(1)
    logits = heads(x)
    probs = logits.softmax(-1)
    assert torch.allclose(probs[:, [2, 3]].sum(-1), torch.ones(5))
    nn.functional.cross_entropy(logits, torch.tensor([2, 3, 2, 3, 2])).backward()
    weight_grad = heads.model.weight.grad
    assert weight_grad[[0, 1, 4, 5]].abs().sum() == 0 and weight_grad[[2, 3]].abs().sum() > 0


def test_task_heads_per_sample_tasks_apply_to_one_forward_only() -> None:
    heads = TaskHeads(nn.Linear(3, 4), task_classes=[[0, 1], [2, 3]])
    heads.use_task(0)
    x = torch.randn(2, 3)
    heads.set_sample_tasks(torch.tensor([0, 1]))
    mixed = heads(x).argmax(-1)
    assert mixed[0] in (0, 1) and mixed[1] in (2, 3)
    assert set(heads(x).argmax(-1).tolist()) <= {0, 1}  # back to the active task
    assert heads.task_of_class().tolist() == [0, 0, 1, 1]
    heads.use_task(None)
    assert torch.equal(heads(x), heads.model(x))
    with pytest.raises(ValueError):
        heads.use_task(2)


# -- the driver -----------------------------------------------------------------------------------


class TaskRecorder(Plugin):
    """Records task boundaries and the labels of the loader each task end receives."""

    name = "task_recorder"

    def __init__(self) -> None:
        self.events: list[str] = []
        self.end_labels: list[set[int]] = []

    @hookimpl
    def litplug_on_task_start(self, task_id: int) -> None:
        self.events.append(f"start:{task_id}")

    @hookimpl
    def litplug_on_task_end(self, task_id: int, dataloader: Any) -> None:
        self.events.append(f"end:{task_id}")
        self.end_labels.append({int(y) for _, ys in dataloader for y in ys})


def _module(model: nn.Module, plugins: list[Plugin] | None = None, lr: float = 0.05) -> LitplugModule:
    return LitplugModule(
        model, plugins=plugins or [], optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9)
    )


def test_driver_fires_task_hooks_fills_the_matrix_and_writes_outputs(tmp_path: Path) -> None:
    L.seed_everything(0)
    data = SplitDigitsDataModule(scenario="class", classes_per_task=5, epochs_per_task=2, batch_size=64)
    recorder = TaskRecorder()
    driver = ContinualLearning()
    trainer = quiet_trainer(callbacks=[driver], default_root_dir=tmp_path, limit_val_batches=0, max_epochs=99)
    results = fit_continual(_module(MLP(64, [32], 10), [recorder]), data, trainer=trainer)
    assert trainer.current_epoch == 4  # the driver set max_epochs to 2 tasks x 2 epochs
    assert recorder.events == ["start:0", "end:0", "start:1", "end:1"]
    assert [labels == set(c) for labels, c in zip(recorder.end_labels, data.task_classes, strict=True)] == [
        True,
        True,
    ]
    assert len(results.matrix) == 2 and len(results.matrix[1]) == 2
    assert results.matrix[0][0] > 0.6  # task 0 learned (5 classes, chance 0.2)
    assert results.matrix[1][0] < results.matrix[0][0]  # class-incremental fine-tuning forgets
    written = json.loads((tmp_path / "continual.json").read_text())
    assert written["accuracy_matrix"] == results.matrix and "forgetting" in written
    assert (tmp_path / "accuracy_matrix.png").stat().st_size > 0
    assert trainer.callback_metrics["continual/avg_acc"] == pytest.approx(results.summary()["avg_acc"])


def test_task_incremental_needs_task_heads_and_uses_them() -> None:
    data = SplitDigitsDataModule(scenario="task", classes_per_task=5, batch_size=64)
    with pytest.raises(ContinualSetupError, match="TaskHeads"):
        fit_continual(
            _module(MLP(64, [16], 10)), data, trainer=quiet_trainer(callbacks=[ContinualLearning()])
        )
    L.seed_everything(0)
    heads = TaskHeads(MLP(64, [32], 10))
    trainer = quiet_trainer(
        callbacks=[ContinualLearning(results_file=None, heatmap=False)], limit_val_batches=0
    )
    results = fit_continual(_module(heads), data, trainer=trainer)
    assert heads.task_classes == data.task_classes
    assert min(results.matrix[1]) > 0.6  # a head per task: task 0 stays well above chance (0.2)


class _TensorTask(L.LightningDataModule):
    """A user's own per-task data module (not a litplug one)."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(int(shift * 10))
        self.x = torch.randn(96, 8, generator=generator) + shift
        self.y = (self.x[:, 0] > shift).long()
        self.num_classes = 2

    def _loader(self, shuffle: bool = False) -> torch.utils.data.DataLoader:
        dataset = torch.utils.data.TensorDataset(self.x, self.y)
        return torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=shuffle)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader()

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader()

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader()


def test_a_users_own_task_list_runs_through_the_driver() -> None:
    L.seed_everything(0)
    data = TaskListDataModule([_TensorTask(0.0), _TensorTask(2.0), _TensorTask(-2.0)], epochs_per_task=2)
    assert data.num_classes == 2 and data.scenario == "domain"
    trainer = quiet_trainer(
        callbacks=[ContinualLearning(results_file=None, heatmap=False)], limit_val_batches=0
    )
    results = fit_continual(_module(MLP(8, [16], 2), lr=0.1), data, trainer=trainer)
    assert [len(row) for row in results.matrix] == [1, 2, 3]


def test_driver_rejects_a_plain_data_module() -> None:
    trainer = quiet_trainer(callbacks=[ContinualLearning()], max_steps=1)
    with pytest.raises(ContinualSetupError, match="ContinualDataModule"):
        trainer.fit(_module(MLP(64, [8], 10)), datamodule=DigitsDataModule())


def test_a_continual_run_killed_after_a_task_boundary_resumes_from_the_epoch_end_checkpoint(
    tmp_path: Path,
) -> None:
    """Killed in task 1, resumed from the default epoch-end checkpoint at the end of task 0, saved
    after the task-end hooks (EWC's Fisher) ran: the same accuracy matrix, weights and EWC state.
    (test_ewc.py resumes the driver from a mid-task checkpoint.)"""
    kill_at, resume_from = 25, "epoch=1-step=20.ckpt"  # 10 steps per task epoch

    def run(
        root: Path, callbacks: list[L.Callback], ckpt_path: Path | None = None
    ) -> tuple[Any, LitplugModule]:
        L.seed_everything(0)
        data = SplitDigitsDataModule(scenario="class", classes_per_task=5, epochs_per_task=2, batch_size=64)
        module = _module(MLP(64, [32], 10, dropout=0.2), [EWC(ewc_lambda=10.0, num_samples=64)])
        trainer = quiet_trainer(
            callbacks=[ContinualLearning(), *callbacks],
            default_root_dir=root,
            limit_val_batches=0,
            enable_checkpointing=True,
            deterministic=True,
        )
        try:
            results = fit_continual(
                module, data, trainer=trainer, ckpt_path=str(ckpt_path) if ckpt_path else None
            )
        except Killed:
            results = None
        return results, module

    reference, uninterrupted = run(tmp_path / "reference", [])
    saves = tmp_path / "saves"
    run(tmp_path / "killed", [ModelCheckpoint(dirpath=saves), KillAtStep(kill_at)])
    resumed_results, resumed = run(tmp_path / "resumed", [], ckpt_path=saves / resume_from)
    assert resumed_results is not None and resumed_results.matrix == reference.matrix
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    ewc_state, resumed_ewc_state = uninterrupted.plugins[0].state_dict(), resumed.plugins[0].state_dict()
    assert_same_state(ewc_state, resumed_ewc_state, "ewc")


def test_a_continual_run_ended_by_max_steps_in_a_tasks_last_epoch_continues_as_the_longer_run(
    tmp_path: Path,
) -> None:
    """The cut epoch's end hooks ran at the cut; the task (EWC's Fisher, its matrix row) must end
    at the task's real end in the continued run, as in the uninterrupted one, and the restored
    matrix must be reported (it was empty: the results were built before the restore)."""

    def run(
        max_steps: int, callbacks: list[L.Callback], ckpt_path: Path | None = None
    ) -> tuple[Any, LitplugModule]:
        L.seed_everything(0)
        data = SplitDigitsDataModule(scenario="class", classes_per_task=5, epochs_per_task=2, batch_size=64)
        module = _module(MLP(64, [32], 10), [EWC(ewc_lambda=10.0, num_samples=64)])
        trainer = quiet_trainer(
            callbacks=[ContinualLearning(results_file=None, heatmap=False), *callbacks],
            limit_val_batches=0,
            max_steps=max_steps,
            enable_checkpointing=bool(callbacks),
            deterministic=True,
        )
        ckpt = str(ckpt_path) if ckpt_path else None
        return fit_continual(module, data, trainer=trainer, ckpt_path=ckpt), module

    reference, uninterrupted = run(40, [ModelCheckpoint(dirpath=tmp_path / "full")])  # 2 x 2 x 10 steps
    nothing_left, _ = run(40, [], ckpt_path=tmp_path / "full" / "epoch=3-step=40.ckpt")
    assert nothing_left.matrix == reference.matrix, "a resume that trains nothing reports the saved matrix"
    cut_results, _ = run(35, [ModelCheckpoint(dirpath=tmp_path)])  # inside task 1's last epoch
    assert len(cut_results.matrix) == 2, "the cut run still reports the task it cut short"
    continued_results, continued = run(40, [], ckpt_path=tmp_path / "epoch=3-step=35.ckpt")
    assert continued_results.matrix == reference.matrix
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, continued.state_dict()[key]), key
    assert_same_state(uninterrupted.plugins[0].state_dict(), continued.plugins[0].state_dict(), "ewc")
