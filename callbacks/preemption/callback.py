"""``PreemptionCheckpoint``: a checkpoint written when the run is told to stop, so it resumes exactly.

SIGTERM is how a run is stopped from outside: ``kill``, a SLURM or Kubernetes preemption, a job
scheduler's time limit; Ctrl-C (SIGINT) is how a person stops it. During the training loop this
callback notes either signal, all ranks agree on it at the end of the batch, and Lightning stops
there (``SIGTERMException``); the callback then saves the full training state. The file holds
every plugin's state, the random-number state and the data order like any litplug checkpoint,
so a run resumed from it ends with the same weights as one never stopped.

It saves on nothing else: other exceptions (an error in a step, a second Ctrl-C) can strike
mid-step, where a checkpoint would mix the weights of one step with the loop counters of another.
``litplug fit`` adds one by default (see the README); ``--trainer.enable_checkpointing=false``, or
a ``PreemptionCheckpoint`` or Lightning ``OnExceptionCheckpoint`` in the config, leaves it out.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, ClassVar

import lightning as L
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

PREEMPTED_FILENAME = "preempted"
FILE_EXTENSION = ".ckpt"


class PreemptionCheckpoint(Callback):
    """Save ``<dirpath>/preempted.ckpt`` when SIGTERM or Ctrl-C stops ``fit``; remove it when a fit completes.

    Args:
        dirpath: directory of the checkpoint; ``None`` takes the trainer's ``default_root_dir``.
        filename: its name, without ``.ckpt``.

    During the training loop the first SIGTERM or Ctrl-C (SIGINT) stops the run at the end of the
    current batch (with gradient accumulation, of the batch that steps the optimizer) and saves;
    a second Ctrl-C stops at once without saving (Lightning's own KeyboardInterrupt handling).
    Resume with ``--ckpt_path <dirpath>/preempted.ckpt``, or with ``--ckpt_path last``:
    ``litplug fit`` then takes the newest of this file and the config's other checkpoints, and
    starts afresh when there is none (so a requeued job can always pass it). A fit that completes removes the file, so ``last`` never picks a
    superseded one; ``validate``/``test`` keep it.

    Not a subclass of Lightning's ``OnExceptionCheckpoint`` on purpose: with one of those in the
    callbacks, Lightning turns every ``fit`` without ``ckpt_path`` into ``ckpt_path="last"``, so a
    rerun of a finished config would silently resume from its end instead of training anew.
    """

    #: The signal that stopped the last fit in this process (signals are per process), for the
    #: command's exit code; ``None`` when none did.
    stop_signal: ClassVar[signal.Signals | None] = None

    def __init__(self, dirpath: _PATH | None = None, filename: str = PREEMPTED_FILENAME) -> None:
        if not filename:
            raise ValueError("callback 'PreemptionCheckpoint': argument 'filename' must not be empty")
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.filename = filename
        self._noted: signal.Signals | None = None  # a signal this process got, not yet acted on
        self._announce = False  # rank zero says what a Ctrl-C does

    @classmethod
    def example(cls) -> PreemptionCheckpoint:
        """A small instance for registry-wide tests: the default directory."""
        return cls()

    def checkpoint_path(self, trainer: L.Trainer) -> str:
        """Where the checkpoint is written for ``trainer`` (known before ``fit`` starts)."""
        return os.path.join(self.dirpath or trainer.default_root_dir, self.filename + FILE_EXTENSION)

    # -- when to stop: every rank at the same batch -----------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take SIGTERM and SIGINT over from Lightning's handlers for the training loop.

        Lightning 2.6's SIGTERM handler broadcasts from rank 0 inside the signal handler, once per
        signal a process receives; a rank that gets the signal twice (its own and the one rank 0's
        launcher forwards) or at another point of its step leaves the ranks' collectives unpaired,
        and the run hangs. Here the handler only notes the signal, and all ranks agree at the end
        of each training batch (one boolean all-reduce under DDP). Lightning restores its own
        handlers when the run ends.
        """
        self._noted = None
        type(self).stop_signal = None
        self._announce = trainer.is_global_zero
        if threading.current_thread() is threading.main_thread():  # signal handlers live there
            signal.signal(signal.SIGTERM, self._note_signal)
            signal.signal(signal.SIGINT, self._note_signal)

    def _note_signal(self, signum: int, frame: FrameType | None) -> None:
        """No collectives in a signal handler (see on_train_start): note it, act at the batch end."""
        if signum == signal.SIGINT and self._noted is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self._noted = signal.Signals(signum)
        if signum == signal.SIGINT and self._announce:
            print(
                "\nlitplug: Ctrl-C: stopping at the end of this training step and saving a checkpoint "
                "(Ctrl-C again stops at once, without one)",
                file=sys.stderr,
                flush=True,
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        noted_anywhere = trainer.strategy.reduce_boolean_decision(self._noted is not None, all=False)
        # Within a gradient-accumulation window the summed gradients are in no checkpoint: a stop
        # there would resume without them. Wait for the batch that steps the optimizer (the same
        # on every rank; the all-reduce above runs at every batch either way).
        if noted_anywhere and not trainer.fit_loop.epoch_loop._should_accumulate():
            # Lightning's own flag, on every rank: all stop where Lightning stops for SIGTERM, at
            # the end of this batch (SIGTERMException), and on_exception below saves there.
            type(self).stop_signal = self._noted or signal.SIGTERM  # SIGTERM: forwarded by a rank
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
        # On every rank: Lightning builds the checkpoint on all of them. A full one (weights_only
        # False) to resume from; saying so also keeps Lightning from logging that it defaulted.
        trainer.save_checkpoint(path, weights_only=False)
        name = (type(self).stop_signal or signal.SIGTERM).name
        rank_zero_info(
            f"litplug: {name}: the state after step {trainer.global_step} is saved in {path}; "
            f"resume by adding --ckpt_path {path} (or --ckpt_path last) to the command"
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:  # a completed fit supersedes the saved state
            trainer.strategy.remove_checkpoint(self.checkpoint_path(trainer))  # rank zero; if present
