"""Deep ensemble (plugins/ensemble) and the calibration maths it logs (core/metrics ECE, core/plots)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_trainer
from torchmetrics.classification import MulticlassCalibrationError

from litplug.core.data import DigitsDataModule
from litplug.core.errors import PluginConfigError
from litplug.core.metrics import ClassificationMetrics
from litplug.core.models import MLP, LSTMClassifier, SmallCNN
from litplug.core.module import LitplugModule
from litplug.core.plots import (
    calibration_bins,
    expected_calibration_error,
    log_image_to_wandb,
    plot_reliability_diagram,
)
from litplug.plugins.ensemble import (
    DeepEnsemble,
    MemberStack,
    disagreement,
    ensemble_log_probs,
    ensemble_nll,
    faster_path,
    make_members,
    sum_of_member_losses,
    time_forward_paths,
)


def _stack(model_fn, members: int = 3, seed: int = 0) -> MemberStack:
    torch.manual_seed(seed)
    return MemberStack(make_members(model_fn(), members, base_seed=seed))


# -- vectorised vs sequential -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_fn", "inputs"),
    [
        (lambda: MLP(64, [32, 32], batch_norm=True, dropout=0.3), torch.rand(20, 64)),
        (lambda: SmallCNN(width=8), torch.rand(20, 1, 8, 8)),
    ],
    ids=["mlp-bn-dropout", "cnn-bn"],
)
def test_vectorised_and_sequential_predictions_agree(model_fn, inputs) -> None:
    stack = _stack(model_fn).eval()
    with torch.no_grad():
        sequential = stack.forward_with("sequential", inputs)
        vectorised = stack.forward_with("vmap", inputs)
        again = stack.forward_with("vmap", inputs)  # served from the stacked-parameter cache
    assert sequential.shape == (3, 20, 10)
    torch.testing.assert_close(vectorised, sequential, rtol=1e-5, atol=1e-6)
    assert torch.equal(vectorised, again)


def test_the_vmap_eval_path_traces_as_the_members_one_by_one() -> None:
    """jit.trace cannot record functional_call: traced, the members run one by one (same outputs)."""
    stack = _stack(lambda: MLP(64, [16], batch_norm=True))
    stack.eval_path = "vmap"
    stack.eval()
    inputs = torch.rand(6, 64)
    with torch.no_grad():
        traced = torch.jit.trace(stack, inputs)
        torch.testing.assert_close(traced(inputs), stack(inputs), rtol=1e-5, atol=1e-6)


def test_the_eval_cache_follows_parameter_updates() -> None:
    stack = _stack(lambda: MLP(64, [16])).eval()
    inputs = torch.rand(5, 64)
    with torch.no_grad():
        before = stack.forward_with("vmap", inputs)
        stack.members[1].head.bias.add_(1.0)
        after = stack.forward_with("vmap", inputs)
        expected = stack.forward_with("sequential", inputs)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, expected)


def test_training_paths_agree_on_gradients_and_batchnorm_statistics() -> None:
    inputs, targets = torch.rand(32, 64), torch.randint(0, 10, (32,))
    results = []
    for path in ("sequential", "vmap"):
        stack = _stack(lambda: MLP(64, [32], batch_norm=True)).train()
        loss = sum_of_member_losses(stack.forward_with(path, inputs), targets)
        loss.backward()
        grads = [p.grad.clone() for p in stack.parameters()]
        buffers = [b.clone() for b in stack.buffers()]
        results.append((loss.detach(), grads, buffers))
    (loss_a, grads_a, buffers_a), (loss_b, grads_b, buffers_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(buffers_a, buffers_b, strict=True):
        assert torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, atol=1e-6)
    stack = _stack(lambda: MLP(64, [32], batch_norm=True)).train()
    stack.forward_with("vmap", inputs)
    for member in stack.members:  # every member's own statistics moved (written back from the vmap copies)
        norm = member.body[2]
        assert int(norm.num_batches_tracked) == 1 and norm.running_mean.abs().sum() > 0


def test_dropout_masks_differ_between_members_on_the_vmap_path() -> None:
    torch.manual_seed(0)
    model = MLP(8, [64], dropout=0.5)
    stack = MemberStack([model, *[type(model)(8, [64], dropout=0.5) for _ in range(1)]])
    stack.members[1].load_state_dict(model.state_dict())  # identical weights: only dropout differs
    outputs = stack.train().forward_with("vmap", torch.ones(4, 8))
    assert not torch.equal(outputs[0], outputs[1])


# -- members ----------------------------------------------------------------------------------------


def test_members_start_different_deterministically_without_touching_the_rng() -> None:
    torch.manual_seed(0)
    model = MLP(64, [32])
    original = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    members = make_members(model, 3, base_seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert members[0] is model and all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    weights = [dict(m.named_parameters()) for m in members]
    for name in weights[0]:
        for a in range(3):
            for b in range(a + 1, 3):
                assert not torch.equal(weights[a][name], weights[b][name]), (name, a, b)
    again = make_members(MLP(64, [32]), 3, base_seed=7)
    assert torch.equal(again[2].head.weight, members[2].head.weight)  # a function of the seed only
    other = make_members(MLP(64, [32]), 3, base_seed=8)
    assert not torch.equal(other[2].head.weight, members[2].head.weight)


def test_parameters_without_reset_parameters_are_reported() -> None:
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))
            self.linear = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x * self.scale)

    with pytest.warns(UserWarning, match="scale"):
        make_members(Scaled(), 2, base_seed=0)


# -- maths ------------------------------------------------------------------------------------------


def test_ensemble_probabilities_are_the_mean_of_member_probabilities() -> None:
    logits = torch.randn(4, 6, 5, dtype=torch.float64) * 3
    targets = torch.randint(0, 5, (6,))
    mean_probs = logits.softmax(-1).mean(0)
    torch.testing.assert_close(ensemble_log_probs(logits).exp(), mean_probs)
    expected_nll = -mean_probs[torch.arange(6), targets].log().mean()
    torch.testing.assert_close(ensemble_nll(logits, targets), expected_nll)
    # logsumexp - log M stays finite where exp underflows: one member certain, three certain elsewhere
    extreme = torch.tensor([[[0.0, -2000.0]], [[-2000.0, 0.0]], [[-2000.0, 0.0]], [[-2000.0, 0.0]]])
    assert ensemble_nll(extreme, torch.tensor([0])).item() == pytest.approx(math.log(4))
    assert not torch.allclose(
        ensemble_log_probs(logits), logits.log_softmax(-1).mean(0)
    )  # not logit averaging


def test_disagreement_matches_a_hand_count() -> None:
    # predictions: member0 [0, 1, 2], member1 [0, 1, 1], member2 [1, 1, 1]
    picks = torch.tensor([[0, 1, 2], [0, 1, 1], [1, 1, 1]])
    outputs = F.one_hot(picks, 3).float()
    # pairs (0,1): 1/3, (0,2): 2/3, (1,2): 1/3 -> mean 4/9
    assert disagreement(outputs).item() == pytest.approx(4 / 9)
    assert disagreement(outputs[:1]).item() == 0.0


def test_sum_of_member_losses_equals_a_loop_with_and_without_ignored_positions() -> None:
    outputs = torch.randn(3, 4, 7, 5)
    targets = torch.randint(0, 5, (4, 7))
    targets[0, :3] = -100
    looped = sum(F.cross_entropy(o.reshape(-1, 5), targets.reshape(-1), ignore_index=-100) for o in outputs)
    torch.testing.assert_close(sum_of_member_losses(outputs, targets), looped)
    custom = sum_of_member_losses(outputs[:, 0], targets[1], lambda o, t: F.cross_entropy(o, t) * 2)
    torch.testing.assert_close(custom, 2 * sum(F.cross_entropy(o, targets[1]) for o in outputs[:, 0]))


# -- calibration: core ECE and the reliability diagram bins ------------------------------------------


def _tiny_calibration_example() -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.tensor(
        [
            [0.90, 0.05, 0.05],  # conf 0.90, correct     -> bin [0.867, 0.933)
            [0.05, 0.90, 0.05],  # conf 0.90, wrong       -> same bin
            [0.65, 0.20, 0.15],  # conf 0.65, correct     -> bin [0.600, 0.667)
            [0.40, 0.35, 0.25],  # conf 0.40, wrong       -> bin [0.400, 0.467)
        ]
    )
    targets = torch.tensor([0, 2, 0, 1])
    return probs, targets


def test_ece_matches_a_hand_computed_value() -> None:
    probs, targets = _tiny_calibration_example()
    # |acc - conf| * n / N per bin: |0.5 - 0.9| * 2/4 + |1 - 0.65| * 1/4 + |0 - 0.4| * 1/4
    hand = 0.4 * 0.5 + 0.35 * 0.25 + 0.4 * 0.25
    metrics = ClassificationMetrics(num_classes=3)
    metrics.update(probs.log(), targets)
    assert metrics.metrics()["ece"].compute().item() == pytest.approx(hand, abs=1e-6)
    bins = calibration_bins(probs, targets)
    assert expected_calibration_error(bins) == pytest.approx(hand, abs=1e-6)
    assert bins.count.sum() == 4 and bins.count[13] == 2 and bins.accuracy[13] == 0.5


def test_reliability_bins_agree_with_torchmetrics_including_confidence_one() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=generator) * 4
    probs = logits.softmax(-1)
    probs[:20] = F.one_hot(torch.arange(20) % 10, 10).float()  # confidence exactly 1.0
    targets = torch.randint(0, 10, (500,), generator=generator)
    for n_bins in (5, 15):
        reference = MulticlassCalibrationError(num_classes=10, n_bins=n_bins, norm="l1")(probs, targets)
        assert expected_calibration_error(calibration_bins(probs, targets, n_bins)) == pytest.approx(
            reference.item(), abs=1e-6
        )


def test_reliability_diagram_is_written_and_logged_to_wandb(tmp_path: Path, monkeypatch) -> None:
    probs, targets = _tiny_calibration_example()
    path = plot_reliability_diagram(calibration_bins(probs, targets), tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    from lightning.pytorch.loggers import WandbLogger

    class _Owner:  # the plots helpers only read `module._trainer.loggers`
        def __init__(self, loggers: list) -> None:
            self._trainer = type("T", (), {"loggers": loggers})()

    assert not log_image_to_wandb(_Owner([]), "reliability/x", path)
    try:
        assert log_image_to_wandb(_Owner([WandbLogger(save_dir=str(tmp_path))]), "reliability/x", path)
    finally:  # leave no run and no process-wide wandb settings to later tests in this worker
        import wandb

        wandb.finish()
        wandb.teardown()


# -- plugin -----------------------------------------------------------------------------------------


def test_bad_arguments_name_the_plugin_and_argument() -> None:
    with pytest.raises(PluginConfigError, match="num_members"):
        DeepEnsemble(num_members=0)
    with pytest.raises(PluginConfigError, match="path"):
        DeepEnsemble(path="parallel")
    with pytest.raises(PluginConfigError, match="timing_repeats"):
        DeepEnsemble(timing_repeats=0)


def test_surgery_is_idempotent_and_one_member_is_the_plain_model() -> None:
    torch.manual_seed(0)
    model = MLP(64, [16])
    plugin = DeepEnsemble(num_members=1, path="sequential")
    module = LitplugModule(model, plugins=[plugin])
    module.apply_surgery()
    stack = module.model
    assert isinstance(stack, MemberStack) and stack.members[0] is model
    assert plugin.litplug_configure_model(stack) is None
    x = torch.rand(6, 64)
    torch.testing.assert_close(module.log_probs(module(x), "val"), model(x).log_softmax(-1))


def test_vmap_failure_falls_back_to_sequential_in_timing_and_is_explained_otherwise() -> None:
    stack = _stack(lambda: LSTMClassifier(input_size=8, hidden_size=8), members=2)
    inputs, targets = torch.rand(4, 8, 8), torch.randint(0, 10, (4,))
    timings = time_forward_paths(stack, inputs, targets, repeats=1)
    assert "vmap_error" in timings  # nn.LSTM's fused kernel has no vmap batching rule
    assert timings["train_vmap"] == math.inf and timings["eval_vmap"] == math.inf
    assert math.isfinite(float(timings["train_sequential"]))
    with pytest.raises(RuntimeError, match="path='sequential'"):
        stack.forward_with("vmap", inputs)


def test_fit_logs_member_metrics_chooses_a_path_and_draws_the_diagram(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plugin = DeepEnsemble(num_members=3, path="auto", timing_repeats=1)
    module = LitplugModule(MLP(64, [32]), plugins=[plugin])
    data = DigitsDataModule(batch_size=128)
    trainer = quiet_trainer(max_epochs=2, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    assert plugin.train_path in ("vmap", "sequential") and plugin.eval_path in ("vmap", "sequential")
    assert {"train_vmap", "train_sequential", "eval_vmap", "eval_sequential"} <= set(plugin.timings)
    assert module.model.train_path == plugin.train_path
    metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    for key in (
        "test/member0_acc",
        "test/member2_acc",
        "test/diversity",
        "test/ece",
        "test/brier",
        "test/nll",
    ):
        assert key in metrics, key
    assert metrics["test/diversity"] > 0.0  # members differ
    assert (tmp_path / "reliability_ensemble_test.png").exists()
    restored = DeepEnsemble(num_members=3, path="auto")
    restored.load_state_dict(plugin.state_dict())
    assert (restored.train_path, restored.eval_path) == (plugin.train_path, plugin.eval_path)


# -- the automatic path choice and the GPU check ------------------------------------------------------


def test_faster_path_keeps_the_preferred_path_unless_the_other_wins_by_the_margin() -> None:
    timings = {"eval_vmap": 0.95, "eval_sequential": 1.0, "train_vmap": 0.8, "train_sequential": 1.0}
    assert faster_path(timings, "eval") == "vmap"  # plain comparison (margin 0)
    assert faster_path(timings, "eval", "sequential", 0.1) == "sequential"  # 5% is noise
    assert faster_path(timings, "train", "sequential", 0.1) == "vmap"  # 20% is not
    gpu_like = {"eval_vmap": 1.05, "eval_sequential": 1.0}
    assert faster_path(gpu_like, "eval", "vmap", 0.1) == "vmap"
    assert faster_path({"eval_vmap": 2.0, "eval_sequential": 1.0}, "eval", "vmap", 0.1) == "sequential"
    assert faster_path({"eval_vmap": math.inf, "eval_sequential": 1.0}, "eval", "vmap", 0.1) == "sequential"
    assert DeepEnsemble.rule_path(torch.device("cuda")) == "vmap"
    assert DeepEnsemble.rule_path(torch.device("cpu")) == "sequential"


def test_auto_path_on_cpu_does_not_leave_sequential_for_noise(monkeypatch) -> None:
    """A fit whose timings show vmap 5% faster keeps the CPU's sequential path; 30% faster switches."""
    import litplug.plugins.ensemble.plugin as plugin_module

    for vmap_time, expected in ((0.95, "sequential"), (0.7, "vmap")):
        fake = {
            "train_vmap": vmap_time,
            "train_sequential": 1.0,
            "eval_vmap": vmap_time,
            "eval_sequential": 1.0,
        }
        monkeypatch.setattr(plugin_module, "time_forward_paths", lambda *a, fake=fake, **k: dict(fake))
        plugin = DeepEnsemble(num_members=2, path="auto", reliability_diagram=False)
        module = LitplugModule(MLP(64, [8]), plugins=[plugin])
        trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
        assert (plugin.train_path, plugin.eval_path) == (expected, expected)


