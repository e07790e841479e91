"""Train the small teacher shipped for configs/distill.yaml and write it as a weights-only checkpoint
(named .pt, not .ckpt: the repository ignores *.ckpt).

    python benchmarks/distill/make_teacher.py   # writes plugins/distill/assets/digits_ensemble3_mlp128.pt

A deep ensemble of 3 MLPs (64-128-10) on the digits, Adam 1e-3, batch 64, 60 epochs, seed 0. (Until
2026-11-29 the asset was the same recipe at 15 epochs: a teacher weaker than the student trained
alone, from which distillation could not help; see benchmarks/distill/RESULTS.md.)
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from litplug.core.data import DigitsDataModule
from litplug.core.models import MLP
from litplug.core.module import LitplugModule
from litplug.plugins.distill import save_teacher_checkpoint
from litplug.plugins.ensemble import DeepEnsemble

ASSET = Path(__file__).resolve().parents[2] / "plugins" / "distill" / "assets" / "digits_ensemble3_mlp128.pt"


def train_teacher(epochs: int = 60, seed: int = 0, members: int = 3, hidden: int = 128) -> LitplugModule:
    """A deep-ensemble teacher trained on the digits (sequential members: the exact CPU path)."""
    L.seed_everything(seed)
    teacher = LitplugModule(
        MLP(64, [hidden]),
        plugins=[DeepEnsemble(num_members=members, path="sequential", reliability_diagram=False)],
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(teacher, datamodule=DigitsDataModule(batch_size=64, seed=seed))
    return teacher


def main() -> None:
    torch.set_num_threads(2)
    teacher = train_teacher()
    path = save_teacher_checkpoint(teacher, ASSET)
    print(f"teacher written to {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
