"""The continual-learning driver: train a task sequence in one fit, evaluate every seen task after each.

How a run works (``litplug fit --config configs/ewc.yaml`` or :func:`fit_continual` from Python):

- The data module is a :class:`~litplug.core.data.continual.ContinualDataModule` (Split-Digits,
  Permuted-Digits, or :class:`~litplug.core.data.continual.TaskListDataModule` over the user's own
  per-task data modules). Task ``t`` owns epochs ``[t * E, (t + 1) * E)``.
- The :class:`ContinualLearning` callback (one Trainer for the whole sequence) sets
  ``max_epochs = num_tasks * E``, makes the trainer reload its loaders every epoch, calls
  ``module.start_task(t)`` when a task begins and ``module.end_task(t, loader)`` when it ends (these
  fire ``litplug_on_task_start`` / ``litplug_on_task_end``: EWC's Fisher, replay and center-loss
  bookkeeping), then evaluates every task seen so far and fills row ``t`` of the accuracy matrix.
- At the end it prints the matrix, average accuracy, average forgetting and backward transfer,
  writes ``continual.json`` and ``accuracy_matrix.png`` in the run directory, adds the summary to the
  trainer's metrics (so ``litplug``'s ``results.json`` holds it) and logs the matrix to every logger
  (a heatmap image to W&B when a ``WandbLogger`` is used).

One trainer rather than one per task: a single checkpoint then holds the whole sequence's progress
(the task is a function of the epoch; the callback's state holds the matrix and which task
boundaries were already handled), so a killed run resumes exactly, and LightningCLI's ``fit`` is the
whole protocol. The price: the optimizer is built once, so its state (Adam moments) carries across
task boundaries, as in most continual-learning code.

Task-incremental learning ("a head per task") is done by :class:`TaskHeads`, a wrapper that masks
the logits of a model with one shared final layer to the active task's classes. The rows of the
final Linear that belong to other tasks get exactly zero gradient, so they behave as separate
heads over a shared body, and any classifier works unchanged (no per-task modules to add).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn

from litplug.core.data.continual import ContinualDataModule, TaskListDataModule
from litplug.core.errors import LitplugError
from litplug.core.run_dir import run_directory

__all__ = [
    "ContinualLearning",
    "ContinualResults",
    "TaskHeads",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "fit_continual",
    "find_task_heads",
]

RESULTS_FILE = "continual.json"
HEATMAP_FILE = "accuracy_matrix.png"
METRIC_PREFIX = "continual"


class ContinualSetupError(LitplugError):
    """The continual driver cannot run with this data module or model."""


# ---------------------------------------------------------------------------------------------------
# Task-incremental heads
# ---------------------------------------------------------------------------------------------------


class TaskHeads(nn.Module):
    """A head per task for task-incremental learning, by masking one shared output layer.

    ``forward`` returns the wrapped model's logits with every class outside the active task set to a
    very negative (finite) value, so softmax, cross-entropy and the Fisher only see the task's
    classes and the other classes' output rows receive zero gradient.

    The active task is set by the driver (:meth:`use_task`); a plugin that mixes tasks in one batch
    (replay) sets per-sample tasks for the next forward with :meth:`set_sample_tasks`.

    Args:
        model: any classifier returning ``[B, num_classes]`` logits.
        task_classes: the labels of each task; the driver fills it from the data module when omitted.
    """

    def __init__(self, model: nn.Module, task_classes: list[list[int]] | None = None) -> None:
        super().__init__()
        self.model = model
        self.active_task: int | None = None
        self._sample_tasks: Tensor | None = None
        self.task_classes: list[list[int]] | None = None
        self._masks: Tensor | None = None
        if task_classes is not None:
            self.set_task_classes(task_classes)

    def set_task_classes(self, task_classes: Sequence[Sequence[int]]) -> None:
        """Define the tasks: ``task_classes[t]`` lists the labels of task ``t``."""
        classes = [sorted(int(c) for c in task) for task in task_classes]
        if not classes or any(not task for task in classes):
            raise ValueError(f"task_classes must be non-empty lists of labels, got {task_classes!r}")
        num_classes = max(max(task) for task in classes) + 1
        masks = torch.zeros(len(classes), num_classes, dtype=torch.bool)
        for task, labels in enumerate(classes):
            masks[task, labels] = True
        self.task_classes = classes
        self._masks = masks

    @property
    def num_tasks(self) -> int:
        return 0 if self.task_classes is None else len(self.task_classes)

    def task_of_class(self) -> Tensor:
        """``[num_classes]`` the (first) task each label belongs to (disjoint tasks: the task)."""
        if self._masks is None:
            raise RuntimeError("TaskHeads has no task_classes yet")
        return self._masks.int().argmax(dim=0)

    def use_task(self, task: int | None) -> None:
        """Mask to ``task``'s classes from now on (``None``: no masking)."""
        if task is not None and not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}), got {task}")
        self.active_task = task

    def set_sample_tasks(self, tasks: Tensor | None) -> None:
        """Per-sample tasks for the NEXT forward only (then the active task applies again)."""
        self._sample_tasks = tasks

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        sample_tasks, self._sample_tasks = self._sample_tasks, None
        if self._masks is None or (sample_tasks is None and self.active_task is None):
            return logits
        masks = self._masks.to(logits.device)
        if masks.shape[1] > logits.shape[-1]:
            raise ValueError(
                f"task classes go up to {masks.shape[1] - 1} but the model has {logits.shape[-1]}"
            )
        if masks.shape[1] < logits.shape[-1]:
            pad = masks.new_zeros(masks.shape[0], logits.shape[-1] - masks.shape[1])
            masks = torch.cat([masks, pad], dim=1)
        keep = masks[sample_tasks.to(logits.device)] if sample_tasks is not None else masks[self.active_task]
        # Finite, so 0 * log p stays 0 (label smoothing, exact Fisher) where -inf would give NaN.
        return logits.masked_fill(~keep, torch.finfo(logits.dtype).min / 4)


