"""Adversarial distributional training: entropy estimate and sign, inner optimiser, generators, state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_trainer
from torch import nn

from litplug.core.data import DigitsDataModule
from litplug.core.errors import CheckpointError, PluginConfigError
from litplug.core.models import MLP, SmallCNN
from litplug.core.module import LitplugModule
from litplug.plugins.adt import (
    AdversarialDistributionalTraining,
    GeneratorNet,
    adt_exp_inputs,
    amortized_inputs,
    grad_reverse,
    signed_adam_step,
    tanh_gaussian_entropy,
)
from litplug.plugins.adt.functional import HALF_LOG_2PI, EncoderNet


class ConstantModel(nn.Module):
    """Logits that ignore the input: the CE term has zero gradient, only the entropy acts."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 10) + 0.0 * x.flatten(1).sum(1, keepdim=True)


def _histogram_entropy(samples: torch.Tensor, bins: int = 400) -> float:
    """Differential entropy of 1-D samples in (-1, 1) from a histogram (reference estimator)."""
    counts = torch.histc(samples, bins=bins, min=-1.0, max=1.0)
    probs = counts / counts.sum()
    width = 2.0 / bins
    nonzero = probs[probs > 0]
    return float(-(nonzero * (nonzero / width).log()).sum())


@pytest.mark.parametrize(("mu", "v"), [(0.0, 0.0), (1.0, -1.0), (-0.5, 1.5), (2.0, 0.5)])
def test_entropy_estimate_matches_histogram_entropy(mu: float, v: float) -> None:
    """With its constant 0.5 log(2 pi) added back, the estimate is the entropy of tanh(u)."""
    torch.manual_seed(0)
    noise = torch.randn(400_000)
    mu_t, v_t = torch.full_like(noise, mu), torch.full_like(noise, v)
    estimate = tanh_gaussian_entropy(mu_t, v_t, noise).item() + HALF_LOG_2PI
    samples = torch.tanh(mu_t + F.softplus(v_t) * noise)
    assert estimate == pytest.approx(_histogram_entropy(samples), abs=0.03)


def test_entropy_term_has_documented_sign() -> None:
    """The inner problem maximises CE + lambda * H: with no CE signal a concentrated start spreads out
    (H rises) for lambda > 0, and nothing moves for lambda = 0."""
    torch.manual_seed(0)
    x = torch.full((4, 16), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    mu0, v0 = torch.full_like(x, 2.0), torch.full_like(x, -2.0)
    noise = torch.randn(2000, *x.shape)
    before = tanh_gaussian_entropy(mu0, v0, noise).item()
    _, mu, v = adt_exp_inputs(
        ConstantModel(),
        x,
        y,
        0.1,
        steps=7,
        entropy_weight=0.01,
        mu_init=mu0,
        v_init=v0,
        return_parameters=True,
    )
    assert tanh_gaussian_entropy(mu, v, noise).item() > before + 1.0
    assert (mu < mu0).all()  # pulled away from tanh's saturated edge
    _, mu_zero, v_zero = adt_exp_inputs(
        ConstantModel(),
        x,
        y,
        0.1,
        steps=7,
        entropy_weight=0.0,
        mu_init=mu0,
        v_init=v0,
        return_parameters=True,
    )
    assert torch.allclose(mu_zero, mu0, atol=1e-4) and torch.allclose(v_zero, v0, atol=1e-4)


def test_signed_step_equals_adam_with_zero_betas() -> None:
    torch.manual_seed(0)
    param = torch.randn(20)
    grad = torch.randn(20)
    p = param.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([p], lr=0.3, betas=(0.0, 0.0))
    for _ in range(3):  # bias corrections stay 1 at every step
        p.grad = -grad  # Adam descends; ADT ascends
        optimizer.step()
    expected = param
    for _ in range(3):
        expected = signed_adam_step(expected, grad, 0.3)
    assert torch.allclose(p.detach(), expected, atol=1e-6)


def test_adt_exp_raises_loss_stays_in_ball_and_range() -> None:
    torch.manual_seed(0)
    model = MLP(input_dim=64, hidden_dims=[32]).eval()
    x = torch.rand(32, 64)
    y = torch.randint(0, 10, (32,))
    torch.manual_seed(1)
    x_adv = adt_exp_inputs(model, x, y, 0.1)
    torch.manual_seed(1)
    x_noise = (x + 0.1 * torch.tanh(F.softplus(torch.zeros(())) * torch.randn_like(x))).clamp(0, 1)
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x_noise), y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())


