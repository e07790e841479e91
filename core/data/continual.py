"""Task sequences for continual learning: Split-Digits, Permuted-Digits and a user's own task list.

A continual data module trains its tasks one after another inside ONE ``Trainer.fit``: task ``t``
owns epochs ``[t * epochs_per_task, (t + 1) * epochs_per_task)``, and ``train_dataloader`` /
``val_dataloader`` serve the task of the trainer's current epoch (the driver,
:class:`litplug.core.continual.ContinualLearning`, makes the trainer reload loaders every epoch and
fires the task start/end hooks). Because the task is a function of the epoch, a run resumed from a
checkpoint continues on the right task with no extra state.

Scenarios (van de Ven & Tolias, "Three scenarios for continual learning", 2019):

- ``"task"`` (task-incremental): the task identity is known at test time; the model predicts only
  among the task's classes (wrap it in :class:`litplug.core.continual.TaskHeads`).
- ``"class"`` (class-incremental): one head over every class seen so far, no task identity.
- ``"domain"`` (domain-incremental): every task has the same classes, the input distribution moves.

Labels are always the original digit labels (0..9), so a 10-way output serves all three scenarios.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from .digits import (
    _FORM_SHAPES,
    NUM_DIGIT_CLASSES,
    DigitsDataModule,
    DigitsForm,
    DigitsNormalize,
    load_digits_tensors,
    normalize_digits,
)
from .sampling import LitplugDataModule, _require_int

__all__ = [
    "ContinualDataModule",
    "PermutedDigitsDataModule",
    "Scenario",
    "SplitDigitsDataModule",
    "TaskListDataModule",
    "split_class_order",
    "pixel_permutations",
]

Scenario = Literal["task", "class", "domain"]
Split = Literal["train", "val", "test"]
SCENARIOS: tuple[str, ...] = ("task", "class", "domain")
SPLITS: tuple[str, ...] = ("train", "val", "test")


def split_class_order(num_classes: int, seed: int, shuffle: bool) -> list[int]:
    """The order in which classes are split into tasks: seeded permutation or ``0..num_classes-1``."""
    if not shuffle:
        return list(range(num_classes))
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_classes, generator=generator).tolist()


def pixel_permutations(num_tasks: int, num_pixels: int, seed: int, identity_first: bool) -> Tensor:
    """``[num_tasks, num_pixels]`` fixed pixel permutations drawn from a private seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(num_pixels, generator=generator) for _ in range(num_tasks)]
    if identity_first:
        perms[0] = torch.arange(num_pixels)
    return torch.stack(perms)


class ContinualDataModule(LitplugDataModule):
    """Base class: a sequence of tasks, served one after another by epoch.

    Subclasses implement :meth:`task_dataset` (or override :meth:`task_loader`), ``num_tasks``,
    ``task_classes`` and ``num_classes``.

    Args:
        epochs_per_task: training epochs spent on each task.
        scenario: ``"task"``, ``"class"`` or ``"domain"`` (see the module docstring).
        batch_size, seed, num_workers, pin_memory, persistent_workers: as for :class:`LitplugDataModule`.
    """

    def __init__(
        self,
        epochs_per_task: int = 1,
        scenario: Scenario = "class",
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(batch_size, seed, num_workers, pin_memory, persistent_workers)
        self._init_schedule(epochs_per_task, scenario)

    def _init_schedule(self, epochs_per_task: int, scenario: Scenario) -> None:
        _require_int("epochs_per_task", epochs_per_task, 1)
        if scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
        self.epochs_per_task = epochs_per_task
        self.scenario: Scenario = scenario

    # -- the task sequence ------------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define num_tasks")

    @property
    def task_classes(self) -> list[list[int]]:
        """The labels that occur in each task (all classes for every task in domain-incremental)."""
        raise NotImplementedError(f"{type(self).__name__} must define task_classes")

    @property
    def total_epochs(self) -> int:
        return self.num_tasks * self.epochs_per_task

    def task_of_epoch(self, epoch: int) -> int:
        """The task trained during ``epoch`` (epochs past the schedule stay on the last task)."""
        return min(epoch // self.epochs_per_task, self.num_tasks - 1)

    def is_last_epoch_of_task(self, epoch: int) -> bool:
        return (epoch + 1) % self.epochs_per_task == 0 or epoch + 1 >= self.total_epochs

    @property
    def current_task(self) -> int:
        """The task of the attached trainer's current epoch (task 0 without a trainer)."""
        trainer = self.trainer
        return self.task_of_epoch(int(trainer.current_epoch)) if trainer is not None else 0

    def task_dataset(self, task: int, split: Split) -> Dataset[Any]:
        raise NotImplementedError(f"{type(self).__name__} must define task_dataset or task_loader")

    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}), got {task}")

    def task_loader(self, task: int, split: Split) -> DataLoader[Any]:
        """An unshuffled loader over one task's ``split`` (evaluation and importance estimates)."""
        self._check_task(task)
        return self.eval_loader(self.task_dataset(task, split))

    def joint_dataset(self, split: Split, tasks: Sequence[int] | None = None) -> Dataset[Any]:
        """The union of ``tasks`` (default all): joint training, the upper bound of a sequence."""
        chosen = range(self.num_tasks) if tasks is None else tasks
        return ConcatDataset([self.task_dataset(t, split) for t in chosen])

    # -- Lightning loaders ------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader[Any]:
        return self.train_loader(self.task_dataset(self.current_task, "train"))

    def val_dataloader(self) -> DataLoader[Any]:
        return self.eval_loader(self.task_dataset(self.current_task, "val"))

    def test_dataloader(self) -> DataLoader[Any]:
        """Every task's test data, concatenated (per-task accuracy comes from the driver)."""
        return self.eval_loader(self.joint_dataset("test"))


