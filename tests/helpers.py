"""Plugins and builders shared by the core tests."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from litplug.core.data import LitplugDataModule
from litplug.core.examples import example_run  # noqa: F401  (re-exported for the tests)
from litplug.core.hookspecs import hookimpl
from litplug.core.plugin import Plugin


class RecordingPlugin(Plugin):
    """Records every hook call (Lightning's hook-recording test, for litplug's hooks)."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.saw_sample_batch = False

    def _rec(self, hook: str, stage: str | None = None) -> None:
        self.calls.append(hook if stage is None else f"{hook}:{stage}")

    @hookimpl
    def litplug_check_setup(self) -> None:
        self._rec("check_setup")

    @hookimpl
    def litplug_configure_model(self, model: nn.Module) -> None:
        self._rec("configure_model")

    @hookimpl
    def litplug_on_fit_start(self, sample_batch: Any) -> None:
        self.saw_sample_batch = isinstance(sample_batch, (tuple, list)) and len(sample_batch) == 2
        self._rec("on_fit_start")

    @hookimpl
    def litplug_transform_batch(self, stage: str) -> None:
        self._rec("transform_batch", stage)

    @hookimpl
    def litplug_compute_loss(self, stage: str) -> None:
        self._rec("compute_loss", stage)

    @hookimpl
    def litplug_extra_losses(self, stage: str) -> None:
        self._rec("extra_losses", stage)

    @hookimpl
    def litplug_log_probs(self, stage: str) -> None:
        self._rec("log_probs", stage)

    @hookimpl
    def litplug_on_after_backward(self) -> None:
        self._rec("on_after_backward")

    @hookimpl
    def litplug_on_before_optimizer_step(self) -> None:
        self._rec("on_before_optimizer_step")

    @hookimpl
    def litplug_on_train_batch_end(self) -> None:
        self._rec("on_train_batch_end")

    @hookimpl
    def litplug_on_train_epoch_end(self) -> None:
        self._rec("on_train_epoch_end")

    @hookimpl
    def litplug_on_eval_start(self, stage: str) -> None:
        self._rec("on_eval_start", stage)

    @hookimpl
    def litplug_eval_step(self, stage: str) -> None:
        self._rec("eval_step", stage)

    @hookimpl
    def litplug_on_eval_end(self, stage: str) -> None:
        self._rec("on_eval_end", stage)

    @hookimpl
    def litplug_on_eval_interrupted(self, stage: str) -> None:
        self._rec("on_eval_interrupted", stage)

    @hookimpl
    def litplug_on_task_start(self, task_id: int) -> None:
        self._rec("on_task_start", str(task_id))

    @hookimpl
    def litplug_on_task_end(self, task_id: int) -> None:
        self._rec("on_task_end", str(task_id))

    @hookimpl
    def litplug_on_save_checkpoint(self) -> None:
        self._rec("on_save_checkpoint")

    @hookimpl
    def litplug_on_load_checkpoint(self) -> None:
        self._rec("on_load_checkpoint")

    @hookimpl
    def litplug_on_fit_end(self) -> None:
        self._rec("on_fit_end")


class Named(Plugin):
    """A plugin whose name and ordering declarations are set per instance (ordering tests)."""

    name = "named"

    def __init__(
        self,
        label: str,
        after: tuple[str, ...] = (),
        before: tuple[str, ...] = (),
        conflicts: tuple[str, ...] = (),
        log: list[str] | None = None,
    ) -> None:
        self.name = label  # type: ignore[misc]
        self.run_after = after
        self.run_before = before
        self.conflicts_with = conflicts
        self.log = log if log is not None else []

    @hookimpl
    def litplug_transform_batch(self) -> None:
        self.log.append(f"transform:{self.name}")

    @hookimpl
    def litplug_on_eval_end(self) -> None:
        self.log.append(f"eval_end:{self.name}")


