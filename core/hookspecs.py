"""Every hook a litplug plugin can implement, grouped by the phase of a run in which it fires.

Plugins implement hooks as methods marked with :data:`hookimpl`; an implementation may accept any
subset of a hook's arguments (pluggy passes them by name). Hooks are always called with keyword
arguments through :class:`litplug.core.manager.PluginHooks`, never as ``pm.hook.x(...)`` elsewhere.

How results combine, stated per hook:

- *collected*: every implementation runs, in the resolved plugin order; ``None`` results are dropped.
- *first result*: implementations run in order until one returns something other than ``None``.
- *chained*: each implementation receives the previous one's result (``None`` means "unchanged").
- *reversed*: like collected, but in reverse plugin order, so the plugin that changed something first
  undoes it last (teardown semantics).

The resolved order comes from each plugin's ``run_after`` / ``run_before`` declarations (see
:mod:`litplug.core.ordering`). Under DDP every hook runs on every rank unless its docstring says
otherwise. Metrics logged with ``module.log`` are reduced by Lightning; a plugin that writes to the
loggers directly (images, task-end statistics) does so on rank zero only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from lightning.pytorch import LightningModule, Trainer
    from torch import Tensor, nn
    from torch.utils.data import DataLoader

PROJECT_NAME = "litplug"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: Hooks whose implementations are chained (each gets the previous result).
CHAINED_HOOKS = frozenset({"litplug_configure_model", "litplug_transform_batch"})
#: Hooks that run in reverse plugin order.
REVERSED_HOOKS = frozenset({"litplug_on_eval_end", "litplug_on_eval_interrupted", "litplug_on_fit_end"})


# ---------------------------------------------------------------------------------------------------
# Setup: before any training step
# ---------------------------------------------------------------------------------------------------


@hookspec
def litplug_check_setup(module: LightningModule, trainer: Trainer) -> None:
    """Validate the plugin against the trainer, the datamodule and the model.

    The model is unmodified on the first stage of a module; in a later one (``test`` after
    ``fit``) model surgery has already been applied.

    Fires in ``LightningModule.setup`` for every stage, before model surgery, so a bad combination
    (a ghost batch larger than the per-device batch, a plugin without DDP support under DDP, ...)
    fails before the first step. Raise :class:`litplug.core.errors.PluginConfigError` naming the
    argument. Results: collected (return values are ignored). Ranks: all.
    """


@hookspec
def litplug_configure_model(model: nn.Module, module: LightningModule) -> nn.Module | None:
    """Model surgery: change the model's structure (replace layers, add parameters, wrap it).

    Fires once per module instance, from ``LightningModule.configure_model`` (before the optimizer is
    built and before a checkpoint's weights are loaded) or, when a checkpoint is loaded without a
    trainer, from ``on_load_checkpoint``; so surgery is always replayed before weights load. Must be
    deterministic given the configuration, and idempotent on an already modified model.
    Results: chained: return a replacement model or ``None`` after changing ``model`` in place.
    Ranks: all (each rank changes its own replica identically).
    """


@hookspec
def litplug_on_fit_start(module: LightningModule, sample_batch: Any) -> None:
    """Fit begins; ``sample_batch`` is the first training batch of this ``fit`` call, on device.

    Fires right before the first training step of every ``fit`` call (also after a resume, so a
    plugin whose work is already in its restored state must skip it; Admin's profiling does). The
    batch is the raw one, before :func:`litplug_transform_batch`. Runs under ``torch.no_grad`` is NOT
    assumed: the plugin decides. Results: collected. Ranks: all, each with its own shard of the first
    global batch; afterwards the core broadcasts rank zero's model and plugin state to every rank. A
    plugin that needs statistics of the global batch reduces them across ranks itself (Admin's
    profiling pools its variances), otherwise rank zero's shard wins.
    """


# ---------------------------------------------------------------------------------------------------
# Every batch (training, validation, test, predict)
# ---------------------------------------------------------------------------------------------------


@hookspec
def litplug_transform_batch(module: LightningModule, batch: Any, stage: str) -> Any | None:
    """Transform a batch before the forward pass (perturb, tile, mix, attack).

    Fires in every step of every stage (``stage`` is ``"train"``, ``"val"``, ``"test"`` or
    ``"predict"``), after the batch is on the device. At ``"predict"`` the batch may be bare
    inputs, and ``litplug export`` captures the call with ``torch.export`` (CONTRIBUTING.md:
    Export). Results: chained: return the new batch or ``None`` for "unchanged". Ranks: all,
    each on its own shard.
    """


@hookspec(firstresult=True)
def litplug_compute_loss(
    module: LightningModule, outputs: Any, targets: Tensor, batch: Any, stage: str
) -> Tensor | None:
    """Replace the main loss (MIMO's sum over heads, an ensemble's sum over members).

    Fires in every training, validation and test step after the forward pass. Results: first
    result; when every plugin returns ``None`` the module's configured loss is used.
    Ranks: all.
    """


@hookspec
def litplug_extra_losses(
    module: LightningModule, outputs: Any, targets: Tensor, batch: Any, stage: str
) -> dict[str, Tensor] | None:
    """Named loss terms added to the main loss (EWC penalty, center loss, distillation).

    Fires in every training step (``stage == "train"``) after the main loss. Each returned term is
    added to the total and logged as ``train/loss_<name>`` (with ``train/loss_main``) on the steps
    Lightning writes logs (every ``log_every_n_steps``; ``train/loss`` is logged every step): a
    ``self.log`` call costs ~0.1 ms, a large share of a small model's step. Results: collected; two plugins returning
    the same name is an error naming both. Ranks: all.
    """


@hookspec(firstresult=True)
def litplug_log_probs(module: LightningModule, outputs: Any, stage: str) -> Tensor | None:
    """Turn the model's outputs into class log-probabilities for metrics and prediction.

    Fires in every validation/test/predict step, and in training steps when training metrics are
    logged. Ensembles and MIMO average member probabilities here; at ``"predict"`` it is part of
    what ``litplug export`` captures. Results: first result; default ``log_softmax(outputs,
    dim=-1)``. Ranks: all.
    """


# ---------------------------------------------------------------------------------------------------
# Training step internals
# ---------------------------------------------------------------------------------------------------


@hookspec
def litplug_on_after_backward(module: LightningModule) -> None:
    """Gradients of the training loss exist (before clipping and the optimizer step).

    Fires from ``LightningModule.on_after_backward``, after every backward: with gradient
    accumulation also on the micro-batches that do not step, whose gradients DDP does not
    all-reduce (``no_sync``); on a stepping one under DDP they are all-reduced. Use
    :func:`litplug_on_before_optimizer_step` for the gradient the step applies. Results:
    collected. Ranks: all.
    """


@hookspec
def litplug_on_before_optimizer_step(module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer is about to step: once per optimizer step (after every micro-batch of a
    gradient-accumulation window), with the gradients already unscaled under AMP (and all-reduced
    under DDP), before the trainer clips them. A gradient added here is clipped and applied like the
    loss's (EWC adds its penalty's gradient here). Results: collected. Ranks: all.
    """


@hookspec
def litplug_on_train_batch_end(module: LightningModule, batch: Any, loss: Tensor, batch_idx: int) -> None:
    """A training step has finished, optimizer step included (EMA updates, center updates).

    Exact timing within a training batch, in Lightning's loop: ``training_step`` -> backward ->
    :func:`litplug_on_after_backward` -> :func:`litplug_on_before_optimizer_step` -> optimizer step
    -> step-interval LR scheduler step -> **this hook** -> every other callback's
    ``on_train_batch_end`` (``ModelCheckpoint(every_n_train_steps=...)`` saves there) ->
    ``LightningModule.on_train_batch_end``. It is fired by the core's
    :class:`~litplug.core.module.PluginBatchEndCallback`, placed first in ``trainer.callbacks``, so
    state a plugin changes here is in a checkpoint saved at this step and visible to every callback.
    ``module.global_step`` already counts this batch's optimizer step. Fires for every batch, also
    between optimizer steps under gradient accumulation (compare ``global_step`` to detect a step),
    and not for a batch skipped by ``on_train_batch_start`` returning -1.

    ``batch`` is the transformed batch the step trained on; ``loss`` the total loss of the step.
    Results: collected. Ranks: all.
    """


@hookspec
def litplug_on_train_epoch_end(module: LightningModule) -> None:
    """A training epoch has ended, or been cut short (``max_steps``, ``max_time``, early stopping).

    Lightning fires it at the cut too, before its end-of-epoch checkpoint. A run cut by
    ``max_steps`` and later continued with a larger one trains the rest of that epoch and fires
    this again at its real end: act on ``module.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch``
    if a partial epoch must not count. Results: collected. Ranks: all.
    """


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


@hookspec
def litplug_on_eval_start(module: LightningModule, stage: str) -> None:
    """A validation, test or predict epoch begins (``stage`` is ``"val"``, ``"test"`` or ``"predict"``).

    Swap in evaluation weights (EMA) here: predictions are made with what test evaluates.
    :func:`litplug_eval_step` does not fire in predict. Results: collected, in plugin order.
    Ranks: all.
    """


@hookspec
def litplug_eval_step(
    module: LightningModule,
    batch: Any,
    raw_batch: Any,
    outputs: Any,
    log_probs: Tensor | None,
    targets: Tensor,
    stage: str,
    dataloader_idx: int,
) -> dict[str, Tensor | float] | None:
    """Per-batch evaluation metrics (robust accuracy, member accuracy, diversity).

    Fires in every validation/test step after the core metrics. ``batch`` is what the model saw
    (after :func:`litplug_transform_batch`), ``raw_batch`` the batch as the dataloader gave it: an
    attack perturbs the raw inputs through ``module.class_scores``, which applies the transforms.
    ``dataloader_idx`` says which of the stage's dataloaders the batch is from (0 when there is
    one). Returned values are logged as ``<stage>/<name>`` and averaged over the epoch (weighted by
    batch size); with several dataloaders Lightning logs each loader's average apart, as
    ``<stage>/<name>/dataloader_idx_<i>``. Results: collected; duplicate names across plugins are
    an error. Ranks: all; values are averaged across ranks.
    """


@hookspec
def litplug_on_eval_end(module: LightningModule, stage: str) -> dict[str, float] | None:
    """A validation, test or predict epoch has ended; return epoch-level metrics if any.

    Undo what :func:`litplug_on_eval_start` did (restore training weights). Once per epoch, after
    all of the stage's dataloaders: epoch-level metrics cover them together. Results: reversed
    order, returned dicts merged (a name returned by two plugins is a :class:`HookError`) and
    logged as ``<stage>/<name>`` (not in predict, where Lightning allows no logging). Ranks: all.
    """


@hookspec
def litplug_on_eval_interrupted(module: LightningModule, stage: str) -> None:
    """A validation, test or predict epoch was stopped by an exception before its end.

    Fires from the core's callback ``on_exception`` (SIGTERM, Ctrl-C, an error in a step), before
    any checkpoint callback's: undo what :func:`litplug_on_eval_start` did, so that a checkpoint
    saved now (``OnExceptionCheckpoint``, litplug's SIGTERM checkpoint) and a later ``fit`` in the
    same process see the training weights, not the evaluation ones. No metrics, no plots: the
    epoch is incomplete. Results: reversed order, return values ignored. Ranks: those that raised,
    which may be one rank only, so implementations must not use collectives.
    """


# ---------------------------------------------------------------------------------------------------
# Continual learning: task boundaries
# ---------------------------------------------------------------------------------------------------


@hookspec
def litplug_on_task_start(module: LightningModule, task_id: int) -> None:
    """Training on task ``task_id`` (0-based) is about to begin.

    Fired by the continual-learning driver, never by a plain ``fit``. Results: collected.
    Ranks: all.
    """


@hookspec
def litplug_on_task_end(module: LightningModule, task_id: int, dataloader: DataLoader) -> None:
    """Training on task ``task_id`` has finished; ``dataloader`` iterates that task's training data.

    Compute importance estimates (EWC's Fisher), store anchors and class centers here. Results:
    collected. Ranks: all, each with its shard: a plugin whose state must agree across ranks reduces
    it itself (EWC all-reduces its Fisher); the DDP callback only checks that it does.
    """


# ---------------------------------------------------------------------------------------------------
# Checkpoints and teardown
# ---------------------------------------------------------------------------------------------------


@hookspec
def litplug_on_save_checkpoint(module: LightningModule, checkpoint: dict[str, Any]) -> None:
    """A checkpoint is being written, after every plugin's ``state_dict()`` was stored in it.

    For plugins that need raw access to the checkpoint; plain state belongs in ``state_dict()``.
    Results: collected. Ranks: all (Lightning writes the file on rank zero only, so what a rank
    other than zero adds here is lost; a plugin whose ``state_dict()`` differs per rank declares
    ``rank_local_state`` and the core stores every rank's copy).
    """


@hookspec
def litplug_on_load_checkpoint(module: LightningModule, checkpoint: dict[str, Any]) -> None:
    """A checkpoint has been read; model surgery was replayed and plugin states were restored.

    Results: collected. Ranks: all.
    """


@hookspec
def litplug_on_fit_end(module: LightningModule) -> None:
    """Fit has ended normally (``max_steps``, ``max_epochs``, early stopping, ``max_time``).

    Fires from ``LightningModule.on_fit_end``. Not after an interruption (SIGTERM, Ctrl-C, an
    error): Lightning then runs only ``on_exception`` and teardown, and the run resumes from its
    checkpoint; undo evaluation swaps in :func:`litplug_on_eval_interrupted` instead. Results:
    reversed order. Ranks: all.
    """