def find_task_heads(model: nn.Module) -> TaskHeads | None:
    """The :class:`TaskHeads` inside ``model`` (it may be wrapped by model surgery), if any."""
    for module in model.modules():
        if isinstance(module, TaskHeads):
            return module
    return None


# ---------------------------------------------------------------------------------------------------
# Metrics of the accuracy matrix
# ---------------------------------------------------------------------------------------------------


def _check_square(matrix: Sequence[Sequence[float]]) -> int:
    tasks = len(matrix)
    if tasks == 0 or any(len(row) < i + 1 for i, row in enumerate(matrix)):
        raise ValueError("the accuracy matrix needs rows 0..T-1, row i holding at least tasks 0..i")
    return tasks


def average_accuracy(matrix: Sequence[Sequence[float]]) -> float:
    """Mean accuracy over all tasks after training the last one: ``mean_j R[T-1][j]``."""
    tasks = _check_square(matrix)
    return sum(matrix[-1][:tasks]) / tasks


def average_forgetting(matrix: Sequence[Sequence[float]]) -> float:
    """Mean over tasks ``j < T-1`` of ``max_{j <= i < T-1} R[i][j] - R[T-1][j]`` (Chaudhry et al. 2018).

    0 for a single task.
    """
    tasks = _check_square(matrix)
    if tasks == 1:
        return 0.0
    drops = [max(matrix[i][j] for i in range(j, tasks - 1)) - matrix[-1][j] for j in range(tasks - 1)]
    return sum(drops) / len(drops)


def backward_transfer(matrix: Sequence[Sequence[float]]) -> float:
    """Mean over tasks ``j < T-1`` of ``R[T-1][j] - R[j][j]`` (Lopez-Paz & Ranzato 2017); 0 for one task."""
    tasks = _check_square(matrix)
    if tasks == 1:
        return 0.0
    return sum(matrix[-1][j] - matrix[j][j] for j in range(tasks - 1)) / (tasks - 1)


