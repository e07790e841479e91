"""``LitplugModule``: the LightningModule that runs any ``nn.Module`` with a list of plugins.

The module owns the flow of a step (transform batch -> forward -> loss + named extra terms -> log)
and calls plugin hooks at fixed points (see :mod:`litplug.core.hookspecs`). It also owns what must
survive a checkpoint besides the weights: every plugin's state under a versioned key, the global
random-number state (so a resumed run draws the same noise), and the fact that model surgery ran.
"""

from __future__ import annotations

import random
import warnings
from contextvars import ContextVar
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from litplug.core import distributed
from litplug.core.errors import CheckpointError, ModuleConfigError, PluginSetupError
from litplug.core.features import get_model_feature
from litplug.core.learning_rates import set_first_group_lr
from litplug.core.loop_state import (
    close_epoch_cut_short,
    close_finished_epoch,
    logging_step,
    reopen_epoch_cut_by_max_steps,
)
from litplug.core.manager import PluginHooks
from litplug.core.metrics import ClassificationMetrics, default_loss
from litplug.core.plugin import Plugin
from litplug.core.tuning import keep_the_tuned_values_on_resume

_given_hyperparameters: ContextVar[Any] | None
try:  # Lightning stores the CLI's plain config instead of objects when this is set.
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - older/newer Lightning without the context variable
    _given_hyperparameters = None

# Lightning's own aliases, so LightningCLI/jsonargparse accept `class_path:` optimizers and schedulers.
OptimizerFactory = OptimizerCallable
SchedulerFactory = LRSchedulerCallable

CHECKPOINT_KEY = "litplug"
CHECKPOINT_FORMAT = 1
EVAL_STAGES = ("val", "test")


#: The ``torch.compile`` keyword arguments ``compile_model`` accepts (``model`` is the network itself).
COMPILE_OPTIONS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")