def test_grad_reverse_negates_gradient() -> None:
    x = torch.randn(5, requires_grad=True)
    (grad_reverse(x) * 3).sum().backward()
    assert torch.allclose(x.grad, torch.full((5,), -3.0))


@pytest.mark.parametrize("variant", ["exp_am", "imp_am"])
@pytest.mark.parametrize("shape", [(64,), (1, 8, 8)])
def test_amortized_generator_ascends_classifier_loss(variant: str, shape: tuple[int, ...]) -> None:
    """One backward of the classifier's loss gives the generator the gradient that raises it."""
    torch.manual_seed(0)
    model = MLP(input_dim=64, hidden_dims=[32]) if len(shape) == 1 else SmallCNN(width=4)
    generator = GeneratorNet(
        shape, 2 if variant == "exp_am" else 1, 8 if variant == "imp_am" else 0, width=16
    )
    encoder = EncoderNet(shape, 8, width=16) if variant == "imp_am" else None
    x = torch.rand(16, *shape)
    y = torch.randint(0, 10, (16,))
    torch.manual_seed(1)
    x_adv, regulariser = amortized_inputs(model.eval(), generator, x, y, 0.1, variant, 0.01, encoder)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    loss = F.cross_entropy(model(x_adv), y)
    loss.backward()
    # A small step along the generator's .grad (descent for its optimiser) must raise the loss.
    with torch.no_grad():
        for p in generator.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad / (p.grad.norm() + 1e-12)
    torch.manual_seed(1)
    x_adv2, _ = amortized_inputs(model, generator, x, y, 0.1, variant, 0.01, encoder)
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv2), y) > loss
    assert regulariser.dim() == 0


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"steps": 0}, "steps"),
        ({"samples": 0}, "samples"),
        ({"entropy_weight": -0.01}, "entropy_weight"),
        ({"lr": 0.0}, "lr"),
        ({"variant": "gan"}, "variant"),
        ({"generator_beta1": 1.0}, "generator_beta1"),
    ],
)
def test_bad_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(PluginConfigError, match=argument):
        AdversarialDistributionalTraining(**kwargs)


def test_paper_defaults() -> None:
    plugin = AdversarialDistributionalTraining()
    assert (plugin.steps, plugin.lr, plugin.samples, plugin.resolved_entropy_weight) == (7, 0.3, 5, 0.01)
    assert AdversarialDistributionalTraining(variant="imp_am").resolved_entropy_weight == 1.0
    assert (plugin.generator_lr, plugin.generator_beta1, plugin.noise_dim) == (2e-4, 0.5, 64)


def _fit(plugin: AdversarialDistributionalTraining, steps: int) -> LitplugModule:
    torch.manual_seed(0)
    module = LitplugModule(MLP(input_dim=64, hidden_dims=[32]), plugins=[plugin])
    quiet_trainer(max_steps=steps, limit_val_batches=0).fit(
        module, datamodule=DigitsDataModule(batch_size=64)
    )
    return module


@pytest.mark.parametrize("variant", ["exp_am", "imp_am"])
def test_generator_state_round_trip_and_training(variant: str) -> None:
    plugin = AdversarialDistributionalTraining(variant=variant, noise_dim=8, generator_width=16)
    _fit(plugin, 2)
    assert plugin.generator is not None
    first = {k: v.clone() for k, v in plugin.generator.state_dict().items()}
    first_steps = float(plugin.state_dict()["optimizer"]["state"][0]["step"])
    assert first_steps == 2.0, "the generator optimiser must step once per training step"
    _fit(plugin, 2)  # the generator keeps training
    assert any(not torch.equal(first[k], v) for k, v in plugin.generator.state_dict().items())
    fresh = AdversarialDistributionalTraining(variant=variant, noise_dim=8, generator_width=16)
    fresh.load_state_dict(plugin.state_dict())
    fresh._ensure_networks(LitplugModule(nn.Linear(64, 10)), torch.zeros(1, 64))
    for key, value in plugin.generator.state_dict().items():
        assert torch.equal(fresh.generator.state_dict()[key], value)
    assert float(fresh.state_dict()["optimizer"]["state"][0]["step"]) == 2 * first_steps


