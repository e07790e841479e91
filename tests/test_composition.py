"""Plugins combined: every pair runs together or is rejected before training, and the attacks see
the prediction the other plugins make (an ensemble's average, MIMO's members), not one head.

Parametrised over the registry, so a new plugin is paired with every other the day it is added.
"""

from __future__ import annotations

import itertools
import math

import lightning as L
import pytest
import torch
from helpers import assert_same_state, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from litplug.core.data import DigitsDataModule
from litplug.core.discovery import available_plugins
from litplug.core.errors import PluginSetupError
from litplug.core.models import MLP
from litplug.core.module import LitplugModule
from litplug.core.plugin import Plugin
from litplug.plugins.attacks import RobustEvaluation
from litplug.plugins.ensemble import DeepEnsemble, ensemble_log_probs
from litplug.plugins.mimo import MIMO, repeat_inputs
from litplug.plugins.mimo import ensemble_log_probs as mimo_log_probs
from litplug.plugins.pgd_at import PGDAdversarialTraining
from litplug.plugins.replay import Replay

# Plugins that run on the reference MLP with BatchNorm over flat digits (Admin needs a transformer,
# binary gates an LSTM: their own tests and the registry-wide resume/DDP tests cover them).
ON_MLP = sorted(
    (info.cls for info in available_plugins().values() if set(info.cls.example().requires) <= {"batchnorm"}),
    key=lambda cls: cls.name,
)
PAIRS = [pytest.param(a, b, id=f"{a.name}+{b.name}") for a, b in itertools.combinations(ON_MLP, 2)]


def _module(*plugins: Plugin) -> LitplugModule:
    model = MLP(input_dim=64, hidden_dims=[32], batch_norm=True, dropout=0.1)
    return LitplugModule(model, plugins=list(plugins), optimizer=lambda p: torch.optim.SGD(p, lr=0.05))


def _declared_conflict(a: type[Plugin], b: type[Plugin]) -> bool:
    return b.name in a.example().conflicts_with or a.name in b.example().conflicts_with


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_every_pair_trains_and_tests_or_is_rejected_before_training(first, second) -> None:
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=64, form="flat")
    trainer = quiet_trainer(max_steps=4, val_check_interval=2, limit_val_batches=1, limit_test_batches=1)
    if _declared_conflict(first, second):
        with pytest.raises(
            PluginSetupError, match=rf"'{first.name}'.*'{second.name}'|'{second.name}'.*'{first.name}'"
        ):
            trainer.fit(_module(first.example(), second.example()), datamodule=data)
        assert trainer.global_step == 0
        return
    module = _module(first.example(), second.example())
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    (results,) = trainer.test(module, datamodule=data, verbose=False)
    assert 0.0 <= results["test/acc"] <= 1.0 and math.isfinite(results["test/loss"])


# -- the prediction attacks differentiate -------------------------------------------------------------


def test_class_scores_are_the_logits_of_a_plain_model() -> None:
    module = _module().eval()
    x = torch.rand(8, 64)
    assert torch.equal(module.class_scores(x), module.model(x))


def test_class_scores_of_an_ensemble_average_its_members() -> None:
    module = _module(DeepEnsemble(num_members=3, path="sequential", reliability_diagram=False))
    module.apply_surgery()
    module.eval()
    x = torch.rand(8, 64)
    with torch.no_grad():
        expected = ensemble_log_probs(module.model(x))
        got = module.class_scores(x)
    assert got.shape == (8, 10)
    torch.testing.assert_close(got, expected)


