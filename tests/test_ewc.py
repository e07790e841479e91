"""EWC: Fisher estimators against the per-sample loop, the penalty, online decay, errors, resume, effect."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import KillAtStep, Killed, quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn

from litplug.core.continual import ContinualLearning, fit_continual
from litplug.core.data.continual import PermutedDigitsDataModule
from litplug.core.errors import PluginConfigError
from litplug.core.models import MLP, SmallCNN
from litplug.core.module import LitplugModule
from litplug.plugins.ewc import (
    EWC,
    ewc_penalty,
    fisher_diagonal,
    fisher_diagonal_loop,
    merge_separate,
    online_update,
    quadratic_penalty,
)
from litplug.plugins.ewc.functional import PreparedPenalty

# -- Fisher estimators ----------------------------------------------------------------------------


def _batches(shape: tuple[int, ...], n: int = 24, batch: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


MODELS = {
    "mlp_bn_dropout": (lambda: MLP(64, [16, 12], 10, batch_norm=True, dropout=0.3), (64,)),  # vmap for BN
    "cnn": (lambda: SmallCNN(width=4), (1, 8, 8)),
}


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("estimator", ["exact", "sampled", "empirical", "batched"])
@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_fisher_equals_the_per_sample_loop(model_name: str, estimator: str, method: str) -> None:
    torch.manual_seed(0)
    build, shape = MODELS[model_name]
    model = build()
    model.train()  # the estimators must switch to eval mode themselves (dropout, BN statistics)
    batches = _batches(shape)
    reference = fisher_diagonal_loop(model, batches, estimator, generator=torch.Generator().manual_seed(5))
    got = fisher_diagonal(
        model, batches, estimator, generator=torch.Generator().manual_seed(5), method=method
    )
    assert model.training, "the model's mode must be restored"
    assert got.keys() == reference.keys()
    for name in reference:
        assert torch.allclose(got[name], reference[name], atol=1e-6, rtol=1e-4), name
    assert sum(f.sum() for f in got.values()) > 0


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_merging_loader_batches_leaves_the_fisher_unchanged(estimator: str) -> None:
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    batches = _batches((1, 8, 8), n=40, batch=6)
    merged = fisher_diagonal(model, batches, estimator, batch_size=16)  # type: ignore[arg-type]
    unmerged = fisher_diagonal(model, batches, estimator, batch_size=None)  # type: ignore[arg-type]
    for name in unmerged:
        torch.testing.assert_close(merged[name], unmerged[name], rtol=1e-5, atol=1e-8, msg=name)


def test_batched_estimator_keeps_the_loaders_batches() -> None:
    """Its value is per loader batch (square of the batch's mean gradient), so no merging."""
    torch.manual_seed(0)
    model = MLP(64, [16], 10)
    batches = _batches((64,), n=40, batch=8)
    kept = fisher_diagonal(model, batches, "batched", batch_size=None)
    default = fisher_diagonal(model, batches, "batched")
    one_batch = fisher_diagonal(
        model, [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))], "batched"
    )
    for name in kept:
        torch.testing.assert_close(default[name], kept[name], msg=name)
    assert any(not torch.allclose(one_batch[n], kept[n]) for n in kept)


def test_sample_batches_merge_up_to_the_size_stop_at_num_samples_and_keep_shapes_apart() -> None:
    from litplug.plugins.ewc.functional import _take_samples

    def batch(n: int, width: int, value: float) -> tuple[Tensor, Tensor]:
        return torch.full((n, width), value), torch.full((n,), value)

    loader = [batch(3, 5, 0.0), batch(3, 5, 1.0), batch(3, 7, 2.0), batch(3, 7, 3.0), batch(3, 7, 4.0)]
    cpu = torch.device("cpu")
    merged = list(_take_samples(loader, 10, cpu, merge_to=4))
    # 3 + 3 merged; the width change flushes; 3 + the first 1 of the next (10 samples in all)
    assert [tuple(x.shape) for x, _ in merged] == [(6, 5), (4, 7)]
    assert merged[1][1].tolist() == [2.0, 2.0, 2.0, 3.0]
    assert [tuple(x.shape) for x, _ in _take_samples(loader, None, cpu)] == [
        (3, 5),
        (3, 5),
        (3, 7),
        (3, 7),
        (3, 7),
    ]