def test_log_q_penalty_is_zero_below_threshold() -> None:
    from litplug.plugins.adt import implicit_entropy_penalty

    encoder = EncoderNet((4,), 2, width=8)
    noise = torch.zeros(3, 2)
    with torch.no_grad():
        for p in encoder.parameters():
            p.zero_()
        encoder.net[-1].bias.copy_(torch.tensor([0.0, 0.0, -3.0, -3.0]))  # mean 0, std e^-3
    value = implicit_entropy_penalty(encoder, torch.zeros(3, 4), torch.zeros(3, 4), noise, 1.0, 0.9)
    assert value.item() == 0.0  # -log q = -3 + 0.92 < 0.9
    wide = implicit_entropy_penalty(encoder, torch.zeros(3, 4), torch.zeros(3, 4), noise + 1.0, 1.0, 0.9)
    assert wide.item() == pytest.approx(0.5 * math.exp(6) - 3 + HALF_LOG_2PI - 0.9, rel=1e-4)


@pytest.mark.parametrize(
    "plugin",
    [
        AdversarialDistributionalTraining(variant="exp", epsilon=0.2, steps=3, samples=2),
        AdversarialDistributionalTraining(
            variant="exp_am", epsilon=0.2, generator_width=32, generator_lr=1e-3
        ),
        # ~120 steps: with the paper's generator lr 2e-4 imp_am measured 0.015, no better than
        # standard training (the generator barely moves); with 2e-3 it measured 0.074 vs 0.015.
        AdversarialDistributionalTraining(
            variant="imp_am", epsilon=0.2, generator_width=32, generator_lr=2e-3
        ),
    ],
    ids=["exp", "exp_am", "imp_am"],
)
def test_adt_beats_standard_training_on_pgd_accuracy(plugin: AdversarialDistributionalTraining) -> None:
    from test_pgd_at import train_and_attack

    standard_clean, standard_robust = train_and_attack([])
    adt_clean, adt_robust = train_and_attack([plugin])
    assert adt_clean > 0.6
    # The amortised variants are weaker after 6 epochs (exp_am measured 0.074, imp_am 0.074 vs 0.015
    # for standard training at eps 0.2).
    margin = 0.1 if plugin.variant == "exp" else 0.04
    assert adt_robust > standard_robust + margin, (standard_robust, adt_robust)


@pytest.mark.parametrize("shape", [(64,), (1, 8, 8)])
def test_generator_batchnorm_uses_batch_statistics_in_every_mode(shape: tuple[int, ...]) -> None:
    """The generator runs only inside training steps: its BN keeps no running statistics, so eval
    mode cannot switch it to stale (never updated) statistics."""
    torch.manual_seed(0)
    generator = GeneratorNet(shape, 1, 8, width=16)
    assert not any(name.endswith(("running_mean", "running_var")) for name, _ in generator.named_buffers())
    x, g1, g2 = torch.rand(8, *shape), torch.randn(8, *shape), torch.randn(8, *shape)
    noise = torch.rand(8, 8) * 2 - 1
    (train_out,) = generator.train()(x, g1, g2, noise)
    (eval_out,) = generator.eval()(x, g1, g2, noise)
    assert torch.equal(train_out, eval_out)


def test_state_version_1_checkpoint_loads_without_generator_running_stats() -> None:
    plugin = AdversarialDistributionalTraining(variant="imp_am", noise_dim=8, generator_width=16)
    plugin._ensure_networks(LitplugModule(nn.Linear(64, 10)), torch.zeros(1, 64))
    state = plugin.state_dict()
    old = dict(state, generator=dict(state["generator"]))
    old["generator"]["stem.1.running_mean"] = torch.zeros(16)
    old["generator"]["stem.1.running_var"] = torch.ones(16)
    old["generator"]["stem.1.num_batches_tracked"] = torch.tensor(3)
    fresh = AdversarialDistributionalTraining(variant="imp_am", noise_dim=8, generator_width=16)
    assert fresh.state_version == 2
    fresh.load_state_dict(fresh.upgrade_state(old, 1))
    fresh._ensure_networks(LitplugModule(nn.Linear(64, 10)), torch.zeros(1, 64))
    for key, value in plugin.generator.state_dict().items():
        assert torch.equal(fresh.generator.state_dict()[key], value)
    with pytest.raises(CheckpointError, match="upgrade_state does not handle version 0"):
        fresh.upgrade_state(old, 0)