def _compile_options(compile_model: bool | dict[str, Any]) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments, or ``None`` for no compilation; bad values fail here."""
    if isinstance(compile_model, bool):
        return {} if compile_model else None
    if not isinstance(compile_model, dict):
        raise ModuleConfigError(
            "compile_model", f"must be true/false or a dict of torch.compile options, got {compile_model!r}"
        )
    unknown = sorted(set(compile_model) - set(COMPILE_OPTIONS))
    if unknown:
        raise ModuleConfigError(
            "compile_model",
            f"has unknown torch.compile option(s) {unknown}; allowed: {list(COMPILE_OPTIONS)}",
        )
    return dict(compile_model)


def _require_logits(outputs: Any, needed_by: str) -> Tensor:
    """The model's outputs, if they are the Tensor of logits the core's defaults need."""
    if isinstance(outputs, Tensor):
        return outputs
    raise ModuleConfigError(
        "model",
        f"returned a {type(outputs).__name__} from forward, but {needed_by} the logits as one "
        "Tensor [batch, ..., classes]: return only the logits (wrap the model), or configure "
        "model.loss for these outputs and model.num_classes: 0 to turn the metrics off",
    )


class LitplugModule(L.LightningModule):
    """Train any ``nn.Module`` with a list of plugins.

    Args:
        model: the network; its forward takes the batch's inputs and returns outputs (logits).
        plugins: the methods to apply; order is resolved from their declarations, not this list.
        loss: loss module called as ``loss(outputs, targets)``; default cross-entropy for integer
            targets (sequence outputs flattened, index -100 ignored) and MSE for float targets.
        optimizer: optimizer factory taking the parameters (from YAML: ``class_path: torch.optim.SGD``).
        lr_scheduler: optional scheduler factory taking the optimizer.
        scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
        scheduler_monitor: metric a ``ReduceLROnPlateau`` scheduler watches.
        num_classes: classes for accuracy/NLL/ECE/Brier; ``None`` takes the datamodule's
            ``num_classes`` or, when it has none (a user's data module), the last dimension of
            the first prediction with integer targets; 0 turns classification metrics off.
        log_train_metrics: also compute accuracy/NLL on training batches (costs a little time).
        compile_model: compile the network with ``torch.compile`` once the plugins' model surgery
            has run: ``True``, or a dict of ``torch.compile`` keyword arguments (``mode``,
            ``dynamic``, ``fullgraph``, ``backend``, ``options``). ``nn.Module.compile`` compiles in
            place, so parameter names, checkpoints and the plugins' view of the model are unchanged.
    """

    def __init__(
        self,
        model: nn.Module,
        plugins: list[Plugin] | None = None,
        loss: nn.Module | None = None,
        optimizer: OptimizerFactory = torch.optim.Adam,
        lr_scheduler: SchedulerFactory | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        scheduler_monitor: str = "val/loss",
        num_classes: int | None = None,
        log_train_metrics: bool = False,
        compile_model: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        from_cli = _given_hyperparameters is not None and _given_hyperparameters.get() is not None
        # Outside the CLI the arguments are live objects: keep them out of the checkpoint so it loads
        # with weights_only=True (pass them again to load_from_checkpoint).
        objects = ["model", "plugins", "loss", "optimizer", "lr_scheduler"]
        self.save_hyperparameters(ignore=None if from_cli else objects)
        self.model = model
        self.loss_fn = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.num_classes = num_classes
        self.log_train_metrics = log_train_metrics
        self.compile_options = _compile_options(compile_model)
        self._lr_override: float | None = None  # set through ``lr`` (Lightning's LearningRateFinder)
        self.hooks = PluginHooks(plugins or [])
        self._check_model_features(model)
        self.surgery_done = False
        self._fit_start_pending = True
        self._pending_rng_state: dict[str, Any] | None = None
        self._logging_step_at_load: int | None = None  # set when loop_state closed an epoch
        # (global_step, epoch) of the last checkpoint loaded: what validate/test report it as
        self.loaded_checkpoint_progress: tuple[int, int] | None = None
        self._train_batch: Any = None
        self._eval_stage: str | None = None  # the evaluation epoch in progress, between start and end
        self.metrics = nn.ModuleDict()

    # -- plugins ----------------------------------------------------------------------------------

    @property
    def plugins(self) -> list[Plugin]:
        """Plugins in their resolved run order."""
        return self.hooks.plugins

    def get_plugin(self, name: str) -> Plugin:
        for plugin in self.plugins:
            if plugin.name == name:
                return plugin
        raise KeyError(f"no plugin named '{name}' is configured; configured: {self.hooks.order()}")

    def _check_model_features(self, model: nn.Module) -> None:
        for plugin in self.plugins:
            for feature_name in plugin.requires:
                feature = get_model_feature(feature_name)
                if not feature.present(model):
                    raise PluginSetupError(
                        f"plugin '{plugin.name}' requires a model with {feature.description}; "
                        f"{type(model).__name__} has none"
                    )

    def apply_surgery(self) -> None:
        """Run every plugin's model surgery once (idempotent)."""
        if not self.surgery_done:
            self.model = self.hooks.configure_model(model=self.model, module=self)
            if self.compile_options is not None:
                self.model.compile(**self.compile_options)  # the model as the plugins left it
            self.surgery_done = True

    # -- Lightning setup --------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer.world_size > 1:
            unsupported = [p.name for p in self.plugins if not p.supports_ddp]
            if unsupported:
                raise PluginSetupError(
                    f"plugin(s) {unsupported} do not support multi-process training "
                    f"(world size {trainer.world_size}); run on one device or remove them"
                )
        self.hooks.check_setup(module=self, trainer=trainer)
        self._build_metrics(trainer)
        _install_first(trainer, InterruptedEvalCallback())
        _install_first(trainer, PluginBatchEndCallback())  # first of all (see its docstring)

    def _build_metrics(self, trainer: L.Trainer) -> None:
        if len(self.metrics) > 0:
            return
        num_classes = self.num_classes
        if num_classes is None:
            datamodule = getattr(trainer, "datamodule", None)
            num_classes = getattr(datamodule, "num_classes", None) if datamodule is not None else None
        if num_classes is not None:
            self._add_metrics(num_classes, self.device)

    def _add_metrics(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        if num_classes:
            for stage in ("train", *EVAL_STAGES):
                self.metrics[f"{stage}_metrics"] = ClassificationMetrics(num_classes).to(device)

    def configure_model(self) -> None:
        self.apply_surgery()

    # -- the learning rate as Lightning's LearningRateFinder sees it ---------------------------------

    @property
    def lr(self) -> float | None:
        """The live optimizer's first param-group lr; before one exists, the lr last set (or ``None``).

        Lightning's ``LearningRateFinder`` (callback or ``Tuner.lr_find``) reads and sets ``lr``.
        Setting it rescales every param group's lrs and the schedulers' base lrs by
        ``lr / old lr``, so group ratios and the schedule's shape are kept, and it is applied to
        the optimizers ``configure_optimizers`` makes from then on (a fit after ``Tuner.lr_find``).
        """
        optimizers = self._trainer.optimizers if self._trainer is not None else []
        return float(optimizers[0].param_groups[0]["lr"]) if optimizers else self._lr_override

    @lr.setter
    def lr(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ModuleConfigError("lr", f"must be a number > 0, got {value!r}")
        self._lr_override = float(value)
        if self._trainer is not None:
            for optimizer in self._trainer.optimizers:
                configs = [
                    c for c in self._trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer
                ]
                set_first_group_lr(optimizer, [c.scheduler for c in configs], self._lr_override)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self._lr_override is not None:  # before the scheduler reads the groups' initial lrs
            set_first_group_lr(optimizer, [], self._lr_override)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_fit_start(self) -> None:
        self._fit_start_pending = True
        run_config = {
            "litplug/plugin_order": self.hooks.order(),
            "litplug/plugins": {p.name: _plain(p.hyperparameters()) for p in self.plugins},
        }
        for logger in self.loggers:
            logger.log_hyperparams(run_config)

    def on_fit_end(self) -> None:
        self.hooks.on_fit_end(module=self)

    # -- forward and loss -------------------------------------------------------------------------

    def forward(self, inputs: Any) -> Any:
        return self.model(inputs)

    @staticmethod
    def split_batch(batch: Any) -> tuple[Any, Tensor]:
        """Batches are ``(inputs, targets)`` pairs."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise TypeError(f"litplug expects batches as (inputs, targets) pairs, got {type(batch).__name__}")

    def main_loss(self, outputs: Any, targets: Tensor, batch: Any, stage: str) -> Tensor:
        replaced = self.hooks.compute_loss(
            module=self, outputs=outputs, targets=targets, batch=batch, stage=stage
        )
        if replaced is not None:
            return replaced
        if self.loss_fn is not None:
            return self.loss_fn(outputs, targets)
        return default_loss(_require_logits(outputs, "the default loss needs"), targets)

    def log_probs(self, outputs: Any, stage: str) -> Tensor:
        result = self.hooks.log_probs(module=self, outputs=outputs, stage=stage)
        if result is not None:
            return result
        return F.log_softmax(_require_logits(outputs, "the metrics and predictions need"), dim=-1)

    def class_scores(self, inputs: Any) -> Tensor:
        """Class scores ``[B, K]`` of the prediction the configured plugins make from raw ``inputs``.

        The predict path, differentiable: :func:`~litplug.core.hookspecs.litplug_transform_batch`
        at stage ``"predict"`` (MIMO tiles the input for its members), the forward pass, and
        :func:`~litplug.core.hookspecs.litplug_log_probs` at ``"predict"`` (a deep ensemble's or
        MIMO's averaged probabilities). Attacks (``pgd_at``, ``adt``, ``robust_eval``) differentiate
        this, so they attack what the model as configured predicts, not one member or head. Without
        a plugin that sets the prediction rule these are the model's logits; otherwise
        log-probabilities. Either way softmax, argmax, cross-entropy and margins are the prediction's.
        """
        inputs = self.hooks.transform_batch(module=self, batch=inputs, stage="predict")
        outputs = self(inputs)
        log_probs = self.hooks.log_probs(module=self, outputs=outputs, stage="predict")
        return outputs if log_probs is None else log_probs

    # -- training ---------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._fit_start_pending:
            self._fit_start_pending = False
            self.hooks.on_fit_start(module=self, sample_batch=batch)
            self._agree_after_fit_start()
        if self._pending_rng_state is not None:
            _set_rng_state(self._pending_rng_state)
            self._pending_rng_state = None
        if self._logging_step_at_load is not None:
            self._put_back_logging_step(self._logging_step_at_load)
            self._logging_step_at_load = None

    def _put_back_logging_step(self, saved: int) -> None:
        """No batch has stepped in this fit yet: the logging step is still the checkpoint's."""
        epoch_loop = self.trainer.fit_loop.epoch_loop
        if epoch_loop._batches_that_stepped == saved + 1:  # Lightning's empty restart iteration
            epoch_loop._batches_that_stepped = saved

    def _agree_after_fit_start(self) -> None:
        """Under DDP, make what plugins computed at fit start (each rank on its own batch) agree:
        rank zero's model and plugin state win. A no-op in a single process."""
        if not distributed.is_distributed():
            return
        distributed.broadcast_module_(self.model)
        for plugin in self.plugins:
            if plugin.rank_local_state:  # differs per rank by design (e.g. a replay memory of a shard)
                continue
            state = plugin.state_dict()
            if state:
                agreed = distributed.broadcast_object(state)
                if distributed.rank() != 0:
                    plugin.load_state_dict(agreed)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = self.hooks.transform_batch(module=self, batch=batch, stage="train")
        inputs, targets = self.split_batch(batch)
        outputs = self(inputs)
        loss = self.main_loss(outputs, targets, batch, "train")
        extras = self.hooks.extra_losses(
            module=self, outputs=outputs, targets=targets, batch=batch, stage="train"
        )
        total = loss + sum(extras.values()) if extras else loss
        batch_size = _batch_size(targets)
        self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
        if extras and self.writes_step_logs():
            self.log("train/loss_main", loss, batch_size=batch_size)
            for name, term in extras.items():
                self.log(f"train/loss_{name}", term, batch_size=batch_size)
        if self.log_train_metrics and self._classifies("train", targets):
            self._update_metrics("train", self.log_probs(outputs, "train"), targets)
        self._train_batch = batch
        return total

    def writes_step_logs(self) -> bool:
        """Whether Lightning writes step metrics at this step (every ``log_every_n_steps``).

        The named loss terms are only logged then: each ``self.log`` call costs ~0.1 ms, which on a
        small model was 45% of a training step for two terms, and the loggers receive step values
        only at these steps anyway. A callback monitoring ``train/loss_<name>`` sees the value of the
        last logging step; ``train/loss`` (the total) is logged every step.
        """
        trainer = self._trainer
        if trainer is None:
            return True
        connector = getattr(trainer, "_logger_connector", None)  # Lightning internals: tolerate absence
        return bool(getattr(connector, "should_update_logs", True))

    def on_after_backward(self) -> None:
        self.hooks.on_after_backward(module=self)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.hooks.on_before_optimizer_step(module=self, optimizer=optimizer)

    def plugins_train_batch_end(self, outputs: Any, batch_idx: int) -> None:
        """Fire ``litplug_on_train_batch_end``. Called by :class:`PluginBatchEndCallback`, which runs
        before every other callback's ``on_train_batch_end`` (ModelCheckpoint saves there), not from
        this module's ``on_train_batch_end``, which Lightning runs after the callbacks'."""
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.hooks.on_train_batch_end(module=self, batch=self._train_batch, loss=loss, batch_idx=batch_idx)
        self._train_batch = None

    def on_train_epoch_end(self) -> None:
        self.hooks.on_train_epoch_end(module=self)

    # -- evaluation -------------------------------------------------------------------------------

    def _eval_step(self, batch: Any, stage: str, dataloader_idx: int = 0) -> Tensor:
        raw_batch = batch
        batch = self.hooks.transform_batch(module=self, batch=batch, stage=stage)
        inputs, targets = self.split_batch(batch)
        outputs = self(inputs)
        loss = self.main_loss(outputs, targets, batch, stage)
        batch_size = _batch_size(targets)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=batch_size, sync_dist=True)
        log_probs = None
        if self._classifies(stage, targets):
            log_probs = self.log_probs(outputs, stage)
            self._update_metrics(stage, log_probs, targets, dataloader_idx)
        extra = self.hooks.eval_step(
            module=self,
            batch=batch,
            raw_batch=raw_batch,
            outputs=outputs,
            log_probs=log_probs,
            targets=targets,
            stage=stage,
            dataloader_idx=dataloader_idx,
        )
        for name, value in extra.items():
            self.log(f"{stage}/{name}", value, batch_size=batch_size, sync_dist=True)
        return loss

    def _classifies(self, stage: str, targets: Tensor) -> bool:
        """Whether this stage computes classification metrics (unknown class count: integer targets)."""
        if targets.is_floating_point():
            return False
        return f"{stage}_metrics" in self.metrics or self.num_classes is None

    def _update_metrics(
        self, stage: str, log_probs: Tensor, targets: Tensor, dataloader_idx: int = 0
    ) -> None:
        if self.num_classes is None:  # neither the config nor the data module said: the prediction's width
            self._add_metrics(log_probs.shape[-1], log_probs.device)
            rank_zero_info(
                f"LitplugModule: classification metrics for {self.num_classes} classes, the last "
                "dimension of the prediction (set model.num_classes, or 0 for none)"
            )
        key, metrics = self._loader_metrics(stage, dataloader_idx, log_probs.device)
        metrics.update(log_probs, targets)
        for name, metric in metrics.metrics().items():
            prog_bar = stage == "val" and name == "acc"
            # Named explicitly: Lightning maps metric objects to attributes once, before a second
            # loader's metrics exist.
            attribute = f"metrics.{key}.{metrics.attribute_of(name)}"
            self.log(f"{stage}/{name}", metric, prog_bar=prog_bar, metric_attribute=attribute)

    def _loader_metrics(
        self, stage: str, dataloader_idx: int, device: torch.device
    ) -> tuple[str, ClassificationMetrics]:
        """The metrics of one dataloader of a stage, and their key in ``self.metrics``: each of
        several loaders accumulates its own (logged as ``<stage>/<name>/dataloader_idx_<i>``)."""
        key = f"{stage}_metrics" if dataloader_idx == 0 else f"{stage}_metrics_{dataloader_idx}"
        if key not in self.metrics:
            self.metrics[key] = ClassificationMetrics(int(self.num_classes or 0)).to(device)
        return key, self.metrics[key]  # type: ignore[return-value]

    # Lightning passes ``dataloader_idx`` when the data module returns several loaders for a stage.
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._eval_step(batch, "val", dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._eval_step(batch, "test", dataloader_idx)

    def predict_probs(self, inputs: Any) -> Tensor:
        """Class probabilities of raw ``inputs`` by the configured plugins' prediction rule.

        What :meth:`predict_step` returns for a batch of these inputs; in eval mode under the
        plugins' evaluation weights (:func:`litplug.core.export.evaluation_weights`) it is the
        prediction ``litplug predict`` and ``litplug export`` give.
        """
        inputs = self.hooks.transform_batch(module=self, batch=inputs, stage="predict")
        return self.log_probs(self(inputs), "predict").exp()

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        batch = self.hooks.transform_batch(module=self, batch=batch, stage="predict")
        inputs = self.split_batch(batch)[0] if isinstance(batch, (tuple, list)) else batch
        return self.log_probs(self(inputs), "predict").exp()

    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def on_validation_epoch_end(self) -> None:
        self._log_eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_end("test")

    def on_predict_epoch_start(self) -> None:
        # The same evaluation weights and paths as test (EMA's average, an ensemble's eval path).
        self._start_eval("predict")

    def on_predict_epoch_end(self) -> None:
        self._eval_stage = None
        self.hooks.on_eval_end(module=self, stage="predict")  # Lightning allows no logging in predict

    def _start_eval(self, stage: str) -> None:
        self._eval_stage = stage
        self.hooks.on_eval_start(module=self, stage=stage)

    def _log_eval_end(self, stage: str) -> None:
        self._eval_stage = None
        for name, value in self.hooks.on_eval_end(module=self, stage=stage).items():
            self.log(f"{stage}/{name}", value, sync_dist=True)

    def interrupt_eval(self) -> None:
        """End an evaluation epoch that an exception stopped: plugins restore the training weights.

        Called by :class:`InterruptedEvalCallback` before any checkpoint callback saves on the
        exception; does nothing outside an evaluation epoch.
        """
        stage, self._eval_stage = self._eval_stage, None
        if stage is not None:
            self.hooks.on_eval_interrupted(module=self, stage=stage)

    # -- continual learning -----------------------------------------------------------------------

    def start_task(self, task_id: int) -> None:
        """Tell plugins that training on ``task_id`` begins (called by the continual driver)."""
        self.hooks.on_task_start(module=self, task_id=task_id)

    def end_task(self, task_id: int, dataloader: Any) -> None:
        """Tell plugins that training on ``task_id`` ended; ``dataloader`` iterates its data."""
        self.hooks.on_task_end(module=self, task_id=task_id, dataloader=dataloader)

    # -- checkpoints ------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "order": self.hooks.order(),
            "plugins": {p.name: self._plugin_checkpoint_entry(p) for p in self.plugins},
            "rng": _get_rng_state(),
            # whether this fit has trained its max_steps: then an unfinished epoch resumes where it
            # stopped when the run is continued with a larger max_steps (loop_state)
            "reached_max_steps": self._reached_max_steps(),
            # what `litplug fit --ckpt_path` continues (the same W&B run): [{"class", "version"}]
            "loggers": [
                {"class": type(lg).__name__, "version": _plain_version(lg)} for lg in self._loggers()
            ],
        }
        self.hooks.on_save_checkpoint(module=self, checkpoint=checkpoint)

    def _reached_max_steps(self) -> bool:
        trainer = self._trainer
        return trainer is not None and 0 <= trainer.max_steps <= trainer.global_step

    def _loggers(self) -> list[Any]:
        return list(self._trainer.loggers) if self._trainer is not None else []

    @staticmethod
    def _plugin_checkpoint_entry(plugin: Plugin) -> dict[str, Any]:
        """The plugin's saved entry. Under DDP a plugin with ``rank_local_state`` also stores every
        rank's state (``rank_states``, rank order): Lightning writes rank zero's checkpoint only, and
        a resumed rank must continue from its own state. Lightning builds the checkpoint on every
        rank (``trainer.save_checkpoint`` must be called on all of them), so the gather is safe."""
        state = plugin.state_dict()
        entry = {"class_path": plugin.class_path(), "version": plugin.state_version, "state": state}
        if plugin.rank_local_state and distributed.is_distributed():
            entry["rank_states"] = distributed.all_gather_object(distributed.to_cpu(state))
        return entry

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.apply_surgery()  # weights of a modified model only fit a modified model
        # before Lightning restores its loops from the same dict (after this hook)
        self.loaded_checkpoint_progress = (
            int(checkpoint.get("global_step", 0)),
            int(checkpoint.get("epoch", 0)),
        )
        loops = checkpoint.get("loops") or {}
        saved = checkpoint.get(CHECKPOINT_KEY)
        closed = close_finished_epoch(loops)
        if not closed and saved is not None:
            # an epoch cut short: max_steps continues it, max_time and early stopping start the next
            if saved.get("reached_max_steps"):
                reopen_epoch_cut_by_max_steps(loops)
            else:
                closed = close_epoch_cut_short(loops)
        # Lightning's restart of a closed epoch counts one logging step too many (loop_state)
        self._logging_step_at_load = logging_step(loops) if closed else None
        if saved is None:
            if self.plugins:
                raise CheckpointError(
                    "checkpoint has no litplug section; it was not written by LitplugModule, so the "
                    f"state of plugins {self.hooks.order()} cannot be restored"
                )
            return
        self._restore_plugin_states(saved["plugins"])
        if self._trainer is not None:  # resuming training: replay the random stream from here
            self._pending_rng_state = saved.get("rng")
            # A fit restores the user's checkpoint before it makes the optimizers; the tuners'
            # own restores of their trial checkpoints come later, inside on_fit_start.
            if self._trainer.state.fn == TrainerFn.FITTING and not self._trainer.optimizers:
                keep_the_tuned_values_on_resume(self._trainer, checkpoint)
        self.hooks.on_load_checkpoint(module=self, checkpoint=checkpoint)

    def _restore_plugin_states(self, saved: dict[str, dict[str, Any]]) -> None:
        configured = {p.name: p for p in self.plugins}
        missing = [name for name in saved if name not in configured]
        if missing:
            details = ", ".join(f"'{n}' ({saved[n]['class_path']})" for n in missing)
            raise CheckpointError(
                f"checkpoint needs plugin(s) {details}, which are not configured; add them to model.plugins"
            )
        for name, entry in saved.items():
            plugin = configured[name]
            state, version = _own_rank_state(plugin, entry), entry["version"]
            if version != plugin.state_version:
                state = plugin.upgrade_state(state, version)
            plugin.load_state_dict(state)


class PluginBatchEndCallback(Callback):
    """Runs the plugins' ``litplug_on_train_batch_end`` first among all callbacks' batch ends.

    Lightning calls every callback's ``on_train_batch_end`` before the LightningModule's, and
    ``ModelCheckpoint(every_n_train_steps=...)`` saves in its own. Firing the plugin hook from the
    module would leave plugin state changed there (an EMA update, a replay offer) out of a checkpoint
    saved at that step, and a resumed run would miss it. :class:`LitplugModule` puts this callback at
    the front of ``trainer.callbacks`` in its ``setup`` (Lightning has already ordered its callbacks
    then, checkpoint callbacks last), so the plugin hook runs after the optimizer step and the
    step-interval scheduler step, and before any other callback sees the batch end. It has no state
    and is never saved in checkpoints.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(pl_module, LitplugModule):
            pl_module.plugins_train_batch_end(outputs, batch_idx)


class InterruptedEvalCallback(Callback):
    """Ends an evaluation epoch stopped by an exception, before checkpoint callbacks save on it.

    SIGTERM mid-validation (Lightning raises at the next batch) or an error in a validation step
    would otherwise leave the evaluation weights in the model (EMA's average): a checkpoint saved
    on the exception would hold them as training weights, and a resumed run would diverge.
    Lightning runs checkpoint callbacks last, and :class:`LitplugModule` puts this one first.
    """

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(pl_module, LitplugModule):
            pl_module.interrupt_eval()


def _install_first(trainer: L.Trainer, callback: Callback) -> None:
    """Put ``callback`` at the front of ``trainer.callbacks``, replacing one of its type (re-setup)."""
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
    callbacks[:] = [callback, *(c for c in callbacks if type(c) is not type(callback))]


def _own_rank_state(plugin: Plugin, entry: dict[str, Any]) -> Any:
    """This rank's saved state: its own from ``rank_states`` when the checkpoint has them."""
    rank_states = entry.get("rank_states")
    if not rank_states or not plugin.rank_local_state:
        return entry["state"]
    rank, world = distributed.rank(), distributed.world_size()
    if len(rank_states) != world:
        warnings.warn(
            f"plugin '{plugin.name}': the checkpoint holds the per-rank state of {len(rank_states)} "
            f"processes and this run has {world}; rank {rank} continues from saved rank "
            f"{rank % len(rank_states)}'s state",
            RuntimeWarning,
            stacklevel=3,
        )
    return rank_states[rank % len(rank_states)]


def _plain_version(logger: Any) -> str | None:
    """A logger's version as a string (checkpoints load with weights_only=True)."""
    version = logger.version
    return None if version is None else str(version)


def _batch_size(targets: Tensor) -> int:
    return int(targets.shape[0]) if targets.ndim > 0 else 1


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters as loggable primitives (objects become their repr)."""
    return {
        k: v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else repr(v)
        for k, v in values.items()
    }


def _get_rng_state() -> dict[str, Any]:
    numpy_state: tuple[Any, ...] = np.random.get_state()  # type: ignore[assignment]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
