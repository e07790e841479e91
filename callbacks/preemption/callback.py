"""``PreemptionCheckpoint``: a checkpoint written when the run is told to stop, so it resumes exactly.

SIGTERM is how a run is stopped from outside: ``kill``, a SLURM or Kubernetes preemption, a job
scheduler's time limit. Lightning notes the signal and stops at the end of the current batch (or
evaluation batch) by raising ``SIGTERMException``; this callback saves the full training state
there. The file holds every plugin's state, the random-number state and the data order like any
litplug checkpoint, so a run resumed from it ends with the same weights as one never stopped.

It saves only on SIGTERM during ``fit``: other exceptions (an error in a step, Ctrl-C) can strike
mid-step, where a checkpoint would mix the weights of one step with the loop counters of another.
``litplug fit`` adds one by default (see the README); ``--trainer.enable_checkpointing=false``, or
a ``PreemptionCheckpoint`` or Lightning ``OnExceptionCheckpoint`` in the config, leaves it out.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

PREEMPTED_FILENAME = "preempted"
FILE_EXTENSION = ".ckpt"


class PreemptionCheckpoint(Callback):
    """Save ``<dirpath>/preempted.ckpt`` when SIGTERM stops ``fit``; remove it when a fit completes.

    Args:
        dirpath: directory of the checkpoint; ``None`` takes the trainer's ``default_root_dir``.
        filename: its name, without ``.ckpt``.

    Resume with ``--ckpt_path <dirpath>/preempted.ckpt``, or with ``--ckpt_path last``: ``litplug
    fit`` then takes the newest of this file and the ``ModelCheckpoint`` ``last.ckpt`` files, and
    starts afresh when there is none (so a requeued job can always pass it). A fit that completes
    removes the file, so ``last`` never picks a superseded one; ``validate``/``test`` keep it.

    Not a subclass of Lightning's ``OnExceptionCheckpoint`` on purpose: with one of those in the
    callbacks, Lightning turns every ``fit`` without ``ckpt_path`` into ``ckpt_path="last"``, so a
    rerun of a finished config would silently resume from its end instead of training anew.
    """

    def __init__(self, dirpath: _PATH | None = None, filename: str = PREEMPTED_FILENAME) -> None:
        if not filename:
            raise ValueError("callback 'PreemptionCheckpoint': argument 'filename' must not be empty")
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.filename = filename
        self._requested = False  # SIGTERM noted by this process's handler, not yet acted on

    @classmethod
    def example(cls) -> PreemptionCheckpoint:
        """A small instance for registry-wide tests: the default directory."""
        return cls()

    def checkpoint_path(self, trainer: L.Trainer) -> str:
        """Where the checkpoint is written for ``trainer`` (known before ``fit`` starts)."""
        return os.path.join(self.dirpath or trainer.default_root_dir, self.filename + FILE_EXTENSION)

    # -- when to stop: every rank at the same batch -----------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take SIGTERM over from Lightning's handler for the training loop.

        Lightning 2.6's handler broadcasts from rank 0 inside the signal handler, once per signal
        a process receives; a rank that gets the signal twice (its own and the one rank 0's
        launcher forwards) or at another point of its step leaves the ranks' collectives unpaired,
        and the run hangs. Here the handler only notes the signal, and all ranks agree at the end
        of each training batch (one boolean all-reduce under DDP). Lightning restores its own
        handlers when the run ends.
        """
        self._requested = False
        if threading.current_thread() is threading.main_thread():  # signal handlers live there
            signal.signal(signal.SIGTERM, self._note_sigterm)

    def _note_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._requested = True  # no collectives in a signal handler: see on_train_start

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.strategy.reduce_boolean_decision(self._requested, all=False):  # any rank, on every rank
            # Lightning's own flag: every rank then stops where Lightning stops for SIGTERM, at the
            # end of this batch (SIGTERMException), and on_exception below saves there.
            trainer._signal_connector.received_sigterm = True

    # -- saving and cleaning up ---------------------------------------------------------------

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return  # nothing trained yet, or not training: the last checkpoint is the state
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # on every rank: Lightning builds the checkpoint on all of them
        rank_zero_info(
            f"litplug: SIGTERM: the state after step {trainer.global_step} is saved in {path}; "
            f"resume by adding --ckpt_path {path} (or --ckpt_path last) to the command"
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:  # a completed fit supersedes the saved state
            trainer.strategy.remove_checkpoint(self.checkpoint_path(trainer))  # rank zero; if present