@pytest.mark.parametrize(
    "build",
    [
        lambda: MLP(64, [16], 10),
        lambda: MLP(64, [16, 12], 10, batch_norm=True),  # BatchNorm1d, eval mode: closed form too
        lambda: SmallCNN(width=4),  # Conv2d + BatchNorm2d
    ],
)
def test_fast_method_covers_linear_conv_and_batchnorm_models(build: Any) -> None:
    torch.manual_seed(0)
    model = build()
    shape = (1, 8, 8) if isinstance(model, SmallCNN) else (64,)
    batches = _batches(shape)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for x, _ in batches:
            model(x)
    fast = fisher_diagonal(model, batches, "empirical", method="fast")
    reference = fisher_diagonal_loop(model, batches, "empirical")
    assert set(fast) == set(reference)
    for name in reference:
        assert torch.allclose(fast[name], reference[name], atol=1e-7, rtol=1e-5), name


def test_fast_method_refuses_layers_it_does_not_cover() -> None:
    model = nn.Sequential(nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 10))
    with pytest.raises(ValueError, match="not covered"):
        fisher_diagonal(model, _batches((64,)), method="fast")


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(1, 3, 3, padding="same"),  # a string F.unfold does not take
        lambda: nn.Conv2d(1, 3, 3, padding=1, padding_mode="reflect"),  # unfold would pad with zeros
    ],
)
def test_conv_padding_unfold_cannot_reproduce_goes_the_vmap_way_and_stays_exact(conv: Any) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(conv(), nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    batches = _batches((1, 8, 8))
    got = fisher_diagonal(model, batches, "empirical")  # auto: closed form for the Linear only
    reference = fisher_diagonal_loop(model, batches, "empirical")
    for name in reference:
        assert torch.allclose(got[name], reference[name], atol=1e-7, rtol=1e-5), name
    with pytest.raises(ValueError, match="not covered"):
        fisher_diagonal(model, batches, method="fast")


class _Shared(nn.Module):
    """One Linear applied twice: its per-sample gradient is not one outer product."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.tanh(self.inner(x)))


def test_weight_sharing_falls_back_to_vmap_and_stays_exact() -> None:
    torch.manual_seed(0)
    model = _Shared()
    batches = _batches((10,))
    got = fisher_diagonal(model, batches, "exact")
    reference = fisher_diagonal_loop(model, batches, "exact")
    for name in reference:
        assert torch.allclose(got[name], reference[name], atol=1e-6, rtol=1e-4)


def test_num_samples_uses_the_first_samples_only() -> None:
    model = MLP(64, [8], 10)
    batches = _batches((64,))
    first = fisher_diagonal(model, batches, num_samples=13)
    manual = fisher_diagonal(model, [(batches[0][0], batches[0][1]), (batches[1][0][:3], batches[1][1][:3])])
    for name in first:
        assert torch.allclose(first[name], manual[name], atol=1e-7)


def test_batched_estimator_is_the_square_of_the_batch_mean_gradient() -> None:
    torch.manual_seed(0)
    model = MLP(64, [8], 10)
    ((x, y),) = _batches((64,), n=10, batch=10)
    fisher = fisher_diagonal(model, [(x, y)], "batched")
    mean_log_p = torch.log_softmax(model(x), -1).gather(1, y[:, None]).mean()
    grads = torch.autograd.grad(mean_log_p, list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), grads, strict=True):
        assert torch.allclose(fisher[name], g.pow(2), atol=1e-8)
    per_sample = fisher_diagonal(model, [(x, y)], "empirical")
    assert sum(f.sum() for f in fisher.values()) < sum(f.sum() for f in per_sample.values())


def test_no_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        fisher_diagonal(MLP(64, [8], 10), [])
    with pytest.raises(ValueError, match="num_samples"):
        fisher_diagonal(MLP(64, [8], 10), _batches((64,)), num_samples=0)


# -- penalty --------------------------------------------------------------------------------------


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def test_penalty_is_zero_at_the_anchor_and_grows_quadratically() -> None:
    torch.manual_seed(0)
    model = MLP(8, [4], 3)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    assert ewc_penalty(_params(model), anchor, fisher, 10.0).item() == 0.0
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    values = []
    for scale in (0.1, 0.2, 0.4):
        moved = {n: anchor[n] + scale * direction[n] for n in anchor}
        values.append(ewc_penalty(moved, anchor, fisher, 10.0).item())
    assert 0 < values[0] < values[1] < values[2]
    assert values[1] / values[0] == pytest.approx(4.0, rel=1e-4)
    expected = 0.5 * 10.0 * sum((fisher[n] * (0.1 * direction[n]) ** 2).sum() for n in anchor)
    assert values[0] == pytest.approx(expected.item(), rel=1e-5)


def _plain_penalty(
    params: dict[str, torch.Tensor], center, fisher, ewc_lambda: float, offset=0.0
) -> torch.Tensor:
    """The textbook formula through ordinary autograd: the reference of the fused penalty."""
    return 0.5 * ewc_lambda * (quadratic_penalty(params, center, fisher) + offset)


@pytest.mark.parametrize("offset", [0.0, 2.5])
def test_fused_penalty_value_and_gradient_equal_autograd_of_the_plain_formula(offset: float) -> None:
    torch.manual_seed(0)
    model = SmallCNN(width=4)  # conv, BN and linear parameters of several shapes
    params = _params(model)
    center = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in params.items()}
    fisher = {n: torch.rand_like(p) for n, p in params.items()}
    fisher[next(iter(fisher))].zero_()  # a parameter with zero Fisher everywhere
    fused = ewc_penalty(params, center, fisher, 30.0, offset)
    plain = _plain_penalty(params, center, fisher, 30.0, offset)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    g_fused = torch.autograd.grad(fused, list(params.values()))
    g_plain = torch.autograd.grad(plain, list(params.values()))
    for a, b in zip(g_fused, g_plain, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
        assert a.abs().max() > 0 or b.abs().max() == 0


def test_fused_penalty_is_zero_with_zero_gradient_at_the_anchor() -> None:
    model = MLP(8, [4], 3)
    params = _params(model)
    anchor = {n: p.detach().clone() for n, p in params.items()}
    fisher = {n: torch.rand_like(p) for n, p in params.items()}
    value = ewc_penalty(params, anchor, fisher, 1e6)
    value.backward()
    assert value.item() == 0.0
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in params.values())


def test_fused_penalty_gradient_carries_the_upstream_scale_as_under_amp_loss_scaling() -> None:
    """GradScaler multiplies the loss; the penalty's gradient must be multiplied too, and add up with
    the task loss's gradient like any other loss term."""
    torch.manual_seed(0)
    model = MLP(8, [4], 3)
    x, y = torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1])
    center = {n: p.detach() + 0.1 for n, p in model.named_parameters()}
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    prepared = PreparedPenalty(center, fisher, scale=2.0)
    expected = []
    for penalty in (
        lambda: prepared(_params(model)),
        lambda: 2.0 * quadratic_penalty(_params(model), center, fisher),
    ):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y) + penalty()
        (1024.0 * loss).backward()
        expected.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*expected, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = prepared(_params(model))
    assert value.dtype == torch.float32


