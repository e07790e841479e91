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

A run stopped by ``max_steps`` inside an epoch also saves from ``on_train_epoch_end``, in the same
state but before the epoch's last batch. Continued with a larger ``max_steps``, Lightning keeps the
epoch's batch count but hands the sampler the next epoch's number, so the rest of the interrupted
epoch is never trained on and the next epoch's first batches are skipped.
:func:`reopen_epoch_cut_by_max_steps` moves it back to the state of a run killed after the same
batch: the epoch started, not processed. Lightning then trains the rest of it and runs its end
hooks at its real end. Only the caller knows that ``max_steps`` cut the epoch (``max_time`` and
early stopping leave the same counts, and resume at the next epoch), so it records that at save.
The epoch-end hooks of the cut epoch have run once at the cut, in the first run: a plugin acting
there (not one of the built-ins at a step-bounded cut) sees that epoch end twice.

Not repaired: under ``max_steps`` with validation each epoch, Lightning's logging step
(``_batches_that_stepped``) runs one ahead after such a resume, repaired or not (a restarted
epoch loop's validation check at batch index -1). Only the step metrics are logged at shifts;
weights, optimizer, schedulers and data order are exact.
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
    whose last batch was trained qualifies. An epoch cut short (``max_time``, early stopping) is
    left as Lightning wrote it: resuming starts the next epoch, as Lightning intends.
    """
    fit = loops.get("fit_loop")
    if not isinstance(fit, dict) or not all(key in fit for key in _REPAIRED_KEYS):
        return False  # not a fit loop, or one of another Lightning version's layout: leave it
    epochs = fit["epoch_progress"]
    total = epochs["total"]
    in_epoch_end = total["ready"] == total["started"] == total["processed"] == total["completed"] + 1
    if not (in_epoch_end and fit["epoch_loop.batch_progress"]["is_last_batch"]):
        return False
    for counts in (epochs["total"], epochs["current"]):
        counts["completed"] = counts["processed"]
    # what TrainingEpochLoop.reset does when a new epoch starts
    batches = fit["epoch_loop.batch_progress"]
    _zero(batches["current"])
    batches["is_last_batch"] = False
    _zero(fit["epoch_loop.scheduler_progress"]["current"])
    for progress in fit["epoch_loop.automatic_optimization.optim_progress"]["optimizer"].values():
        _zero(progress["current"])
    _zero(fit["epoch_loop.manual_optimization.optim_step_progress"]["current"])
    _zero(fit["epoch_loop.val_loop.batch_progress"]["total"])
    return True


def reopen_epoch_cut_by_max_steps(loops: dict[str, Any]) -> bool:
    """Mark an epoch that ``max_steps`` stopped before its last batch as still running.

    ``loops`` is a checkpoint's ``"loops"`` entry, changed in place; call it only for a checkpoint
    saved by a run that had reached its ``max_steps``. Returns whether it changed: only a fit loop
    in its epoch-end hooks (``ready == started == processed == completed + 1``) whose last batch
    was not trained qualifies.
    """
    fit = loops.get("fit_loop")
    if not isinstance(fit, dict) or not all(key in fit for key in _REPAIRED_KEYS):
        return False
    epochs = fit["epoch_progress"]
    total = epochs["total"]
    in_epoch_end = total["ready"] == total["started"] == total["processed"] == total["completed"] + 1
    if not in_epoch_end or fit["epoch_loop.batch_progress"]["is_last_batch"]:
        return False
    for counts in (epochs["total"], epochs["current"]):
        counts["processed"] = counts["completed"]
    return True


def _zero(counts: dict[str, int]) -> None:
    for event in _EVENTS:
        if event in counts:
            counts[event] = 0
