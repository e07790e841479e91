"""Named loss terms are logged on Lightning's logging steps only (each ``self.log`` costs ~0.1 ms);
the class count of the metrics when neither the config nor the data says it."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from helpers import quiet_trainer
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from litplug.core.data import DigitsDataModule
from litplug.core.errors import ModuleConfigError
from litplug.core.hookspecs import hookimpl
from litplug.core.models import MLP
from litplug.core.module import LitplugModule
from litplug.core.plugin import Plugin
from litplug.plugins.mimo import MIMO


class _ConstantTerm(Plugin):
    """Adds a constant named loss term."""

    name = "constant_term"

    @hookimpl
    def litplug_extra_losses(self, module: Any, stage: str) -> dict[str, Tensor] | None:
        return {"const": torch.tensor(0.5)} if stage == "train" else None


def test_named_terms_are_logged_on_logging_steps_only() -> None:
    L.seed_everything(0)
    module = LitplugModule(MLP(64, [16], 10), plugins=[_ConstantTerm()])
    logged: list[tuple[str, int]] = []
    real_log = module.log

    def spy(name: str, *args: Any, **kwargs: Any) -> None:
        logged.append((name, module.trainer.global_step))
        real_log(name, *args, **kwargs)

    module.log = spy  # type: ignore[method-assign]
    trainer = quiet_trainer(max_steps=9, log_every_n_steps=4, limit_val_batches=0)
    trainer.fit(module, DigitsDataModule(form="flat", batch_size=32))
    # The total every step; the named terms at the steps Lightning writes (global_step 3 and 7 before
    # the optimizer step, i.e. the 4th and 8th batch).
    assert [step for name, step in logged if name == "train/loss"] == list(range(9))
    assert [step for name, step in logged if name == "train/loss_const"] == [3, 7]
    assert [step for name, step in logged if name == "train/loss_main"] == [3, 7]


@pytest.mark.parametrize(("members", "targets"), [(1, "classes"), (3, "classes"), (1, "floats")])
def test_class_count_comes_from_the_prediction_when_nothing_gives_it(members: int, targets: str) -> None:
    """Plain loaders (no data module, no ``num_classes``): metrics for the prediction's width, which
    for MIMO is the averaged prediction's K, not the widened head's M * K; none for regression."""
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = torch.randint(0, 3, (64,)) if targets == "classes" else torch.randn(64, 3)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    plugins = [MIMO(num_members=members)] if members > 1 else []
    module = LitplugModule(MLP(8, [16], num_classes=3), plugins=plugins)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    trainer.fit(module, loader, loader)
    if targets == "floats":
        assert module.num_classes is None and "val/acc" not in trainer.callback_metrics
        return
    assert module.num_classes == 3
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0
    tested = trainer.test(module, loader, verbose=False)[0]
    assert {"test/acc", "test/nll", "test/ece", "test/brier"} <= tested.keys()


class _TwoOutputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.layer(x)
        return logits, logits.detach()


def test_a_model_that_does_not_return_logits_gets_a_clear_error() -> None:
    """The default loss and metrics need one Tensor; a tuple failed deep in reshape/log_softmax."""
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    expected = "argument 'model' returned a tuple from forward, but the default loss needs the logits"
    with pytest.raises(ModuleConfigError, match=expected):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(LitplugModule(_TwoOutputs()), loader)
    # with its own loss and no metrics, such a model trains
    module = LitplugModule(_TwoOutputs(), loss=_FirstOutputCrossEntropy(), num_classes=0)
    quiet_trainer(max_steps=2, limit_val_batches=0).fit(module, loader)
    assert module.trainer.global_step == 2


class _FirstOutputCrossEntropy(torch.nn.Module):
    def forward(self, outputs: tuple[Tensor, Tensor], targets: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(outputs[0], targets)