def test_class_scores_of_mimo_tile_the_raw_input_and_average_the_heads() -> None:
    module = _module(MIMO(num_members=2, eval_input="tiled", reliability_diagram=False))
    module.apply_surgery()
    module.eval()
    x = torch.rand(8, 64)
    with torch.no_grad():
        expected = mimo_log_probs(module.model(repeat_inputs(x, 2)), 2)
        got = module.class_scores(x)
    assert got.shape == (8, 10)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "combining",
    [
        pytest.param(
            lambda: DeepEnsemble(num_members=2, path="sequential", reliability_diagram=False), id="ensemble"
        ),
        pytest.param(lambda: MIMO(num_members=2, reliability_diagram=False), id="mimo"),
    ],
)
def test_robust_accuracy_at_a_vanishing_radius_is_the_combined_predictions_accuracy(combining) -> None:
    """FGSM at epsilon 1e-6 moves no prediction, so robust accuracy must equal test accuracy: it
    scores the ensemble's / MIMO's combined prediction (not one member, not M * K raw outputs)."""
    L.seed_everything(0)
    robust = RobustEvaluation(epsilons=[1e-6], attacks=["fgsm"], max_batches=None, stages=["test"])
    module = _module(combining(), robust)
    data = DigitsDataModule(batch_size=64, form="flat")
    trainer = quiet_trainer(max_steps=20, limit_val_batches=0, limit_test_batches=3, inference_mode=False)
    trainer.fit(module, datamodule=data)
    (results,) = trainer.test(module, datamodule=data, verbose=False)
    assert results["test/acc"] > 0.3  # trained a little: the check is not about chance-level outputs
    assert results["test/robust_acc_fgsm_eps1e-06"] == pytest.approx(results["test/acc"], abs=1e-6)


def test_batch_transforms_of_raw_batches_run_before_mimo_builds_its_members_batches() -> None:
    module = _module(MIMO(num_members=2), Replay(memory_size=16), PGDAdversarialTraining(steps=1))
    names = [p.name for p in module.plugins]
    assert names[-1] == "mimo" and set(names) == {"pgd_at", "replay", "mimo"}


def test_center_loss_is_rejected_with_an_ensemble_or_mimo() -> None:
    from litplug.plugins.center_loss import CenterLoss

    for combining in (DeepEnsemble(num_members=2), MIMO(num_members=2)):
        with pytest.raises(PluginSetupError, match="center_loss"):
            quiet_trainer(max_steps=1).fit(
                _module(CenterLoss(), combining), datamodule=DigitsDataModule(batch_size=64, form="flat")
            )


# -- plugins paired with data they cannot work on -----------------------------------------------------


class _TokenClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(1))


def _token_loaders(targets: torch.Tensor) -> DataLoader:
    tokens = torch.randint(0, 20, (32, 5))
    return DataLoader(TensorDataset(tokens, targets), batch_size=8)


@pytest.mark.parametrize(
    "plugin",
    [PGDAdversarialTraining(steps=1), RobustEvaluation.example()],
    ids=["pgd_at", "robust_eval"],
)
def test_an_attack_on_token_ids_fails_before_the_first_step(plugin: Plugin) -> None:
    module = LitplugModule(_TokenClassifier(), plugins=[plugin])
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, inference_mode=False)
    with pytest.raises(PluginSetupError, match=rf"'{plugin.name}'.*floating-point inputs.*int64"):
        trainer.fit(module, train_dataloaders=_token_loaders(torch.randint(0, 3, (32,))))
    assert trainer.global_step == 0


def test_replay_on_sequence_targets_fails_before_the_first_step() -> None:
    module = LitplugModule(_TokenClassifier(), plugins=[Replay(memory_size=8)])
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    with pytest.raises(PluginSetupError, match=r"'replay'.*one class index per example.*\(32, 5\)|\(8, 5\)"):
        trainer.fit(module, train_dataloaders=_token_loaders(torch.randint(0, 3, (32, 5))))
    assert trainer.global_step == 0


# -- continual learning with every other plugin ---------------------------------------------------------

CONTINUAL = [cls for cls in ON_MLP if cls.name in ("ewc", "replay", "center_loss")]
CONTINUAL_PAIRS = [
    pytest.param(c, other, id=f"{c.name}+{other.name}")
    for c in CONTINUAL
    for other in ON_MLP
    if other is not c
]


