"""close_finished_epoch repairs exactly the loop state saved inside an epoch's end hooks after its
last batch; close_epoch_cut_short and reopen_epoch_cut_by_max_steps exactly the one saved there
before it (an epoch cut short, or stopped by max_steps).

The states are Lightning's own, captured from a real fit where each kind of checkpoint is saved.
That a repaired checkpoint resumes exactly is tested registry-wide in test_resume.py.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
from helpers import quiet_trainer, toy_loaders
from lightning.pytorch.callbacks import Callback
from torch import nn

from litplug.core.loop_state import (
    close_epoch_cut_short,
    close_finished_epoch,
    reopen_epoch_cut_by_max_steps,
)
from litplug.core.module import LitplugModule

BATCHES_PER_EPOCH = 4  # 64 rows at batch 16


class CaptureLoopState(Callback):
    """The fit loop's state where a checkpoint would be saved: mid-epoch and at each epoch's end."""

    def __init__(self, stop_at_batch: int | None = None) -> None:
        self.stop_at_batch = stop_at_batch
        self.mid_epoch: dict[str, Any] = {}
        self.epoch_end: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if args[-1] == 1 and not self.mid_epoch:
            self.mid_epoch = {"fit_loop": copy.deepcopy(trainer.fit_loop.state_dict())}
        if args[-1] == self.stop_at_batch:
            trainer.should_stop = True  # what max_time and early stopping do

    def on_train_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.epoch_end.append({"fit_loop": copy.deepcopy(trainer.fit_loop.state_dict())})


def _captured(stop_at_batch: int | None = None, **bound: int) -> CaptureLoopState:
    capture = CaptureLoopState(stop_at_batch)
    train, _ = toy_loaders()
    trainer = quiet_trainer(callbacks=[capture], limit_val_batches=0, **bound)
    trainer.fit(LitplugModule(nn.Linear(8, 3), num_classes=3), train)
    return capture


def test_an_epoch_saved_in_its_end_hooks_is_closed_as_the_next_epoch_starts() -> None:
    for bound in ({"max_steps": 2 * BATCHES_PER_EPOCH + 1}, {"max_epochs": 2}):
        loops = _captured(**bound).epoch_end[0]
        epochs = loops["fit_loop"]["epoch_progress"]["total"]
        assert (epochs["processed"], epochs["completed"]) == (1, 0)
        assert close_finished_epoch(loops)
        fit = loops["fit_loop"]
        for counts in (fit["epoch_progress"]["total"], fit["epoch_progress"]["current"]):
            assert counts == {"ready": 1, "started": 1, "processed": 1, "completed": 1}
        batches = fit["epoch_loop.batch_progress"]
        assert set(batches["current"].values()) == {0} and not batches["is_last_batch"]
        assert batches["total"]["completed"] == BATCHES_PER_EPOCH  # totals are kept
        assert not close_finished_epoch(loops), "a closed epoch is left alone"


def test_mid_epoch_and_cut_short_states_are_left_as_lightning_wrote_them() -> None:
    mid_epoch = _captured(max_epochs=1).mid_epoch
    cut_short = _captured(stop_at_batch=1, max_epochs=3).epoch_end[0]
    assert cut_short["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] < BATCHES_PER_EPOCH
    for loops in (mid_epoch, cut_short):
        before = copy.deepcopy(loops)
        assert not close_finished_epoch(loops)
        assert loops == before
    assert not close_finished_epoch({})  # a checkpoint without loop state (weights only)
    other_layout = _captured(max_epochs=1).epoch_end[0]
    del other_layout["fit_loop"]["epoch_loop.scheduler_progress"]
    assert not close_finished_epoch(other_layout)  # another Lightning's layout: left alone


def test_an_epoch_cut_by_max_steps_is_reopened_where_it_stopped() -> None:
    loops = _captured(max_steps=BATCHES_PER_EPOCH + 1).epoch_end[1]  # one batch into the second
    fit = loops["fit_loop"]
    assert not close_finished_epoch(copy.deepcopy(loops)), "not at its last batch: not closed"
    assert reopen_epoch_cut_by_max_steps(loops)
    for counts in (fit["epoch_progress"]["total"], fit["epoch_progress"]["current"]):
        assert counts["started"] == counts["processed"] + 1 == counts["completed"] + 1
    assert fit["epoch_progress"]["total"]["started"] == 2
    assert fit["epoch_loop.batch_progress"]["current"]["completed"] == 1  # batch count kept
    assert not reopen_epoch_cut_by_max_steps(loops), "an open epoch is left alone"
    finished = _captured(max_steps=BATCHES_PER_EPOCH).epoch_end[0]
    assert not reopen_epoch_cut_by_max_steps(finished), "an epoch at its last batch is not reopened"
    mid_epoch = _captured(max_epochs=1).mid_epoch
    assert not reopen_epoch_cut_by_max_steps(mid_epoch)
    assert not reopen_epoch_cut_by_max_steps({})


def test_an_epoch_cut_short_is_closed_under_either_bound() -> None:
    for bound in ({"max_steps": 3 * BATCHES_PER_EPOCH}, {"max_epochs": 3}):
        loops = _captured(stop_at_batch=1, **bound).epoch_end[0]
        assert not close_epoch_cut_short(copy.deepcopy(_captured(max_epochs=1).epoch_end[0])), "last batch"
        assert close_epoch_cut_short(loops)
        fit = loops["fit_loop"]
        for counts in (fit["epoch_progress"]["total"], fit["epoch_progress"]["current"]):
            assert counts == {"ready": 1, "started": 1, "processed": 1, "completed": 1}
        batches = fit["epoch_loop.batch_progress"]
        assert set(batches["current"].values()) == {0} and not batches["is_last_batch"]
        assert batches["total"]["completed"] == 2  # batches 0 and 1 were trained
        assert not close_epoch_cut_short(loops), "a closed epoch is left alone"
