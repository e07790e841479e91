"""Lightning's tuner callbacks on LitplugModule: ``lr`` is read and set through the optimizer, and a
resumed fit keeps what the first search found."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from helpers import KillAtStep, Killed, quiet_trainer
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder, ModelCheckpoint
from lightning.pytorch.tuner import Tuner

from litplug.core.data import DigitsDataModule
from litplug.core.errors import ModuleConfigError
from litplug.core.models import MLP
from litplug.core.module import LitplugModule
from litplug.core.tuning import keep_the_tuned_values_on_resume

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


def _tuned_run(
    tuner: L.Callback, tmp_path: Path, callbacks: list[L.Callback], ckpt: Path | None = None
) -> tuple[LitplugModule, L.Trainer, DigitsDataModule]:
    L.seed_everything(0)
    module = LitplugModule(
        MLP(64, [32], 10, dropout=0.2), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)
    )
    data = DigitsDataModule(form="flat", batch_size=16)
    trainer = quiet_trainer(
        max_steps=30,
        limit_val_batches=0,
        callbacks=[tuner, *callbacks],
        enable_checkpointing=True,
        deterministic=True,
        default_root_dir=tmp_path,
    )
    try:
        trainer.fit(module, data, ckpt_path=ckpt)
    except Killed:
        pass
    return module, trainer, data


@pytest.mark.parametrize(
    "make_tuner",
    [
        lambda: LearningRateFinder(num_training_steps=15, min_lr=1e-3, max_lr=1.0),
        lambda: BatchSizeFinder(init_val=16, max_trials=2, steps_per_trial=1),
    ],
    ids=["lr-finder", "batch-size-finder"],
)
def test_a_resumed_fit_keeps_what_the_tuner_found_and_ends_as_the_uninterrupted_run(
    make_tuner: Any, tmp_path: Path
) -> None:
    """Lightning's tuner callbacks search again on every fit, a resumed one too: on the half-trained
    weights they find another lr (seen: 0.40 then 0.063) and the run diverges. A resumed fit keeps
    the checkpoint's lr and batch size instead, and ends with the uninterrupted run's weights."""
    reference, ref_trainer, ref_data = _tuned_run(make_tuner(), tmp_path / "ref", [])
    saver = ModelCheckpoint(tmp_path / "ckpt", "{step}", every_n_train_steps=10, save_top_k=-1)
    _tuned_run(make_tuner(), tmp_path / "killed", [saver, KillAtStep(15)])
    resumed, trainer, data = _tuned_run(
        make_tuner(), tmp_path / "resumed", [], tmp_path / "ckpt" / "step=10.ckpt"
    )
    assert not [c for c in trainer.callbacks if isinstance(c, (LearningRateFinder, BatchSizeFinder))]
    assert data.batch_size == ref_data.batch_size
    assert trainer.optimizers[0].param_groups[0]["lr"] == ref_trainer.optimizers[0].param_groups[0]["lr"]
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_a_batch_size_finder_whose_result_is_not_saved_searches_again_and_says_so() -> None:
    """Only a litplug data module keeps its batch size in checkpoints; otherwise the finder stays."""
    finder = BatchSizeFinder()
    trainer = SimpleNamespace(callbacks=[finder], datamodule=None)
    with pytest.warns(UserWarning, match="BatchSizeFinder searches again on this resumed fit"):
        keep_the_tuned_values_on_resume(trainer, {})  # type: ignore[arg-type]
    assert trainer.callbacks == [finder]