def test_fused_penalty_refuses_a_second_backward() -> None:
    params = {"w": torch.ones(3, requires_grad=True)}
    value = ewc_penalty(params, {"w": torch.zeros(3)}, {"w": torch.ones(3)}, 1.0)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        value.backward()


def test_parameters_added_after_the_anchor_are_not_penalised() -> None:
    old = {"w": torch.ones(3)}
    fisher = {"w": torch.ones(3)}
    params = {"w": torch.full((3,), 2.0, requires_grad=True), "new_head": torch.randn(4, requires_grad=True)}
    value = ewc_penalty(params, old, fisher, 2.0)
    value.backward()
    assert value.item() == pytest.approx(3.0)
    assert params["new_head"].grad is None


def test_merged_separate_penalty_equals_the_sum_of_per_task_penalties() -> None:
    torch.manual_seed(0)
    params = {"a": torch.randn(5, requires_grad=True), "b": torch.randn(2, 3, requires_grad=True)}
    anchors = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(3)]
    fishers = [{k: torch.rand_like(v) for k, v in params.items()} for _ in range(3)]
    fishers[1]["a"][0] = 0.0
    fishers[0]["a"][0] = 0.0
    fishers[2]["a"][0] = 0.0  # an entry no task cares about
    del anchors[0]["b"], fishers[0]["b"]  # "b" appeared after task 0
    separate = sum(ewc_penalty(params, a, f, 3.0) for a, f in zip(anchors, fishers, strict=True))
    total, center, offset = merge_separate(anchors, fishers)
    merged = ewc_penalty(params, center, total, 3.0, offset)
    assert merged.item() == pytest.approx(separate.item(), rel=1e-5)
    g_sep = torch.autograd.grad(separate, list(params.values()))
    g_merged = torch.autograd.grad(merged, list(params.values()))
    for a, b in zip(g_sep, g_merged, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_online_update_decays_the_old_fisher_by_gamma() -> None:
    old = {"w": torch.tensor([2.0, 4.0])}
    new = {"w": torch.tensor([1.0, 1.0]), "head": torch.tensor([3.0])}
    merged = online_update(old, new, 0.5)
    assert torch.equal(merged["w"], torch.tensor([2.0, 3.0])) and torch.equal(merged["head"], new["head"])
    assert torch.equal(online_update(None, new, 0.5)["w"], new["w"])
    with pytest.raises(ValueError, match="gamma"):
        online_update(old, new, 0.0)


# -- plugin ---------------------------------------------------------------------------------------


class _FakeModule:
    def __init__(self, model: nn.Module) -> None:
        self.model = model


def test_plugin_online_mode_keeps_one_decayed_fisher_and_the_latest_anchor() -> None:
    torch.manual_seed(0)
    model = MLP(64, [8], 10)
    batches = _batches((64,))
    plugin = EWC(mode="online", gamma=0.25, num_samples=None)
    module = _FakeModule(model)
    plugin.litplug_on_task_end(module, 0, batches)
    first = {k: v.clone() for k, v in plugin.fishers[0].items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    plugin.litplug_on_task_end(module, 1, batches)
    second = fisher_diagonal(model, batches, "empirical")
    assert len(plugin.fishers) == 1 and len(plugin.anchors) == 1 and plugin.tasks == [1]
    for name in first:
        assert torch.allclose(plugin.fishers[0][name], 0.25 * first[name] + second[name], atol=1e-7)
        assert torch.equal(plugin.anchors[0][name], dict(model.named_parameters())[name].detach())
    assert plugin.penalty(model).item() == pytest.approx(0.0, abs=1e-7)


def test_plugin_separate_mode_penalises_every_task_anchor() -> None:
    torch.manual_seed(0)
    model = MLP(64, [8], 10)
    batches = _batches((64,))
    plugin = EWC(ewc_lambda=7.0, num_samples=None)
    module = _FakeModule(model)
    assert plugin.litplug_extra_losses(module, "train") is None  # nothing before the first task end
    plugin.litplug_on_task_end(module, 0, batches)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    plugin.litplug_on_task_end(module, 1, batches)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    expected = sum(
        ewc_penalty(_params(model), a, f, 7.0) for a, f in zip(plugin.anchors, plugin.fishers, strict=True)
    )
    term = plugin.litplug_extra_losses(module, "train")["ewc"]
    assert term.item() == pytest.approx(expected.item(), rel=1e-5) and term.item() > 0
    assert plugin.litplug_extra_losses(module, "val") is None


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"ewc_lambda": -1.0}, "ewc_lambda"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 1.5}, "gamma"),
        ({"num_samples": 0}, "num_samples"),
        ({"estimator": "fisherish"}, "estimator"),
        ({"mode": "both"}, "mode"),
        ({"method": "loop"}, "method"),
        ({"fisher_batch_size": 0}, "fisher_batch_size"),
        ({"fisher_batch_size": 2.5}, "fisher_batch_size"),
    ],
)
def test_bad_arguments_name_the_plugin_and_argument(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(PluginConfigError, match=f"'ewc': argument '{argument}'"):
        EWC(**kwargs)


# -- runs: forgetting and resume ------------------------------------------------------------------


def _permuted(epochs: int = 2) -> PermutedDigitsDataModule:
    return PermutedDigitsDataModule(num_tasks=2, epochs_per_task=epochs, batch_size=64, seed=0)


def _module(plugins: list[Any]) -> LitplugModule:
    return LitplugModule(
        MLP(64, [64], 10), plugins=plugins, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)
    )


