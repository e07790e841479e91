"""``pgd_at``: train on PGD adversarial examples (Madry et al. 2018)."""

from __future__ import annotations

from typing import Any, ClassVar

from litplug.core.hookspecs import hookimpl
from litplug.core.plugin import Plugin
from litplug.plugins.attacks.functional import LOSSES, NORMS, AttackConfigError, check_attack_arguments

from .functional import adversarial_training_inputs


class PGDAdversarialTraining(Plugin):
    """Madry PGD adversarial training: every training batch is replaced by its PGD attack.

    Args:
        epsilon: L-inf (or L2) radius in the data's scale. The paper's CIFAR value is 8/255 on [0, 1]
            images; on litplug's digits (``normalize="unit"``, pixels in [0, 1] with only 17 grey
            levels) 8/255 is tiny: use 0.1 or 0.2.
        steps: PGD iterations (paper: 7 on CIFAR-10).
        step_size: PGD step; ``None`` gives ``epsilon / 4`` (the paper's 2/255 for 8/255).
        norm: ``"linf"`` or ``"l2"``.
        loss: ``"ce"`` or ``"margin"`` (the loss the inner attack maximises).
        random_start: start from a uniform point in the ball (paper: yes).
        attack_mode: ``"eval"`` (default) or ``"train"``: the model's mode during the attack.
        clip_min, clip_max: valid input range (``None`` both for unbounded inputs).
        allow_large_step: permit ``step_size > epsilon``.
    """

    name = "pgd_at"
    stochastic_training = True  # random noise / starts / shuffles while training (see core/plugin.py)
    conflicts_with = ("adt",)
    conflict_reasons: ClassVar[dict[str, str]] = {"adt": "both replace every training batch by an attack"}

    def __init__(
        self,
        epsilon: float = 0.1,
        steps: int = 7,
        step_size: float | None = None,
        norm: str = "linf",
        loss: str = "ce",
        random_start: bool = True,
        attack_mode: str = "eval",
        clip_min: float | None = 0.0,
        clip_max: float | None = 1.0,
        allow_large_step: bool = False,
    ) -> None:
        resolved_step = epsilon / 4 if step_size is None else step_size
        try:
            check_attack_arguments(epsilon, steps, resolved_step, norm, loss, 1, allow_large_step)
        except AttackConfigError as err:
            self.check(False, err.argument, err.problem)
        self.check_choice("norm", norm, NORMS)
        self.check_choice("loss", loss, LOSSES)
        self.check_choice("attack_mode", attack_mode, ("eval", "train"))
        self.check(
            (clip_min is None) == (clip_max is None), "clip_min", "and clip_max must both be set or both None"
        )
        self.epsilon = epsilon
        self.steps = steps
        self.step_size = step_size
        self.norm = norm
        self.loss = loss
        self.random_start = random_start
        self.attack_mode = attack_mode
        self.clip_min = clip_min
        self.clip_max = clip_max
        self.allow_large_step = allow_large_step

    @classmethod
    def example(cls) -> PGDAdversarialTraining:
        return cls(epsilon=0.1, steps=2)

    @property
    def resolved_step_size(self) -> float:
        return self.epsilon / 4 if self.step_size is None else self.step_size

    @hookimpl
    def litplug_on_fit_start(self, sample_batch: Any) -> None:
        self.check_batch(sample_batch, float_inputs=True)

    @hookimpl
    def litplug_transform_batch(self, module: Any, batch: Any, stage: str) -> Any:
        if stage != "train":
            return None
        inputs, targets = module.split_batch(batch)
        clip = None if self.clip_min is None or self.clip_max is None else (self.clip_min, self.clip_max)
        adversarial = adversarial_training_inputs(
            module.model,
            inputs,
            targets,
            self.epsilon,
            self.resolved_step_size,
            self.steps,
            self.norm,  # type: ignore[arg-type]
            self.loss,  # type: ignore[arg-type]
            self.random_start,
            clip,
            self.attack_mode,  # type: ignore[arg-type]
            self.allow_large_step,
            forward=module.class_scores,  # the prediction as configured (ensemble average, MIMO)
        )
        return (adversarial, targets)
