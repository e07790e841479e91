"""Resume mid-epoch on another number of processes: 1 -> 2 (ddp_spawn) and 2 -> 1.

Writes, under the output folder given as the only argument, one JSON file per run (and per rank)
with the example indices and (epoch, batch_idx) of every training step; the test reads them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

sys.path.insert(0, str(Path(__file__).parent))

from helpers import BatchRecorder, IndexData  # noqa: E402


class WriteRecord(L.Callback):
    """Saves the recorder's steps as ``<name>-rank<r>.json``: spawned ranks return nothing else."""

    def __init__(self, out: Path, name: str) -> None:
        self.out, self.name = out, name

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, BatchRecorder)
        record = {"seen": pl_module.seen, "batch_indices": pl_module.batch_indices}
        (self.out / f"{self.name}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


def fit(
    out: Path, name: str, devices: int, ckpt_dir: Path | None = None, ckpt_path: Path | None = None
) -> None:
    callbacks: list[L.Callback] = [WriteRecord(out, name)]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(ckpt_dir, "{step}", every_n_train_steps=1, save_top_k=-1))
    strategy: Any = DDPStrategy(start_method="spawn", process_group_backend="gloo") if devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
        default_root_dir=out,
    )
    trainer.fit(BatchRecorder(), IndexData(batch_size=8, seed=5), ckpt_path=ckpt_path)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    fit(out, "one", 1, ckpt_dir=out / "one")  # 5 steps of 8 per epoch
    # 3 steps of 1 x 8 done; the other 16 examples make one step of 2 x 8
    fit(out, "one-to-two", 2, ckpt_dir=out / "two", ckpt_path=out / "one" / "step=3.ckpt")
    # the 2-process run's step 5 is the first of its epoch 1: 16 examples done, 24 left for 1 x 8
    fit(out, "two-to-one", 1, ckpt_path=out / "two" / "step=5.ckpt")
