"""Madry et al.'s PGD adversarial training, pure torch: the inner maximisation of one training step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn

from litplug.plugins.attacks.functional import AttackLoss, Norm, frozen_batchnorm_stats, model_mode, pgd

__all__ = ["AttackMode", "adversarial_training_inputs"]

AttackMode = Literal["eval", "train"]


def adversarial_training_inputs(
    model: nn.Module,
    x: Tensor,
    targets: Tensor,
    epsilon: float,
    step_size: float,
    steps: int,
    norm: Norm = "linf",
    loss: AttackLoss = "ce",
    use_random_start: bool = True,
    clip: tuple[float, float] | None = (0.0, 1.0),
    attack_mode: AttackMode = "eval",
    allow_large_step: bool = False,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """PGD adversarial examples to train on, leaving the model's modes and BatchNorm stats as found.

    ``forward`` maps inputs to the class scores the attack ascends (default: ``model`` itself);
    the plugin passes the prediction as other plugins make it (``LitplugModule.class_scores``).
    ``model`` is the module whose modes and BatchNorm statistics the attack sets and restores.

    ``attack_mode="eval"`` attacks the model in eval mode (BatchNorm uses running statistics, no
    dropout): the common choice, and what the ADT paper does. ``"train"`` attacks in train mode
    (batch statistics, dropout masks from the training RNG) and restores the BatchNorm running
    statistics afterwards, so only the final training forward pass updates them. Random starts and
    dropout draw from the global RNG: that is training randomness, checkpointed by the core.
    """
    guard = frozen_batchnorm_stats(model) if attack_mode == "train" else contextlib.nullcontext()
    with model_mode(model, attack_mode == "train"), guard:
        return pgd(
            model if forward is None else forward,
            x.detach(),
            targets,
            epsilon,
            step_size,
            steps,
            norm,
            loss,
            use_random_start,
            1,
            clip,
            allow_large_step,
        )
