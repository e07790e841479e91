"""The exact sequence of litplug hooks in fit, validate and test (a recording plugin)."""

from __future__ import annotations

import torch
from helpers import RecordingPlugin, quiet_trainer, toy_loaders
from torch import nn

from litplug.core.module import LitplugModule


def _module(recorder: RecordingPlugin) -> LitplugModule:
    torch.manual_seed(0)
    return LitplugModule(nn.Linear(8, 3), plugins=[recorder], num_classes=3)


TRAIN_STEP = [
    "transform_batch:train",
    "compute_loss:train",
    "extra_losses:train",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
]
VAL_STEP = ["transform_batch:val", "compute_loss:val", "log_probs:val", "eval_step:val"]


def test_fit_sequence() -> None:
    recorder = RecordingPlugin()
    train, val = toy_loaders()
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(_module(recorder), train, val)
    epoch = TRAIN_STEP * 2 + ["on_eval_start:val", *VAL_STEP, "on_eval_end:val", "on_train_epoch_end"]
    first_epoch = epoch.copy()
    first_epoch.insert(0, "on_fit_start")
    expected = ["check_setup", "configure_model", *first_epoch, *epoch, "on_fit_end"]
    assert recorder.calls == expected
    assert recorder.saw_sample_batch


def test_validate_and_test_sequences() -> None:
    recorder = RecordingPlugin()
    train, val = toy_loaders()
    module = _module(recorder)
    trainer = quiet_trainer(limit_val_batches=2, limit_test_batches=1)
    trainer.validate(module, val)
    assert recorder.calls == [
        "check_setup",
        "configure_model",
        "on_eval_start:val",
        *VAL_STEP,
        *VAL_STEP,
        "on_eval_end:val",
    ]
    recorder.calls.clear()
    trainer.test(module, val)
    test_step = [s.replace(":val", ":test") for s in VAL_STEP]
    # surgery ran already on this module instance: configure_model is not called twice
    assert recorder.calls == ["check_setup", "on_eval_start:test", *test_step, "on_eval_end:test"]


def test_task_hooks_and_checkpoint_hooks(tmp_path) -> None:
    recorder = RecordingPlugin()
    train, val = toy_loaders()
    module = _module(recorder)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, train)
    recorder.calls.clear()
    module.start_task(0)
    module.end_task(0, train)
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    assert recorder.calls == ["on_task_start:0", "on_task_end:0", "on_save_checkpoint"]
    recorder.calls.clear()
    fresh = RecordingPlugin()
    LitplugModule.load_from_checkpoint(
        tmp_path / "x.ckpt", model=nn.Linear(8, 3), plugins=[fresh], weights_only=True
    )
    assert fresh.calls == ["configure_model", "on_load_checkpoint"]
