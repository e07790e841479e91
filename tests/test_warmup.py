"""Tests of the warmup callbacks: exact lr sequences, scheduler composition, LEGW scaling, resume."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import KillAtStep, Killed
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from litplug.callbacks.warmup import LEGW, LinearWarmup, WarmupConfigError
from litplug.callbacks.warmup import functional as F
from litplug.core.data import DigitsDataModule
from litplug.core.models import MLP
from litplug.core.module import LitplugModule

LR = 0.1
BATCHES_PER_EPOCH = 5  # limit_train_batches: short epochs keep every test at a second or two


class LRRecorder(Callback):
    """Records the lr of every param group as the optimizer step reads it.

    Its torch step pre-hook is registered after the warmup callback's (it comes later in the
    callback list), so it sees the lr actually used by the step.
    """

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.after_step: list[list[float]] = []
        self.logged_lrs: list[float | None] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        optimizer.register_step_pre_hook(lambda opt, *_: self.lrs.append([g["lr"] for g in opt.param_groups]))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.after_step.append([g["lr"] for g in trainer.optimizers[0].param_groups])
        logged = trainer.callback_metrics.get("warmup/lr")  # the warmup callback logs it before this
        self.logged_lrs.append(None if logged is None else float(logged))

    @property
    def first_group(self) -> list[float]:
        return [lrs[0] for lrs in self.lrs]


def _data(batch_size: int = 32) -> DigitsDataModule:
    return DigitsDataModule(batch_size=batch_size, form="flat")


def _fit(
    callbacks: list[Callback],
    max_steps: int,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    interval: str = "step",
    data: L.LightningDataModule | None = None,
    ckpt_path: Path | None = None,
    **trainer_kwargs: Any,
) -> tuple[LitplugModule, LRRecorder, L.Trainer]:
    L.seed_everything(0, verbose=False)
    recorder = LRRecorder()
    module = LitplugModule(
        MLP(input_dim=64, hidden_dims=[16]),
        optimizer=partial(torch.optim.SGD, lr=LR),
        lr_scheduler=scheduler,
        scheduler_interval=interval,  # type: ignore[arg-type]
    )
    kwargs: dict[str, Any] = {
        "max_steps": max_steps,
        "limit_train_batches": BATCHES_PER_EPOCH,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [*callbacks, recorder],
    }
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(**kwargs)
    trainer.fit(module, datamodule=data if data is not None else _data(), ckpt_path=ckpt_path)
    return module, recorder, trainer


def _factor(step: int, warmup: int, start: float = 0.0) -> float:
    """The documented formula, written out independently of the implementation."""
    return start + (1.0 - start) * min(1.0, (step + 1) / warmup)


# ---------------------------------------------------------------- functional


def test_functional_factor_and_lengths() -> None:
    assert F.warmup_factor(0.0) == 0.0
    assert F.warmup_factor(0.5, start_factor=0.2) == pytest.approx(0.6)
    assert F.warmup_factor(3.0) == 1.0 and F.warmup_factor(-1.0, 0.1) == 0.1
    assert [F.warmup_factor_at_step(t, 4) for t in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert F.optimizer_steps_per_epoch(10, 3) == 4  # the final partial accumulation also steps
    assert F.epochs_to_steps(0.3, 10) == 3 and F.epochs_to_steps(0.01, 10) == 1
    assert F.epochs_to_steps(1.5, 5) == 8  # rounded up: at least the asked length


@pytest.mark.parametrize(("rule", "expected"), [("sqrt", 4.0), ("linear", 16.0), ("none", 1.0)])
def test_functional_legw_rules(rule: F.LRScaling, expected: float) -> None:
    k = F.batch_ratio(256, 16)
    assert k == 16.0
    assert F.legw_lr_scale(k, rule) == expected
    assert F.legw_warmup_epochs(k, 0.25) == 4.0


def test_functional_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="lr scaling rule"):
        F.legw_lr_scale(4.0, "cube")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch sizes"):
        F.batch_ratio(0, 16)
    with pytest.raises(ValueError, match="warmup_steps"):
        F.warmup_factor_at_step(0, 0)


# ---------------------------------------------------------------- lr sequences


def test_lr_sequence_without_scheduler() -> None:
    warmup = LinearWarmup(warmup_steps=4, start_factor=0.2)
    _, rec, _ = _fit([warmup], max_steps=7)
    expected = [LR * _factor(t, 4, 0.2) for t in range(7)]
    assert rec.first_group == pytest.approx(expected, rel=1e-12)
    assert rec.first_group[4:] == [LR] * 3  # after warmup: exactly the configured lr
    assert all(lrs == [LR] for lrs in rec.after_step)  # the factor never stays in group["lr"]
    assert warmup.step == 7 and warmup.total_steps == 4


SCHEDULERS = {
    "step_lr": (
        partial(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.5),
        lambda t: LR * 0.5 ** (t // 3),
    ),
    "cosine": (
        partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=10),
        lambda t: LR * (1 + math.cos(math.pi * t / 10)) / 2,
    ),
    "lambda": (partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda t: 0.9**t), lambda t: LR * 0.9**t),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_warmup_multiplies_the_schedule(name: str) -> None:
    """lr(t) = schedule(t) * factor(t) during warmup, exactly schedule(t) after it."""
    factory, closed_form = SCHEDULERS[name]
    _, plain, _ = _fit([], max_steps=10, scheduler=factory)
    _, warm, _ = _fit([LinearWarmup(warmup_steps=6)], max_steps=10, scheduler=factory)
    schedule = plain.first_group
    assert schedule == pytest.approx([closed_form(t) for t in range(10)], rel=1e-9)
    for t in range(10):
        assert warm.first_group[t] == pytest.approx(schedule[t] * _factor(t, 6), rel=1e-12), t
    # Chainable schedulers (StepLR, cosine) read group["lr"]: exact equality shows no factor leaked.
    assert warm.first_group[6:] == schedule[6:]
    assert warm.after_step == plain.after_step
    # LearningRateMonitor would show after_step (no factor); warmup/lr is the lr each step used
    assert warm.logged_lrs[:6] == pytest.approx(warm.first_group[:6], rel=1e-6)  # logged while warming up


def test_warmup_with_epoch_interval_scheduler() -> None:
    factory = partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    _, rec, _ = _fit([LinearWarmup(warmup_steps=7)], max_steps=12, scheduler=factory, interval="epoch")
    expected = [LR * 0.5 ** (t // BATCHES_PER_EPOCH) * _factor(t, 7) for t in range(12)]
    assert rec.first_group == pytest.approx(expected, rel=1e-12)


def test_warmup_epochs_equals_steps() -> None:
    by_epochs = LinearWarmup(warmup_epochs=1.5)
    _, rec_epochs, _ = _fit([by_epochs], max_steps=10)
    _, rec_steps, _ = _fit([LinearWarmup(warmup_steps=8)], max_steps=10)
    assert by_epochs.total_steps == math.ceil(1.5 * BATCHES_PER_EPOCH) == 8
    assert rec_epochs.lrs == rec_steps.lrs


def test_warmup_epochs_count_optimizer_steps_with_accumulation() -> None:
    warmup = LinearWarmup(warmup_epochs=2.0)
    _, rec, trainer = _fit([warmup], max_steps=8, accumulate_grad_batches=2)
    # 5 batches per epoch, accumulating 2 -> steps after batches 2, 4 and 5: 3 optimizer steps/epoch.
    assert warmup.total_steps == 6
    assert rec.first_group == pytest.approx([LR * _factor(t, 6) for t in range(8)], rel=1e-12)
    assert trainer.global_step == 8


# ---------------------------------------------------------------- LEGW


@pytest.mark.parametrize(("rule", "scale"), [("sqrt", 2.0), ("linear", 4.0), ("none", 1.0)])
def test_legw_scales_lr_and_warmup(rule: F.LRScaling, scale: float) -> None:
    legw = LEGW(base_batch_size=16, base_warmup_epochs=0.5, lr_scaling=rule)
    _, rec, _ = _fit([legw], max_steps=12, data=_data(batch_size=64))  # k = 64 / 16 = 4
    assert legw.k == 4.0 and legw.lr_scale == scale
    assert legw.warmup_epochs == 2.0  # k * w0
    assert legw.total_steps == 2 * BATCHES_PER_EPOCH
    expected = [LR * scale * _factor(t, 10) for t in range(12)]
    assert rec.first_group == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["cosine", "lambda"])
def test_legw_scales_the_whole_schedule(name: str) -> None:
    """Scheduler base lrs are scaled too: LambdaLR recomputes from them and would undo the scaling."""
    factory, closed_form = SCHEDULERS[name]
    _, rec, _ = _fit(
        [LEGW(base_batch_size=16, base_warmup_epochs=0.25, lr_scaling="linear")],
        max_steps=10,
        scheduler=factory,
        data=_data(batch_size=64),
    )
    warmup = math.ceil(4 * 0.25 * BATCHES_PER_EPOCH)
    expected = [4.0 * closed_form(t) * _factor(t, warmup) for t in range(10)]
    assert rec.first_group == pytest.approx(expected, rel=1e-9)


def test_legw_global_batch_counts_accumulation_and_override() -> None:
    legw = LEGW(base_batch_size=16, base_warmup_epochs=0.5)
    _fit([legw], max_steps=2, data=_data(batch_size=32), accumulate_grad_batches=2)
    assert legw.resolved_global_batch_size == 64 and legw.k == 4.0
    override = LEGW(base_batch_size=16, base_warmup_epochs=0.5, global_batch_size=144)
    _fit([override], max_steps=2, data=_data(batch_size=32))
    assert override.k == 9.0 and override.lr_scale == 3.0
    later = LEGW(base_batch_size=16, base_warmup_epochs=0.5)
    later.set_global_batch_size(256)  # what a DDP callback calls before training starts
    _fit([later], max_steps=2, data=_data(batch_size=32))
    assert later.k == 16.0


def _loaders(**loader_kwargs: Any) -> DataLoader[Any]:
    data = TensorDataset(torch.randn(64, 64), torch.randint(0, 10, (64,)))
    return DataLoader(data, **loader_kwargs)


def test_legw_reads_the_dataloader_batch_size_without_datamodule() -> None:
    legw = LEGW(base_batch_size=4, base_warmup_epochs=0.5)
    module = LitplugModule(MLP(input_dim=64, hidden_dims=[8]), optimizer=partial(torch.optim.SGD, lr=LR))
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, callbacks=[legw])
    trainer.fit(module, train_dataloaders=_loaders(batch_size=16))
    assert legw.k == 4.0


def test_legw_unknown_batch_size_is_a_clear_error() -> None:
    legw = LEGW(base_batch_size=4, base_warmup_epochs=0.5)
    module = LitplugModule(MLP(input_dim=64, hidden_dims=[8]), optimizer=partial(torch.optim.SGD, lr=LR))
    loader = _loaders(batch_sampler=[list(range(8)), list(range(8, 16))])
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, callbacks=[legw])
    with pytest.raises(WarmupConfigError, match="'LEGW': argument 'global_batch_size'"):
        trainer.fit(module, train_dataloaders=loader)


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "make",
    [lambda: LinearWarmup(warmup_steps=10), lambda: LEGW(base_batch_size=16, base_warmup_epochs=1.0)],
    ids=["LinearWarmup", "LEGW"],
)
def test_resume_mid_warmup_continues_identically(make: Callable[[], LinearWarmup], tmp_path: Path) -> None:
    """14 steps in one go == a run killed after a checkpoint at step 7, resumed (lrs, weights, state)."""
    factory = partial(torch.optim.lr_scheduler.StepLR, step_size=4, gamma=0.5)
    full_cb = make()
    full, full_rec, _ = _fit([full_cb], max_steps=14, scheduler=factory)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1)
    with pytest.raises(Killed):
        _fit([make(), saver, KillAtStep(8)], max_steps=14, scheduler=factory, enable_checkpointing=True)
    checkpoint = tmp_path / "epoch=1-step=7.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    # The checkpointed optimizer holds the scheduled lr (StepLR: halved after step 4), never the warmed one.
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(
        LR * getattr(full_cb, "lr_scale", 1.0) / 2
    )
    second_cb = make()
    resumed, second_rec, _ = _fit([second_cb], max_steps=14, scheduler=factory, ckpt_path=checkpoint)
    assert second_rec.lrs == full_rec.lrs[7:]
    assert full_cb.total_steps is not None and 7 < full_cb.total_steps  # the cut was mid-warmup
    assert second_cb.state_dict() == full_cb.state_dict()
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_legw_state_round_trip_does_not_rescale() -> None:
    legw = LEGW(base_batch_size=16, base_warmup_epochs=0.5)
    _fit([legw], max_steps=3, data=_data(batch_size=64))
    state = legw.state_dict()
    assert state == {"step": 3, "warmup_steps": 10, "global_batch_size": 64, "k": 4.0, "lr_scale": 2.0}
    restored = LEGW(base_batch_size=16, base_warmup_epochs=0.5)
    restored.load_state_dict(state)
    assert restored.step == 3 and restored.state_key == legw.state_key


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: LinearWarmup(), "warmup_steps/warmup_epochs"),
        (lambda: LinearWarmup(warmup_steps=3, warmup_epochs=1.0), "warmup_steps/warmup_epochs"),
        (lambda: LinearWarmup(warmup_steps=0), "warmup_steps"),
        (lambda: LinearWarmup(warmup_steps=-2), "warmup_steps"),
        (lambda: LinearWarmup(warmup_steps=2.5), "warmup_steps"),
        (lambda: LinearWarmup(warmup_epochs=0.0), "warmup_epochs"),
        (lambda: LinearWarmup(warmup_epochs=-1.0), "warmup_epochs"),
        (lambda: LinearWarmup(warmup_steps=3, start_factor=1.0), "start_factor"),
        (lambda: LinearWarmup(warmup_steps=3, start_factor=-0.1), "start_factor"),
        (lambda: LEGW(base_batch_size=0, base_warmup_epochs=1.0), "base_batch_size"),
        (lambda: LEGW(base_batch_size=None, base_warmup_epochs=1.0), "base_batch_size"),
        (lambda: LEGW(base_batch_size=16, base_warmup_epochs=0.0), "base_warmup_epochs"),
        (lambda: LEGW(base_batch_size=16, base_warmup_epochs=1.0, lr_scaling="cube"), "lr_scaling"),
        (lambda: LEGW(base_batch_size=16, base_warmup_epochs=1.0, global_batch_size=0), "global_batch_size"),
    ],
)
def test_bad_arguments_raise_value_error(make: Callable[[], Callback], argument: str) -> None:
    with pytest.raises(ValueError, match=f"argument '{argument}'") as info:
        make()
    assert isinstance(info.value, WarmupConfigError)
    assert info.value.callback in {"LinearWarmup", "LEGW"}


def test_examples_and_exports() -> None:
    import litplug.callbacks.warmup as package

    assert {"LEGW", "LinearWarmup"} <= set(package.__all__)
    assert LinearWarmup.example().warmup_steps == 3
    example = LEGW.example()
    assert isinstance(example, LEGW) and example.base_batch_size == 16


def test_a_fit_resumed_after_warmup_still_reports_its_factor_and_lr(tmp_path: Path) -> None:
    """The final metrics of a resumed run have the keys of the first run's (warmup/factor, warmup/lr)."""
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1)
    _, _, first = _fit([LinearWarmup(warmup_steps=3), saver], max_steps=6, enable_checkpointing=True)
    assert float(first.callback_metrics["warmup/factor"]) == 1.0
    _, recorder, resumed = _fit(
        [LinearWarmup(warmup_steps=3)], max_steps=9, ckpt_path=tmp_path / "epoch=1-step=6.ckpt"
    )
    assert float(resumed.callback_metrics["warmup/factor"]) == 1.0
    assert float(resumed.callback_metrics["warmup/lr"]) == pytest.approx(LR)
    assert recorder.logged_lrs[0] == pytest.approx(LR)
