"""EMA of the weights (plugins/ema): the formula, warmup, the eval-time swap, checkpoint state."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from litplug.core.data import DigitsDataModule
from litplug.core.errors import PluginConfigError
from litplug.core.models import MLP
from litplug.core.module import LitplugModule
from litplug.plugins.ema import EMA, ema_decay, ema_update_reference, make_averaged_model


def test_decay_warmup_schedule() -> None:
    assert ema_decay(0.999, 1, warmup=True) == pytest.approx(2 / 11)
    assert ema_decay(0.999, 100, warmup=True) == pytest.approx(101 / 110)
    assert ema_decay(0.99, 10_000, warmup=True) == 0.99
    assert ema_decay(0.999, 1, warmup=False) == 0.999


@pytest.mark.parametrize("warmup", [False, True])
def test_averaged_model_follows_the_formula(warmup: bool) -> None:
    torch.manual_seed(0)
    model = MLP(4, [3], batch_norm=True)
    averaged = make_averaged_model(model, decay=0.9, warmup=warmup, use_buffers=True)
    expected: list[torch.Tensor] | None = None
    for t in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(5, 4))  # moves BatchNorm statistics and num_batches_tracked
        current = [p.detach().clone() for p in model.parameters()]
        if expected is None:
            expected = current  # the first update copies
        else:
            d = ema_decay(0.9, t, warmup)
            expected = [ema_update_reference(e, c, d) for e, c in zip(expected, current, strict=True)]
        averaged.update_parameters(model)
    for got, want in zip(averaged.module.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want)
    norm = averaged.module.body[2]
    assert int(norm.num_batches_tracked) == 6  # integer buffers are copied, not blended


def test_bad_arguments_name_the_plugin_and_argument() -> None:
    with pytest.raises(PluginConfigError, match="'ema'.*decay"):
        EMA(decay=1.0)
    with pytest.raises(PluginConfigError, match="update_every_n_steps"):
        EMA(update_every_n_steps=0)
    with pytest.raises(PluginConfigError, match="start_step"):
        EMA(start_step=-1)


def test_update_schedule() -> None:
    plugin = EMA(update_every_n_steps=3, start_step=2)
    assert [s for s in range(10) if plugin.should_update(s)] == [2, 5, 8]


class _RecordWeights(Callback):
    """Weights after every optimizer step (callbacks' batch end runs after the step)."""

    def __init__(self) -> None:
        self.history: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.history.append([p.detach().clone() for p in pl_module.model.parameters()])


def _fit(
    plugin: EMA, tmp_path: Path, steps: int = 6, callbacks: list[Callback] | None = None
) -> LitplugModule:
    L.seed_everything(0)
    module = LitplugModule(MLP(64, [16]), plugins=[plugin], optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    callbacks = callbacks or []
    trainer = quiet_trainer(
        max_steps=steps,
        limit_val_batches=0,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    return module


def test_plugin_average_equals_a_hand_ema_of_the_training_weights(tmp_path: Path) -> None:
    recorder = _RecordWeights()
    plugin = EMA(decay=0.8, warmup=False, update_every_n_steps=2)
    _fit(plugin, tmp_path, steps=7, callbacks=[recorder])
    updates = [w for step, w in enumerate(recorder.history) if step % 2 == 0]  # steps 0, 2, 4, 6
    expected = updates[0]
    for weights in updates[1:]:
        expected = [ema_update_reference(e, w, 0.8) for e, w in zip(expected, weights, strict=True)]
    assert plugin.num_updates == 4
    for got, want in zip(plugin.averaged.module.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_evaluation_uses_the_average_and_restores_the_training_weights(tmp_path: Path) -> None:
    plugin = EMA(decay=0.9)
    module = _fit(plugin, tmp_path)
    training = [p.detach().clone() for p in module.model.parameters()]
    averaged_model = copy.deepcopy(plugin.averaged.module)
    data = DigitsDataModule(batch_size=64)
    metrics = quiet_trainer().validate(module, datamodule=data, verbose=False)[0]
    for p, saved in zip(module.model.parameters(), training, strict=True):
        assert torch.equal(p, saved)  # bit-exact restore
    x, y = data.val_dataloader().dataset.tensors
    with torch.no_grad():
        ema_loss = torch.nn.functional.cross_entropy(averaged_model.eval()(x), y).item()
        live_loss = torch.nn.functional.cross_entropy(module.model.eval()(x), y).item()
    assert metrics["val/loss"] == pytest.approx(ema_loss, rel=1e-5)
    assert ema_loss != pytest.approx(live_loss, rel=1e-3)
    assert metrics["val/ema_updates"] == 6


def test_predictions_come_from_the_average_like_the_test_metrics(tmp_path: Path) -> None:
    module = _fit(EMA(decay=0.9), tmp_path)
    training = [p.detach().clone() for p in module.model.parameters()]
    data = DigitsDataModule(batch_size=64)
    test_nll = quiet_trainer().test(module, datamodule=data, verbose=False)[0]["test/nll"]
    probs = torch.cat(quiet_trainer().predict(module, datamodule=data))  # type: ignore[arg-type]
    _, y = data.test_dataloader().dataset.tensors
    predicted_nll = torch.nn.functional.nll_loss(probs.log(), y).item()
    assert predicted_nll == pytest.approx(test_nll, rel=1e-5)  # live weights give another NLL
    for p, saved in zip(module.model.parameters(), training, strict=True):
        assert torch.equal(p, saved)


def test_the_average_survives_a_checkpoint_and_serves_a_test_run(tmp_path: Path) -> None:
    plugin = EMA(decay=0.9)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    module = _fit(plugin, tmp_path, steps=6, callbacks=[saver])
    checkpoint = torch.load(tmp_path / "epoch=0-step=6.ckpt", weights_only=True)
    state = checkpoint["litplug"]["plugins"]["ema"]["state"]
    assert int(state["averaged"]["n_averaged"]) == 6  # the update of the saving step is included
    assert state["last_update_step"] == 6
    restored = EMA(decay=0.9)
    fresh = LitplugModule(MLP(64, [16]), plugins=[restored])
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert restored.has_average() and restored.num_updates == 6
    data = DigitsDataModule(batch_size=64)
    got = quiet_trainer().test(fresh, datamodule=data, verbose=False)[0]["test/loss"]
    want = quiet_trainer().test(module, datamodule=data, verbose=False)[0]["test/loss"]
    assert got == pytest.approx(want, rel=1e-6)