@pytest.mark.parametrize(("continual", "other"), CONTINUAL_PAIRS)
def test_a_continual_plugin_with_any_other_runs_two_tasks_or_is_rejected(continual, other, tmp_path) -> None:
    """Task ends (EWC's Fisher, replay's and center loss's bookkeeping) and the per-task evaluation
    with every other plugin in the model: a two-task Split-Digits run fills its accuracy matrix."""
    from litplug.core.continual import ContinualLearning, fit_continual
    from litplug.core.data.continual import SplitDigitsDataModule

    L.seed_everything(0)
    data = SplitDigitsDataModule(scenario="class", classes_per_task=5, epochs_per_task=1, batch_size=64)
    trainer = quiet_trainer(
        callbacks=[ContinualLearning()],
        limit_val_batches=0,
        limit_train_batches=2,
        inference_mode=False,
        default_root_dir=tmp_path,  # the driver writes continual.json and a heatmap there
    )
    if _declared_conflict(continual, other):
        with pytest.raises(PluginSetupError, match="conflicts with plugin"):
            fit_continual(_module(other.example(), continual.example()), data, trainer=trainer)
        return
    results = fit_continual(_module(other.example(), continual.example()), data, trainer=trainer)
    assert [len(row) for row in results.matrix] == [1, 2]
    assert all(0.0 <= acc <= 1.0 for row in results.matrix for acc in row)


def test_continual_evaluation_uses_the_prediction_the_plugins_make() -> None:
    """MIMO with a tiled evaluation input: the per-task accuracy goes through class_scores (raw
    digits into a model whose input layer takes M of them would fail)."""
    from litplug.core.continual import evaluate_task

    module = _module(MIMO(num_members=2, eval_input="tiled", reliability_diagram=False))
    module.apply_surgery()
    x, y = torch.rand(16, 64), torch.randint(0, 10, (16,))
    expected = float((module.eval().class_scores(x).argmax(-1) == y).float().mean())
    assert evaluate_task(module, [(x, y)], None, 0, "class") == pytest.approx(expected)


def test_a_conflict_error_says_why() -> None:
    from litplug.plugins.ewc import EWC

    with pytest.raises(PluginSetupError, match=r"'ewc' conflicts with plugin 'ensemble' \(its Fisher"):
        quiet_trainer(max_steps=1).fit(
            _module(EWC(), DeepEnsemble(num_members=2)),
            datamodule=DigitsDataModule(batch_size=64, form="flat"),
        )


# -- several plugins resume together ------------------------------------------------------------------


@pytest.mark.parametrize(
    "names",
    [("ghost_bn", "ema", "replay", "pgd_at"), ("ensemble", "ema", "adt"), ("mimo", "replay", "robust_eval")],
    ids="+".join,
)
def test_a_killed_run_with_several_plugins_resumes_to_identical_weights(names, tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_resume import KillAtStep, Killed

    by_name = {cls.name: cls for cls in ON_MLP}

    def run(callbacks: list, ckpt_path=None) -> LitplugModule:
        L.seed_everything(0)
        module = _module(*(by_name[name].example() for name in names))
        trainer = quiet_trainer(
            max_steps=6,
            limit_val_batches=0,
            callbacks=callbacks,
            enable_checkpointing=bool(callbacks),
            deterministic=True,
            inference_mode=False,
        )
        try:
            trainer.fit(module, datamodule=DigitsDataModule(batch_size=128, form="flat"), ckpt_path=ckpt_path)
        except Killed:
            pass
        return module

    reference = run([])
    run([ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1), KillAtStep(3)])
    resumed = run([], ckpt_path=tmp_path / "epoch=0-step=2.ckpt")
    expected, got = reference.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume"
    for ref_plugin, res_plugin in zip(reference.plugins, resumed.plugins, strict=True):
        assert_same_state(ref_plugin.state_dict(), res_plugin.state_dict(), ref_plugin.name)