def test_ewc_reduces_forgetting_on_two_permuted_tasks() -> None:
    forgetting = {}
    for name, plugins in (("naive", []), ("ewc", [EWC(ewc_lambda=100.0, num_samples=300)])):
        L.seed_everything(0)
        trainer = quiet_trainer(
            callbacks=[ContinualLearning(results_file=None, heatmap=False)], limit_val_batches=0
        )
        results = fit_continual(_module(plugins), _permuted(epochs=3), trainer=trainer)
        forgetting[name] = results.summary()["forgetting"]
    assert forgetting["naive"] > 0.2
    assert forgetting["ewc"] < 0.5 * forgetting["naive"], forgetting


def _resumable_run(tmp_path: Path, callbacks: list[Callback], ckpt: Path | None) -> tuple[LitplugModule, Any]:
    L.seed_everything(0)
    module = _module([EWC(ewc_lambda=50.0, num_samples=200)])
    driver = ContinualLearning(results_file=None, heatmap=False)
    trainer = quiet_trainer(
        callbacks=[driver, *callbacks],
        limit_val_batches=0,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        deterministic=True,
    )
    try:
        trainer.fit(module, datamodule=_permuted(epochs=2), ckpt_path=ckpt)
    except Killed:
        pass
    return module, driver


def test_a_run_killed_in_task_one_resumes_to_identical_weights_and_ewc_state(tmp_path: Path) -> None:
    reference, ref_driver = _resumable_run(tmp_path, [], None)
    steps_per_epoch = 20  # 1257 training digits at batch 64
    kill_at = 2 * steps_per_epoch + 5  # inside task 1, after task 0's Fisher
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=kill_at - 1, save_top_k=-1)
    _resumable_run(tmp_path, [saver, KillAtStep(kill_at)], None)
    checkpoint = tmp_path / f"epoch=2-step={kill_at - 1}.ckpt"
    assert checkpoint.exists(), sorted(p.name for p in tmp_path.iterdir())
    resumed, res_driver = _resumable_run(tmp_path, [], checkpoint)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    ref_ewc, res_ewc = reference.get_plugin("ewc"), resumed.get_plugin("ewc")
    assert ref_ewc.tasks == res_ewc.tasks == [0, 1]
    for a, b in zip(ref_ewc.fishers + ref_ewc.anchors, res_ewc.fishers + res_ewc.anchors, strict=True):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert ref_driver.matrix == res_driver.matrix and len(ref_driver.matrix) == 2


