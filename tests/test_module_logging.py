"""Named loss terms are logged on Lightning's logging steps only (each ``self.log`` costs ~0.1 ms)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from helpers import quiet_trainer
from torch import Tensor

from litplug.core.data import DigitsDataModule
from litplug.core.hookspecs import hookimpl
from litplug.core.models import MLP
from litplug.core.module import LitplugModule
from litplug.core.plugin import Plugin


class _ConstantTerm(Plugin):
    """Adds a constant named loss term."""

    name = "constant_term"

    @hookimpl
    def litplug_extra_losses(self, module: Any, stage: str) -> dict[str, Tensor] | None:
        return {"const": torch.tensor(0.5)} if stage == "train" else None


def test_named_terms_are_logged_on_logging_steps_only() -> None:
    L.seed_everything(0)
    module = LitplugModule(MLP(64, [16], 10), plugins=[_ConstantTerm()])
    logged: list[tuple[str, int]] = []
    real_log = module.log

    def spy(name: str, *args: Any, **kwargs: Any) -> None:
        logged.append((name, module.trainer.global_step))
        real_log(name, *args, **kwargs)

    module.log = spy  # type: ignore[method-assign]
    trainer = quiet_trainer(max_steps=9, log_every_n_steps=4, limit_val_batches=0)
    trainer.fit(module, DigitsDataModule(form="flat", batch_size=32))
    # The total every step; the named terms at the steps Lightning writes (global_step 3 and 7 before
    # the optimizer step, i.e. the 4th and 8th batch).
    assert [step for name, step in logged if name == "train/loss"] == list(range(9))
    assert [step for name, step in logged if name == "train/loss_const"] == [3, 7]
    assert [step for name, step in logged if name == "train/loss_main"] == [3, 7]
