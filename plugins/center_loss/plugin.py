"""The center-loss plugin: pull features toward per-class centers, kept across tasks."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from litplug.core import distributed
from litplug.core.hookspecs import hookimpl
from litplug.core.plugin import Plugin

from .functional import apply_center_update, center_loss, center_statistics


def feature_module(model: nn.Module, feature_layer: str | None) -> tuple[nn.Module, bool]:
    """The module whose output (or, with ``feature_layer=None``, the final Linear's input) is the feature.

    Returns ``(module, use_input)``.
    """
    if feature_layer is not None:
        modules = dict(model.named_modules())
        if feature_layer not in modules:
            raise KeyError(f"no layer named {feature_layer!r}; layers: {[n for n in modules if n][:20]}")
        return modules[feature_layer], False
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise KeyError("the model has no nn.Linear; name the feature layer with feature_layer")
    return linears[-1], True


class CenterLoss(Plugin):
    """Center-loss regularisation for continual learning (Wen et al. 2016; Olpadkar & Gavas 2021).

    Adds ``(center_lambda / 2) * mean_i ||h_i - c_{y_i}||^2`` (term ``center``) where ``h`` are the
    features at ``feature_layer`` (default: the input of the model's last ``nn.Linear``) and ``c``
    the class centers, updated every step with Wen et al.'s rule at rate ``alpha`` (not by the
    optimizer: no weight decay, independent of lambda). For continual learning the centers of
    classes learned in earlier tasks are frozen at each task end (``freeze_old_centers``), so new
    tasks' features of those classes are pulled to the OLD centers and the old decision boundaries
    stay valid (domain-incremental: the same classes in a new input distribution). Combine with
    ``Replay`` for the paper's best variant: replayed samples are pulled to their centers too.

    The centers are updated once per training batch, in ``litplug_on_train_batch_end`` (so a
    checkpoint saved at that step holds the update), from the features of that step's forward pass.
    Under DDP the per-class feature sums and counts of every rank's shard are all-reduced first, so
    every rank applies the update of the global batch: the centers (and ``seen``) stay identical
    across ranks and equal those of a one-process run with the global batch.

    Args:
        center_lambda: strength, >= 0.
        alpha: center learning rate in [0, 1] (Wen et al.: 0.5).
        feature_layer: dotted name of the module whose output is the feature; ``None``: the input
            of the last ``nn.Linear`` (the classifier's input).
        freeze_old_centers: freeze every class's center at the end of the task that trained it.
        freeze_classifier: at the first task end, stop training the classifier (the last
            ``nn.Linear``, whose input is the feature), one reading of the paper's "keeping the
            decision boundaries unchanged"; single-process only.
    """

    name: ClassVar[str] = "center_loss"
    run_after = ("replay",)
    # One feature vector per example, pulled to its class's center: an ensemble has one per member
    # (its members' layers run inside vmap, where the feature hook does not fire), MIMO one for
    # several examples with different labels.
    conflicts_with = ("ensemble", "mimo")
    conflict_reasons: ClassVar[dict[str, str]] = {
        "ensemble": "center loss needs one feature vector per example; an ensemble has one per member",
        "mimo": "center loss needs one feature vector per example; MIMO's serve several examples at once",
    }
    supports_ddp: ClassVar[bool] = True  # center updates use the global batch's sums and counts

    def __init__(
        self,
        center_lambda: float = 0.1,
        alpha: float = 0.5,
        feature_layer: str | None = None,
        freeze_old_centers: bool = True,
        freeze_classifier: bool = False,
    ) -> None:
        self.check_range("center_lambda", center_lambda, low=0.0)
        self.check_range("alpha", alpha, low=0.0, high=1.0)
        self.check(
            isinstance(freeze_classifier, bool),
            "freeze_classifier",
            f"must be a bool, got {freeze_classifier!r}",
        )
        self.center_lambda = center_lambda
        self.alpha = alpha
        self.feature_layer = feature_layer
        self.freeze_old_centers = freeze_old_centers
        self.freeze_classifier = freeze_classifier
        self.classifier_frozen = False  # set at the first task end when freeze_classifier
        self.centers: Tensor | None = None
        self.seen: Tensor | None = None  # classes that have trained their center
        self.frozen: Tensor | None = None
        self._features: Tensor | None = None
        self._hooked: nn.Module | None = None
        self._handle: Any = None
        self._pending: tuple[Tensor, Tensor] | None = None  # this step's (features, labels)

    @classmethod
    def example(cls) -> CenterLoss:
        return cls(center_lambda=0.05)

    # -- feature capture --------------------------------------------------------------------------

    def _attach(self, model: nn.Module) -> None:
        module, use_input = feature_module(model, self.feature_layer)
        if self._hooked is module:
            return
        if self._handle is not None:
            self._handle.remove()

        def keep_input(_: nn.Module, args: tuple[Any, ...]) -> None:
            self._features = args[0]

        def keep_output(_: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            self._features = output

        if use_input:
            self._handle = module.register_forward_pre_hook(keep_input)
        else:
            self._handle = module.register_forward_hook(keep_output)
        self._hooked = module

    @hookimpl
    def litplug_check_setup(self, module: Any) -> None:
        try:
            feature_module(module.model, self.feature_layer)
        except KeyError as err:
            self.check(False, "feature_layer", str(err))
        if self.freeze_classifier:
            self.check(
                self.feature_layer is None,
                "freeze_classifier",
                "needs feature_layer=None (the classifier frozen is the last nn.Linear, whose input is the feature)",
            )
            trainer = getattr(module, "_trainer", None)
            self.check(
                trainer is None or trainer.world_size == 1,
                "freeze_classifier",
                "is not supported under DDP (parameters that stop training mid-run break DDP's gradient reducer)",
            )

    @hookimpl
    def litplug_on_fit_start(self, module: Any, sample_batch: Any) -> None:
        self.check_batch(sample_batch, class_targets=True)
        self._attach(module.model)
        if self.classifier_frozen:  # resumed after the first task end
            self._freeze_classifier(module.model)

    def _freeze_classifier(self, model: nn.Module) -> None:
        """Stop training the classifier (the last ``nn.Linear``): the decision boundaries stay as the
        first task left them, and later tasks' features are pulled to the frozen centers."""
        classifier, _ = feature_module(model, None)
        for p in classifier.parameters():
            p.requires_grad_(False)
            p.grad = None

    # -- loss and center update -------------------------------------------------------------------

    def _ensure_centers(self, num_classes: int, dim: int, device: torch.device) -> None:
        if self.centers is None:
            self.centers = torch.zeros(num_classes, dim, device=device)
            self.seen = torch.zeros(num_classes, dtype=torch.bool, device=device)
            self.frozen = torch.zeros(num_classes, dtype=torch.bool, device=device)
        elif self.centers.device != device:
            self.centers = self.centers.to(device)
            self.seen = self.seen.to(device)  # type: ignore[union-attr]
            self.frozen = self.frozen.to(device)  # type: ignore[union-attr]

    @hookimpl
    def litplug_extra_losses(
        self, module: Any, outputs: Tensor, targets: Tensor, stage: str
    ) -> dict[str, Tensor] | None:
        if stage != "train":
            return None
        self._attach(module.model)
        features = self._features
        self._features = None
        if features is None:
            return None
        features = features.reshape(features.shape[0], -1)
        num_classes = int(getattr(module, "num_classes", None) or outputs.shape[-1])
        self._ensure_centers(num_classes, features.shape[1], features.device)
        assert self.centers is not None
        loss = center_loss(features, targets, self.centers, self.center_lambda)
        self._pending = (features.detach(), targets.detach())  # the update waits for the step's end
        return {"center": loss}

    @hookimpl
    def litplug_on_train_batch_end(self) -> None:
        """Wen et al.'s update with this step's features, on the global batch under DDP."""
        if self._pending is None:
            return
        features, targets = self._pending
        self._pending = None
        assert self.centers is not None and self.seen is not None
        sums, counts = center_statistics(features, targets, self.centers.shape[0])
        if distributed.is_distributed():
            # One collective for both: [C, D] sums and [C] counts of every rank's shard, added up.
            packed = torch.cat([sums, counts[:, None]], dim=1)
            torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
            sums, counts = packed[:, :-1], packed[:, -1]
        apply_center_update(self.centers, sums, counts, self.alpha, self.frozen)
        self.seen |= counts.to(self.seen.device) > 0

    @hookimpl
    def litplug_on_task_end(self, module: Any) -> None:
        if self.freeze_old_centers and self.seen is not None and self.frozen is not None:
            self.frozen |= self.seen
        if self.freeze_classifier and not self.classifier_frozen:
            self.classifier_frozen = True
            self._freeze_classifier(module.model)

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "centers": self.centers,
            "seen": self.seen,
            "frozen": self.frozen,
            "classifier_frozen": self.classifier_frozen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.centers, self.seen, self.frozen = state["centers"], state["seen"], state["frozen"]
        self.classifier_frozen = bool(state.get("classifier_frozen", False))  # absent before 2026-11-29
