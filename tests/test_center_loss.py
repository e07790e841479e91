"""Center loss (Wen et al. 2016): penalty and update against hand computations, and the plugin in runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from litplug.core.continual import ContinualLearning, fit_continual
from litplug.core.data.continual import PermutedDigitsDataModule, SplitDigitsDataModule
from litplug.core.models import MLP
from litplug.core.module import LitplugModule
from litplug.plugins.center_loss import CenterLoss
from litplug.plugins.center_loss.functional import (
    apply_center_update,
    center_loss,
    center_statistics,
    update_centers,
)


def test_penalty_is_half_lambda_mean_squared_distance_and_centers_get_no_gradient() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 0])
    centers = torch.tensor([[1.0, 1.0], [0.0, 0.0]], requires_grad=True)
    loss = center_loss(features, labels, centers, strength=0.4)
    expected = 0.5 * 0.4 * (1.0 + 4.0 + 8.0) / 3
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert centers.grad is None
    assert torch.allclose(features.grad[0], 0.4 * (features[0] - centers[0]).detach() / 3)


def test_penalty_is_zero_at_the_centers() -> None:
    centers = torch.randn(3, 5)
    labels = torch.tensor([2, 0, 1, 2])
    assert center_loss(centers[labels], labels, centers, strength=1.0).item() == 0.0


def test_update_matches_the_paper_formula_and_respects_frozen_classes() -> None:
    centers = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    features = torch.tensor([[2.0, 0.0], [4.0, 2.0], [3.0, 3.0]])
    labels = torch.tensor([0, 0, 1])
    alpha = 0.5
    # class 0: n=2, sum(c - h) = (0-2 + 0-4, 0-0 + 0-2) = (-6, -2); delta = (-6, -2) / 3
    expected0 = torch.tensor([0.0, 0.0]) - alpha * torch.tensor([-6.0, -2.0]) / 3
    frozen = torch.tensor([False, True, False])
    update_centers(centers, features, labels, alpha=alpha, frozen=frozen)
    assert torch.allclose(centers[0], expected0)
    assert torch.equal(centers[1], torch.tensor([1.0, 1.0]))  # frozen
    assert torch.equal(centers[2], torch.tensor([5.0, 5.0]))  # no examples: unchanged
    with pytest.raises(ValueError, match="alpha"):
        update_centers(centers, features, labels, alpha=1.5)
    with pytest.raises(ValueError, match="strength"):
        center_loss(features, labels, centers, strength=-1.0)


def test_shard_statistics_add_up_to_the_whole_batch_update() -> None:
    """The update from summed per-shard sums and counts (what DDP all-reduces) is the global one."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 3, generator=generator)
    features = torch.randn(10, 3, generator=generator)
    labels = torch.tensor([0, 0, 1, 3, 3, 3, 0, 1, 3, 0])
    frozen = torch.tensor([False, False, False, True])
    whole = update_centers(centers.clone(), features, labels, 0.5, frozen)
    shards = [center_statistics(features[r::2], labels[r::2], 4) for r in range(2)]
    sums, counts = (torch.stack(parts).sum(0) for parts in zip(*shards, strict=True))
    assert counts.tolist() == [4.0, 2.0, 0.0, 4.0]
    combined = apply_center_update(centers.clone(), sums, counts, 0.5, frozen)
    torch.testing.assert_close(combined, whole)
    one_shard = apply_center_update(centers.clone(), *shards[0], 0.5, frozen)
    assert not torch.allclose(one_shard, whole)  # a shard alone gives another update


# -- two processes: every rank applies the global batch's update ------------------------------------