class _DigitsTasks(ContinualDataModule, DigitsDataModule):
    """Shared setup of the digits task sequences: one seeded stratified split, normalised.

    Also a :class:`DigitsDataModule` (the continual loaders come first in the method order), so the
    ``litplug`` CLI, whose ``data`` argument accepts DigitsDataModule subclasses, takes it.
    """

    def __init__(
        self,
        epochs_per_task: int,
        scenario: Scenario,
        batch_size: int,
        seed: int,
        val_fraction: float,
        test_fraction: float,
        form: DigitsForm,
        normalize: DigitsNormalize,
        num_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
    ) -> None:
        DigitsDataModule.__init__(
            self,
            batch_size=batch_size,
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            form=form,
            normalize=normalize,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
        )
        self._init_schedule(epochs_per_task, scenario)
        self.tasks: list[dict[str, TensorDataset]] = []

    @property
    def num_classes(self) -> int:
        return NUM_DIGIT_CLASSES

    @property
    def input_shape(self) -> tuple[int, ...]:
        return _FORM_SHAPES[self.form]

    def _splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        splits = load_digits_tensors(self.seed, self.val_fraction, self.test_fraction)
        return normalize_digits(splits, self.normalize)

    def _shape(self, x: Tensor) -> Tensor:
        return x.reshape(len(x), *self.input_shape).contiguous()

    def _build(self) -> list[dict[str, TensorDataset]]:
        raise NotImplementedError(f"{type(self).__name__} must define _build (the per-task splits)")

    def setup(self, stage: str | None = None) -> None:
        if not self.tasks:
            self.tasks = self._build()

    def task_dataset(self, task: int, split: Split) -> Dataset[Any]:
        self._check_task(task)
        self.setup()
        return self.tasks[task][split]