class _TrainerWithOptimizer:
    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizers = [optimizer]


def test_task_end_warns_when_sgd_would_diverge_on_the_penalty() -> None:
    """lr * lambda * max F > 2 (1 + momentum): plain gradient descent on the quadratic diverges."""
    torch.manual_seed(0)
    model = MLP(64, [8], 10)
    module = _FakeModule(model)
    batches = _batches((64,))
    stable = EWC(ewc_lambda=1.0, num_samples=None)
    stable.litplug_on_task_end(module, 0, batches)
    curvature = stable.curvature()
    fisher_max = max(float(f.max()) for f in stable.fishers[0].values())
    assert curvature == pytest.approx(fisher_max)
    lr = 1.0 / curvature  # lr * curvature = 1 < 2: fine
    module._trainer = _TrainerWithOptimizer(torch.optim.SGD(model.parameters(), lr=lr))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EWC(ewc_lambda=1.0, num_samples=None).litplug_on_task_end(module, 0, batches)
    module._trainer = _TrainerWithOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EWC(ewc_lambda=3.0, num_samples=None).litplug_on_task_end(module, 0, batches)  # 3 < 2 (1 + 0.9)
    module._trainer = _TrainerWithOptimizer(torch.optim.SGD(model.parameters(), lr=lr))
    with pytest.warns(RuntimeWarning, match="'ewc'.*stability limit"):
        EWC(ewc_lambda=3.0, num_samples=None).litplug_on_task_end(module, 0, batches)  # 3 > 2


