"""Adversarial distributional training (Dong et al., NeurIPS 2020), pure torch.

ADT replaces PGD's single worst-case perturbation by a worst-case *distribution* of perturbations:

    min_theta  E_(x,y) [ max_p  E_{delta ~ p} CE(f_theta(x + delta), y) + lambda * H(p) ]

with an entropy bonus H(p) that keeps p spread out. Three parameterisations of p:

- ADT_EXP (:func:`adt_exp_inputs`): per example and coordinate ``delta = eps * tanh(mu + softplus(v) * n)``,
  ``n ~ N(0, I)``, (mu, v) found per batch by a few signed (Adam with betas (0, 0)) ascent steps
  on a Monte Carlo estimate of the objective.
- ADT_EXP-AM (:func:`amortized_inputs` with ``variant="exp_am"``): a generator network maps
  ``[x, grad at x, grad at an FGSM point]`` to (mu, v); trained jointly with the classifier
  through a gradient reversal (one backward: classifier down, generator up).
- ADT_IMP-AM (``variant="imp_am"``): the generator also takes noise ``z ~ U(-1, 1)^k`` and outputs
  the perturbation directly; its entropy is kept up by an encoder ``q(z | delta, x)``: the penalty
  ``lambda * relu(-E log q(z | delta, x) - threshold)`` punishes a generator whose output no longer
  tells which noise made it (a collapsed, low-entropy distribution).

Sign convention (tested): :func:`tanh_gaussian_entropy` estimates the entropy ``H = E[-log p(delta)]``
(up to the constant ``0.5 log(2 pi) + log eps`` per coordinate); the inner problem *maximises*
``CE + lambda * H``, so a larger ``lambda`` gives a wider distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AmortizedVariant",
    "EncoderNet",
    "GeneratorNet",
    "adt_exp_inputs",
    "amortized_inputs",
    "generator_adam",
    "grad_reverse",
    "implicit_entropy_penalty",
    "signed_adam_step",
    "tanh_gaussian_entropy",
    "tanh_gaussian_sample",
]

AmortizedVariant = Literal["exp_am", "imp_am"]
Clip = tuple[float, float] | None
#: Inputs -> class scores ``[B, K]``: a classifier, or the prediction of a configured LitplugModule.
Scores = Callable[[Tensor], Tensor]
_LOG_EPS = 1e-8
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _clip(x: Tensor, clip: Clip) -> Tensor:
    return x if clip is None else x.clamp(clip[0], clip[1])


# -- the explicit (tanh-Gaussian) distribution -------------------------------------------------------


def tanh_gaussian_sample(mu: Tensor, v: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """``(tanh(u), -log p)`` per coordinate for ``u = mu + softplus(v) * noise``.

    ``-log p(tanh u) = n^2 / 2 + log sigma + log(1 - tanh(u)^2)`` + const (change of variables);
    the constant ``0.5 log(2 pi)`` (and ``log eps`` once scaled by eps) is left out.
    """
    sigma = F.softplus(v)
    unit = torch.tanh(mu + sigma * noise)
    negative_log_p = noise.pow(2) / 2 + (sigma + _LOG_EPS).log() + (1 - unit.pow(2) + _LOG_EPS).log()
    return unit, negative_log_p


def tanh_gaussian_entropy(mu: Tensor, v: Tensor, noise: Tensor) -> Tensor:
    """Monte Carlo entropy estimate, averaged over every coordinate (and the samples in ``noise``'s
    leading dimensions): the mean of ``-log p`` from :func:`tanh_gaussian_sample`."""
    return tanh_gaussian_sample(mu, v, noise)[1].mean()


def signed_adam_step(param: Tensor, grad: Tensor, lr: float, eps: float = 1e-8) -> Tensor:
    """One *ascent* step of Adam with ``betas=(0, 0)``: ``param + lr * g / (|g| + eps)``.

    With both betas 0 Adam's moments are the current gradient and its square and both bias
    corrections are 1, so the step is exactly this (a signed step, as in the paper's code).
    """
    return param + lr * grad / (grad.abs() + eps)


def adt_exp_inputs(
    model: Scores,
    x: Tensor,
    targets: Tensor,
    epsilon: float,
    steps: int = 7,
    lr: float = 0.3,
    samples: int = 5,
    entropy_weight: float = 0.01,
    clip: Clip = (0.0, 1.0),
    mu_init: Tensor | None = None,
    v_init: Tensor | None = None,
    return_parameters: bool = False,
    per_sample_forward: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """ADT_EXP: fit (mu, v) per example by ``steps`` signed ascent steps, then draw one sample.

    Each step draws ``samples`` noises per example, evaluates the model once on all of them
    (a batch of ``samples * B``) and ascends ``sum CE + lambda * samples * mean(-log p)`` (the
    paper code's scaling: CE summed over examples, entropy averaged over coordinates, per sample).
    ``per_sample_forward`` evaluates the ``samples * B`` batch as ``samples`` forwards of ``B``
    (one backward either way): on CPU a SmallCNN pass over 5B images measured ~1.6x five passes over B,
    while an MLP measured the opposite (5B: 0.4x); the plugin picks per input type.
    Returns the detached training inputs ``clip(x + eps * tanh(mu + sigma * n))`` (and, with
    ``return_parameters``, the final mu and v). The caller picks the model's mode; parameter
    ``.grad`` fields are untouched (gradients are taken with respect to mu and v only).
    """
    x = x.detach()
    mu = torch.zeros_like(x) if mu_init is None else mu_init.detach().clone()
    v = torch.zeros_like(x) if v_init is None else v_init.detach().clone()
    tiled_x = x.unsqueeze(0).expand(samples, *x.shape)
    tiled_targets = targets.repeat(samples)
    for _ in range(steps):
        with torch.enable_grad():
            mu.requires_grad_(True)
            v.requires_grad_(True)
            noise = torch.randn_like(tiled_x)
            unit, negative_log_p = tanh_gaussian_sample(mu, v, noise)
            x_adv = _clip(tiled_x + epsilon * unit, clip)
            batched = x_adv.reshape(samples * x.shape[0], *x.shape[1:])
            if per_sample_forward:  # same values, `samples` forwards of B (see the docstring)
                logits = torch.cat([model(chunk) for chunk in batched.chunk(samples)])
            else:
                logits = model(batched)
            objective = F.cross_entropy(logits, tiled_targets, reduction="sum")
            objective = objective + entropy_weight * samples * negative_log_p.mean()
            grad_mu, grad_v = torch.autograd.grad(objective, (mu, v))
        mu = signed_adam_step(mu.detach(), grad_mu, lr)
        v = signed_adam_step(v.detach(), grad_v, lr)
    unit, _ = tanh_gaussian_sample(mu, v, torch.randn_like(x))
    x_adv = _clip(x + epsilon * unit, clip).detach()
    if return_parameters:
        return x_adv, mu, v
    return x_adv


# -- amortised generators ----------------------------------------------------------------------------


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x) if scale == 1.0 else x * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * -ctx.scale, None


def grad_reverse(x: Tensor, scale: float = 1.0) -> Tensor:
    """``scale * x`` forward, ``-scale * grad`` backward: what descends the classifier ascends the
    generator. Folding the scale (epsilon) in saves a separate multiply node in every step."""
    return _GradReverse.apply(x, scale)


def _batch_norm(kind: type[nn.BatchNorm1d] | type[nn.BatchNorm2d], features: int) -> nn.Module:
    """The generator's BatchNorm: batch statistics in every mode, no running statistics.

    The generator only ever runs inside a training step, in train mode (as in the paper's code), so
    running statistics would be dead state; without them BN cannot silently switch to stale
    statistics if someone puts the generator in eval mode, and each step skips their update.
    """
    return kind(features, track_running_stats=False)


def _apply_layers(layers: Iterable[nn.Module], h: Tensor) -> Tensor:
    """``layers(h)`` with the generator's own layer types called functionally.

    The generator and encoder run once per training step on small tensors, where nn.Module call
    dispatch (~20 calls per step) is a measurable share of the time; the functional calls compute
    exactly the same values (tested bit-identical). Module forward hooks on these layers do not fire.
    """
    for layer in layers:
        if isinstance(layer, nn.Linear):
            h = F.linear(h, layer.weight, layer.bias)
        elif isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros":
            h = F.conv2d(
                h, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
            )
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm) and not layer.track_running_stats:
            h = F.batch_norm(h, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
        elif isinstance(layer, nn.ReLU):
            h = F.relu(h)
        else:
            h = layer(h)
    return h


class _ResidualMLPBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(width, width),
            _batch_norm(nn.BatchNorm1d, width),
            nn.ReLU(),
            nn.Linear(width, width),
            _batch_norm(nn.BatchNorm1d, width),
        )

    def forward(self, h: Tensor) -> Tensor:
        return F.relu(h + _apply_layers(self.body, h))


class _ResidualConvBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            _batch_norm(nn.BatchNorm2d, channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            _batch_norm(nn.BatchNorm2d, channels),
        )

    def forward(self, h: Tensor) -> Tensor:
        return F.relu(h + _apply_layers(self.body, h))


class GeneratorNet(nn.Module):
    """A small residual network with BatchNorm mapping ``[x, g1, g2]`` (and noise) to per-coordinate
    outputs: ``out_per_input`` maps of the input's shape (2 for (mu, v), 1 for a perturbation).

    Images ``[C, H, W]`` get a conv ResNet (noise enters as ``C`` extra channels through a linear
    map); anything else is flattened and gets a residual MLP.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        out_per_input: int,
        noise_dim: int = 0,
        width: int = 128,
        blocks: int = 2,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.out_per_input = out_per_input
        self.noise_dim = noise_dim
        self.is_image = len(self.input_shape) == 3
        numel = math.prod(self.input_shape)
        if self.is_image:
            channels = self.input_shape[0]
            self.noise_map = nn.Linear(noise_dim, numel) if noise_dim else None
            in_channels = channels * (3 + (1 if noise_dim else 0))
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                _batch_norm(nn.BatchNorm2d, width),
                nn.ReLU(),
            )
            self.blocks = nn.Sequential(*[_ResidualConvBlock(width) for _ in range(blocks)])
            self.head: nn.Conv2d | nn.Linear = nn.Conv2d(width, channels * out_per_input, 3, padding=1)
        else:
            self.noise_map = None
            self.stem = nn.Sequential(
                nn.Linear(3 * numel + noise_dim, width), _batch_norm(nn.BatchNorm1d, width), nn.ReLU()
            )
            self.blocks = nn.Sequential(*[_ResidualMLPBlock(width) for _ in range(blocks)])
            self.head = nn.Linear(width, numel * out_per_input)
        # Start near zero output (mu = v = 0 as ADT_EXP does; a small implicit perturbation).
        assert self.head.bias is not None
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(0.1)

    def _trunk(self, h: Tensor) -> Tensor:
        """``head(blocks(stem(h)))`` (called functionally, see :func:`_apply_layers`)."""
        h = _apply_layers(self.stem, h)
        for block in self.blocks:
            h = F.relu(h + _apply_layers(cast(nn.Sequential, block.body), h))
        return _apply_layers((self.head,), h)

    def forward(self, x: Tensor, g1: Tensor, g2: Tensor, noise: Tensor | None = None) -> tuple[Tensor, ...]:
        batch = x.shape[0]
        if self.is_image:
            parts = [x, g1, g2]
            if self.noise_map is not None and noise is not None:
                parts.append(self.noise_map(noise).view(batch, *self.input_shape))
            out = self._trunk(torch.cat(parts, dim=1))
            return out.chunk(self.out_per_input, dim=1)
        parts = [x.flatten(1), g1.flatten(1), g2.flatten(1)]
        if self.noise_dim and noise is not None:
            parts.append(noise)
        out = self._trunk(torch.cat(parts, dim=1))
        if self.out_per_input == 1:
            return (out.view(batch, *self.input_shape),)
        return tuple(
            chunk.reshape(batch, *self.input_shape) for chunk in out.chunk(self.out_per_input, dim=1)
        )


class EncoderNet(nn.Module):
    """``q(z | delta, x)``: a diagonal Gaussian over the generator's noise (ADT_IMP-AM's entropy)."""

    def __init__(self, input_shape: tuple[int, ...], noise_dim: int, width: int = 128) -> None:
        super().__init__()
        numel = math.prod(input_shape)
        self.net = nn.Sequential(
            nn.Linear(2 * numel, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 2 * noise_dim),
        )

    def forward(self, unit_delta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.cat([unit_delta.flatten(1), x.flatten(1)], dim=1)
        mean, log_std = _apply_layers(self.net, h).chunk(2, dim=1)
        return mean, log_std.clamp(-6.0, 2.0)


def generator_adam(params: list[nn.Parameter], lr: float, beta1: float) -> torch.optim.Adam:
    """The generator's (and encoder's) Adam, betas ``(beta1, 0.999)``, fused where torch has a fused
    kernel for the parameters' device (CPU, CUDA): the generator and encoder have ~30 small tensors,
    and the per-tensor Adam loop cost ~10% of an ADT_IMP-AM step on the digits MLP."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=(beta1, 0.999), fused=True)
    except RuntimeError:  # no fused kernel for this device or dtype
        return torch.optim.Adam(params, lr=lr, betas=(beta1, 0.999))


def implicit_entropy_penalty(
    encoder: EncoderNet, unit_delta: Tensor, x: Tensor, noise: Tensor, weight: float, threshold: float = 0.9
) -> Tensor:
    """``weight * relu(-E log q(z | delta, x) - threshold)``, ``-log q`` averaged over noise dims."""
    mean, log_std = encoder(unit_delta, x)
    # -log q = 0.5 ((z - m) / s)^2 + log s + 0.5 log(2 pi); the constant is added after the mean
    # (one op on a scalar, not one per coordinate).
    negative_log_q = ((noise - mean) * torch.exp(-log_std)).square().mul(0.5).add(log_std).mean()
    return weight * F.relu(negative_log_q + (HALF_LOG_2PI - threshold))


def _normalised(grad: Tensor) -> Tensor:
    """Per-example standardised gradient: raw input gradients span orders of magnitude."""
    flat = grad.flatten(1)
    scale = flat.std(dim=1, keepdim=True).clamp_min(1e-12)
    return (flat / scale).view_as(grad)


def _ce_input_gradient(model: Scores, x: Tensor, targets: Tensor) -> Tensor:
    """Gradient of the summed cross-entropy with respect to ``x`` (what
    :func:`~litplug.plugins.attacks.functional.input_gradient` gives for ``"ce"``, with the fused
    ``reduction="sum"`` and without returning logits: this runs twice in every amortised step)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x), targets, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def generator_features(
    model: Scores, x: Tensor, targets: Tensor, epsilon: float, clip: Clip
) -> tuple[Tensor, Tensor]:
    """The generator's gradient inputs: CE gradient at ``x`` and at the FGSM point (2 passes)."""
    grad_clean = _ce_input_gradient(model, x, targets)
    x_fgsm = _clip(x + epsilon * grad_clean.sign(), clip)
    grad_fgsm = _ce_input_gradient(model, x_fgsm, targets)
    return _normalised(grad_clean), _normalised(grad_fgsm)


def amortized_inputs(
    model: Scores,
    generator: GeneratorNet,
    x: Tensor,
    targets: Tensor,
    epsilon: float,
    variant: AmortizedVariant,
    entropy_weight: float,
    encoder: EncoderNet | None = None,
    entropy_threshold: float = 0.9,
    clip: Clip = (0.0, 1.0),
) -> tuple[Tensor, Tensor]:
    """ADT_EXP-AM / ADT_IMP-AM: ``(training inputs, generator regulariser)``.

    The training inputs carry the generator's graph through :func:`grad_reverse`, so the ordinary
    backward of the classifier's loss also gives the generator the gradient that *ascends* that loss.
    The regulariser is to be *minimised* by the generator (and encoder): ``-lambda * H`` for
    ``exp_am`` (so H is maximised), the encoder penalty for ``imp_am``; it does not depend on the
    classifier's parameters. Gradient features are computed with the model in whatever mode the
    caller set; the generator runs in its own (training) mode.
    """
    x = x.detach()
    g1, g2 = generator_features(model, x, targets, epsilon, clip)
    if variant == "exp_am":
        mu, v = generator(x, g1, g2)
        unit, negative_log_p = tanh_gaussian_sample(mu, v, torch.randn_like(x))
        regulariser = -entropy_weight * negative_log_p.mean()
    elif variant == "imp_am":
        if encoder is None:
            raise ValueError("variant 'imp_am' needs an encoder")
        # uniform_(-1, 1) draws the same numbers as rand() * 2 - 1, in one op instead of three.
        noise = torch.empty(x.shape[0], generator.noise_dim, device=x.device, dtype=x.dtype).uniform_(-1, 1)
        (raw,) = generator(x, g1, g2, noise)
        unit = torch.tanh(raw)
        regulariser = implicit_entropy_penalty(encoder, unit, x, noise, entropy_weight, entropy_threshold)
    else:
        raise ValueError(f"variant must be 'exp_am' or 'imp_am', got {variant!r}")
    x_adv = _clip(x + grad_reverse(unit, epsilon), clip)
    return x_adv, regulariser