class SplitDigitsDataModule(_DigitsTasks):
    """Split-Digits: the 10 digit classes split into tasks of ``classes_per_task`` classes.

    Args:
        classes_per_task: classes per task (10 must be divisible by it); 2 gives the usual 5 tasks.
        scenario: ``"task"`` (a head per task, task identity at test) or ``"class"`` (one head).
        shuffle_classes: assign classes to tasks in a seeded random order (else 0-1, 2-3, ...).
        epochs_per_task, batch_size, seed, val_fraction, test_fraction, form, normalize,
        num_workers, pin_memory, persistent_workers: as for :class:`DigitsDataModule` (``seed`` also orders the classes).
    """

    def __init__(
        self,
        classes_per_task: int = 2,
        scenario: Scenario = "task",
        shuffle_classes: bool = True,
        epochs_per_task: int = 1,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        form: DigitsForm = "flat",
        normalize: DigitsNormalize = "unit",
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(
            epochs_per_task,
            scenario,
            batch_size,
            seed,
            val_fraction,
            test_fraction,
            form,
            normalize,
            num_workers,
            pin_memory,
            persistent_workers,
        )
        _require_int("classes_per_task", classes_per_task, 1)
        if NUM_DIGIT_CLASSES % classes_per_task != 0:
            raise ValueError(f"classes_per_task must divide {NUM_DIGIT_CLASSES}, got {classes_per_task}")
        if scenario == "domain":
            raise ValueError("Split-Digits is task- or class-incremental; use scenario 'task' or 'class'")
        self.classes_per_task = classes_per_task
        self.shuffle_classes = shuffle_classes
        self.class_order = split_class_order(NUM_DIGIT_CLASSES, seed, shuffle_classes)

    @property
    def num_tasks(self) -> int:
        return NUM_DIGIT_CLASSES // self.classes_per_task

    @property
    def task_classes(self) -> list[list[int]]:
        k = self.classes_per_task
        return [sorted(self.class_order[t * k : (t + 1) * k]) for t in range(self.num_tasks)]

    def _build(self) -> list[dict[str, TensorDataset]]:
        splits = self._splits()
        tasks = []
        for classes in self.task_classes:
            datasets = {}
            for split, (x, y) in splits.items():
                keep = torch.isin(y, torch.tensor(classes))
                datasets[split] = TensorDataset(self._shape(x[keep]), y[keep])
            tasks.append(datasets)
        return tasks


class PermutedDigitsDataModule(_DigitsTasks):
    """Permuted-Digits: every task is all 10 digits under its own fixed pixel permutation.

    Domain-incremental: the classes stay, the input distribution changes. Permutations are drawn
    from a private generator seeded with ``seed`` (applied to the 64 pixels before reshaping to
    ``form``).

    Args:
        num_tasks: number of permutations (tasks).
        identity_first: task 0 sees the unpermuted digits.
        epochs_per_task, batch_size, seed, val_fraction, test_fraction, form, normalize,
        num_workers, pin_memory, persistent_workers: as for :class:`DigitsDataModule`.
    """

    def __init__(
        self,
        num_tasks: int = 5,
        identity_first: bool = True,
        epochs_per_task: int = 1,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        form: DigitsForm = "flat",
        normalize: DigitsNormalize = "unit",
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(
            epochs_per_task,
            "domain",
            batch_size,
            seed,
            val_fraction,
            test_fraction,
            form,
            normalize,
            num_workers,
            pin_memory,
            persistent_workers,
        )
        _require_int("num_tasks", num_tasks, 1)
        self._num_tasks = num_tasks
        self.identity_first = identity_first
        self.permutations = pixel_permutations(num_tasks, 64, seed, identity_first)

    @property
    def num_tasks(self) -> int:
        return self._num_tasks

    @property
    def task_classes(self) -> list[list[int]]:
        return [list(range(NUM_DIGIT_CLASSES)) for _ in range(self.num_tasks)]

    def _build(self) -> list[dict[str, TensorDataset]]:
        splits = self._splits()
        return [
            {split: TensorDataset(self._shape(x[:, perm]), y) for split, (x, y) in splits.items()}
            for perm in self.permutations
        ]


class TaskListDataModule(ContinualDataModule):
    """A user's own task sequence: one LightningDataModule per task, trained in list order.

    Each task module serves its own ``train_dataloader`` / ``val_dataloader`` / ``test_dataloader``;
    build them with :meth:`LitplugDataModule.train_loader` for exact mid-epoch resume.

    Args:
        tasks: the per-task data modules.
        task_classes: the labels of each task (needed for ``scenario="task"``); default: every
            task has ``range(num_classes)``.
        num_classes: output classes (default: the first task module's ``num_classes``).
        epochs_per_task, scenario: as for :class:`ContinualDataModule`.
    """

    def __init__(
        self,
        tasks: list[L.LightningDataModule],
        task_classes: list[list[int]] | None = None,
        num_classes: int | None = None,
        epochs_per_task: int = 1,
        scenario: Scenario = "domain",
    ) -> None:
        first = tasks[0] if tasks else None
        super().__init__(epochs_per_task, scenario, batch_size=int(getattr(first, "batch_size", 64)))
        if not tasks:
            raise ValueError("tasks must hold at least one data module")
        if task_classes is not None and len(task_classes) != len(tasks):
            raise ValueError(f"task_classes has {len(task_classes)} entries for {len(tasks)} tasks")
        self.task_modules = list(tasks)
        self._task_classes = task_classes
        self._num_classes = num_classes if num_classes is not None else int(getattr(first, "num_classes", 0))
        if scenario == "task" and task_classes is None:
            raise ValueError("scenario 'task' needs task_classes (the labels of each task)")

    @property
    def num_tasks(self) -> int:
        return len(self.task_modules)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def task_classes(self) -> list[list[int]]:
        if self._task_classes is not None:
            return self._task_classes
        return [list(range(self._num_classes)) for _ in self.task_modules]

    def setup(self, stage: str | None = None) -> None:
        for module in self.task_modules:
            module.trainer = self.trainer
            module.prepare_data()
            module.setup(stage or "fit")

    def _loader(self, task: int, split: Split) -> Any:
        module = self.task_modules[task]
        module.trainer = self.trainer
        return getattr(module, f"{split}_dataloader")()

    def task_loader(self, task: int, split: Split) -> DataLoader[Any]:
        self._check_task(task)
        return self._loader(task, split)

    def train_dataloader(self) -> Any:
        return self._loader(self.current_task, "train")

    def val_dataloader(self) -> Any:
        return self._loader(self.current_task, "val")

    def test_dataloader(self) -> Any:
        return [self._loader(t, "test") for t in range(self.num_tasks)]
