"""A run stopped by a real signal resumes to exactly the weights of a run never stopped.

End to end through `litplug fit` subprocesses: SIGTERM (a `kill`, a preemption) mid-step and
mid-validation, where litplug's default PreemptionCheckpoint saves the state Lightning stops at,
and SIGKILL, after which the run resumes from its last periodic checkpoint. The run has EMA
(whose average is swapped into the model during validation) and a warmup callback, dropout on.
Plus in-process checks of the pieces: the interrupted-evaluation hook and the callback's rules.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import (
    RecordingPlugin,
    assert_same_state,
    litplug_command,
    quiet_trainer,
    subprocess_env,
    toy_loaders,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from litplug.callbacks.preemption import PreemptionCheckpoint
from litplug.core.cli import (
    SIGTERM_EXIT_CODE,
    _checkpoint_folders,
    add_preemption_checkpoint,
    resume_checkpoint,
)
from litplug.core.module import LitplugModule
from litplug.plugins.ema import EMA

FINAL = "epoch=2-step=12.ckpt"  # 5 steps per epoch at batch 256; max_steps 12
CONFIG = """\
seed_everything: 0
trainer:
  max_steps: 12
  accelerator: cpu
  devices: 1
  deterministic: true
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  limit_val_batches: 2
  default_root_dir: {root}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/ckpts, every_n_train_steps: 3, save_top_k: -1, save_last: true}}
    - class_path: litplug.callbacks.warmup.LinearWarmup
      init_args: {{warmup_steps: 5}}
model:
  model:
    class_path: litplug.core.models.MLP
    init_args: {{input_dim: 64, hidden_dims: [32], num_classes: 10, dropout: 0.2}}
  optimizer:
    class_path: torch.optim.SGD
    init_args: {{lr: 0.05, momentum: 0.9}}
  plugins:
    - class_path: litplug.plugins.ema.EMA
      init_args: {{decay: 0.9}}
data:
  class_path: litplug.core.data.DigitsDataModule
  init_args: {{batch_size: 256, form: flat}}
