"""Attacks (FGSM, PGD; L-inf, L2; CE, margin) and the robust_eval plugin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_trainer
from torch import nn

from litplug.core.data import DigitsDataModule
from litplug.core.errors import PluginConfigError
from litplug.core.models import MLP
from litplug.core.module import LitplugModule
from litplug.plugins.attacks import (
    AttackConfigError,
    RobustEvaluation,
    evaluation_attack_context,
    fgsm,
    margin_loss,
    pgd,
    robust_accuracies,
)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP trained briefly on digits (inputs in [0, 1]) and 128 test digits."""
    torch.manual_seed(0)
    data = DigitsDataModule(form="flat")
    data.setup()
    x, y = data.datasets["train"].tensors
    model = MLP(input_dim=64, hidden_dims=[64])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    test_x, test_y = data.datasets["test"].tensors
    return model.eval(), test_x[:128], test_y[:128]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_pgd_increases_loss_and_respects_ball_and_range(trained, norm: str, loss: str) -> None:
    model, x, y = trained
    eps = 0.1 if norm == "linf" else 1.0
    torch.manual_seed(0)
    x_adv = pgd(model, x, y, eps, steps=10, norm=norm, loss=loss)
    assert _loss(model, x_adv, y) > _loss(model, x, y) + 0.1
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-5
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_pgd_stronger_than_fgsm_and_restarts_not_weaker(trained) -> None:
    model, x, y = trained

    def acc(x_adv: torch.Tensor) -> float:
        with torch.no_grad():
            return (model(x_adv).argmax(1) == y).float().mean().item()

    torch.manual_seed(0)
    clean = acc(x)
    fast = acc(fgsm(model, x, y, 0.1))
    torch.manual_seed(0)
    one = acc(pgd(model, x, y, 0.1, steps=10, loss="margin", restarts=1))
    torch.manual_seed(0)
    three = acc(pgd(model, x, y, 0.1, steps=10, loss="margin", restarts=3))
    assert fast < clean
    assert one <= fast
    assert three <= one  # the first restart is the same draw: restarts can only add successes


def test_margin_loss_is_cw_margin() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    targets = torch.tensor([0, 2])
    assert torch.allclose(margin_loss(logits, targets), torch.tensor([2.0 - 3.0, 5.0 - 1.0]))


def test_fgsm_is_one_signed_step() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.full((5, 4), 0.5)
    y = torch.tensor([0, 1, 2, 0, 1])
    x_adv = fgsm(model, x, y, 0.1)
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(model(xr), y, reduction="sum").backward()
    assert torch.allclose(x_adv, (x + 0.1 * xr.grad.sign()).clamp(0, 1))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"epsilon": 0.1, "steps": 0}, "steps"),
        ({"epsilon": 0.1, "step_size": 0.2}, "step_size"),
        ({"epsilon": 0.1, "norm": "l1"}, "norm"),
        ({"epsilon": 0.1, "loss": "hinge"}, "loss"),
        ({"epsilon": 0.1, "restarts": 0}, "restarts"),
    ],
)
def test_bad_attack_arguments(trained, kwargs: dict, argument: str) -> None:
    model, x, y = trained
    with pytest.raises(AttackConfigError, match=argument):
        pgd(model, x, y, **kwargs)


def test_large_step_needs_opt_in(trained) -> None:
    model, x, y = trained
    x_adv = pgd(model, x, y, 0.1, step_size=0.2, steps=2, allow_large_step=True)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


def test_evaluation_attack_leaves_training_state_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10)
    )
    model.train()
    model[1].eval()  # a mixed mode must come back exactly as it was
    x = torch.rand(16, 64)
    y = torch.randint(0, 10, (16,))
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    robust_accuracies(model, x, y, [0.1], ["fgsm", "pgd", "margin_pgd"], pgd_steps=3, margin_restarts=2)
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def test_attack_in_train_mode_would_change_bn_stats() -> None:
    """The check above can fail: a plain train-mode attack does move BatchNorm statistics."""
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)).train()
    before = model[1].running_mean.clone()
    pgd(model, torch.rand(16, 64), torch.randint(0, 10, (16,)), 0.1, steps=2)
    assert not torch.equal(before, model[1].running_mean)


def test_evaluation_attack_is_repeatable() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    x, y = torch.rand(10, 8), torch.randint(0, 3, (10,))
    with evaluation_attack_context(model, seed=5):
        a = pgd(model, x, y, 0.1, steps=2)
    with evaluation_attack_context(model, seed=5):
        b = pgd(model, x, y, 0.1, steps=2)
    assert torch.equal(a, b)


def test_attack_under_inference_mode_gives_clear_error() -> None:
    model = nn.Linear(8, 3)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        robust_accuracies(model, torch.rand(4, 8), torch.zeros(4, dtype=torch.long), [0.1], ["fgsm"])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"epsilons": [0.0]}, "epsilons"),
        ({"attacks": ["deepfool"]}, "attacks"),
        ({"pgd_steps": 0}, "pgd_steps"),
        ({"pgd_steps": 2, "step_size_factor": 2.5}, "step_size_factor"),
        ({"margin_restarts": 0}, "margin_restarts"),
        ({"stages": ["train"]}, "stages"),
    ],
)
def test_robust_eval_bad_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(PluginConfigError, match=argument):
        RobustEvaluation(**kwargs)


def _digits_module(plugin: RobustEvaluation) -> tuple[LitplugModule, DigitsDataModule]:
    torch.manual_seed(0)
    return LitplugModule(MLP(input_dim=64, hidden_dims=[32]), plugins=[plugin]), DigitsDataModule(
        batch_size=128, form="flat"
    )


def test_robust_eval_logs_metrics_and_handles_inference_mode() -> None:
    plugin = RobustEvaluation(epsilons=[0.1, 0.3], pgd_steps=3, margin_restarts=1, max_batches=1)
    module, data = _digits_module(plugin)
    trainer = quiet_trainer(max_epochs=3)  # inference_mode=True by default: forced off with a warning
    with pytest.warns(UserWarning, match="inference_mode"):
        trainer.fit(module, datamodule=data)
    metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    for attack in ("fgsm", "pgd", "margin_pgd"):
        for eps in ("0.1", "0.3"):
            assert f"test/robust_acc_{attack}_eps{eps}" in metrics
    assert metrics["test/robust_acc_pgd_eps0.3"] <= metrics["test/robust_acc_pgd_eps0.1"]
    assert metrics["test/robust_acc_pgd_eps0.1"] < metrics["test/acc"]


def test_robust_eval_refuses_inference_mode_when_not_forcing() -> None:
    plugin = RobustEvaluation(pgd_steps=3, force_no_inference_mode=False)
    module, data = _digits_module(plugin)
    with pytest.raises(PluginConfigError, match="inference_mode"):
        quiet_trainer(max_steps=1).fit(module, datamodule=data)
    module, data = _digits_module(RobustEvaluation(pgd_steps=3, force_no_inference_mode=False))
    quiet_trainer(max_steps=1, limit_val_batches=1, inference_mode=False).fit(module, datamodule=data)