# -- diagnostics ----------------------------------------------------------------------------------


def test_task_end_statistics_are_the_fisher_magnitudes_of_the_task_and_of_the_penalty() -> None:
    torch.manual_seed(0)
    model = MLP(64, [8], 10)
    module = _FakeModule(model)  # no trainer: statistics are kept, nothing is logged
    batches = _batches((64,))
    for mode in ("separate", "online"):
        plugin = EWC(ewc_lambda=3.0, mode=mode, gamma=0.5, num_samples=None)
        plugin.litplug_on_task_end(module, 0, batches)
        first = torch.cat([f.reshape(-1) for f in plugin.fishers[0].values()]).clone()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.2)
        plugin.litplug_on_task_end(module, 1, batches)
        task = torch.cat([f.reshape(-1) for f in fisher_diagonal(model, batches, "empirical").values()])
        penalty = task + first if mode == "separate" else task + 0.5 * first
        stats = plugin.last_fisher_statistics
        assert stats["ewc/task"] == 1.0
        for label, values in (("fisher", task), ("fisher_penalty", penalty)):
            assert stats[f"ewc/{label}_mean"] == pytest.approx(float(values.mean()), rel=1e-5), (mode, label)
            assert stats[f"ewc/{label}_max"] == pytest.approx(float(values.max()), rel=1e-5), (mode, label)
            assert stats[f"ewc/{label}_sum"] == pytest.approx(float(values.sum()), rel=1e-5), (mode, label)
        assert stats["ewc/curvature"] == pytest.approx(3.0 * float(penalty.max()), rel=1e-5)


def test_a_plain_csv_run_logs_the_fisher_magnitude_at_every_task_end(tmp_path: Path) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0)
    plugin = EWC(ewc_lambda=10.0, num_samples=64)
    trainer = quiet_trainer(
        callbacks=[ContinualLearning(results_file=None, heatmap=False)],
        limit_val_batches=0,
        limit_train_batches=2,
        logger=CSVLogger(tmp_path, name="csv"),
    )
    fit_continual(_module([plugin]), _permuted(epochs=1), trainer=trainer)
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    logged = [row for row in rows if row.get("ewc/fisher_mean")]
    assert [float(row["ewc/task"]) for row in logged] == [0.0, 1.0]
    assert [int(row["step"]) for row in logged] == [2, 4]  # the global step at each task end
    for key, value in plugin.last_fisher_statistics.items():
        assert float(logged[-1][key]) == pytest.approx(value, rel=1e-6), key
    assert float(logged[0]["ewc/fisher_sum"]) > 0


# -- DDP: the Fisher is averaged across ranks -----------------------------------------------------


