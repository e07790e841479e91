"""Pure-torch adversarial attacks: FGSM and PGD under L-inf and L2, cross-entropy and margin losses.

Conventions:

- ``model`` maps inputs ``[B, ...]`` to logits ``[B, C]``; ``targets`` are class indices ``[B]``.
- ``epsilon`` and ``step_size`` are in the data's own scale. litplug's digits with
  ``normalize="unit"`` live in [0, 1], so ``clip=(0.0, 1.0)`` (the default) keeps every adversarial
  input a valid image; pass ``clip=None`` for unbounded inputs (standardised data).
- Gradients are taken with :func:`torch.autograd.grad` with respect to the perturbation only, so the
  model's parameter ``.grad`` fields are never touched.
- Random starts draw from the global torch RNG. That is right inside a training step (adversarial
  training: the core checkpoints the stream); evaluation uses :func:`evaluation_attack_context`,
  which forks the RNG, puts the model in eval mode and restores both afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttackConfigError",
    "Norm",
    "AttackLoss",
    "attack_loss",
    "check_attack_arguments",
    "evaluation_attack_context",
    "fgsm",
    "frozen_batchnorm_stats",
    "input_gradient",
    "margin_loss",
    "model_mode",
    "pgd",
    "project",
    "random_start",
]

Norm = Literal["linf", "l2"]
AttackLoss = Literal["ce", "margin"]
Clip = tuple[float, float] | None
NORMS: tuple[str, ...] = ("linf", "l2")
LOSSES: tuple[str, ...] = ("ce", "margin")
_TINY = 1e-12


class AttackConfigError(ValueError):
    """An attack got an argument it cannot work with (names the argument and what is allowed)."""

    def __init__(self, argument: str, problem: str) -> None:
        self.argument = argument
        self.problem = problem
        super().__init__(f"attack argument '{argument}' {problem}")


def check_attack_arguments(
    epsilon: float,
    steps: int = 1,
    step_size: float | None = None,
    norm: str = "linf",
    loss: str = "ce",
    restarts: int = 1,
    allow_large_step: bool = False,
) -> None:
    """Reject arguments no attack can use; a step larger than epsilon needs ``allow_large_step``."""
    if not epsilon > 0:
        raise AttackConfigError("epsilon", f"must be > 0, got {epsilon!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise AttackConfigError("steps", f"must be an integer >= 1, got {steps!r}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise AttackConfigError("restarts", f"must be an integer >= 1, got {restarts!r}")
    if norm not in NORMS:
        raise AttackConfigError("norm", f"must be one of {NORMS}, got {norm!r}")
    if loss not in LOSSES:
        raise AttackConfigError("loss", f"must be one of {LOSSES}, got {loss!r}")
    if step_size is not None:
        if not step_size > 0:
            raise AttackConfigError("step_size", f"must be > 0, got {step_size!r}")
        if step_size > epsilon and not allow_large_step:
            raise AttackConfigError(
                "step_size",
                f"({step_size!r}) is larger than epsilon ({epsilon!r}); pass allow_large_step=True "
                "if that is intended",
            )


# -- losses -----------------------------------------------------------------------------------------


def margin_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Carlini-Wagner margin per example: ``max_{j != y} z_j - z_y`` (> 0 means misclassified)."""
    true_logit = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    others = logits.masked_fill(F.one_hot(targets, logits.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - true_logit


def attack_loss(logits: Tensor, targets: Tensor, loss: AttackLoss = "ce") -> Tensor:
    """The per-example loss an attack maximises."""
    if loss == "ce":
        return F.cross_entropy(logits, targets, reduction="none")
    if loss == "margin":
        return margin_loss(logits, targets)
    raise AttackConfigError("loss", f"must be one of {LOSSES}, got {loss!r}")


# -- geometry ---------------------------------------------------------------------------------------


def _per_example_norm(x: Tensor) -> Tensor:
    """L2 norm of each example, shaped ``[B, 1, ..., 1]`` to broadcast against ``x``."""
    norms = x.flatten(1).norm(dim=1).clamp_min(_TINY)
    return norms.view(-1, *([1] * (x.dim() - 1)))


def project(delta: Tensor, epsilon: float, norm: Norm) -> Tensor:
    """Project a perturbation onto the epsilon ball of ``norm``."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    scale = (epsilon / _per_example_norm(delta)).clamp(max=1.0)
    return delta * scale


def random_start(like: Tensor, epsilon: float, norm: Norm) -> Tensor:
    """A random point in the epsilon ball (uniform per coordinate for L-inf; random direction and
    uniform radius for L2), drawn from the global torch RNG."""
    if norm == "linf":
        return torch.empty_like(like).uniform_(-epsilon, epsilon)
    direction = torch.randn_like(like)
    direction = direction / _per_example_norm(direction)
    radius = torch.rand(like.shape[0], device=like.device, dtype=like.dtype)
    return direction * (epsilon * radius).view(-1, *([1] * (like.dim() - 1)))


def _clip_inputs(x: Tensor, clip: Clip) -> Tensor:
    return x if clip is None else x.clamp(clip[0], clip[1])


def _ascent_direction(grad: Tensor, norm: Norm) -> Tensor:
    """Steepest ascent direction of unit size in ``norm``: the sign (L-inf) or normalised gradient."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_example_norm(grad)


# -- attacks ----------------------------------------------------------------------------------------


def input_gradient(
    model: Callable[[Tensor], Tensor], x: Tensor, targets: Tensor, loss: AttackLoss = "ce"
) -> tuple[Tensor, Tensor]:
    """Gradient of the summed per-example attack loss with respect to ``x`` and the logits.

    Summing (not averaging) keeps each example's gradient independent of the batch size.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        value = attack_loss(logits, targets, loss).sum()
        (grad,) = torch.autograd.grad(value, x)
    return grad, logits.detach()


def fgsm(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    targets: Tensor,
    epsilon: float,
    norm: Norm = "linf",
    loss: AttackLoss = "ce",
    clip: Clip = (0.0, 1.0),
) -> Tensor:
    """Fast gradient (sign) method: one step of size epsilon from ``x``; returns detached inputs."""
    check_attack_arguments(epsilon, norm=norm, loss=loss)
    grad, _ = input_gradient(model, x, targets, loss)
    return _clip_inputs(x + epsilon * _ascent_direction(grad, norm), clip).detach()


def _pgd_once(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    targets: Tensor,
    epsilon: float,
    step_size: float,
    steps: int,
    norm: Norm,
    loss: AttackLoss,
    use_random_start: bool,
    clip: Clip,
) -> Tensor:
    delta = random_start(x, epsilon, norm) if use_random_start else torch.zeros_like(x)
    delta = _clip_inputs(x + delta, clip) - x
    for _ in range(steps):
        grad, _ = input_gradient(model, x + delta, targets, loss)
        delta = project(delta + step_size * _ascent_direction(grad, norm), epsilon, norm)
        delta = _clip_inputs(x + delta, clip) - x  # stays in the ball: clipping only shrinks |delta|
    return (x + delta).detach()


def _worse(
    model: Callable[[Tensor], Tensor], x_adv: Tensor, targets: Tensor, loss: AttackLoss
) -> tuple[Tensor, Tensor]:
    """(misclassified, loss) per example: restarts keep the candidate that fools the model, and
    among equals the one with the higher loss."""
    with torch.no_grad():
        logits = model(x_adv)
        return logits.argmax(1) != targets, attack_loss(logits, targets, loss)


def pgd(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    targets: Tensor,
    epsilon: float,
    step_size: float | None = None,
    steps: int = 10,
    norm: Norm = "linf",
    loss: AttackLoss = "ce",
    use_random_start: bool = True,
    restarts: int = 1,
    clip: Clip = (0.0, 1.0),
    allow_large_step: bool = False,
) -> Tensor:
    """Projected gradient descent (Madry et al. 2018) on the loss; returns detached inputs.

    Args:
        epsilon: radius of the perturbation ball in ``norm``.
        step_size: step per iteration; default ``min(epsilon, 2.5 * epsilon / steps)`` (Madry et al.'s rule),
            which lets ``steps`` steps travel past the ball's edge.
        steps: gradient steps per restart.
        use_random_start: start each restart from a random point in the ball.
        restarts: independent runs; per example the strongest result is kept (one that fools the
            model, else the one with the higher loss).
        clip: valid input range, or ``None``.
        allow_large_step: permit ``step_size > epsilon`` (usually a configuration mistake).
    """
    if step_size is None:
        check_attack_arguments(epsilon, steps, None, norm, loss, restarts)
        step_size = min(epsilon, 2.5 * epsilon / steps)
    check_attack_arguments(epsilon, steps, step_size, norm, loss, restarts, allow_large_step)
    best = _pgd_once(model, x, targets, epsilon, step_size, steps, norm, loss, use_random_start, clip)
    if restarts == 1:
        return best
    best_fooled, best_loss = _worse(model, best, targets, loss)
    for _ in range(restarts - 1):
        candidate = _pgd_once(
            model, x, targets, epsilon, step_size, steps, norm, loss, use_random_start, clip
        )
        fooled, value = _worse(model, candidate, targets, loss)
        better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (value > best_loss))
        mask = better.view(-1, *([1] * (x.dim() - 1)))
        best = torch.where(mask, candidate, best)
        best_fooled = best_fooled | fooled
        best_loss = torch.where(better, value, best_loss)
    return best


# -- training-state hygiene -------------------------------------------------------------------------


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm's running statistics on exit (for attacks run in train mode)."""
    saved = [
        (m, {k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None})
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in saved:
                for key, value in buffers.items():
                    getattr(module, key).copy_(value)


@contextlib.contextmanager
def model_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put ``model`` in train/eval mode and restore every submodule's own flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def evaluation_attack_context(model: nn.Module, seed: int | None = None) -> Iterator[None]:
    """Run an evaluation-only attack without changing training state.

    Inside: eval mode (no dropout, BatchNorm uses and keeps its running statistics), gradients
    enabled, and a forked RNG (seeded with ``seed`` when given, so evaluation is repeatable). On exit
    the modes, the BatchNorm buffers and the RNG the training uses are exactly as before.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "an adversarial attack needs autograd, but it runs under torch.inference_mode (Lightning "
            "evaluates under it by default): build the Trainer with inference_mode=False "
            "(YAML: trainer.inference_mode: false)"
        )
    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    with torch.random.fork_rng(devices=devices), model_mode(model, False), frozen_batchnorm_stats(model):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.enable_grad():
            yield