def _plugin_step(plugin: CenterLoss, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step's worth of plugin hooks outside Lightning: forward, loss term, batch end."""

    class _Module:
        num_classes = 10

    _Module.model = model  # type: ignore[attr-defined]
    plugin.litplug_on_fit_start(_Module, (x, y))
    outputs = model(x)
    assert "center" in plugin.litplug_extra_losses(_Module, outputs, y, "train")
    plugin.litplug_on_train_batch_end()


def _two_batches() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = MLP(64, [8], 10)
    generator = torch.Generator().manual_seed(1)
    return model, [
        (torch.randn(12, 64, generator=generator), torch.randint(0, 10, (12,), generator=generator))
        for _ in range(2)
    ]


def _center_worker(rank: int, store: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model, batches = _two_batches()
        plugin = CenterLoss(alpha=0.5)
        for x, y in batches:  # rank r takes the r-th half of each global batch (litplug's sharding)
            _plugin_step(plugin, model, x[6 * rank : 6 * rank + 6], y[6 * rank : 6 * rank + 6])
        torch.save(plugin.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_keep_identical_centers_equal_to_one_process_on_the_global_batch(
    tmp_path: Path,
) -> None:
    torch.multiprocessing.spawn(
        _center_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ("centers", "seen", "frozen"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # bitwise: the same reduced statistics
    model, batches = _two_batches()
    single = CenterLoss(alpha=0.5)
    for x, y in batches:
        _plugin_step(single, model, x, y)
    torch.testing.assert_close(ranks[0]["centers"], single.centers)
    assert torch.equal(ranks[0]["seen"], single.seen)
    model, batches = _two_batches()
    shard_only = CenterLoss(alpha=0.5)
    for x, y in batches:
        _plugin_step(shard_only, model, x[0::2], y[0::2])
    assert not torch.allclose(shard_only.centers, single.centers)  # the test can tell them apart


# -- the plugin inside a real run ------------------------------------------------------------------


class _Snapshots(Callback):
    """Centers at every batch start, the head's input (the feature) and the labels of every step."""

    def __init__(self, plugin: CenterLoss, model: nn.Module) -> None:
        self.plugin = plugin
        self.before: list[torch.Tensor | None] = []
        self.after: list[torch.Tensor] = []
        self.frozen: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.features: list[torch.Tensor] = []
        self.epoch_start: dict[int, torch.Tensor] = {}
        model.head.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if module.training:
            self.features.append(args[0].detach().clone())

    def _centers(self) -> torch.Tensor | None:
        return None if self.plugin.centers is None else self.plugin.centers.clone()

    def on_train_epoch_start(self, trainer: L.Trainer, *args: object) -> None:
        centers = self._centers()
        if centers is not None:
            self.epoch_start[int(trainer.current_epoch)] = centers

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any
    ) -> None:
        self.before.append(self._centers())
        self.frozen.append(None if self.plugin.frozen is None else self.plugin.frozen.clone())
        self.labels.append(batch[1].clone())

    def on_train_batch_end(self, *args: object) -> None:
        self.after.append(self._centers())


def _split_run(plugin: CenterLoss) -> tuple[LitplugModule, _Snapshots, SplitDigitsDataModule, L.Trainer]:
    L.seed_everything(0)
    model = MLP(64, [16], 10)
    module = LitplugModule(model, plugins=[plugin], optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    snapshots = _Snapshots(plugin, model)
    data = SplitDigitsDataModule(
        classes_per_task=5, scenario="class", epochs_per_task=1, batch_size=64, seed=0
    )
    trainer = quiet_trainer(
        callbacks=[ContinualLearning(results_file=None, heatmap=False), snapshots],
        limit_val_batches=0,
        log_every_n_steps=1,  # loss terms are logged on logging steps only
    )
    fit_continual(module, data, trainer=trainer)
    return module, snapshots, data, trainer


def test_plugin_adds_its_term_updates_centers_as_wen_et_al_and_freezes_old_classes_at_task_end() -> None:
    plugin = CenterLoss(center_lambda=0.2, alpha=0.5)
    module, snap, data, trainer = _split_run(plugin)
    assert "train/loss_center" in trainer.callback_metrics  # the named loss term was added and logged
    assert len(snap.features) == len(snap.labels) == len(snap.after)
    # Every step after the first: centers_after = Wen et al.'s update of centers_before with that
    # step's features and labels (frozen classes kept).
    for step in range(1, len(snap.labels)):
        expected = update_centers(
            snap.before[step].clone(), snap.features[step], snap.labels[step], 0.5, snap.frozen[step]
        )
        assert torch.allclose(snap.after[step], expected, atol=1e-6), step
    # Task 0's classes were frozen at its end: unchanged through task 1; task 1's classes moved.
    old, new = data.task_classes[0], data.task_classes[1]
    at_task1_start = snap.epoch_start[1]
    assert torch.equal(plugin.centers[old], at_task1_start[old])
    assert not torch.allclose(plugin.centers[new], at_task1_start[new])
    assert snap.frozen[1] is not None and not snap.frozen[1].any()  # nothing frozen during task 0
    assert snap.frozen[-1][old].all() and not snap.frozen[-1][new].any()  # during task 1: task 0's classes
    assert plugin.frozen.tolist() == [True] * 10  # both tasks ended: every class frozen


def _features_to_centers(
    module: LitplugModule, plugin: CenterLoss, data: PermutedDigitsDataModule
) -> list[float]:
    """Mean squared distance of each task's test features to their class's (frozen) center."""
    features: list[torch.Tensor] = []
    handle = module.model.head.register_forward_pre_hook(lambda m, args: features.append(args[0].detach()))
    module.eval()
    distances = []
    with torch.no_grad():
        for task in range(data.num_tasks):
            features.clear()
            labels = []
            for x, y in data.task_loader(task, "test"):
                module.model(x)
                labels.append(y)
            y = torch.cat(labels)
            distances.append(float((torch.cat(features) - plugin.centers[y]).pow(2).sum(1).mean()))
    handle.remove()
    return distances


def test_center_loss_pulls_new_task_features_to_old_centers_and_changes_forgetting() -> None:
    """Two permuted tasks, seed 3: center_lambda 0 is naive fine-tuning (centers tracked, no pull).

    Measured here (torch 2.13 CPU): forgetting naive 0.122, center loss 0.03; features of task 1 to
    the frozen centers 3.33 vs 1.36. Over seeds 0-3 the forgetting direction was NOT consistent
    (lambda 0.1: 2 of 4 seeds lower), the pull toward the old centers was on every seed, so the pull
    is asserted as the mechanism and the forgetting only as measurably different on this seed.
    """
    results = {}
    for lam in (0.0, 0.1):
        L.seed_everything(3)
        plugin = CenterLoss(center_lambda=lam, alpha=0.5)
        module = LitplugModule(
            MLP(64, [64], 10), plugins=[plugin], optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
        )
        data = PermutedDigitsDataModule(num_tasks=2, epochs_per_task=2, batch_size=64, seed=3)
        trainer = quiet_trainer(
            callbacks=[ContinualLearning(results_file=None, heatmap=False)], limit_val_batches=0
        )
        forgetting = fit_continual(module, data, trainer=trainer).summary()["forgetting"]
        assert plugin.frozen.all()  # domain-incremental: every class's center is frozen after task 0
        results[lam] = (forgetting, _features_to_centers(module, plugin, data))
    (naive_forgetting, naive_dist), (cl_forgetting, cl_dist) = results[0.0], results[0.1]
    assert cl_dist[1] < 0.6 * naive_dist[1], results  # new task's features pulled to the old centers
    assert cl_dist[0] < naive_dist[0], results  # old task's features drifted less from them
    assert abs(cl_forgetting - naive_forgetting) > 0.03, results


# -- freeze_classifier ------------------------------------------------------------------------------


class _WeightsAtEpochStart(Callback):
    """The classifier's and the first layer's weights at every epoch start (one epoch per task)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.head: list[torch.Tensor] = []
        self.body: list[torch.Tensor] = []

    def on_train_epoch_start(self, *args: object) -> None:
        self.head.append(self.model.head.weight.detach().clone())  # type: ignore[union-attr]
        self.body.append(next(self.model.parameters()).detach().clone())


def test_freeze_classifier_keeps_the_head_from_the_first_task_end_on_and_trains_the_rest() -> None:
    plugin = CenterLoss(center_lambda=0.1, freeze_classifier=True)
    L.seed_everything(0)
    model = MLP(64, [16], 10)
    module = LitplugModule(model, plugins=[plugin], optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    weights = _WeightsAtEpochStart(model)
    data = SplitDigitsDataModule(
        classes_per_task=5, scenario="class", epochs_per_task=1, batch_size=64, seed=0
    )
    trainer = quiet_trainer(
        callbacks=[ContinualLearning(results_file=None, heatmap=False), weights], limit_val_batches=0
    )
    fit_continual(module, data, trainer=trainer)
    assert plugin.classifier_frozen and plugin.state_dict()["classifier_frozen"] is True
    assert not any(p.requires_grad for p in model.head.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("head."))
    head_task0_start, head_task1_start = weights.head
    assert not torch.equal(head_task0_start, head_task1_start)  # task 0 trained the head
    assert torch.equal(model.head.weight, head_task1_start)  # task 1 did not
    assert not torch.equal(next(model.parameters()), weights.body[1])  # but trained the features


def test_freeze_classifier_is_restored_from_the_checkpoint_state() -> None:
    model = MLP(64, [16], 10)
    plugin = CenterLoss(freeze_classifier=True)
    plugin.load_state_dict({"centers": None, "seen": None, "frozen": None, "classifier_frozen": True})
    module = LitplugModule(model, plugins=[plugin])
    plugin.litplug_on_fit_start(module, (torch.rand(4, 64), torch.zeros(4, dtype=torch.long)))
    assert not any(p.requires_grad for p in model.head.parameters())
    old = CenterLoss()
    old.load_state_dict({"centers": None, "seen": None, "frozen": None})  # a checkpoint from before the flag
    assert old.classifier_frozen is False


def test_freeze_classifier_needs_the_classifier_input_as_feature() -> None:
    plugin = CenterLoss(freeze_classifier=True, feature_layer="body.1")
    module = LitplugModule(MLP(64, [16], 10), plugins=[plugin])
    with pytest.raises(Exception, match="freeze_classifier"):
        plugin.litplug_check_setup(module)