def _fisher_worker(rank: int, store: str, out_dir: str) -> None:
    """One rank of a 2-process gloo group: task end on rows rank, rank+2, ... of every batch."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = MLP(64, [8], 10)
        shard = [(x[rank::2], y[rank::2]) for x, y in _batches((64,), n=24, batch=12)]
        plugin = EWC(ewc_lambda=1.0, num_samples=None)
        plugin.litplug_on_task_end(_FakeModule(model), 0, shard)
        torch.save(
            {"fisher": plugin.fishers[0], "statistics": plugin.last_fisher_statistics},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_under_two_processes_the_fisher_is_the_mean_of_the_ranks_and_equal_on_both(tmp_path: Path) -> None:
    """Issue 3: under DDP the Fisher is averaged across ranks. Equal shards: the mean of the two
    shards' Fishers is the Fisher of the whole batch, and both ranks hold exactly the same one."""
    torch.multiprocessing.spawn(
        _fisher_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["statistics"] == ranks[1]["statistics"]
    torch.manual_seed(0)
    model = MLP(64, [8], 10)
    batches = _batches((64,), n=24, batch=12)
    whole = fisher_diagonal(model, batches, "empirical")
    shard0 = fisher_diagonal(model, [(x[0::2], y[0::2]) for x, y in batches], "empirical")
    for name, value in whole.items():
        assert torch.equal(ranks[0]["fisher"][name], ranks[1]["fisher"][name]), name
        torch.testing.assert_close(ranks[0]["fisher"][name], value, rtol=1e-5, atol=1e-8)
    assert not all(torch.allclose(shard0[n], whole[n], rtol=1e-3) for n in whole)  # shards differ


# -- penalty_via: gradient injection vs backpropagated loss ---------------------------------------


def _two_task_weights(
    penalty_via: str, ewc_lambda: float = 50.0, **trainer_kwargs: Any
) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = _module([EWC(ewc_lambda=ewc_lambda, num_samples=200, penalty_via=penalty_via)])
    trainer = quiet_trainer(
        callbacks=[ContinualLearning(results_file=None, heatmap=False)],
        limit_val_batches=0,
        deterministic=True,
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=_permuted(epochs=1))
    assert module.get_plugin("ewc").tasks == [0, 1]
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "trainer_kwargs",
    # 20 batches per epoch: accumulating 4 never leaves a partial step at an epoch end (there the
    # backpropagated penalty would count only the micro-batches seen, the injected one in full)
    [{}, {"accumulate_grad_batches": 4, "gradient_clip_val": 0.5}],
    ids=["plain", "accumulation+clipping"],
)
def test_gradient_injection_trains_like_the_backpropagated_penalty(trainer_kwargs: dict[str, Any]) -> None:
    by_loss = _two_task_weights("loss", **trainer_kwargs)
    by_gradient = _two_task_weights("gradient", **trainer_kwargs)
    naive = _two_task_weights("gradient", ewc_lambda=0.0, **trainer_kwargs)
    for key, value in by_loss.items():
        torch.testing.assert_close(by_gradient[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(by_loss[k], naive[k]) for k in by_loss)


def test_gradient_injection_adds_the_closed_form_gradient_and_reaches_unused_parameters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    plugin = EWC(ewc_lambda=3.0)
    center = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    plugin.anchors, plugin.fishers, plugin.tasks = [center], [fisher], [0]
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)  # steps the first layer only
    model[0](torch.randn(5, 4)).sum().backward()  # the second layer gets no gradient from the loss
    before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    plugin.add_penalty_gradient(model, optimizer)
    for name, p in model.named_parameters():
        expected_penalty = 3.0 * fisher[name] * (p.detach() - center[name])
        if name.startswith("0."):
            torch.testing.assert_close(p.grad, before[name] + expected_penalty)
        else:  # not in the optimizer: left alone
            assert p.grad is None
    plugin.add_penalty_gradient(model)  # no optimizer: every penalised parameter
    torch.testing.assert_close(
        model[1].weight.grad, 3.0 * fisher["1.weight"] * (model[1].weight - center["1.weight"])
    )


