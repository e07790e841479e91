"""The MIMO plugin: M subnetworks trained and evaluated in one network (Havasi et al. 2021)."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, cast

import lightning as L
import torch
from torch import Tensor, nn

from litplug.core.errors import CheckpointError, PluginConfigError
from litplug.core.hookspecs import hookimpl
from litplug.core.plots import ReliabilityRecorder
from litplug.core.plugin import Plugin

from . import functional as mimo

TRAIN = "train"
EVAL_INPUTS = ("auto", "summed", "tiled")
#: ``(rtol, atol)`` by output dtype within which "auto" keeps the summed input (rounding only):
#: half-precision weights (precision "bf16-true") round the two ways apart by about their epsilon.
AUTO_TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (4e-3, 4e-3)}


class MIMO(Plugin):
    """MIMO: M subnetworks in one network (multi-input multi-output), ensembles at ~1x inference cost.

    Model surgery widens the model's input layer to take ``num_members`` inputs (concatenated along
    channels for images, features for flat inputs) and its output layer to give ``num_members``
    heads. In training each head sees its own independently shuffled batch; at evaluation every head
    sees the same input (tiled, one forward pass) and the heads' probabilities are averaged.

    Args:
        num_members: M, the number of subnetworks (1 is exactly the plain model).
        input_repetition: rho in [0, 1], the fraction of each training batch shown to every member
            (0 = fully independent members; the paper uses 0 on CIFAR, 0.6 on ImageNet).
        batch_repetitions: each loaded batch (the unique examples) is tiled this many times before
            the per-member shuffles, so a step trains on ``batch_size * batch_repetitions`` rows
            (paper: 4 on CIFAR, 2 on ImageNet; set the loader's batch size to B / batch_repetitions
            to match the paper's step batch B).
        input_layer: dotted attribute path of the first layer (Linear or Conv2d) of a user model;
            default ``stem`` (SmallCNN) or the first Linear/Conv2d in ``body`` (MLP).
        output_layer: dotted attribute path of the last layer (Linear or Conv2d); default ``head``.
        reliability_diagram: save ``reliability_mimo_test.png`` (the averaged prediction) in the
            run directory, and log it to W&B, at the end of each test epoch.
        eval_input: how evaluation feeds the same input to every member. ``"tiled"``: the input
            repeated M times along dim 1 (the paper's way). ``"summed"``: the plain input, which
            the widened input layer applies through the sum of its M weight blocks (the same
            numbers, since the layer is linear, without building the tiled input; cached between
            weight changes). ``"auto"`` (default): on the first evaluation batch run both and keep
            ``"summed"`` when they agree (a model whose code between its input and its input layer
            depends on the input's width falls back to ``"tiled"`` with a warning).
    """

    name = "mimo"
    stochastic_training = True  # random noise / starts / shuffles while training (see core/plugin.py)
    conflicts_with = ("ensemble",)
    conflict_reasons: ClassVar[dict[str, str]] = {"ensemble": "both replace the loss and the prediction rule"}
    # Batch transforms of the raw (inputs, targets) first: replay mixes in its memory and an attack
    # perturbs raw inputs (through class_scores, which tiles them for the members); then MIMO
    # builds its members' batches from the result.
    run_after = ("replay", "pgd_at", "adt")

    def __init__(
        self,
        num_members: int = 3,
        input_repetition: float = 0.0,
        batch_repetitions: int = 4,
        input_layer: str | None = None,
        output_layer: str | None = None,
        reliability_diagram: bool = True,
        eval_input: str = "auto",
    ) -> None:
        self._check_int("num_members", num_members)
        self.check_choice("eval_input", eval_input, EVAL_INPUTS)
        self.check_range("input_repetition", input_repetition, low=0.0, high=1.0)
        self._check_int("batch_repetitions", batch_repetitions)
        for argument, path in (("input_layer", input_layer), ("output_layer", output_layer)):
            self.check(
                path is None or (isinstance(path, str) and path.strip() != ""),
                argument,
                f"must be a dotted attribute path like 'encoder.0' or null, got {path!r}",
            )
        self.num_members = num_members
        self.input_repetition = float(input_repetition)
        self.batch_repetitions = batch_repetitions
        self.input_layer = input_layer
        self.output_layer = output_layer
        self.reliability_diagram = reliability_diagram
        self.eval_input = eval_input
        # "auto" is decided on the first evaluation batch (per process: not checkpointed).
        self._eval_input: str | None = None if eval_input == "auto" else eval_input
        self._recorder = ReliabilityRecorder()

    def _check_int(self, argument: str, value: object) -> None:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        self.check(is_int and value >= 1, argument, f"must be an integer >= 1, got {value!r}")  # type: ignore[operator]

    @classmethod
    def example(cls) -> MIMO:
        """Two members, half the rows shared, batches repeated twice: every code path in a few steps."""
        return cls(num_members=2, input_repetition=0.5, batch_repetitions=2, reliability_diagram=False)

    @property
    def passthrough(self) -> bool:
        """M=1 without batch repetition: the plugin changes nothing (exactly the plain model)."""
        return self.num_members == 1 and self.batch_repetitions == 1

    # -- setup ------------------------------------------------------------------------------------

    def _layer_paths(self, model: nn.Module) -> tuple[str, str]:
        try:
            return mimo.resolve_layer_paths(model, self.input_layer, self.output_layer)
        except mimo.MIMOSurgeryError as err:
            raise PluginConfigError(self.name, err.argument, err.problem) from None

    @hookimpl
    def litplug_check_setup(self, module: L.LightningModule) -> None:
        """Fail before training when the layers cannot be found or widened."""
        # The hooks get the LitplugModule, whose ``model`` is an nn.Module; read through LightningModule's
        # ``__getattr__`` mypy only sees ``Tensor | Module``, hence the casts (no runtime effect).
        self._layer_paths(cast(nn.Module, module.model))
        if getattr(module, "loss_fn", None) is not None:
            warnings.warn(
                f"plugin '{self.name}' replaces the configured loss with the sum over heads of "
                "cross-entropy; model.loss is ignored",
                stacklevel=2,
            )

    @hookimpl
    def litplug_configure_model(self, model: nn.Module) -> nn.Module:
        """Widen the input and output layers in place (idempotent, see :func:`widen_model`)."""
        try:
            return mimo.widen_model(model, self.num_members, self.input_layer, self.output_layer)
        except mimo.MIMOSurgeryError as err:
            raise PluginConfigError(self.name, err.argument, err.problem) from None

    # -- every batch ------------------------------------------------------------------------------

    @hookimpl
    def litplug_transform_batch(self, batch: Any, stage: str, module: L.LightningModule | None) -> Any:
        """Training: each member its own shuffled rows; otherwise the same input for every member
        (tiled M times, or left as it is for the summed input layer: see ``eval_input``)."""
        if self.passthrough:
            return None
        if stage != TRAIN:
            inputs = batch if isinstance(batch, Tensor) else batch[0]  # predict may yield bare inputs
            if self.num_members == 1 or self._summed_eval(module, inputs):
                return None
            tiled = mimo.repeat_inputs(inputs, self.num_members)
            return tiled if isinstance(batch, Tensor) else (tiled, *batch[1:])
        inputs, targets = batch
        indices = mimo.member_indices(
            inputs.shape[0], self.num_members, self.input_repetition, self.batch_repetitions
        )
        member_inputs = mimo.stack_member_inputs(inputs, indices)
        member_targets = targets[indices.to(targets.device)].transpose(0, 1)  # [N, M]
        return member_inputs, member_targets

    def _summed_eval(self, module: L.LightningModule | None, inputs: Tensor) -> bool:
        """Whether this evaluation batch goes in untiled (``eval_input``; "auto" decides once)."""
        if self._eval_input is None:
            if module is None:
                return False
            model = cast(nn.Module, module.model)
            if model.training:  # a check forward in training mode would move BatchNorm statistics
                return False
            self._eval_input = self._check_summed_input(model, inputs)
        return self._eval_input == "summed"

    def _check_summed_input(self, model: nn.Module, inputs: Tensor) -> str:
        """``"summed"`` when the model gives the same outputs for the plain and the tiled input."""
        # Outside autocast: mixed precision would round the two ways differently and hide nothing.
        with torch.no_grad(), torch.autocast(inputs.device.type, enabled=False):
            tiled = model(mimo.repeat_inputs(inputs, self.num_members))
            try:
                plain = model(inputs)
            except (RuntimeError, ValueError) as err:
                problem = f"fails on the plain input ({type(err).__name__}: {err})"
            else:
                rtol, atol = AUTO_TOLERANCES.get(plain.dtype, AUTO_TOLERANCES[torch.float32])
                if plain.shape == tiled.shape and torch.allclose(plain, tiled, rtol, atol):
                    return "summed"
                problem = "gives other outputs for the plain input than for the tiled one"
        warnings.warn(
            f"plugin '{self.name}': eval_input='auto' keeps the tiled evaluation input: the model "
            f"{problem} (set eval_input: tiled to silence this)",
            stacklevel=2,
        )
        return "tiled"

    @hookimpl
    def litplug_compute_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Sum over heads of each head's mean cross-entropy (training and evaluation alike)."""
        return mimo.mimo_loss(outputs, targets, self.num_members)

    @hookimpl
    def litplug_log_probs(self, outputs: Tensor, stage: str) -> Tensor:
        """Training: each head's own log-probs ``[B, M, K]`` (its own targets); else the average."""
        if stage == TRAIN:
            return mimo.member_log_probs(outputs, self.num_members)
        return mimo.ensemble_log_probs(outputs, self.num_members)

    @hookimpl
    def litplug_on_eval_start(self) -> None:
        self._recorder.reset()

    @hookimpl
    def litplug_eval_step(
        self, outputs: Tensor, log_probs: Tensor | None, targets: Tensor, stage: str
    ) -> dict[str, Tensor] | None:
        """Each member's NLL/accuracy, their means and the members' disagreement."""
        if targets.dim() != 1 or targets.is_floating_point():
            return None
        if stage == "test" and self.reliability_diagram and log_probs is not None:
            self._recorder.update(log_probs.detach().exp(), targets)
        return mimo.member_metrics(outputs.detach(), targets, self.num_members)

    @hookimpl
    def litplug_on_eval_end(self, module: L.LightningModule, stage: str) -> None:
        if stage == "test" and self.reliability_diagram:
            self._recorder.save(module, name=f"mimo_{stage}")

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The member count, so a checkpoint loaded with another M fails with a clear message."""
        return {"num_members": self.num_members}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("num_members", self.num_members)
        if saved != self.num_members:
            raise CheckpointError(
                f"plugin '{self.name}': the checkpoint was trained with num_members={saved}, "
                f"but num_members={self.num_members} is configured"
            )