def test_generator_optimizer_is_adam_with_the_papers_betas() -> None:
    """The fused generator Adam takes the same steps as torch's reference Adam (betas (b1, 0.999))."""
    from litplug.plugins.adt.functional import generator_adam

    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    fast = generator_adam(a, 2e-4, 0.5)
    reference = torch.optim.Adam(b, lr=2e-4, betas=(0.5, 0.999), foreach=False)
    assert fast.param_groups[0]["betas"] == (0.5, 0.999)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        fast.step()
        reference.step()
    for p, q in zip(a, b, strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_feature_gradients_equal_attack_input_gradient() -> None:
    """The amortised variants' own CE input gradient is the attacks' ``input_gradient``."""
    from litplug.plugins.adt.functional import generator_features
    from litplug.plugins.attacks.functional import input_gradient

    torch.manual_seed(0)
    model = MLP(input_dim=64, hidden_dims=[32]).eval()
    x, y = torch.rand(16, 64), torch.randint(0, 10, (16,))
    g1, g2 = generator_features(model, x, y, 0.1, (0.0, 1.0))
    reference, _ = input_gradient(model, x, y, "ce")
    reference_fgsm, _ = input_gradient(model, (x + 0.1 * reference.sign()).clamp(0, 1), y, "ce")
    standardise = lambda g: g / g.std(dim=1, keepdim=True)  # noqa: E731
    assert torch.allclose(g1, standardise(reference), atol=1e-5)
    assert torch.allclose(g2, standardise(reference_fgsm), atol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_grad_reverse_with_scale_scales_forward_and_negates_scaled_gradient() -> None:
    x = torch.randn(5, requires_grad=True)
    y = grad_reverse(x, 0.1)
    assert torch.equal(y, x * 0.1)
    (y * 3).sum().backward()
    assert torch.allclose(x.grad, torch.full((5,), -0.3))


@pytest.mark.parametrize("shape", [(64,), (1, 8, 8)])
def test_functional_layer_calls_equal_module_calls(shape: tuple[int, ...]) -> None:
    """The generator and encoder call their layers functionally (cheaper per step); the values are
    exactly those of calling the modules."""
    torch.manual_seed(0)
    generator = GeneratorNet(shape, 1, 8, width=16)
    encoder = EncoderNet(shape, 8, width=16)
    x, g1, g2 = torch.rand(8, *shape), torch.randn(8, *shape), torch.randn(8, *shape)
    noise = torch.rand(8, 8) * 2 - 1
    (out,) = generator(x, g1, g2, noise)
    if len(shape) == 3:
        h = torch.cat([x, g1, g2, generator.noise_map(noise).view(8, *shape)], dim=1)
    else:
        h = torch.cat([x.flatten(1), g1.flatten(1), g2.flatten(1), noise], dim=1)
    h = generator.stem(h)
    for block in generator.blocks:
        h = F.relu(h + block.body(h))
    assert torch.equal(out, generator.head(h).view_as(out))
    mean, log_std = encoder(out.tanh(), x)
    ref_mean, ref_log_std = encoder.net(torch.cat([out.tanh().flatten(1), x.flatten(1)], 1)).chunk(2, 1)
    assert torch.equal(mean, ref_mean) and torch.equal(log_std, ref_log_std.clamp(-6.0, 2.0))


def test_adt_exp_per_sample_forward_gives_the_batched_result() -> None:
    """Evaluating the 5B noise draws as 5 forwards of B (faster for convs on CPU) changes nothing."""
    torch.manual_seed(0)
    model = SmallCNN(width=4).eval()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    results = []
    for per_sample in (False, True):
        torch.manual_seed(1)
        results.append(
            adt_exp_inputs(model, x, y, 0.1, steps=3, return_parameters=True, per_sample_forward=per_sample)
        )
    for batched, looped in zip(*results, strict=True):
        assert torch.allclose(batched, looped, atol=1e-6)


def test_sample_batching_auto_choice_and_validation() -> None:
    plugin = AdversarialDistributionalTraining()
    assert plugin.per_sample_forward(torch.zeros(2, 1, 8, 8))
    assert not plugin.per_sample_forward(torch.zeros(2, 64))
    assert not AdversarialDistributionalTraining(attack_mode="train").per_sample_forward(
        torch.zeros(2, 1, 8, 8)
    )
    assert AdversarialDistributionalTraining(sample_batching="per_sample").per_sample_forward(
        torch.zeros(2, 64)
    )
    assert not AdversarialDistributionalTraining(sample_batching="batched").per_sample_forward(
        torch.zeros(2, 1, 8, 8)
    )
    with pytest.raises(PluginConfigError, match="sample_batching"):
        AdversarialDistributionalTraining(sample_batching="sometimes")