def _gpu_check():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "uncertainty" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("litplug_gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_code_path_runs_on_the_cpu_and_refuses_to_fake_a_gpu(tmp_path: Path) -> None:
    """The GPU check's agreement and timing functions on tiny CPU models (so the script does not
    rot between GPU sessions); without CUDA its main entry point measures nothing."""
    check = _gpu_check()
    cpu = torch.device("cpu")
    d = check.ensemble_agreement(lambda: MLP(64, [16], batch_norm=True), torch.rand(8, 64), cpu)
    assert max(d.values()) < 1e-5, d
    assert check.mimo_agreement(torch.rand(8, 1, 8, 8), cpu) < 1e-5
    speed = check.ensemble_speed(lambda: MLP(64, [16]), torch.rand(8, 64), cpu, repeats=1)
    assert speed["eval"] > 0 and speed["train"] > 0
    assert check.mimo_speed(torch.rand(8, 1, 8, 8), cpu, repeats=1)["summed"] > 0
    if not torch.cuda.is_available():
        assert check.main(["--out", str(tmp_path / "gpu.md")]) == 2
        assert not (tmp_path / "gpu.md").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_check_agreement_on_cuda(tmp_path: Path) -> None:
    """On a GPU machine: vmap and sequential agree on the device (and MIMO summed vs tiled); the
    report with the speed targets is written (speed is reported there, not asserted here)."""
    check = _gpu_check()
    out = tmp_path / "gpu.md"
    assert check.main(["--quick", "--out", str(out)]) == 0
    assert "FAILED" not in out.read_text()
