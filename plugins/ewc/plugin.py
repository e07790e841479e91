"""The EWC plugin: Fisher and anchor at every task end, a quadratic penalty while training later tasks."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from litplug.core.distributed import all_reduce_mean_
from litplug.core.hookspecs import hookimpl
from litplug.core.plugin import Plugin

from .functional import (
    ESTIMATORS,
    METHODS,
    FisherDict,
    PreparedPenalty,
    fisher_diagonal,
    merge_separate,
    online_update,
)

MODES = ("separate", "online")
PENALTY_VIA = ("gradient", "loss")
METRIC_PREFIX = "ewc"


def _detached(params: dict[str, Tensor]) -> FisherDict:
    return {name: p.detach().clone() for name, p in params.items()}


def _average_across_ranks(fisher: FisherDict) -> FisherDict:
    """Mean of each rank's Fisher under DDP, in place (a no-op in one process).

    Each rank estimates the Fisher on the samples its task loader gives it: with a sharded loader
    and equally many samples per rank the mean is the Fisher of all ranks' samples together; with
    litplug's data modules (unsharded task loaders) every rank's estimate is already the same.
    """
    for tensor in fisher.values():
        all_reduce_mean_(tensor)
    return fisher


def _magnitudes(fisher: FisherDict) -> dict[str, float]:
    """Mean, max and sum over every entry of a diagonal Fisher (all parameters together)."""
    values = [f.detach().reshape(-1).double() for f in fisher.values() if f.numel()]
    if not values:
        return {"mean": 0.0, "max": 0.0, "sum": 0.0}
    flat = torch.cat([v.cpu() for v in values])
    return {"mean": float(flat.mean()), "max": float(flat.max()), "sum": float(flat.sum())}


class EWC(Plugin):
    """Elastic weight consolidation (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018).

    At the end of each task (``litplug_on_task_end``) the diagonal Fisher of the model's trainable
    parameters is estimated on that task's training data (eval mode, per-sample gradients) and the
    weights are stored as an anchor. While later tasks train, the loss gets the named term ``ewc``:
    ``(ewc_lambda / 2) * sum_i F_i (theta_i - theta*_i)^2``.

    Args:
        ewc_lambda: penalty strength (>= 0). Depends on the Fisher's scale: tune on a log grid
            (1e0 .. 1e4 on the digits; ~batch-size times more for ``estimator="batched"``).
        mode: ``"separate"`` (one anchor and Fisher per task, all penalised) or ``"online"`` (one
            running Fisher ``F <- gamma F + F_new`` anchored at the latest task's weights).
        gamma: decay of the running Fisher in online mode, in (0, 1].
        estimator: ``"exact"``, ``"sampled"``, ``"empirical"`` or ``"batched"`` (square of the
            mini-batch mean gradient: a documented alternative, not a per-sample Fisher).
        num_samples: samples of the task's training data used for the Fisher (>= 1); ``None``: all.
        method: per-sample gradient engine: ``"auto"`` (closed form for Linear/Conv2d, torch.func
            for the rest), ``"fast"`` or ``"vmap"``.
        fisher_batch_size: the task loader's batches are merged into Fisher passes of at least this
            many samples (>= 1; fewer, larger passes are faster: with the training batch of 32 the
            closed form was 1.4-1.8x slower); lower it if the Fisher pass runs out of memory;
            ``None`` keeps the loader's batches.
        seed: seed of the private generator that draws labels for ``estimator="sampled"`` (task
            ``t`` uses ``seed + t``), so the training random stream is untouched.
        penalty_via: ``"gradient"`` (default) adds the penalty's closed-form gradient
            ``lambda * F * (theta - theta*)`` to the parameters' gradients in
            ``on_before_optimizer_step`` (after AMP unscaling and gradient accumulation, before
            clipping: the same update as backpropagating it, at a fraction of the cost); its value,
            without a graph, joins the loss on the steps Lightning writes logs (``train/loss`` and
            ``train/loss_ewc`` as written to the loggers include it; the progress bar's per-step
            ``train/loss`` between those steps does not). ``"loss"`` backpropagates the
            penalty as a loss term: use it when something re-evaluates the loss itself (LBFGS's
            line search, a custom training loop that skips ``on_before_optimizer_step``).

    Parameters that did not exist (or had another shape) when a task ended, such as a head added
    later, are not penalised for that task.

    Diagnostics: at every task end the magnitude of the diagonal Fisher is logged to every logger of
    the trainer (rank zero; W&B, CSV, TensorBoard alike) at the current global step and kept in
    :attr:`last_fisher_statistics`: ``ewc/fisher_{mean,max,sum}`` for the task that just ended,
    ``ewc/fisher_penalty_{mean,max,sum}`` for the Fisher the penalty now uses (the sum over tasks in
    separate mode, the running ``gamma``-decayed one in online mode), ``ewc/curvature``
    (``ewc_lambda * max F``, see the stability warning) and ``ewc/task``.
    """

    name: ClassVar[str] = "ewc"
    # Its Fisher is that of one classifier's [B, K] log-softmax over the task's raw inputs: an
    # ensemble's [M, B, K] outputs or MIMO's heads on tiled inputs would need an estimator of their own.
    conflicts_with = ("ensemble", "mimo")
    conflict_reasons: ClassVar[dict[str, str]] = {
        "ensemble": "its Fisher estimator handles one classifier's [B, K] outputs, not an ensemble's [M, B, K]",
        "mimo": "its Fisher estimator feeds raw inputs to one classifier, not MIMO's tiled inputs and heads",
    }
    supports_ddp: ClassVar[bool] = True

    def __init__(
        self,
        ewc_lambda: float = 100.0,
        mode: str = "separate",
        gamma: float = 1.0,
        estimator: str = "empirical",
        num_samples: int | None = 500,
        method: str = "auto",
        seed: int = 0,
        penalty_via: str = "gradient",
        fisher_batch_size: int | None = 128,
    ) -> None:
        self.check_range("ewc_lambda", ewc_lambda, low=0.0)
        self.check_choice("mode", mode, MODES)
        self.check_range("gamma", gamma, low=0.0, high=1.0, low_inclusive=False)
        self.check_choice("estimator", estimator, ESTIMATORS)
        if num_samples is not None:
            self.check(
                isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 1,
                "num_samples",
                f"must be an integer >= 1 or None (all samples), got {num_samples!r}",
            )
        self.check_choice("method", method, METHODS)
        self.check(isinstance(seed, int) and seed >= 0, "seed", f"must be an integer >= 0, got {seed!r}")
        self.check_choice("penalty_via", penalty_via, PENALTY_VIA)
        if fisher_batch_size is not None:
            self.check(
                isinstance(fisher_batch_size, int)
                and not isinstance(fisher_batch_size, bool)
                and fisher_batch_size >= 1,
                "fisher_batch_size",
                f"must be an integer >= 1 or None (the loader's batches), got {fisher_batch_size!r}",
            )
        self.ewc_lambda = ewc_lambda
        self.mode = mode
        self.gamma = gamma
        self.estimator = estimator
        self.num_samples = num_samples
        self.method = method
        self.seed = seed
        self.penalty_via = penalty_via
        self.fisher_batch_size = fisher_batch_size
        self.tasks: list[int] = []
        self.anchors: list[FisherDict] = []
        self.fishers: list[FisherDict] = []
        self._merged: PreparedPenalty | None = None
        self.last_fisher_statistics: dict[str, float] = {}
        # add_penalty_gradient's per-optimizer cache (never saved: rebuilt on the first step)
        self._gradient_key: tuple[int, ...] | None = None
        self._gradient_params: dict[str, Tensor] = {}
        self._gradient_include: frozenset[int] = frozenset()

    @classmethod
    def example(cls) -> EWC:
        return cls(ewc_lambda=10.0, num_samples=64)

    # -- setup --------------------------------------------------------------------------------------

    @hookimpl
    def litplug_check_setup(self, trainer: Any) -> None:
        from litplug.core.continual import ContinualLearning  # the one source of task ends

        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        if fitting and not any(isinstance(cb, ContinualLearning) for cb in trainer.callbacks):
            rank_zero_warn(
                "plugin 'ewc' consolidates weights at task ends, but the trainer has no "
                "ContinualLearning callback, so this fit has none: EWC adds no penalty. Add "
                "litplug.core.continual.ContinualLearning with a continual data module (configs/ewc.yaml)"
            )

    # -- task end: Fisher and anchor --------------------------------------------------------------

    def estimate_fisher(self, model: torch.nn.Module, dataloader: Any, task_id: int) -> FisherDict:
        generator = torch.Generator().manual_seed(self.seed + task_id)
        fisher = fisher_diagonal(
            model,
            dataloader,
            estimator=self.estimator,  # type: ignore[arg-type]
            num_samples=self.num_samples,
            generator=generator,
            method=self.method,  # type: ignore[arg-type]
            batch_size=self.fisher_batch_size,
        )
        return _average_across_ranks(fisher)

    @hookimpl
    def litplug_on_task_end(self, module: Any, task_id: int, dataloader: Any) -> None:
        model = module.model
        fisher = self.estimate_fisher(model, dataloader, task_id)
        anchor = _detached({n: p for n, p in model.named_parameters() if p.requires_grad})
        if self.mode == "online":
            previous = self.fishers[0] if self.fishers else None
            self.fishers = [online_update(previous, fisher, self.gamma)]
            self.anchors = [anchor]
            self.tasks = [task_id]
        else:
            self.fishers.append(fisher)
            self.anchors.append(anchor)
            self.tasks.append(task_id)
        self._merged = None
        self._gradient_key = None  # a task may have added parameters (a new head)
        self.last_fisher_statistics = self.fisher_statistics(fisher, task_id)
        self._log_statistics(module, self.last_fisher_statistics)
        self._warn_if_unstable(module)

    def fisher_statistics(self, task_fisher: FisherDict, task_id: int) -> dict[str, float]:
        """Magnitudes of the task's Fisher and of the penalty's (merged or running) Fisher."""
        statistics = {f"{METRIC_PREFIX}/task": float(task_id)}
        for label, fisher in (("fisher", task_fisher), ("fisher_penalty", self._prepared().fisher)):
            for name, value in _magnitudes(fisher).items():
                statistics[f"{METRIC_PREFIX}/{label}_{name}"] = value
        statistics[f"{METRIC_PREFIX}/curvature"] = self.curvature()
        return statistics

    @staticmethod
    def _log_statistics(module: Any, statistics: dict[str, float]) -> None:
        """Send ``statistics`` to the trainer's loggers, as the continual driver logs its matrix.

        Task ends run in callback hooks (epoch start/end, train end) where ``LightningModule.log``
        is not always allowed, so this goes to the loggers directly. The Fisher is already averaged
        across ranks, so rank zero's values are everyone's.
        """
        trainer = getattr(module, "_trainer", None)
        if trainer is None or getattr(trainer, "global_rank", 0) != 0:
            return
        for logger in getattr(trainer, "loggers", None) or []:
            logger.log_metrics(statistics, step=int(trainer.global_step))

    def curvature(self) -> float:
        """The penalty's largest curvature, ``ewc_lambda * max_i F_i`` (``F`` merged over tasks)."""
        if not self.anchors:
            return 0.0
        fisher = self._prepared().fisher
        return self.ewc_lambda * max((float(f.max()) for f in fisher.values() if f.numel()), default=0.0)

    def _warn_if_unstable(self, module: Any) -> None:
        """Gradient descent on the quadratic diverges when ``lr * curvature > 2 (1 + momentum)``.

        Measured on Permuted-Digits with plain SGD lr 0.1: lambda 30 trained, lambda 100 diverged to
        chance within a task. Only SGD is checked (adaptive optimizers bound the step size).
        """
        trainer = getattr(module, "_trainer", None)
        optimizers = getattr(trainer, "optimizers", None) or []
        curvature = self.curvature()
        for optimizer in optimizers:
            if not isinstance(optimizer, torch.optim.SGD):
                continue
            for group in optimizer.param_groups:
                lr, momentum = float(group["lr"]), float(group.get("momentum", 0.0))
                if lr * curvature > 2.0 * (1.0 + momentum):
                    warnings.warn(
                        f"plugin 'ewc': ewc_lambda * max Fisher = {curvature:.3g} with SGD lr {lr:g} "
                        f"(momentum {momentum:g}) exceeds the stability limit 2 (1 + momentum) / lr = "
                        f"{2.0 * (1.0 + momentum) / lr:.3g}: training is likely to diverge; lower "
                        "ewc_lambda or the learning rate",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    return

    # -- penalty ----------------------------------------------------------------------------------

    def _prepared(self) -> PreparedPenalty:
        """The penalty's single quadratic (merged over tasks in separate mode), built once per task end.

        ``PreparedPenalty`` moves sqrt(F) and the center to each parameter's device and dtype on
        first use, so later steps cost a few fused ops only.
        """
        if self._merged is None:
            if len(self.anchors) == 1:
                fisher, center, offset = self.fishers[0], self.anchors[0], torch.zeros(())
            else:
                fisher, center, offset = merge_separate(self.anchors, self.fishers)
            self._merged = PreparedPenalty(center, fisher, 0.5 * self.ewc_lambda, offset)
        return self._merged

    def penalty(self, model: torch.nn.Module) -> Tensor | None:
        """The EWC term for ``model``'s current weights (``None`` before the first task ended)."""
        if not self.anchors:
            return None
        return self._prepared()(dict(model.named_parameters()))

    @hookimpl
    def litplug_extra_losses(self, module: Any, stage: str) -> dict[str, Tensor] | None:
        if stage != "train" or not self.anchors:
            return None
        if self.penalty_via == "loss":
            return {"ewc": self._prepared()(dict(module.model.named_parameters()))}
        # The gradient is added before the optimizer step. The value only matters for the logged
        # loss, so it is computed on the steps Lightning writes logs (two more passes otherwise).
        writes_logs = getattr(module, "writes_step_logs", None)
        if writes_logs is not None and not writes_logs():
            return None
        return {"ewc": self._prepared().value(dict(module.model.named_parameters()))}

    def add_penalty_gradient(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """``p.grad += lambda * F * (p - theta*)`` for the penalised parameters (those of ``optimizer``
        when given): the penalty's gradient, added outside autograd (``penalty_via="gradient"``)."""
        if not self.anchors:
            return
        penalty = self._prepared()
        if optimizer is None:
            penalty.add_gradient(dict(model.named_parameters()))
            return
        # Cached per optimizer parameter list: rebuilding the name map and the id set every step cost
        # ~15 us, about 1% of a batch-64 MLP step.
        key = tuple(id(p) for group in optimizer.param_groups for p in group["params"])
        if key != self._gradient_key:
            self._gradient_params = dict(model.named_parameters())
            self._gradient_include = frozenset(key)
            self._gradient_key = key
        penalty.add_gradient(self._gradient_params, self._gradient_include)

    @hookimpl
    def litplug_on_before_optimizer_step(self, module: Any, optimizer: torch.optim.Optimizer) -> None:
        if self.penalty_via == "gradient":
            self.add_penalty_gradient(module.model, optimizer)

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "anchors": self.anchors,
            "fishers": self.fishers,
            "mode": self.mode,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            self.check(False, "mode", f"is {self.mode!r} but the checkpoint was saved with {state['mode']!r}")
        self.tasks = [int(t) for t in state["tasks"]]
        self.anchors = [dict(a) for a in state["anchors"]]
        self.fishers = [dict(f) for f in state["fishers"]]
        self._merged = None