@dataclass
class ContinualResults:
    """The accuracy matrix of a run: ``matrix[i][j]`` = accuracy on task ``j`` after training task ``i``
    (``j <= i``); rows exist for the tasks trained so far."""

    matrix: list[list[float]] = field(default_factory=list)
    num_tasks: int = 0
    scenario: str = ""

    def summary(self) -> dict[str, float]:
        if not self.matrix:
            return {}
        return {
            "avg_acc": average_accuracy(self.matrix),
            "forgetting": average_forgetting(self.matrix),
            "bwt": backward_transfer(self.matrix),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "num_tasks": self.num_tasks,
            "tasks_trained": len(self.matrix),
            "accuracy_matrix": self.matrix,
            **self.summary(),
        }

    def table(self) -> str:
        """The matrix as text: one row per trained task, one column per task."""
        cols = self.num_tasks or len(self.matrix)
        header = "after \\ on " + "".join(f"{'T' + str(j):>8}" for j in range(cols))
        lines = [header, "-" * len(header)]
        for i, row in enumerate(self.matrix):
            cells = "".join(f"{row[j]:>8.3f}" if j < len(row) else f"{'':>8}" for j in range(cols))
            lines.append(f"{'T' + str(i):<11}{cells}")
        lines.append("-" * len(header))
        lines += [f"{name:<11}{value:>8.4f}" for name, value in self.summary().items()]
        return "\n".join(lines)


