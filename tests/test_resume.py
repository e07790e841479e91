"""A run killed and resumed from its checkpoint ends with exactly the uninterrupted weights.

Parametrised over the registry (every built-in and installed plugin, every built-in callback), so a
new plugin is covered the day it is added. Dropout is on, so the random stream must resume too.
Each case resumes from a checkpoint saved mid-epoch (``every_n_train_steps``) and from the one
``ModelCheckpoint`` saves by default at an epoch's end (in ``on_train_epoch_end``), with the run
bounded by ``max_steps`` and by ``max_epochs``: Lightning restores the epoch-end one differently in
each (``litplug.core.loop_state``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import KillAtStep, Killed, assert_same_state, example_run, quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from litplug.core.discovery import available_plugins, builtin_callbacks
from litplug.core.module import LitplugModule
from litplug.core.plugin import Plugin

TOTAL_STEPS = 8  # crosses an epoch boundary
STEPS_PER_EPOCH = 5  # the digits at batch 256; text data is cut to it (limit_train_batches)
KILL_AT = 3  # mid-epoch
# how the run is bounded, the checkpoint it saves and the step it is killed at, the file resumed
STOPS = {
    "mid-epoch": (
        {"max_steps": TOTAL_STEPS},
        {"every_n_train_steps": KILL_AT, "save_top_k": -1},
        KILL_AT + 1,
    ),
    "epoch-end-max-steps": ({"max_steps": TOTAL_STEPS}, {}, STEPS_PER_EPOCH + 2),
    "epoch-end-max-epochs": ({"max_epochs": 2}, {}, STEPS_PER_EPOCH + 2),
}


PLUGINS = sorted(available_plugins().values(), key=lambda info: info.name)
CALLBACKS = builtin_callbacks()
CASES = (
    [pytest.param(None, None, id="no-plugin")]
    + [pytest.param(info.cls, None, id=f"plugin-{info.name}") for info in PLUGINS]
    + [pytest.param(None, cb, id=f"callback-{cb.__name__}") for cb in CALLBACKS]
)


def _run(
    plugin_cls: type[Plugin] | None,
    callback_cls: type[Callback] | None,
    extra_callbacks: list[Callback],
    bound: dict[str, int],
    ckpt_path: Path | None = None,
) -> LitplugModule:
    L.seed_everything(0)
    plugin = plugin_cls.example() if plugin_cls is not None else None
    model, data = example_run(plugin)
    module = LitplugModule(
        model,
        plugins=[plugin] if plugin else [],
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    )
    callbacks = list(extra_callbacks)
    if callback_cls is not None:
        callbacks.append(callback_cls.example())  # type: ignore[attr-defined]
    trainer = quiet_trainer(
        **bound,
        limit_train_batches=STEPS_PER_EPOCH,
        limit_val_batches=0,
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        deterministic=True,
    )
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except Killed:
        pass
    return module


@pytest.mark.parametrize("stop", sorted(STOPS))
@pytest.mark.parametrize(("plugin_cls", "callback_cls"), CASES)
def test_killed_run_resumes_to_identical_weights(plugin_cls, callback_cls, stop: str, tmp_path: Path) -> None:
    bound, saving, kill_at = STOPS[stop]
    reference = _run(plugin_cls, callback_cls, [], bound)
    saver = ModelCheckpoint(dirpath=tmp_path, **saving)
    _run(plugin_cls, callback_cls, [saver, KillAtStep(kill_at)], bound)
    saved_at = kill_at - 1 if stop == "mid-epoch" else STEPS_PER_EPOCH
    checkpoint = tmp_path / f"epoch=0-step={saved_at}.ckpt"
    assert checkpoint.exists(), sorted(p.name for p in tmp_path.iterdir())
    resumed = _run(plugin_cls, callback_cls, [], bound, ckpt_path=checkpoint)
    expected = reference.state_dict()
    got = resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume"
    for ref_plugin, res_plugin in zip(reference.plugins, resumed.plugins, strict=True):
        assert_same_state(ref_plugin.state_dict(), res_plugin.state_dict(), ref_plugin.name)


def test_a_run_ended_by_max_steps_at_an_epoch_end_continues_as_the_longer_run(tmp_path: Path) -> None:
    """Lightning#19617: continued with a larger ``max_steps``, Lightning 2.6.6 trained an extra batch
    in the finished epoch and re-ran its end hooks; repaired by ``close_finished_epoch``."""
    longer = _run(None, None, [], {"max_steps": 2 * STEPS_PER_EPOCH + 2})
    _run(None, None, [ModelCheckpoint(dirpath=tmp_path)], {"max_steps": 2 * STEPS_PER_EPOCH})
    checkpoint = tmp_path / f"epoch=1-step={2 * STEPS_PER_EPOCH}.ckpt"
    continued = _run(None, None, [], {"max_steps": 2 * STEPS_PER_EPOCH + 2}, ckpt_path=checkpoint)
    for key, value in longer.state_dict().items():
        assert torch.equal(value, continued.state_dict()[key]), f"{key} differs"


@pytest.mark.parametrize(("plugin_cls", "callback_cls"), CASES)
def test_a_run_ended_by_max_steps_mid_epoch_continues_as_the_longer_run(
    plugin_cls, callback_cls, tmp_path: Path
) -> None:
    """A run stopped by ``max_steps`` inside an epoch saves its checkpoint in the epoch-end hooks of
    an epoch not trained to its end. Continued with a larger ``max_steps``, it must train the rest
    of that epoch (Lightning alone moved the sampler on to the next epoch's order but kept the
    batch count, so the epoch's remaining examples were never seen). Every plugin and callback:
    one acting at epoch ends sees the cut epoch end twice, and must still end as the longer run."""
    stop, longer_steps = STEPS_PER_EPOCH + 2, 2 * STEPS_PER_EPOCH + 2  # a cut inside the second epoch
    longer = _run(plugin_cls, callback_cls, [], {"max_steps": longer_steps})
    _run(plugin_cls, callback_cls, [ModelCheckpoint(dirpath=tmp_path)], {"max_steps": stop})
    checkpoint = tmp_path / f"epoch=1-step={stop}.ckpt"
    assert checkpoint.exists(), sorted(p.name for p in tmp_path.iterdir())
    continued = _run(plugin_cls, callback_cls, [], {"max_steps": longer_steps}, ckpt_path=checkpoint)
    for key, value in longer.state_dict().items():
        assert torch.equal(value, continued.state_dict()[key]), f"{key} differs"
    for ref_plugin, res_plugin in zip(longer.plugins, continued.plugins, strict=True):
        assert_same_state(ref_plugin.state_dict(), res_plugin.state_dict(), ref_plugin.name)


class StopAfterStep(Callback):
    """Sets ``trainer.should_stop`` after optimizer step ``step``, as max_time and early stopping do."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_an_epoch_cut_short_by_should_stop_resumes_at_the_next_epoch(tmp_path: Path) -> None:
    """max_time / early stopping ending an epoch early: the resumed run starts the next epoch from
    its first batch. Lightning does so under max_epochs; under max_steps it kept the batch count in
    the next epoch's order (repaired by core/loop_state.close_epoch_cut_short). Both bounds here
    end after one whole epoch past the cut, so they must end with the same weights."""
    cut = STEPS_PER_EPOCH + 2  # inside the second epoch
    resumed = {}
    for name, bound in (("steps", {"max_steps": cut + STEPS_PER_EPOCH}), ("epochs", {"max_epochs": 3})):
        _run(None, None, [ModelCheckpoint(dirpath=tmp_path / name), StopAfterStep(cut)], bound)
        checkpoint = tmp_path / name / f"epoch=1-step={cut}.ckpt"
        assert checkpoint.exists(), sorted(p.name for p in (tmp_path / name).iterdir())
        resumed[name] = _run(None, None, [], bound, ckpt_path=checkpoint)
        assert resumed[name].trainer.global_step == cut + STEPS_PER_EPOCH
        assert resumed[name].trainer.current_epoch == 3
    for key, value in resumed["epochs"].state_dict().items():
        assert torch.equal(value, resumed["steps"].state_dict()[key]), f"{key} differs"


def test_an_epoch_end_resume_with_validation_logs_at_the_steps_of_the_longer_run(tmp_path: Path) -> None:
    """Lightning restarts a closed epoch with an empty iteration that counts a logging step: every
    step logged after an epoch-end resume with validation was one ahead (metrics at shifted steps)."""
    from litplug.core.data import DigitsDataModule
    from litplug.core.models import MLP

    def fit(max_steps: int, callbacks: list[Callback], ckpt_path: Path | None = None) -> L.Trainer:
        L.seed_everything(0)
        trainer = quiet_trainer(
            max_steps=max_steps,
            limit_train_batches=3,
            limit_val_batches=1,
            callbacks=callbacks,
            enable_checkpointing=bool(callbacks),
        )
        module = LitplugModule(MLP(64, [16], 10))
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32, form="flat"), ckpt_path=ckpt_path)
        return trainer

    straight = fit(9, [])
    fit(6, [ModelCheckpoint(dirpath=tmp_path)])
    resumed = fit(9, [], ckpt_path=tmp_path / "epoch=1-step=6.ckpt")
    assert resumed.global_step == straight.global_step == 9
    logging_steps = [t.fit_loop.epoch_loop._batches_that_stepped for t in (straight, resumed)]
    assert logging_steps == [9, 9], logging_steps
