"""``robust_eval``: robust accuracy under FGSM, PGD and margin-loss PGD with restarts as val/test metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from litplug.core.hookspecs import hookimpl
from litplug.core.plugin import Plugin

from .functional import (
    LOSSES,
    NORMS,
    AttackConfigError,
    Norm,
    check_attack_arguments,
    evaluation_attack_context,
    fgsm,
    pgd,
)

ATTACKS = ("fgsm", "pgd", "margin_pgd")


def inference_mode_loops(trainer: Any, stages: list[str]) -> list[tuple[str, Any]]:
    """``(name, loop)`` of the Trainer's evaluation loops for ``stages`` that use torch.inference_mode."""
    loops = {
        "val": [("fit validation", "fit_loop.epoch_loop.val_loop"), ("validate", "validate_loop")],
        "test": [("test", "test_loop")],
    }
    found = []
    for stage in stages:
        for label, path in loops[stage]:
            loop: Any = trainer
            for attribute in path.split("."):
                loop = getattr(loop, attribute, None)
            if loop is not None and getattr(loop, "inference_mode", False):
                found.append((label, loop))
    return found


class RobustEvaluation(Plugin):
    """Robust accuracy under FGSM, PGD-k and margin-loss PGD with restarts, logged as val/test metrics.

    Logs ``<stage>/robust_acc_<attack>_eps<epsilon>`` for every attack and epsilon (clean accuracy is
    the core's ``<stage>/acc``). Attacks run in eval mode on a forked, seeded RNG, so they change
    neither the model's modes, its BatchNorm statistics nor the training random stream.

    Lightning evaluates under ``torch.inference_mode`` by default, which forbids autograd. Attacks
    need ``Trainer(inference_mode=False)`` (YAML ``trainer.inference_mode: false``): by default the
    plugin switches the evaluation loops it attacks in to ``torch.no_grad`` at setup and warns;
    with ``force_no_inference_mode=False`` it raises a clear error instead.

    Args:
        epsilons: perturbation radii in the data's scale (digits with ``normalize="unit"``: [0, 1]).
        attacks: any of ``"fgsm"``, ``"pgd"`` (cross-entropy, ``pgd_steps`` steps, one random start)
            and ``"margin_pgd"`` (CW margin loss, ``pgd_steps`` steps, ``margin_restarts`` restarts).
        norm: ``"linf"`` or ``"l2"``.
        pgd_steps: PGD iterations (20 gives the usual PGD-20).
        step_size_factor: PGD step is ``step_size_factor * epsilon / pgd_steps`` (Madry's 2.5).
        margin_restarts: random restarts of the margin-loss PGD.
        stages: ``"val"`` and/or ``"test"``.
        max_batches: attack only the first this many batches of each evaluation epoch (``None``: all).
        clip_min, clip_max: valid input range; both ``None`` for unbounded inputs.
        seed: seed of the attacks' random starts (forked RNG; evaluation is repeatable).
        force_no_inference_mode: switch the Trainer's evaluation loops off inference mode (warns)
            instead of raising.
    """

    name = "robust_eval"

    def __init__(
        self,
        epsilons: list[float] | None = None,
        attacks: list[str] | None = None,
        norm: str = "linf",
        pgd_steps: int = 20,
        step_size_factor: float = 2.5,
        margin_restarts: int = 3,
        stages: list[str] | None = None,
        max_batches: int | None = None,
        clip_min: float | None = 0.0,
        clip_max: float | None = 1.0,
        seed: int = 0,
        force_no_inference_mode: bool = True,
    ) -> None:
        epsilons = [0.1] if epsilons is None else [float(e) for e in epsilons]
        attacks = list(ATTACKS) if attacks is None else list(attacks)
        stages = ["val", "test"] if stages is None else list(stages)
        self.check(len(epsilons) > 0, "epsilons", "must name at least one epsilon")
        for eps in epsilons:
            self.check_range("epsilons", eps, low=0.0, low_inclusive=False)
        self.check(len(attacks) > 0, "attacks", f"must name at least one of {ATTACKS}")
        for attack in attacks:
            self.check_choice("attacks", attack, ATTACKS)
        self.check_choice("norm", norm, NORMS)
        self.check(
            isinstance(pgd_steps, int) and pgd_steps >= 1, "pgd_steps", f"must be >= 1, got {pgd_steps!r}"
        )
        self.check_range("step_size_factor", step_size_factor, low=0.0, low_inclusive=False)
        self.check(
            step_size_factor <= pgd_steps,
            "step_size_factor",
            f"gives a PGD step ({step_size_factor}/{pgd_steps} * epsilon) larger than epsilon",
        )
        self.check(
            isinstance(margin_restarts, int) and margin_restarts >= 1,
            "margin_restarts",
            f"must be >= 1, got {margin_restarts!r}",
        )
        for stage in stages:
            self.check_choice("stages", stage, ("val", "test"))
        self.check(
            max_batches is None or (isinstance(max_batches, int) and max_batches >= 1),
            "max_batches",
            f"must be None or >= 1, got {max_batches!r}",
        )
        self.check(
            (clip_min is None) == (clip_max is None), "clip_min", "and clip_max must both be set or both None"
        )
        if clip_min is not None and clip_max is not None:
            self.check(clip_min < clip_max, "clip_min", f"must be < clip_max, got {clip_min} >= {clip_max}")
        self.epsilons = epsilons
        self.attacks = attacks
        self.norm = norm
        self.pgd_steps = pgd_steps
        self.step_size_factor = step_size_factor
        self.margin_restarts = margin_restarts
        self.stages = stages
        self.max_batches = max_batches
        self.clip_min = clip_min
        self.clip_max = clip_max
        self.seed = seed
        self.force_no_inference_mode = force_no_inference_mode
        self._batches_seen = 0

    @classmethod
    def example(cls) -> RobustEvaluation:
        return cls(epsilons=[0.1], pgd_steps=3, margin_restarts=1, max_batches=1)

    @property
    def clip(self) -> tuple[float, float] | None:
        if self.clip_min is None or self.clip_max is None:
            return None
        return (self.clip_min, self.clip_max)

    @hookimpl
    def litplug_check_setup(self, trainer: Any) -> None:
        loops = inference_mode_loops(trainer, self.stages)
        if not loops:
            return
        names = ", ".join(name for name, _ in loops)
        self.check(
            self.force_no_inference_mode,
            "trainer.inference_mode",
            f"must be False: the {names} loop(s) run under torch.inference_mode, which forbids "
            "the gradients an attack needs; build the Trainer with inference_mode=False "
            "(YAML: trainer.inference_mode: false)",
        )
        for _, loop in loops:
            loop.inference_mode = False
        rank_zero_warn(
            f"robust_eval: the {names} loop(s) ran under torch.inference_mode, which forbids the "
            "gradients attacks need; switched them to torch.no_grad. Set Trainer(inference_mode=False) "
            "(YAML: trainer.inference_mode: false) to silence this."
        )

    @hookimpl
    def litplug_on_fit_start(self, sample_batch: Any) -> None:
        self.check_batch(sample_batch, float_inputs=True)

    @hookimpl
    def litplug_on_eval_start(self) -> None:
        self._batches_seen = 0

    @hookimpl
    def litplug_eval_step(self, module: Any, raw_batch: Any, stage: str) -> dict[str, Tensor] | None:
        if stage not in self.stages:
            return None
        self._batches_seen += 1
        if self.max_batches is not None and self._batches_seen > self.max_batches:
            return None
        # The raw inputs, attacked through the prediction as the plugins make it (MIMO tiles the
        # input inside class_scores; an ensemble averages its members there).
        self.check_batch(raw_batch, float_inputs=True)  # also without a fit (validate / test)
        inputs, targets = module.split_batch(raw_batch)
        return robust_accuracies(
            module.model,
            inputs,
            targets,
            self.epsilons,
            self.attacks,
            norm=self.norm,  # type: ignore[arg-type]
            pgd_steps=self.pgd_steps,
            step_size_factor=self.step_size_factor,
            margin_restarts=self.margin_restarts,
            clip=self.clip,
            seed=self.seed + self._batches_seen,
            forward=module.class_scores,
        )