def test_gradient_injection_follows_a_new_optimizer_and_a_new_task() -> None:
    """add_penalty_gradient caches the optimizer's parameters: a new optimizer, or a task end that
    changes the anchor, must be picked up on the next step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    plugin = EWC(ewc_lambda=2.0)
    center = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    plugin.anchors, plugin.fishers, plugin.tasks = [center], [fisher], [0]

    def injected(optimizer: torch.optim.Optimizer) -> dict[str, Tensor | None]:
        model.zero_grad(set_to_none=True)
        plugin.add_penalty_gradient(model, optimizer)
        return {n: p.grad for n, p in model.named_parameters()}

    first_only = injected(torch.optim.SGD(model[0].parameters(), lr=0.1))
    assert first_only["1.weight"] is None and first_only["0.weight"] is not None
    both = injected(torch.optim.SGD(model.parameters(), lr=0.1))
    for name, p in model.named_parameters():
        torch.testing.assert_close(both[name], 2.0 * fisher[name] * (p.detach() - center[name]))
    # a new anchor at the current weights: the penalty's gradient there is zero (to rounding)
    plugin.anchors = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    plugin._merged = None
    at_anchor = injected(torch.optim.SGD(model.parameters(), lr=0.1))
    for grad in at_anchor.values():
        assert grad is not None and float(grad.abs().max()) < 1e-6


def test_gradient_injection_in_half_precision_takes_the_exact_form() -> None:
    """bfloat16 parameters near their anchor: ``G * theta - G * center`` would carry rounding noise
    of ~eps * |G * theta| (eps = 2^-8), many times the penalty's gradient ``G * (theta - center)``
    itself here; the exact form is within one bfloat16 rounding of the float64 value."""
    torch.manual_seed(0)
    model = nn.Linear(16, 8).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.5 * torch.rand(p.shape))
    plugin = EWC(ewc_lambda=50.0)
    plugin.anchors = [{n: (p.detach().float() + 0.02).bfloat16() for n, p in model.named_parameters()}]
    plugin.fishers = [{n: 1.0 + 10 * torch.rand(p.shape) for n, p in model.named_parameters()}]
    plugin.tasks = [0]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    plugin.add_penalty_gradient(model)
    for name, p in model.named_parameters():
        scaled_fisher = (50.0 * plugin.fishers[0][name]).bfloat16().double()
        expected = scaled_fisher * (p.detach().double() - plugin.anchors[0][name].double())
        torch.testing.assert_close(p.grad.double(), expected, rtol=1e-2, atol=0.0, msg=name)


def test_the_logged_term_is_the_penalty_value_in_both_modes() -> None:
    torch.manual_seed(0)
    model = MLP(8, [6], 3)
    params = dict(model.named_parameters())
    center = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in params.items()}
    fisher = {n: torch.rand_like(p) for n, p in params.items()}
    module = type("M", (), {"model": model})()
    values = {}
    for via in ("loss", "gradient"):
        plugin = EWC(ewc_lambda=7.0, penalty_via=via)
        plugin.anchors, plugin.fishers, plugin.tasks = [center], [fisher], [0]
        values[via] = plugin.litplug_extra_losses(module, "train")["ewc"]
    assert values["loss"].requires_grad and not values["gradient"].requires_grad
    torch.testing.assert_close(values["gradient"], values["loss"].detach())
    torch.testing.assert_close(values["loss"].detach(), ewc_penalty(params, center, fisher, 7.0).detach())


def test_a_fit_without_task_ends_warns_that_ewc_does_nothing() -> None:
    from litplug.core.data import DigitsDataModule

    data = DigitsDataModule(batch_size=64, form="flat")
    with pytest.warns(UserWarning, match="plugin 'ewc' .* no ContinualLearning callback"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(_module([EWC()]), datamodule=data)
    driver = ContinualLearning(results_file=None, heatmap=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no ContinualLearning callback")
        trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[driver])
        trainer.fit(_module([EWC()]), datamodule=_permuted())
