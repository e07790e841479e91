"""PGD adversarial training: the batch transform, training-state hygiene, errors, and its effect."""

from __future__ import annotations

import pytest
import torch
from helpers import quiet_trainer
from torch import nn

from litplug.core.data import DigitsDataModule
from litplug.core.errors import PluginConfigError
from litplug.core.models import MLP
from litplug.core.module import LitplugModule
from litplug.core.plugin import Plugin
from litplug.plugins.attacks import robust_accuracies
from litplug.plugins.pgd_at import PGDAdversarialTraining


def _bn_module(plugin: PGDAdversarialTraining) -> LitplugModule:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10)
    )
    return LitplugModule(model, plugins=[plugin])


@pytest.mark.parametrize("attack_mode", ["eval", "train"])
def test_transform_attacks_training_batches_only_and_keeps_state(attack_mode: str) -> None:
    plugin = PGDAdversarialTraining(epsilon=0.1, steps=3, attack_mode=attack_mode)
    module = _bn_module(plugin)
    module.train()
    x = torch.rand(16, 64)
    y = torch.randint(0, 10, (16,))
    buffers = {k: v.clone() for k, v in module.model.state_dict().items()}
    x_adv, y_adv = module.hooks.transform_batch(module=module, batch=(x, y), stage="train")
    assert y_adv is y
    assert 0 < (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad
    assert all(m.training for m in module.model.modules())
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    assert all(p.grad is None for p in module.model.parameters())
    for stage in ("val", "test", "predict"):
        batch = (x, y)
        assert module.hooks.transform_batch(module=module, batch=batch, stage=stage) is batch


def test_adversarial_batch_has_higher_loss() -> None:
    plugin = PGDAdversarialTraining(epsilon=0.2, steps=5)
    module = _bn_module(plugin)
    data = DigitsDataModule(form="flat")
    data.setup()
    x, y = data.datasets["train"].tensors[0][:128], data.datasets["train"].tensors[1][:128]
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(30):  # a model worth attacking
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()
    module.eval()
    x_adv, _ = module.hooks.transform_batch(module=module, batch=(x, y), stage="train")
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy
        assert loss(module(x_adv), y) > loss(module(x), y) + 0.5


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"steps": 0}, "steps"),
        ({"epsilon": 0.1, "step_size": 0.2}, "step_size"),
        ({"norm": "l1"}, "norm"),
        ({"loss": "hinge"}, "loss"),
        ({"attack_mode": "test"}, "attack_mode"),
        ({"clip_min": None}, "clip_min"),
    ],
)
def test_bad_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(PluginConfigError, match=f"'pgd_at': argument '{argument}'"):
        PGDAdversarialTraining(**kwargs)


def test_large_step_with_opt_in_and_default_step() -> None:
    assert PGDAdversarialTraining(epsilon=0.1, step_size=0.2, allow_large_step=True).resolved_step_size == 0.2
    assert PGDAdversarialTraining(epsilon=0.2).resolved_step_size == pytest.approx(0.05)


def train_and_attack(plugins: list[Plugin], epsilon: float = 0.2, epochs: int = 6) -> tuple[float, float]:
    """(clean accuracy, PGD-20 accuracy at ``epsilon``) on the digits test split after a short run."""
    torch.manual_seed(0)
    module = LitplugModule(
        MLP(input_dim=64, hidden_dims=[128]),
        plugins=plugins,
        optimizer=lambda p: torch.optim.Adam(p, lr=3e-3),
    )
    data = DigitsDataModule(batch_size=64, form="flat")
    quiet_trainer(max_epochs=epochs, limit_val_batches=0).fit(module, datamodule=data)
    x, y = data.datasets["test"].tensors
    model = module.model.eval()
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    robust = robust_accuracies(model, x, y, [epsilon], ["pgd"], seed=0)[f"robust_acc_pgd_eps{epsilon:g}"]
    return clean, robust.item()


def test_pgd_at_beats_standard_training_on_pgd_accuracy() -> None:
    standard_clean, standard_robust = train_and_attack([])
    at_clean, at_robust = train_and_attack([PGDAdversarialTraining(epsilon=0.2, steps=3)])
    assert standard_clean > 0.85 and at_clean > 0.6
    assert at_robust > standard_robust + 0.15, (standard_robust, at_robust)
