"""Knowledge distillation (plugins/distill): the loss by hand, teacher checkpoints, the plugin."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer

from litplug.core.data import DigitsDataModule
from litplug.core.errors import CheckpointError, PluginConfigError
from litplug.core.models import MLP
from litplug.core.module import LitplugModule
from litplug.plugins.distill import Distill, distillation_loss, load_teacher, save_teacher_checkpoint
from litplug.plugins.ensemble import DeepEnsemble


def test_distillation_loss_matches_a_hand_computation_including_t_squared() -> None:
    student = torch.tensor([[2.0, 0.0, -1.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0]])
    target = torch.tensor([0])
    for temperature, alpha in ((1.0, 0.5), (3.0, 0.9)):
        hard, soft = distillation_loss(student, teacher, target, temperature, alpha)
        s = [math.exp(v / temperature) for v in (2.0, 0.0, -1.0)]
        t = [math.exp(v / temperature) for v in (1.0, 1.0, 0.0)]
        q = [v / sum(s) for v in s]
        p = [v / sum(t) for v in t]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        ce = -math.log(math.exp(2.0) / sum(math.exp(v) for v in (2.0, 0.0, -1.0)))
        assert hard.item() == pytest.approx((1 - alpha) * ce, rel=1e-6)
        assert soft.item() == pytest.approx(alpha * temperature**2 * kl, rel=1e-6)


def test_ignored_positions_are_left_out_and_the_teacher_gets_no_gradient() -> None:
    student = torch.randn(2, 5, 4, requires_grad=True)
    teacher = torch.randn(2, 5, 4, requires_grad=True)
    targets = torch.randint(0, 4, (2, 5))
    targets[1, 2:] = -100
    hard, soft = distillation_loss(student, teacher, targets, 2.0, 0.5)
    keep = targets.reshape(-1) != -100
    hard_ref, soft_ref = distillation_loss(
        student.reshape(-1, 4)[keep], teacher.reshape(-1, 4)[keep], targets.reshape(-1)[keep], 2.0, 0.5
    )
    torch.testing.assert_close((hard, soft), (hard_ref, soft_ref))
    (hard + soft).backward()
    assert teacher.grad is None and student.grad is not None
    with pytest.raises(ValueError, match="same classes"):
        distillation_loss(torch.randn(3, 4), torch.randn(3, 5), torch.zeros(3, dtype=torch.long))


def _ensemble_teacher(tmp_path: Path) -> tuple[LitplugModule, Path]:
    torch.manual_seed(3)
    teacher = LitplugModule(MLP(64, [16]), plugins=[DeepEnsemble(num_members=3, path="sequential")])
    return teacher, save_teacher_checkpoint(teacher, tmp_path / "teacher.pt")


def test_a_teacher_checkpoint_predicts_like_the_saved_ensemble(tmp_path: Path) -> None:
    teacher, path = _ensemble_teacher(tmp_path)
    loaded = load_teacher(path, MLP(64, [16]), [DeepEnsemble(num_members=3)])
    x = torch.rand(7, 64)
    teacher.eval()
    with torch.no_grad():
        expected = torch.stack([m(x).softmax(-1) for m in teacher.model.members]).mean(0).log()
        got = loaded.log_probs(loaded(x), "predict")
    torch.testing.assert_close(got, expected)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_bad_arguments_and_bad_teachers_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(PluginConfigError, match="teacher_checkpoint"):
        Distill()
    with pytest.raises(PluginConfigError, match="temperature"):
        Distill("x.pt", temperature=0.0)
    with pytest.raises(PluginConfigError, match="alpha"):
        Distill("x.pt", alpha=1.5)
    with pytest.raises(PluginConfigError, match="file not found"):
        Distill(str(tmp_path / "missing.pt")).build_teacher(MLP(64, [16]))
    _, path = _ensemble_teacher(tmp_path)
    with pytest.raises(PluginConfigError, match="does not load"):  # plugins missing
        Distill(str(path), teacher_model=MLP(64, [16])).build_teacher(MLP(64, [16]))
    with pytest.raises(PluginConfigError, match="does not load"):  # wrong architecture
        Distill(str(path), teacher_model=MLP(64, [32]), teacher_plugins=[DeepEnsemble(3)]).build_teacher(
            MLP(64, [16])
        )


def test_plugin_loss_terms_use_the_teachers_ensemble_prediction(tmp_path: Path) -> None:
    teacher, path = _ensemble_teacher(tmp_path)
    plugin = Distill(str(path), teacher_plugins=[DeepEnsemble(num_members=3)], temperature=2.0, alpha=0.7)
    torch.manual_seed(0)
    student = LitplugModule(MLP(64, [16]), plugins=[plugin])  # teacher_model defaults to the student's
    x, y = torch.rand(9, 64), torch.randint(0, 10, (9,))
    outputs = student(x)
    extras = plugin.litplug_extra_losses(student, outputs, y, (x, y))
    main = plugin.litplug_compute_loss(student, outputs, y, "train")
    teacher.eval()
    with torch.no_grad():
        teacher_log_probs = torch.stack([m(x).log_softmax(-1) for m in teacher.model.members]).logsumexp(0)
    hard, soft = distillation_loss(outputs, teacher_log_probs - math.log(3), y, 2.0, 0.7)
    torch.testing.assert_close(extras["distill"], soft)
    torch.testing.assert_close(main, hard)
    assert plugin.litplug_compute_loss(student, outputs, y, "val") is None  # eval loss stays plain CE


def test_fit_logs_both_terms_and_a_changed_teacher_is_refused_on_resume(tmp_path: Path) -> None:
    _, path = _ensemble_teacher(tmp_path)
    plugin = Distill(str(path), teacher_plugins=[DeepEnsemble(num_members=3)])
    torch.manual_seed(0)
    module = LitplugModule(MLP(64, [16]), plugins=[plugin])
    # log_every_n_steps=1: the named terms are logged on logging steps only
    trainer = quiet_trainer(max_steps=3, limit_val_batches=2, log_every_n_steps=1)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    logged = dict(trainer.callback_metrics)
    assert {"train/loss_main", "train/loss_distill"} <= set(logged)
    validated = trainer.validate(module, datamodule=DigitsDataModule(batch_size=64), verbose=False)[0]
    assert 0.0 <= validated["val/teacher_agreement"] <= 1.0
    total = logged["train/loss_main"] + logged["train/loss_distill"]
    torch.testing.assert_close(logged["train/loss"], total)
    state = plugin.state_dict()
    other_path = tmp_path / "other.pt"
    torch.manual_seed(99)
    save_teacher_checkpoint(
        LitplugModule(MLP(64, [16]), plugins=[DeepEnsemble(num_members=3, path="sequential")]), other_path
    )
    resumed = Distill(str(other_path), teacher_plugins=[DeepEnsemble(num_members=3)])
    resumed.load_state_dict(state)
    with pytest.raises(CheckpointError, match="differs"):
        resumed.build_teacher(MLP(64, [16]))