"""


def _litplug_fit(root: Path, *extra: str, launcher: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    config = root / "run.yaml"
    if not config.exists():
        root.mkdir(parents=True, exist_ok=True)
        config.write_text(CONFIG.format(root=root))
    command = litplug_command("fit", config, *extra, launcher=launcher)
    return subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=root
    )


def _final_state(root: Path, name: str = FINAL) -> dict[str, Any]:
    return _training_state(root / "ckpts" / name)


def _training_state(path: Path) -> dict[str, Any]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = {key: checkpoint[key] for key in ("state_dict", "optimizer_states", "global_step")}
    # ModelCheckpoint's own state is paths in this run's directory
    state["callbacks"] = {
        k: v for k, v in checkpoint["callbacks"].items() if not k.startswith("ModelCheckpoint")
    }
    state["plugins"] = {name: entry["state"] for name, entry in checkpoint["litplug"]["plugins"].items()}
    return state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("uninterrupted")
    completed = _litplug_fit(root)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return _final_state(root)


def _signal(name: str, **where: int) -> list[str]:
    return [
        f"--trainer.callbacks.signal_name={name}",
        *(f"--trainer.callbacks.{k}={v}" for k, v in where.items()),
    ]


STOPS = {
    # the signal and where, the exit code, the checkpoint `--ckpt_path last` must resume from
    "sigterm-mid-epoch": (_signal("SIGTERM", at_step=7), 143, "preempted.ckpt"),
    # noted during validation, acted on at the next training batch end
    "sigterm-during-validation": (_signal("SIGTERM", in_validation_epoch=1), 143, "preempted.ckpt"),
    # at an epoch's last batch: Lightning starts the due validation and stops it after one batch,
    # with EMA's average swapped in
    "sigterm-before-validation": (_signal("SIGTERM", at_step=9), 143, "preempted.ckpt"),
    "ctrl-c-mid-epoch": (_signal("SIGINT", at_step=7), 130, "preempted.ckpt"),
    # a second Ctrl-C stops at once (Lightning's KeyboardInterrupt exit), saving nothing
    "ctrl-c-twice": (_signal("SIGINT", at_step=7, times=2), 1, "last.ckpt"),
    "sigkill-mid-epoch": (_signal("SIGKILL", at_step=7), -9, "last.ckpt"),
}


@pytest.mark.slow
@pytest.mark.parametrize("stop", sorted(STOPS))
def test_a_signalled_litplug_fit_resumes_from_last_to_identical_state(
    stop: str, uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    signal_args, exit_code, resumed_from = STOPS[stop]
    stopped = _litplug_fit(tmp_path, "--trainer.callbacks+=helpers.SendSignal", *signal_args)
    assert stopped.returncode == exit_code, stopped.stderr[-3000:]
    preempted = tmp_path / "preempted.ckpt"
    assert preempted.exists() is (resumed_from == "preempted.ckpt")
    if preempted.exists():
        name = "SIGINT" if stop.startswith("ctrl-c") else "SIGTERM"
        assert f"litplug: {name}: the state after step" in stopped.stderr, stopped.stderr[-3000:]
        assert f"saved in {preempted}" in stopped.stderr and f"stopped by {name}" in stopped.stderr
    assert not (tmp_path / "ckpts" / FINAL).exists()

    resumed = _litplug_fit(tmp_path, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    restored = [
        line for line in resumed.stderr.splitlines() + resumed.stdout.splitlines() if "Restoring" in line
    ]
    assert restored and restored[0].endswith(resumed_from), restored
    assert not preempted.exists(), "a completed fit removes the superseded preemption checkpoint"
    assert_same_state(uninterrupted, _final_state(tmp_path), stop)


@pytest.mark.slow
def test_sigterm_inside_a_gradient_accumulation_window_stops_at_its_optimizer_step(tmp_path: Path) -> None:
    """Stopping after the first of two accumulated batches would lose its gradient (no checkpoint
    holds .grad): the run stops after the second, and resumes exactly."""
    accumulating = ["--trainer.accumulate_grad_batches=2", "--trainer.max_steps=6"]
    final = "epoch=1-step=6.ckpt"  # 3 optimizer steps per epoch: batches (0, 1), (2, 3), (4)
    assert _litplug_fit(tmp_path / "uninterrupted", *accumulating).returncode == 0
    stopped_root = tmp_path / "stopped"
    # global step 1 starts at batch 2, the first of its window
    stopped = _litplug_fit(
        stopped_root, *accumulating, "--trainer.callbacks+=helpers.SendSignal", *_signal("SIGTERM", at_step=1)
    )
    assert stopped.returncode == SIGTERM_EXIT_CODE, stopped.stderr[-3000:]
    assert "the state after step 2 is saved" in stopped.stderr, stopped.stderr[-3000:]
    resumed = _litplug_fit(stopped_root, *accumulating, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(
        _final_state(tmp_path / "uninterrupted", final), _final_state(stopped_root, final), "accumulating"
    )


# As the shipped configs checkpoint: Lightning's default ModelCheckpoint (the latest epoch end) in
# the folder of a CSVLogger that numbers its runs, so a restarted run writes to a new version_N.
VERSIONED_CONFIG = CONFIG.replace("  logger: false\n", "").replace(
    "  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
    "      init_args: {{dirpath: {root}/ckpts, every_n_train_steps: 3, save_top_k: -1, save_last: true}}\n",
    "  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n"
    "    init_args: {{save_dir: {root}, name: run}}\n  callbacks:\n",
)


@pytest.mark.slow
def test_ckpt_path_last_finds_the_epoch_checkpoint_of_an_earlier_logger_version(tmp_path: Path) -> None:
    """SIGKILL saves nothing; the restarted run logs to version_1, yet resumes from version_0's
    epoch checkpoint (Lightning's own "last" looks in version_1 only and would train from scratch)."""
    assert "ModelCheckpoint" not in VERSIONED_CONFIG and "CSVLogger" in VERSIONED_CONFIG
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    for root in (uninterrupted, killed):
        root.mkdir()
        (root / "run.yaml").write_text(VERSIONED_CONFIG.format(root=root))
    assert _litplug_fit(uninterrupted).returncode == 0
    stopped = _litplug_fit(killed, "--trainer.callbacks+=helpers.SendSignal", *_signal("SIGKILL", at_step=7))
    assert stopped.returncode == -signal.SIGKILL, stopped.stderr[-3000:]
    resumed = _litplug_fit(killed, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epoch_end = killed / "run" / "version_0" / "checkpoints" / "epoch=0-step=5.ckpt"
    assert f"--ckpt_path last resumes from {epoch_end}" in resumed.stdout, resumed.stdout[-2000:]
    final = Path("run") / "{}" / "checkpoints" / "epoch=2-step=12.ckpt"
    assert_same_state(
        _training_state(uninterrupted / str(final).format("version_0")),
        _training_state(killed / str(final).format("version_1")),
        "resumed from an earlier version",
    )


DDP = ["--trainer.devices=2", "--trainer.strategy=ddp"]
DDP_FINAL = "epoch=3-step=12.ckpt"  # 3 steps per epoch: a global batch of 2 x 256
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
DDP_STOPS = {
    # `kill <pid>` of the `litplug fit` you started: Lightning forwards the signal to its other process.
    "lightning-launcher-sigterm-to-rank-0": ([], ["--trainer.callbacks.rank=0"], SIGTERM_EXIT_CODE),
    # `kill -TERM -<process group>`: rank 1 gets two signals; Lightning's own handler hung here.
    "lightning-launcher-sigterm-to-every-rank": ([], [], SIGTERM_EXIT_CODE),
    # srun/torchrun-style: every rank gets the signal once. torchrun exits 1 when a rank fails.
    "torchrun-sigterm-to-every-rank": (TORCHRUN, [], 1),
}


@pytest.fixture(scope="module")
def ddp_uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ddp_uninterrupted")
    completed = _litplug_fit(root, *DDP)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return _final_state(root, DDP_FINAL)


@pytest.mark.slow
@pytest.mark.parametrize("stop", sorted(DDP_STOPS))
def test_a_two_process_run_stopped_by_sigterm_resumes_to_identical_state(
    stop: str, ddp_uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    """Both processes stop at the same batch and write one checkpoint. Without PreemptionCheckpoint's
    own SIGTERM handler, the every-rank case hangs in Lightning 2.6's (callbacks/preemption/README.md)."""
    launcher, rank_args, exit_code = DDP_STOPS[stop]
    signal_args = ["--trainer.callbacks.signal_name=SIGTERM", "--trainer.callbacks.at_step=4", *rank_args]
    stopped = _litplug_fit(
        tmp_path, *DDP, "--trainer.callbacks+=helpers.SendSignal", *signal_args, launcher=launcher
    )
    assert stopped.returncode == exit_code, stopped.stderr[-3000:]
    assert "stopped by SIGTERM" in stopped.stderr and (tmp_path / "preempted.ckpt").exists()
    resumed = _litplug_fit(tmp_path, *DDP, "--ckpt_path", "last", launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "Restoring states from the checkpoint path at " + str(tmp_path / "preempted.ckpt")
        in resumed.stderr + resumed.stdout
    )
    assert_same_state(ddp_uninterrupted, _final_state(tmp_path, DDP_FINAL), stop)


# -- in-process pieces --------------------------------------------------------------------------


class Stop(RuntimeError):
    pass


class RaiseInValidation(Callback):
    """Raises in the first batch of the second validation epoch; keeps the training weights seen
    at its start (callbacks run before the module's hook, where EMA swaps its average in)."""

    def __init__(self, exception: BaseException) -> None:
        self.exception = exception
        self.training_weights: dict[str, torch.Tensor] = {}

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.training_weights = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.current_epoch == 1:
            raise self.exception


def test_an_exception_mid_validation_leaves_the_training_weights_and_fires_the_interrupted_hook() -> None:
    torch.manual_seed(0)
    recorder, ema = RecordingPlugin(), EMA(decay=0.5)
    module = LitplugModule(nn.Linear(8, 3), plugins=[ema, recorder], num_classes=3)
    raiser = RaiseInValidation(Stop("stop"))
    train, val = toy_loaders()
    with pytest.raises(Stop):
        quiet_trainer(max_epochs=3, limit_train_batches=2, callbacks=[raiser]).fit(module, train, val)
    assert recorder.calls[-1] == "on_eval_interrupted:val"
    assert recorder.calls.count("on_eval_end:val") == 1  # the first epoch's only
    averaged = ema.averaged.module.state_dict()  # type: ignore[union-attr]
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, raiser.training_weights[key]), key
        assert not torch.equal(value, averaged[key]), f"{key}: the EMA average is still swapped in"


def _trainer(tmp_path: Path, exception: BaseException) -> tuple[L.Trainer, PreemptionCheckpoint]:
    preemption = PreemptionCheckpoint()
    trainer = quiet_trainer(
        max_epochs=3,
        limit_train_batches=2,
        default_root_dir=tmp_path,
        callbacks=[preemption, RaiseInValidation(exception)],
    )
    return trainer, preemption


def test_the_preemption_checkpoint_saves_on_sigterm_only(tmp_path: Path) -> None:
    train, val = toy_loaders()
    for exception, saved in ((Stop("an error"), False), (SIGTERMException(), True)):
        trainer, preemption = _trainer(tmp_path, exception)
        with pytest.raises(type(exception)):
            trainer.fit(LitplugModule(nn.Linear(8, 3), num_classes=3), train, val)
        assert preemption.checkpoint_path(trainer) == str(tmp_path / "preempted.ckpt")
        assert (tmp_path / "preempted.ckpt").exists() is saved, type(exception).__name__
    # two epochs of two steps, stopped in the second validation
    assert torch.load(tmp_path / "preempted.ckpt", weights_only=False)["global_step"] == 4


def test_the_preemption_checkpoint_is_removed_by_a_completed_fit_and_kept_by_test(tmp_path: Path) -> None:
    saved = tmp_path / "preempted.ckpt"
    saved.write_bytes(b"not a checkpoint")
    train, val = toy_loaders()
    module = LitplugModule(nn.Linear(8, 3), num_classes=3)
    trainer = quiet_trainer(max_epochs=1, default_root_dir=tmp_path, callbacks=[PreemptionCheckpoint()])
    trainer.test(module, val)
    assert saved.exists()
    # A fit without ckpt_path trains afresh: it does not pick the file up (Lightning does that for
    # its OnExceptionCheckpoint, turning ckpt_path=None into "last"; here loading it would fail).
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    trainer.fit(module, train, val)
    assert not saved.exists()
    # its SIGINT/SIGTERM handlers live only during the fit (Lightning restores the previous ones)
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers


def test_ckpt_path_last_takes_the_newest_of_the_preemption_and_last_checkpoints(tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, callbacks=[saver, PreemptionCheckpoint()])
    assert resume_checkpoint(trainer) is None  # nothing saved: train from the start
    last, preempted = tmp_path / "ckpts" / "last.ckpt", tmp_path / "preempted.ckpt"
    last.parent.mkdir()
    for older, newer in ((last, preempted), (preempted, last)):
        older.write_bytes(b"")
        newer.write_bytes(b"")
        os.utime(older, (1_000_000, 1_000_000))
        assert resume_checkpoint(trainer) == str(newer)


def _touch(path: Path, mtime: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))
    return path


def test_ckpt_path_last_searches_every_run_folder_of_the_logger_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def newest(**logger: Any) -> str | None:
        csv = CSVLogger(save_dir=tmp_path, name="run", **logger)
        return resume_checkpoint(
            L.Trainer(default_root_dir=tmp_path, logger=csv, callbacks=[ModelCheckpoint()])
        )

    assert newest() is None
    _touch(tmp_path / "run" / "version_0" / "checkpoints" / "epoch=9-step=90.ckpt", 3_000_000)
    latest = _touch(tmp_path / "run" / "version_1" / "checkpoints" / "epoch=2-step=20.ckpt", 4_000_000)
    # another experiment name
    _touch(tmp_path / "other" / "version_0" / "checkpoints" / "epoch=0-step=5.ckpt", 5_000_000)
    _touch(tmp_path / "run" / "version_1" / "checkpoints" / "notes.txt", 6_000_000)  # not a checkpoint
    assert newest() == str(latest)
    # a fixed version is one folder, as Lightning resolves it
    fixed = _touch(tmp_path / "run" / "mine" / "checkpoints" / "epoch=0-step=1.ckpt", 1_000_000)
    assert newest(version="mine") == str(fixed)
    # W&B names each run's folder by its run id
    wandb = WandbLogger(save_dir=str(tmp_path), project="proj", offline=True)
    in_a_run = _touch(tmp_path / "proj" / "0rqujklt" / "checkpoints" / "epoch=1-step=9.ckpt", 1_500_000)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=wandb, callbacks=[ModelCheckpoint()])
    assert resume_checkpoint(trainer) == str(in_a_run)
    # a remote logger folder is left to Lightning's own lookup: as a Path, memory://runs would be the
    # local folder memory:/runs
    monkeypatch.chdir(tmp_path)
    _touch(tmp_path / "memory:" / "runs" / "run" / "version_0" / "checkpoints" / "a.ckpt", 7_000_000)
    remote = CSVLogger(save_dir="memory://runs", name="run")
    assert _checkpoint_folders(L.Trainer(default_root_dir=tmp_path, logger=remote), ModelCheckpoint()) == []
    # without a logger: <default_root_dir>/checkpoints
    plain = _touch(tmp_path / "checkpoints" / "epoch=0-step=2.ckpt", 2_000_000)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, callbacks=[ModelCheckpoint()])
    assert resume_checkpoint(trainer) == str(plain)


def test_litplug_fit_adds_a_preemption_checkpoint_unless_checkpointing_is_off_or_one_is_configured(
    tmp_path: Path,
) -> None:
    def added(**kwargs: Any) -> list[PreemptionCheckpoint]:
        trainer = L.Trainer(default_root_dir=tmp_path, logger=False, **kwargs)
        add_preemption_checkpoint(trainer)
        found = [c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)]  # type: ignore[attr-defined]
        assert all(c.checkpoint_path(trainer) == str(tmp_path / "preempted.ckpt") for c in found[:1])
        return found

    assert len(added()) == 1
    assert added(enable_checkpointing=False) == []
    assert added(callbacks=[OnExceptionCheckpoint(tmp_path)]) == []
    assert len(added(callbacks=[PreemptionCheckpoint(tmp_path)])) == 1
