"""Repairs Lightning's loop state in a checkpoint saved in ``on_train_epoch_end``.

``ModelCheckpoint`` saves at the end of every epoch by default, from ``on_train_epoch_end``: the
epoch's batches are done and its ``processed`` count is up, but ``completed`` is not yet. Lightning
2.6 restores that state correctly when ``max_epochs`` bounds the run. When ``max_steps`` does
(iteration-based training), it treats the epoch as unfinished. It then trains one extra batch (the
loader's first) in the finished epoch, runs ``on_train_epoch_end`` a second time, steps
epoch-interval schedulers once more, and passes every later epoch a sampler epoch one too high.
A resumed run then differs from the uninterrupted one (upstream: Lightning#19403, #19617).

:func:`close_finished_epoch` moves such a state to the one Lightning has at the next epoch's
start: the epoch completed, the per-epoch counters at zero. Lightning then resumes exactly, with
either bound. Plain dicts in, no Lightning import: the layout is ``Trainer.fit_loop.state_dict()``.

An epoch cut short also saves from ``on_train_epoch_end``, in the same state but before its last
batch; under ``max_steps`` Lightning restores it wrongly too: it keeps the epoch's batch count but
hands the sampler the next epoch's number, so the rest of the epoch and the next epoch's first
batches are never trained on, and the epoch-end hooks run again. What is right depends on the cut:

- ``max_steps`` cut it (the run is continued with a larger one):
  :func:`reopen_epoch_cut_by_max_steps` moves the state back to that of a run killed after the
  same batch, the epoch started but not processed. Lightning trains the rest of the epoch and runs
  its end hooks at its real end, as the longer run would have. Its end hooks have also run once at
  the cut, in the first run: a plugin acting there sees that epoch end twice.
- ``max_time`` or early stopping cut it: :func:`close_epoch_cut_short` closes it as
  :func:`close_finished_epoch` does, so the resumed run starts the next epoch from its first
  batch. That is what Lightning does under ``max_epochs``, now under either bound.

The counts are the same in both cases; only the caller knows which cut it was, and records it when
it saves.

Closing an epoch also leaves one count to repair at run time: Lightning restarts a closed epoch
with an empty iteration (a validation check at batch index -1, skipped) that still counts a
logging step (``_batches_that_stepped``), so after an epoch-end resume with validation every
logged step was one ahead. :func:`logging_step` reads the checkpoint's count for the caller to
put back before the first batch. Weights, optimizer, schedulers and data order are exact either way.
"""

from __future__ import annotations

from typing import Any

_EVENTS = ("ready", "started", "processed", "completed")
_REPAIRED_KEYS = (
    "epoch_progress",
    "epoch_loop.batch_progress",
    "epoch_loop.scheduler_progress",
    "epoch_loop.automatic_optimization.optim_progress",
    "epoch_loop.manual_optimization.optim_step_progress",
    "epoch_loop.val_loop.batch_progress",
)


def close_finished_epoch(loops: dict[str, Any]) -> bool:
    """Mark an epoch saved after its last batch, inside its epoch-end hooks, as completed.

    ``loops`` is a checkpoint's ``"loops"`` entry, changed in place. Returns whether it changed:
    only a fit loop whose epoch counts read ``ready == started == processed == completed + 1`` and
    whose last batch was trained qualifies.
    """
    fit = _fit_loop_in_epoch_end(loops)
    if fit is None or not fit["epoch_loop.batch_progress"]["is_last_batch"]:
        return False
    _close_epoch(fit)
    return True


def close_epoch_cut_short(loops: dict[str, Any]) -> bool:
    """Mark an epoch that ``max_time`` or early stopping ended before its last batch as completed,
    so that the resumed run starts the next epoch; as :func:`close_finished_epoch` otherwise."""
    fit = _fit_loop_in_epoch_end(loops)
    if fit is None or fit["epoch_loop.batch_progress"]["is_last_batch"]:
        return False
    _close_epoch(fit)
    return True


def reopen_epoch_cut_by_max_steps(loops: dict[str, Any]) -> bool:
    """Mark an epoch that ``max_steps`` stopped before its last batch as still running.

    ``loops`` is a checkpoint's ``"loops"`` entry, changed in place; call it only for a checkpoint
    saved by a run that had reached its ``max_steps``. Returns whether it changed: only a fit loop
    in its epoch-end hooks whose last batch was not trained qualifies.
    """
    fit = _fit_loop_in_epoch_end(loops)
    if fit is None or fit["epoch_loop.batch_progress"]["is_last_batch"]:
        return False
    epochs = fit["epoch_progress"]
    for counts in (epochs["total"], epochs["current"]):
        counts["processed"] = counts["completed"]
    return True


def logging_step(loops: dict[str, Any]) -> int | None:
    """The checkpoint's logging step (the epoch loop's ``_batches_that_stepped``), if it has one."""
    fit = loops.get("fit_loop")
    epoch_loop = fit.get("epoch_loop.state_dict") if isinstance(fit, dict) else None
    step = epoch_loop.get("_batches_that_stepped") if isinstance(epoch_loop, dict) else None
    return step if isinstance(step, int) else None


def _fit_loop_in_epoch_end(loops: dict[str, Any]) -> dict[str, Any] | None:
    """The fit loop's state if it was saved inside an epoch's end hooks, else None."""
    fit = loops.get("fit_loop")
    if not isinstance(fit, dict) or not all(key in fit for key in _REPAIRED_KEYS):
        return None  # not a fit loop, or one of another Lightning version's layout: leave it
    total = fit["epoch_progress"]["total"]
    in_epoch_end = total["ready"] == total["started"] == total["processed"] == total["completed"] + 1
    return fit if in_epoch_end else None


def _close_epoch(fit: dict[str, Any]) -> None:
    """What Lightning's loops hold when the next epoch starts: this one completed, the per-epoch
    counters at zero (what TrainingEpochLoop.reset does)."""
    epochs = fit["epoch_progress"]
    for counts in (epochs["total"], epochs["current"]):
        counts["completed"] = counts["processed"]
    batches = fit["epoch_loop.batch_progress"]
    _zero(batches["current"])
    batches["is_last_batch"] = False
    _zero(fit["epoch_loop.scheduler_progress"]["current"])
    for progress in fit["epoch_loop.automatic_optimization.optim_progress"]["optimizer"].values():
        _zero(progress["current"])
    _zero(fit["epoch_loop.manual_optimization.optim_step_progress"]["current"])
    _zero(fit["epoch_loop.val_loop.batch_progress"]["total"])


def _zero(counts: dict[str, int]) -> None:
    for event in _EVENTS:
        if event in counts:
            counts[event] = 0
