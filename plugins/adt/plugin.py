"""``adt``: adversarial distributional training (ADT_EXP, ADT_EXP-AM, ADT_IMP-AM)."""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch
from torch import Tensor

from litplug.core import distributed
from litplug.core.hookspecs import hookimpl
from litplug.core.plugin import Plugin
from litplug.plugins.attacks.functional import frozen_batchnorm_stats, model_mode

from .functional import EncoderNet, GeneratorNet, adt_exp_inputs, amortized_inputs, generator_adam

VARIANTS = ("exp", "exp_am", "imp_am")
DEFAULT_ENTROPY_WEIGHT = {"exp": 0.01, "exp_am": 0.01, "imp_am": 1.0}


class AdversarialDistributionalTraining(Plugin):
    """Adversarial distributional training (Dong et al. 2020): train on samples of a learned worst-case
    perturbation distribution with an entropy bonus.

    Args:
        variant: ``"exp"`` (per-example tanh-Gaussian found by inner steps, ADT_EXP), ``"exp_am"``
            (a generator outputs its (mu, v), ADT_EXP-AM) or ``"imp_am"`` (an implicit generator
            fed with noise, ADT_IMP-AM).
        epsilon: L-inf radius in the data's scale. The paper's 8/255 is for CIFAR images in
            [0, 1]; on litplug's digits (``normalize="unit"``: [0, 1], 17 grey levels) it is tiny:
            use 0.1 or 0.2.
        steps: ADT_EXP inner steps (paper: 7).
        lr: ADT_EXP inner step size in the (mu, v) space before the tanh (paper: 0.3 with Adam
            betas (0, 0), i.e. signed steps). Not an input-space step, so it is not compared with
            epsilon.
        samples: ADT_EXP Monte Carlo samples per inner step (paper: 5).
        entropy_weight: lambda; ``None`` gives the paper's 0.01 (exp, exp_am) or 1.0 (imp_am).
        entropy_threshold: ADT_IMP-AM's penalty threshold on ``-E log q`` (paper code: 0.9).
        noise_dim: ADT_IMP-AM noise dimension (paper: 64).
        generator_lr, generator_beta1: the generator's Adam (paper: 2e-4, 0.5).
        generator_width: hidden width (MLP) or channels (conv) of the generator.
        sample_batching: how ADT_EXP evaluates its ``samples`` noise draws per inner step:
            ``"batched"`` (one forward of ``samples * B``), ``"per_sample"`` (``samples`` forwards of
            ``B``; the same values in eval mode, while in train mode BatchNorm then normalises each
            chunk of B on its own) or ``"auto"``: per sample for image inputs on CPU with
            ``attack_mode="eval"`` (a batched SmallCNN pass measured ~1.6x the per-sample passes
            there), batched otherwise.
        attack_mode: the classifier's mode while the perturbation is built: ``"eval"`` (as the
            paper) or ``"train"`` (batch statistics; the BatchNorm running statistics are restored
            afterwards so only the training forward pass updates them).
        clip_min, clip_max: valid input range (``None`` both for unbounded inputs).
    """

    name = "adt"
    # 2: the generator's BatchNorm keeps no running statistics (they were never used: the generator
    # only runs in train mode); version-1 checkpoints load with those buffers dropped.
    state_version = 2
    stochastic_training = True  # random noise / starts / shuffles while training (see core/plugin.py)
    conflicts_with = ("pgd_at",)
    conflict_reasons: ClassVar[dict[str, str]] = {"pgd_at": "both replace every training batch by an attack"}

    def __init__(
        self,
        variant: str = "exp",
        epsilon: float = 0.1,
        steps: int = 7,
        lr: float = 0.3,
        samples: int = 5,
        entropy_weight: float | None = None,
        entropy_threshold: float = 0.9,
        noise_dim: int = 64,
        generator_lr: float = 2e-4,
        generator_beta1: float = 0.5,
        generator_width: int = 64,
        sample_batching: str = "auto",
        attack_mode: str = "eval",
        clip_min: float | None = 0.0,
        clip_max: float | None = 1.0,
    ) -> None:
        self.check_choice("variant", variant, VARIANTS)
        self.check_range("epsilon", epsilon, low=0.0, low_inclusive=False)
        self.check(isinstance(steps, int) and steps >= 1, "steps", f"must be an integer >= 1, got {steps!r}")
        self.check_range("lr", lr, low=0.0, low_inclusive=False)
        self.check(
            isinstance(samples, int) and samples >= 1, "samples", f"must be an integer >= 1, got {samples!r}"
        )
        if entropy_weight is not None:
            self.check_range("entropy_weight", entropy_weight, low=0.0)
        self.check_range("entropy_threshold", entropy_threshold)
        self.check(
            isinstance(noise_dim, int) and noise_dim >= 1, "noise_dim", f"must be >= 1, got {noise_dim!r}"
        )
        self.check_range("generator_lr", generator_lr, low=0.0, low_inclusive=False)
        self.check_range("generator_beta1", generator_beta1, low=0.0, high=1.0, high_inclusive=False)
        self.check(generator_width >= 1, "generator_width", f"must be >= 1, got {generator_width!r}")
        self.check_choice("sample_batching", sample_batching, ("auto", "batched", "per_sample"))
        self.check_choice("attack_mode", attack_mode, ("eval", "train"))
        self.check(
            (clip_min is None) == (clip_max is None), "clip_min", "and clip_max must both be set or both None"
        )
        self.variant = variant
        self.epsilon = epsilon
        self.steps = steps
        self.lr = lr
        self.samples = samples
        self.entropy_weight = entropy_weight
        self.entropy_threshold = entropy_threshold
        self.noise_dim = noise_dim
        self.generator_lr = generator_lr
        self.generator_beta1 = generator_beta1
        self.generator_width = generator_width
        self.sample_batching = sample_batching
        self.attack_mode = attack_mode
        self.clip_min = clip_min
        self.clip_max = clip_max
        self.generator: GeneratorNet | None = None
        self.encoder: EncoderNet | None = None
        self.generator_optimizer: torch.optim.Optimizer | None = None
        self._input_shape: tuple[int, ...] | None = None
        self._pending_state: dict[str, Any] | None = None
        self._regulariser: Tensor | None = None

    @classmethod
    def example(cls) -> AdversarialDistributionalTraining:
        return cls(variant="imp_am", epsilon=0.1, noise_dim=8, generator_width=16)

    # -- derived settings ---------------------------------------------------------------------------

    @property
    def amortized(self) -> bool:
        return self.variant != "exp"

    @property
    def resolved_entropy_weight(self) -> float:
        return DEFAULT_ENTROPY_WEIGHT[self.variant] if self.entropy_weight is None else self.entropy_weight

    def per_sample_forward(self, inputs: Tensor) -> bool:
        if self.sample_batching == "auto":  # eval mode only: there the two give the same values
            return inputs.dim() >= 4 and inputs.device.type == "cpu" and self.attack_mode == "eval"
        return self.sample_batching == "per_sample"

    @property
    def clip(self) -> tuple[float, float] | None:
        if self.clip_min is None or self.clip_max is None:
            return None
        return (self.clip_min, self.clip_max)

    # -- the generator --------------------------------------------------------------------------------

    def _build_networks(self, input_shape: tuple[int, ...], device: torch.device) -> None:
        """Create the generator (and encoder) for ``input_shape``; init draws from a forked RNG seeded
        from the training stream, so it is reproducible and costs the stream one draw."""
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out_per_input = 2 if self.variant == "exp_am" else 1
            noise_dim = self.noise_dim if self.variant == "imp_am" else 0
            self.generator = GeneratorNet(input_shape, out_per_input, noise_dim, self.generator_width).to(
                device
            )
            params = list(self.generator.parameters())
            if self.variant == "imp_am":
                self.encoder = EncoderNet(input_shape, self.noise_dim, self.generator_width).to(device)
                params += list(self.encoder.parameters())
        self.generator_optimizer = generator_adam(params, self.generator_lr, self.generator_beta1)
        self._input_shape = tuple(input_shape)

    def _ensure_networks(self, module: Any, inputs: Tensor) -> None:
        if self.generator is not None:
            return
        shape = tuple(inputs.shape[1:])
        if self._pending_state is not None:
            shape = tuple(self._pending_state["input_shape"])
        self._build_networks(shape, module.device)
        if self._pending_state is not None:
            self._load_networks(self._pending_state)
            self._pending_state = None

    def _load_networks(self, state: dict[str, Any]) -> None:
        assert self.generator is not None and self.generator_optimizer is not None
        self.generator.load_state_dict(state["generator"])
        if self.encoder is not None:
            self.encoder.load_state_dict(state["encoder"])
        self.generator_optimizer.load_state_dict(state["optimizer"])

    def _attack_context(self, model: Any) -> contextlib.ExitStack:
        """The classifier's mode while the perturbation is built (BatchNorm stats kept in train mode)."""
        stack = contextlib.ExitStack()
        stack.enter_context(model_mode(model, self.attack_mode == "train"))
        if self.attack_mode == "train":
            stack.enter_context(frozen_batchnorm_stats(model))
        return stack

    # -- hooks ----------------------------------------------------------------------------------------

    @hookimpl
    def litplug_on_fit_start(self, module: Any, sample_batch: Any) -> None:
        self.check_batch(sample_batch, float_inputs=True)
        if self.amortized:
            self._ensure_networks(module, module.split_batch(sample_batch)[0])

    @hookimpl
    def litplug_transform_batch(self, module: Any, batch: Any, stage: str) -> Any:
        if stage != "train":
            return None
        inputs, targets = module.split_batch(batch)
        if not self.amortized:
            with self._attack_context(module.model):
                adversarial = adt_exp_inputs(
                    module.class_scores,  # the prediction as configured (ensemble average, MIMO)
                    inputs,
                    targets,
                    self.epsilon,
                    self.steps,
                    self.lr,
                    self.samples,
                    self.resolved_entropy_weight,
                    self.clip,
                    per_sample_forward=self.per_sample_forward(inputs),
                )
            return (adversarial, targets)
        self._ensure_networks(module, inputs)
        assert self.generator is not None
        with self._attack_context(module.model):
            adversarial, self._regulariser = amortized_inputs(
                module.class_scores,
                self.generator,
                inputs,
                targets,
                self.epsilon,
                self.variant,  # type: ignore[arg-type]
                self.resolved_entropy_weight,
                self.encoder,
                self.entropy_threshold,
                self.clip,
            )
        return (adversarial, targets)

    @hookimpl
    def litplug_extra_losses(self, stage: str) -> dict[str, Tensor] | None:
        """The generator's regulariser joins the one backward (it does not depend on the classifier)."""
        if stage != "train" or self._regulariser is None:
            return None
        regulariser, self._regulariser = self._regulariser, None
        return {"adt_generator": regulariser}

    @hookimpl
    def litplug_on_before_optimizer_step(self) -> None:
        """Step the generator with the gradients the classifier's backward left (reversed) on it."""
        if self.generator_optimizer is not None:
            # DDP averages the classifier's gradients only; the generator is the plugin's own
            # network, so average its gradients here or the ranks' generators drift apart.
            if distributed.is_distributed():  # checked once, not per parameter (it is per step)
                for group in self.generator_optimizer.param_groups:
                    for param in group["params"]:
                        if param.grad is not None:
                            distributed.all_reduce_mean_(param.grad)
            self.generator_optimizer.step()
            self.generator_optimizer.zero_grad(set_to_none=True)

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.generator is None or self.generator_optimizer is None:
            return dict(self._pending_state) if self._pending_state is not None else {}
        state: dict[str, Any] = {
            "input_shape": list(self._input_shape or ()),
            "generator": dict(self.generator.state_dict()),
            "optimizer": self.generator_optimizer.state_dict(),
        }
        if self.encoder is not None:
            state["encoder"] = dict(self.encoder.state_dict())
        return state

    def upgrade_state(self, state: dict[str, Any], from_version: int) -> dict[str, Any]:
        if from_version != 1:
            return super().upgrade_state(state, from_version)
        if not state:
            return state
        dead = ("running_mean", "running_var", "num_batches_tracked")
        generator = {k: v for k, v in state["generator"].items() if not k.endswith(dead)}
        return {**state, "generator": generator}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.generator is not None and self._input_shape == tuple(state["input_shape"]):
            self._load_networks(state)
        else:  # built lazily on the module's device at fit start
            self.generator = self.encoder = self.generator_optimizer = None
            self._pending_state = state
