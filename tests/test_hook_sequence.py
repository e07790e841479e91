"""The exact sequence of litplug hooks in fit, validate, test and predict (a recording plugin), and where the
after-step hook sits relative to Lightning's callbacks (checkpoints saved at a step see its changes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from helpers import RecordingPlugin, quiet_trainer, toy_loaders
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from litplug.core.hookspecs import hookimpl
from litplug.core.module import InterruptedEvalCallback, LitplugModule, PluginBatchEndCallback
from litplug.core.plugin import Plugin


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
    recorder.calls.clear()
    trainer = quiet_trainer(limit_predict_batches=2)
    trainer.predict(module, val)
    predict_step = ["transform_batch:predict", "log_probs:predict"]
    assert recorder.calls == [
        "check_setup",
        "on_eval_start:predict",
        *predict_step,
        *predict_step,
        "on_eval_end:predict",
    ]


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


# -- litplug_on_train_batch_end runs before every callback's on_train_batch_end ---------------------


class CallbackSpy(Callback):
    """A user callback that writes its own batch end (and the optimizer step it saw) into the recorder."""

    def __init__(self, recorder: RecordingPlugin) -> None:
        self.recorder = recorder

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.recorder.calls.append(f"callback.on_train_batch_end:{trainer.global_step}")


def test_plugin_batch_end_runs_before_user_callbacks_after_the_optimizer_step() -> None:
    recorder = RecordingPlugin()
    train, _ = toy_loaders()
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[CallbackSpy(recorder)])
    trainer.fit(_module(recorder), train)
    steps = [c for c in recorder.calls if c in ("on_before_optimizer_step", "on_train_batch_end") or "." in c]
    assert steps == [
        "on_before_optimizer_step",
        "on_train_batch_end",
        "callback.on_train_batch_end:1",
        "on_before_optimizer_step",
        "on_train_batch_end",
        "callback.on_train_batch_end:2",
    ]
    assert isinstance(trainer.callbacks[0], PluginBatchEndCallback)  # type: ignore[attr-defined]
    trainer.fit(_module(RecordingPlugin()), train)  # a second fit on the same trainer: still one, first
    core = [c for c in trainer.callbacks if isinstance(c, PluginBatchEndCallback)]  # type: ignore[attr-defined]
    assert len(core) == 1 and trainer.callbacks[0] is core[0]  # type: ignore[attr-defined]
    assert sum(isinstance(c, InterruptedEvalCallback) for c in trainer.callbacks) == 1  # type: ignore[attr-defined]


class StepCounter(Plugin):
    """State changed only in litplug_on_train_batch_end: the number of steps it has seen."""

    name = "step_counter"

    def __init__(self) -> None:
        self.count = 0

    @hookimpl
    def litplug_on_train_batch_end(self) -> None:
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])


def test_checkpoint_saved_every_step_holds_the_state_changed_in_that_steps_batch_end(tmp_path: Path) -> None:
    counter = StepCounter()
    module = LitplugModule(nn.Linear(8, 3), plugins=[counter], num_classes=3)
    train, _ = toy_loaders()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer = quiet_trainer(
        max_steps=3, limit_val_batches=0, callbacks=[checkpoint], enable_checkpointing=True
    )
    trainer.fit(module, train)
    for step in (1, 2, 3):
        saved = torch.load(tmp_path / f"epoch=0-step={step}.ckpt", weights_only=True)
        assert saved["global_step"] == step
        assert saved["litplug"]["plugins"]["step_counter"]["state"]["count"] == step
    # Resuming from step 2 continues the count as an uninterrupted run would.
    resumed = StepCounter()
    module = LitplugModule(nn.Linear(8, 3), plugins=[resumed], num_classes=3)
    quiet_trainer(max_steps=3, limit_val_batches=0).fit(
        module, train, ckpt_path=tmp_path / "epoch=0-step=2.ckpt"
    )
    assert resumed.count == counter.count == 3
