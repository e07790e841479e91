"""Lightning's learning-rate finder on LitplugModule: ``lr`` is read and set through the optimizer."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import LearningRateFinder
from lightning.pytorch.tuner import Tuner

from litplug.core.data import DigitsDataModule
from litplug.core.errors import ModuleConfigError
from litplug.core.models import MLP
from litplug.core.module import LitplugModule

HALVING = 0.5  # LambdaLR factor per epoch: a schedule that reads its base lrs


def _module(**kwargs: object) -> LitplugModule:
    L.seed_everything(0)
    return LitplugModule(
        MLP(64, [32], 10), optimizer=lambda params: torch.optim.SGD(params, lr=0.01), **kwargs
    )


def test_the_finder_callback_sets_the_lr_and_the_schedule_follows_it() -> None:
    module = _module(
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: HALVING**epoch)
    )
    finder = LearningRateFinder(num_training_steps=20, min_lr=1e-4, max_lr=1.0)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[finder])
    trainer.fit(module, DigitsDataModule(form="flat", batch_size=32))
    found = finder.optimal_lr.suggestion()
    assert found is not None and not math.isclose(found, 0.01)
    # the schedule kept its shape around the found lr: two epochs of halving
    live = trainer.optimizers[0].param_groups[0]["lr"]
    assert math.isclose(live, found * HALVING**2, rel_tol=1e-9), (live, found)
    assert module.lr == live


def test_tuner_lr_find_sets_the_lr_of_the_optimizer_the_fit_then_makes() -> None:
    module = _module()
    assert module.lr is None  # no optimizer yet
    data = DigitsDataModule(form="flat", batch_size=32)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    result = Tuner(trainer).lr_find(module, datamodule=data, num_training=20, min_lr=1e-4, max_lr=1.0)
    assert result is not None
    found = result.suggestion()
    trainer.fit(module, data)
    assert math.isclose(trainer.optimizers[0].param_groups[0]["lr"], found, rel_tol=1e-9)


@pytest.mark.parametrize("value", [0.0, -1.0, True])
def test_a_non_positive_lr_is_refused(value: float) -> None:
    with pytest.raises(ModuleConfigError, match="LitplugModule: argument 'lr' must be a number > 0"):
        _module().lr = value