class CountingPlugin(Plugin):
    """Keeps a counter and a tensor in its state, adds a tiny named loss term."""

    name = "counter"

    def __init__(self, weight: float = 0.01) -> None:
        self.check_range("weight", weight, low=0.0)
        self.weight = weight
        self.steps = 0
        self.anchor: torch.Tensor | None = None

    @hookimpl
    def litplug_extra_losses(self, module: L.LightningModule) -> dict[str, torch.Tensor]:
        params = torch.cat([p.reshape(-1) for p in module.model.parameters()])
        if self.anchor is None:
            self.anchor = params.detach().clone()
        return {"drift": self.weight * (params - self.anchor).pow(2).sum()}

    @hookimpl
    def litplug_on_train_batch_end(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        self.anchor = state["anchor"]


def toy_loaders(n: int = 64, batch_size: int = 16, classes: int = 3) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=batch_size), DataLoader(data, batch_size=batch_size)


class TrainValTestData(L.LightningDataModule):
    """A user's data module: train, val and test loaders, no predict loader; ``setup`` builds the
    test set only for the test stage, as many do. 8 features, 3 classes; the test set has 24 rows."""

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(0)
        x, y = torch.randn(88, 8, generator=generator), torch.randint(0, 3, (88,), generator=generator)
        self.train_set = TensorDataset(x[:64], y[:64])
        if stage == "test":
            self.test_set = TensorDataset(x[64:], y[64:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=16)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=16)


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class DieOnRankOne(Plugin):
    """Raises on rank 1 after its second step (a crashed DDP worker)."""

    name = "die_on_rank_one"

    @hookimpl
    def litplug_on_train_batch_end(self, batch_idx: int) -> None:
        if batch_idx == 1 and torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            raise RuntimeError("rank 1 died")


class Killed(RuntimeError):
    """A simulated crash, raised by :class:`KillAtStep`."""


class KillAtStep(Callback):
    """Simulates a crash: raises :class:`Killed` before the batch that would be optimizer step
    ``step + 1`` (a run that saved a checkpoint at ``step`` then resumes from it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"simulated kill at step {self.step}")


class SendSignal(Callback):
    """Sends this process a real signal at the start of a training step or of a validation epoch's
    first batch, ``times`` times: the run meets the signal handling a ``kill`` from outside would.
    Under DDP only the process of ``rank`` signals itself (``None``: every process)."""

    def __init__(
        self,
        signal_name: str,
        at_step: int | None = None,
        in_validation_epoch: int | None = None,
        rank: int | None = None,
        times: int = 1,
    ) -> None:
        self.signum = signal.Signals[signal_name]
        self.times = times
        self.at_step = at_step
        self.in_validation_epoch = in_validation_epoch
        self.rank = rank

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at_step and self.rank in (None, trainer.global_rank):
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.sanity_checking or trainer.current_epoch != self.in_validation_epoch:
            return
        if args[-1] == 0 and self.rank in (None, trainer.global_rank):  # the first batch: stops mid-epoch
            os.kill(os.getpid(), self.signum)


TESTS_DIR = Path(__file__).resolve().parent


def subprocess_env() -> dict[str, str]:
    """The environment of a test's child process: this folder importable (``helpers``), no W&B."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")])
    env.setdefault("WANDB_MODE", "disabled")
    return env


def litplug_command(subcommand: str, config: Path, *args: str, launcher: Sequence[str] = ()) -> list[str]:
    """``python [launcher] -m litplug.core.cli <subcommand> --config <config> <args>``."""
    return [sys.executable, *launcher, "-m", "litplug.core.cli", subcommand, "--config", str(config), *args]


def assert_same_state(a: object, b: object, where: str) -> None:
    """Equal nested plugin state: tensors bit for bit, containers element by element."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class IndexData(LitplugDataModule):
    """40 examples whose input is their own index, so batches identify themselves."""

    num_classes = 2
    input_shape = (1,)

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        return self.train_loader(TensorDataset(torch.arange(40.0).unsqueeze(1), torch.zeros(40).long()))


class BatchRecorder(L.LightningModule):
    """Records the example indices and (epoch, batch_idx) of every training step; trains nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[list[int]] = []
        self.batch_indices: list[tuple[int, int]] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch[0].squeeze(1).long().tolist())
        self.batch_indices.append((self.current_epoch, batch_idx))
        return self.layer(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)
