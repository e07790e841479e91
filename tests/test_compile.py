"""``LitplugModule(compile_model=...)``: the network as the plugins left it, compiled in place."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import KillAtStep, Killed, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch._dynamo.utils import counters

from litplug.core.errors import ModuleConfigError
from litplug.core.examples import example_run
from litplug.core.module import LitplugModule
from litplug.plugins.ema import EMA
from litplug.plugins.ghost_bn import GhostBatchNorm, GhostBatchNormPlugin

STEPS = 6


def _fit(
    compile_model: bool | dict,
    dropout: float = 0.0,
    callbacks: list[L.Callback] | None = None,
    ckpt_path: Path | None = None,
) -> LitplugModule:
    """Ghost batch norm (model surgery) and EMA (weights swapped in for validation) on an MLP with BN."""
    L.seed_everything(0)
    ghost_bn = GhostBatchNormPlugin(ghost_batch_size=16)
    model, data = example_run(ghost_bn, batch_size=64, dropout=dropout)
    module = LitplugModule(model, plugins=[ghost_bn, EMA(decay=0.9)], compile_model=compile_model)
    trainer = quiet_trainer(
        max_steps=STEPS,
        limit_val_batches=2,
        val_check_interval=3,
        callbacks=callbacks or [],
        enable_checkpointing=bool(callbacks),
        deterministic=True,
    )
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except Killed:
        pass
    return module


def test_the_compiled_model_trains_as_the_eager_one_with_the_same_parameter_names() -> None:
    eager = _fit(False)
    torch._dynamo.reset()
    counters.clear()
    compiled = _fit({"dynamic": False})
    assert counters["stats"]["unique_graphs"] > 0  # dynamo did compile the network
    assert compiled.model._compiled_call_impl is not None
    # compiled after the surgery: the ghost layers are what runs
    assert any(isinstance(layer, GhostBatchNorm) for layer in compiled.model.modules())
    expected, got = eager.state_dict(), compiled.state_dict()
    assert expected.keys() == got.keys()  # checkpoints of either load into the other
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    # EMA's average, swapped into the compiled network for validation, gave the same metrics
    averaged = compiled.get_plugin("ema").state_dict()["averaged"]
    for name, value in eager.get_plugin("ema").state_dict()["averaged"].items():
        torch.testing.assert_close(averaged[name], value, rtol=1e-5, atol=1e-6, msg=name)
    validated = compiled.trainer.callback_metrics["val/loss"]
    torch.testing.assert_close(validated, eager.trainer.callback_metrics["val/loss"], rtol=1e-5, atol=1e-6)


def test_a_compiled_run_killed_mid_epoch_resumes_to_identical_weights(tmp_path: Path) -> None:
    """Dropout on: the compiled graph draws its randomness from the restored random state."""
    reference = _fit(True, dropout=0.2)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    _fit(True, dropout=0.2, callbacks=[saver, KillAtStep(3)])
    resumed = _fit(True, dropout=0.2, ckpt_path=tmp_path / "epoch=0-step=2.ckpt")
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), f"{key} differs after resume"


@pytest.mark.parametrize(
    ("compile_model", "problem"),
    [
        (
            {"mod": "max-autotune"},
            "has unknown torch.compile option\\(s\\) \\['mod'\\]; allowed: \\['fullgraph'",
        ),
        ("yes", "must be true/false or a dict of torch.compile options, got 'yes'"),
    ],
)
def test_bad_compile_options_fail_at_construction(compile_model: object, problem: str) -> None:
    model, _ = example_run(None)
    with pytest.raises(ModuleConfigError, match="LitplugModule: argument 'compile_model' " + problem):
        LitplugModule(model, compile_model=compile_model)  # type: ignore[arg-type]