def robust_accuracies(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    epsilons: list[float],
    attacks: list[str],
    norm: Norm = "linf",
    pgd_steps: int = 20,
    step_size_factor: float = 2.5,
    margin_restarts: int = 3,
    clip: tuple[float, float] | None = (0.0, 1.0),
    seed: int | None = 0,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """``{"robust_acc_<attack>_eps<eps>": accuracy}`` on one batch, without touching training state.

    ``forward`` maps inputs to the class scores that are attacked and scored (default: ``model``);
    ``model`` is the module put in eval mode for the attack.
    """
    results: dict[str, Tensor] = {}
    inputs = inputs.detach()
    scores = model if forward is None else forward
    with evaluation_attack_context(model, seed):
        for eps in epsilons:
            for attack in attacks:
                x_adv = run_named_attack(
                    scores,
                    inputs,
                    targets,
                    attack,
                    eps,
                    norm,
                    pgd_steps,
                    step_size_factor,
                    margin_restarts,
                    clip,
                )
                with torch.no_grad():
                    correct = (scores(x_adv).argmax(dim=1) == targets).float().mean()
                results[f"robust_acc_{attack}_eps{eps:g}"] = correct
    return results


def run_named_attack(
    model: Callable[[Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    attack: str,
    epsilon: float,
    norm: Norm,
    pgd_steps: int,
    step_size_factor: float,
    margin_restarts: int,
    clip: tuple[float, float] | None,
) -> Tensor:
    """Run one of :data:`ATTACKS` (see :class:`RobustEvaluation` for what each name means)."""
    if attack == "fgsm":
        return fgsm(model, inputs, targets, epsilon, norm=norm, clip=clip)
    step_size = step_size_factor * epsilon / pgd_steps
    check_attack_arguments(epsilon, pgd_steps, step_size, norm)
    if attack == "pgd":
        return pgd(model, inputs, targets, epsilon, step_size, pgd_steps, norm, "ce", True, 1, clip)
    if attack == "margin_pgd":
        return pgd(
            model, inputs, targets, epsilon, step_size, pgd_steps, norm, "margin", True, margin_restarts, clip
        )
    raise AttackConfigError("attack", f"must be one of {ATTACKS} (losses {LOSSES}), got {attack!r}")
