"""The deep-ensemble plugin: model surgery into a :class:`MemberStack`, the summed member loss,
mean-of-probabilities prediction, per-member metrics, and the automatic vmap/sequential choice."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, cast

import lightning as L
import torch
from torch import Tensor, nn

from litplug.core.hookspecs import hookimpl
from litplug.core.metrics import flatten_classes
from litplug.core.plots import ReliabilityRecorder
from litplug.core.plugin import Plugin

if TYPE_CHECKING:
    from litplug.core.module import LitplugModule

from .functional import (
    FORWARD_PATHS,
    ForwardPath,
    MemberStack,
    disagreement,
    ensemble_log_probs,
    faster_path,
    make_members,
    sum_of_member_losses,
    time_forward_paths,
)

PATH_CHOICES = ("auto", *FORWARD_PATHS)


class DeepEnsemble(Plugin):
    """Deep ensemble: N independently initialised copies of the model trained together, probabilities averaged.

    Lakshminarayanan et al., "Simple and Scalable Predictive Uncertainty Estimation using Deep
    Ensembles", NeurIPS 2017.

    Args:
        num_members: ensemble size M (the paper used 5; uncertainty-baselines 4).
        path: how members run: ``"vmap"`` (one vectorised call), ``"sequential"`` (a loop), or
            ``"auto"``: time both once at fit start on the first batch (training step and evaluation
            forward separately) and keep the faster (the device's expected winner, sequential on a
            CPU and vmap on CUDA, unless the other is more than ``SWITCH_MARGIN`` = 10% faster);
            the choice is stored in the checkpoint. Under
            multi-process training ``"auto"`` uses the rule "vmap on CUDA, sequential otherwise" so
            every rank runs the same path; evaluation without a fit uses the same rule.
        seed: base seed of the members' initialisation; ``None`` derives it from
            ``torch.initial_seed()`` (so ``seed_everything`` changes every member).
        timing_repeats: interleaved repeats per path when ``path="auto"`` (medians are compared).
        reliability_diagram: save ``reliability_ensemble_test.png`` in the run directory (and log
            it to W&B) at the end of each test epoch.
    """

    name = "ensemble"
    conflicts_with = ("mimo", "distill")
    conflict_reasons: ClassVar[dict[str, str]] = {
        "mimo": "both replace the loss and the prediction rule",
        "distill": "the student is a single model (the teacher may be an ensemble checkpoint)",
    }
    supports_ddp: ClassVar[bool] = True
    #: ``path="auto"`` leaves the device's expected winner (sequential on a CPU, vmap on CUDA) only
    #: for a path that timed more than this fraction faster (short timings on a shared machine are noisy).
    SWITCH_MARGIN: ClassVar[float] = 0.1

    def __init__(
        self,
        num_members: int = 4,
        path: str = "auto",
        seed: int | None = None,
        timing_repeats: int = 3,
        reliability_diagram: bool = True,
    ) -> None:
        self.check(
            isinstance(num_members, int) and num_members >= 1,
            "num_members",
            f"must be an integer >= 1, got {num_members!r}",
        )
        self.check_choice("path", path, PATH_CHOICES)
        self.check(
            seed is None or (isinstance(seed, int) and seed >= 0),
            "seed",
            f"must be None or an integer >= 0, got {seed!r}",
        )
        self.check(
            isinstance(timing_repeats, int) and timing_repeats >= 1,
            "timing_repeats",
            f"must be an integer >= 1, got {timing_repeats!r}",
        )
        self.num_members = num_members
        self.path = path
        self.seed = seed
        self.timing_repeats = timing_repeats
        self.reliability_diagram = reliability_diagram
        fixed = "" if path == "auto" else path
        self.train_path: str = fixed  # "" = not decided yet
        self.eval_path: str = fixed
        self.timings: dict[str, float | str] = {}
        self._recorder = ReliabilityRecorder()

    @classmethod
    def example(cls) -> DeepEnsemble:
        # An explicit path: "auto" may pick differently in two runs, and the paths agree only to
        # rounding, so a bit-exact resume comparison needs a fixed one (vmap: the harder path).
        return cls(num_members=2, path="vmap", reliability_diagram=False)

    # -- surgery and path choice ------------------------------------------------------------------

    @hookimpl
    def litplug_configure_model(self, model: nn.Module) -> nn.Module | None:
        if isinstance(model, MemberStack):
            return None  # idempotent: already an ensemble
        base_seed = self.seed if self.seed is not None else torch.initial_seed()
        stack = MemberStack(make_members(model, self.num_members, base_seed))
        self._apply_paths(stack)
        return stack

    def _stack(self, module: L.LightningModule) -> MemberStack:
        stack = module.model
        if not isinstance(stack, MemberStack):
            raise TypeError(
                f"ensemble: expected the model to be a MemberStack after surgery, got {type(stack).__name__}"
            )
        return stack

    def _apply_paths(self, stack: MemberStack) -> None:
        if self.train_path:
            stack.train_path = self.train_path  # type: ignore[assignment]
        if self.eval_path:
            stack.eval_path = self.eval_path  # type: ignore[assignment]

    @staticmethod
    def rule_path(device: torch.device) -> ForwardPath:
        """The documented rule when nothing was measured: vmap on CUDA, sequential elsewhere."""
        return "vmap" if device.type == "cuda" else "sequential"

    @hookimpl
    def litplug_on_fit_start(self, module: L.LightningModule, sample_batch: Any) -> None:
        stack = self._stack(module)
        if self.path == "auto" and not self.train_path:  # not after a resume: the choice is restored
            trainer = module.trainer
            if trainer.world_size > 1:
                self.train_path = self.eval_path = self.rule_path(module.device)
                self.timings = {"rule": "multi-process: vmap on CUDA, sequential otherwise"}
            else:
                # the hooks get the LitplugModule; split_batch is its method, not LightningModule's
                inputs, targets = cast("LitplugModule", module).split_batch(sample_batch)
                loss_fn = getattr(module, "loss_fn", None)
                self.timings = time_forward_paths(stack, inputs, targets, loss_fn, self.timing_repeats)
                prefer = self.rule_path(module.device)
                self.train_path = faster_path(self.timings, "train", prefer, self.SWITCH_MARGIN)
                self.eval_path = faster_path(self.timings, "eval", prefer, self.SWITCH_MARGIN)
        self._apply_paths(stack)

    # -- loss and prediction ----------------------------------------------------------------------

    @hookimpl
    def litplug_compute_loss(self, module: L.LightningModule, outputs: Tensor, targets: Tensor) -> Tensor:
        return sum_of_member_losses(outputs, targets, getattr(module, "loss_fn", None))

    @hookimpl
    def litplug_log_probs(self, outputs: Tensor) -> Tensor:
        return ensemble_log_probs(outputs)

    # -- evaluation -------------------------------------------------------------------------------

    @hookimpl
    def litplug_on_eval_start(self, module: L.LightningModule, stage: str) -> None:
        stack = self._stack(module)
        if not self.eval_path:  # evaluation without a fit and without a stored choice
            self.eval_path = self.rule_path(module.device)
        self._apply_paths(stack)
        self._recorder.reset()

    @hookimpl
    def litplug_eval_step(
        self, outputs: Tensor, log_probs: Tensor | None, targets: Tensor, stage: str
    ) -> dict[str, Tensor]:
        return self.member_metrics(outputs, log_probs, targets, stage)

    def member_metrics(
        self, outputs: Tensor, log_probs: Tensor | None, targets: Tensor, stage: str
    ) -> dict[str, Tensor]:
        """Each member's accuracy, the members' mean accuracy and NLL, and pairwise disagreement."""
        if targets.is_floating_point():
            return {}
        members = outputs.detach().reshape(outputs.shape[0], -1, outputs.shape[-1])
        flat_targets = targets.reshape(-1)
        keep = flat_targets != -100
        members, flat_targets = members[:, keep], flat_targets[keep]
        if flat_targets.numel() == 0:
            return {}
        member_log_probs = torch.log_softmax(members.float(), dim=-1)
        correct = member_log_probs.argmax(-1).eq(flat_targets).float().mean(-1)  # [M]
        member_nll = -member_log_probs.gather(
            -1, flat_targets.expand(members.shape[0], -1).unsqueeze(-1)
        ).mean()
        metrics = {f"member{k}_acc": correct[k] for k in range(members.shape[0])}
        metrics["member_acc_mean"] = correct.mean()
        metrics["member_nll_mean"] = member_nll
        metrics["diversity"] = disagreement(members)
        if stage == "test" and self.reliability_diagram and log_probs is not None:
            probs, kept_targets = flatten_classes(log_probs.detach().exp(), targets)
            self._recorder.update(probs, kept_targets)
        return metrics

    @hookimpl
    def litplug_on_eval_end(self, module: L.LightningModule, stage: str) -> None:
        if stage == "test" and self.reliability_diagram:
            self._recorder.save(module, name=f"ensemble_{stage}")

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"train_path": self.train_path, "eval_path": self.eval_path, "timings": dict(self.timings)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.path == "auto":  # an explicit path in the config wins over a stored choice
            self.train_path = state["train_path"]
            self.eval_path = state["eval_path"]
        self.timings = dict(state["timings"])