def save_heatmap(results: ContinualResults, path: Path) -> Path:
    """Draw the accuracy matrix (rows: after task i, columns: task j) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = results.num_tasks or len(results.matrix)
    grid = torch.full((len(results.matrix), cols), float("nan"))
    for i, row in enumerate(results.matrix):
        grid[i, : len(row)] = torch.tensor(row)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * cols, 0.8 + 0.6 * len(results.matrix)))
    image = ax.imshow(grid.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    for i, row in enumerate(results.matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_xticks(range(cols))
    ax.set_yticks(range(len(results.matrix)))
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_task(module: Any, loader: Any, heads: TaskHeads | None, task: int, scenario: str) -> float:
    """Accuracy of ``module`` on one task's loader, in eval mode, without touching the training RNG.

    Plugins' ``litplug_on_eval_start`` / ``litplug_on_eval_end`` run around it (weight swaps such as
    EMA apply). In the task-incremental scenario the heads are masked to ``task``.
    """
    was_training = module.training
    previous_task = heads.active_task if heads is not None else None
    devices = [module.device] if module.device.type == "cuda" else []
    correct, total = 0, 0
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        module.eval()
        hooks = getattr(module, "hooks", None)
        if hooks is not None:
            hooks.on_eval_start(module=module, stage="test")
        if heads is not None:
            heads.use_task(task if scenario == "task" else None)
        try:
            for inputs, targets in loader:
                inputs, targets = inputs.to(module.device), targets.to(module.device)
                # class_scores: the prediction as the plugins make it (MIMO tiles the input)
                scores = module.class_scores(inputs) if hasattr(module, "class_scores") else module(inputs)
                correct += int((scores.argmax(dim=-1) == targets).sum())
                total += int(targets.numel())
        finally:
            if hooks is not None:
                hooks.on_eval_end(module=module, stage="test")
            if heads is not None:
                heads.use_task(previous_task)
            module.train(was_training)
    if total == 0:
        raise ContinualSetupError(f"task {task} has no evaluation data")
    return correct / total


# ---------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------


class ContinualLearning(Callback):
    """Runs a :class:`ContinualDataModule`'s task sequence inside one ``fit`` (see the module docstring).

    Args:
        eval_split: the split each seen task is evaluated on after every task (``"test"`` or ``"val"``).
        results_file: file name of the JSON results in the run directory (``None``: not written).
        heatmap: write (and log to W&B) the accuracy-matrix heatmap.
        verbose: print the matrix after every task (the final table is always printed).
    """

    def __init__(
        self,
        eval_split: str = "test",
        results_file: str | None = RESULTS_FILE,
        heatmap: bool = True,
        verbose: bool = False,
    ) -> None:
        if eval_split not in ("test", "val"):
            raise ValueError(f"eval_split must be 'test' or 'val', got {eval_split!r}")
        self.eval_split: Literal["test", "val"] = "test" if eval_split == "test" else "val"
        self.results_file = results_file
        self.heatmap = heatmap
        self.verbose = verbose
        self.matrix: list[list[float]] = []
        self.started_task = -1  # the last task whose start hook fired
        self.ended_tasks = 0  # tasks 0..ended_tasks-1 had their end hook and evaluation
        self.results = ContinualResults()
        self.output_files: dict[str, str] = {}

    # -- Lightning state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"matrix": self.matrix, "started_task": self.started_task, "ended_tasks": self.ended_tasks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.matrix = [list(row) for row in state_dict["matrix"]]
        self.started_task = int(state_dict["started_task"])
        self.ended_tasks = int(state_dict["ended_tasks"])
        # setup (which runs before Lightning restores callbacks) built the results on the old list
        self.results = ContinualResults(self.matrix, self.results.num_tasks, self.results.scenario)

    # -- helpers ----------------------------------------------------------------------------------

    @staticmethod
    def _data(trainer: L.Trainer) -> ContinualDataModule:
        # Trainer sets datamodule, callbacks, fast_dev_run, ... in its connectors: invisible to mypy.
        data = trainer.datamodule  # type: ignore[attr-defined]
        if not isinstance(data, ContinualDataModule):
            raise ContinualSetupError(
                "ContinualLearning needs a ContinualDataModule (SplitDigitsDataModule, "
                f"PermutedDigitsDataModule, TaskListDataModule); got {type(data).__name__}"
            )
        return data

    @staticmethod
    def _model(pl_module: L.LightningModule) -> nn.Module:
        return getattr(pl_module, "model", pl_module)

    def _heads(self, pl_module: L.LightningModule) -> TaskHeads | None:
        return find_task_heads(self._model(pl_module))

    def _set_active_task(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = self._data(trainer)
        heads = self._heads(pl_module)
        if heads is not None:
            heads.use_task(data.current_task if data.scenario == "task" else None)

    # -- setup ------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = self._data(trainer)
        heads = self._heads(pl_module)
        if data.scenario == "task":
            if heads is None:
                raise ContinualSetupError(
                    "scenario 'task' needs a head per task: wrap the model in "
                    "litplug.core.continual.TaskHeads (model: {class_path: litplug.core.continual.TaskHeads, "
                    "init_args: {model: ...}})"
                )
            if heads.task_classes is None:
                heads.set_task_classes(data.task_classes)
            elif heads.task_classes != [sorted(t) for t in data.task_classes]:
                raise ContinualSetupError(
                    f"TaskHeads task_classes {heads.task_classes} differ from the data's {data.task_classes}"
                )
        if stage != "fit":
            return
        # The loaders follow the task of the current epoch, so they must be rebuilt every epoch.
        trainer.reload_dataloaders_every_n_epochs = 1  # type: ignore[attr-defined]
        if not trainer.fast_dev_run and trainer.fit_loop.max_epochs != data.total_epochs:  # type: ignore[attr-defined]
            rank_zero_info(
                f"ContinualLearning: max_epochs set to {data.total_epochs} "
                f"({data.num_tasks} tasks x {data.epochs_per_task} epochs)"
            )
            trainer.fit_loop.max_epochs = data.total_epochs
        self.results = ContinualResults(self.matrix, data.num_tasks, data.scenario)
        self._set_active_task(trainer, pl_module)

    # -- task boundaries --------------------------------------------------------------------------

    def _sync_tasks(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """End every task before the current one that has not ended yet, then start the current one."""
        data = self._data(trainer)
        current = data.task_of_epoch(int(trainer.current_epoch))
        while self.ended_tasks < current:
            self._end_task(trainer, pl_module, self.ended_tasks)
        self._set_active_task(trainer, pl_module)
        if self.started_task < current:
            self.started_task = current
            _start_task(pl_module, current)

    def _end_task(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        data = self._data(trainer)
        heads = self._heads(pl_module)
        if heads is not None:
            heads.use_task(task if data.scenario == "task" else None)
        _end_task(pl_module, task, data.task_loader(task, "train"))
        row = [
            evaluate_task(pl_module, data.task_loader(j, self.eval_split), heads, j, data.scenario)
            for j in range(task + 1)
        ]
        self.matrix = self.matrix[:task] + [row]
        self.ended_tasks = task + 1
        self.results = ContinualResults(self.matrix, data.num_tasks, data.scenario)
        self._log_row(trainer, task, row)
        if self.verbose:
            _print(f"\ncontinual: after task {task}\n{self.results.table()}")

    def _log_row(self, trainer: L.Trainer, task: int, row: list[float]) -> None:
        metrics = {f"{METRIC_PREFIX}/acc_task_{j}": value for j, value in enumerate(row)}
        metrics.update({f"{METRIC_PREFIX}/{k}": v for k, v in self.results.summary().items()})
        metrics[f"{METRIC_PREFIX}/task"] = float(task)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync_tasks(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync_tasks(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # Cut short (max_steps, max_time): on_train_end ends the task for this run's report,
            # after the checkpoint saved here, so a run continued from it ends the task at its
            # real end, as an uninterrupted run does.
            return
        data = self._data(trainer)
        epoch = int(trainer.current_epoch)
        task = data.task_of_epoch(epoch)
        if data.is_last_epoch_of_task(epoch) and self.ended_tasks <= task:
            self._end_task(trainer, pl_module, task)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        while self.ended_tasks <= self.started_task:  # a task cut short (max_steps) still gets its row
            self._end_task(trainer, pl_module, self.ended_tasks)
        self._report(trainer)

    # -- test: mask task-incremental heads per batch ----------------------------------------------

    def on_test_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        data = self._data(trainer)
        heads = self._heads(pl_module)
        if heads is None or data.scenario != "task":
            return
        if isinstance(data, TaskListDataModule):
            heads.use_task(dataloader_idx)
        else:  # Split tasks have disjoint classes: the task identity given at test is the label's task
            heads.set_sample_tasks(heads.task_of_class().to(batch[1].device)[batch[1]])

    # -- reporting --------------------------------------------------------------------------------

    def _report(self, trainer: L.Trainer) -> None:
        summary = self.results.summary()
        for name, value in summary.items():
            trainer.callback_metrics[f"{METRIC_PREFIX}/{name}"] = torch.tensor(value)
        for i, row in enumerate(self.matrix):
            for j, value in enumerate(row):
                trainer.callback_metrics[f"{METRIC_PREFIX}/R_{i}_{j}"] = torch.tensor(value)
        self._write_outputs(trainer)

    @rank_zero_only
    def _write_outputs(self, trainer: L.Trainer) -> None:
        _print(f"\ncontinual learning ({self.results.scenario}-incremental): accuracy matrix R[i][j]")
        _print(self.results.table())
        run_dir = run_directory(trainer)  # rank zero's: no collective in this rank-zero-only method
        if self.results_file:
            path = run_dir / self.results_file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.results.to_dict(), indent=2) + "\n")
            self.output_files["json"] = str(path)
        if self.heatmap and self.matrix:
            image = save_heatmap(self.results, run_dir / HEATMAP_FILE)
            self.output_files["heatmap"] = str(image)
            for logger in trainer.loggers:
                if hasattr(logger, "log_image") and type(logger).__name__ == "WandbLogger":
                    logger.log_image(key=f"{METRIC_PREFIX}/accuracy_matrix", images=[str(image)])


def _print(text: str) -> None:
    print(text, flush=True)


def _start_task(pl_module: Any, task: int) -> None:
    if hasattr(pl_module, "start_task"):
        pl_module.start_task(task)


def _end_task(pl_module: Any, task: int, loader: Any) -> None:
    if hasattr(pl_module, "end_task"):
        pl_module.end_task(task, loader)


def fit_continual(
    module: L.LightningModule,
    datamodule: ContinualDataModule,
    trainer: L.Trainer | None = None,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> ContinualResults:
    """Train ``module`` on ``datamodule``'s task sequence and return the accuracy matrix.

    Builds a Trainer from ``trainer_kwargs`` unless one is given; the :class:`ContinualLearning`
    callback is added when the trainer has none.
    """
    if trainer is None:
        callbacks = list(trainer_kwargs.pop("callbacks", []))
        if not any(isinstance(c, ContinualLearning) for c in callbacks):
            callbacks.append(ContinualLearning())
        trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs)
    drivers = [c for c in trainer.callbacks if isinstance(c, ContinualLearning)]  # type: ignore[attr-defined]
    if not drivers:
        raise ContinualSetupError("the trainer has no ContinualLearning callback")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return drivers[0].results
