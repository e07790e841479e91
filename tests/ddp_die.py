"""A 2-process ddp_spawn run in which rank 1 raises: must exit with that error, not hang."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import DDPStrategy

sys.path.insert(0, str(Path(__file__).parent))

from helpers import DieOnRankOne  # noqa: E402

from litplug.core.data import DigitsDataModule  # noqa: E402
from litplug.core.models import MLP  # noqa: E402
from litplug.core.module import LitplugModule  # noqa: E402

if __name__ == "__main__":
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        # a short collective timeout bounds the wait of the surviving rank even if the launcher did not
        strategy=DDPStrategy(
            start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=60)
        ),
        max_steps=20,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
    )
    trainer.fit(
        LitplugModule(MLP(64, [16]), plugins=[DieOnRankOne()]), datamodule=DigitsDataModule(batch_size=32)
    )
