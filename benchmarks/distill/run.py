"""Distillation: a small student (MLP 64-64-10) trained alone vs distilled from the shipped ensemble teacher.

python benchmarks/distill/run.py            # full run (a minute or two on 2 CPU cores), writes RESULTS.md
python benchmarks/distill/run.py --quick    # smoke run, prints only
"""

from __future__ import annotations

import argparse
import statistics
from datetime import date
from pathlib import Path

import lightning as L
import torch

from litplug.core.data import DigitsDataModule
from litplug.core.models import MLP
from litplug.core.module import LitplugModule
from litplug.plugins.distill import Distill
from litplug.plugins.ensemble import DeepEnsemble

RESULTS = Path(__file__).with_name("RESULTS.md")
TEACHER = "plugins/distill/assets/digits_ensemble3_mlp128.pt"
METRICS = ("acc", "nll", "ece", "brier")


def fit_and_test(plugins: list, seed: int, epochs: int) -> dict[str, float]:
    L.seed_everything(seed)
    module = LitplugModule(MLP(64, [64]), plugins=plugins, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    data = DigitsDataModule(batch_size=64)  # split seed 0: the teacher's split (no test leakage)
    trainer.fit(module, datamodule=data)
    result = trainer.test(module, datamodule=data, verbose=False)[0]
    return {m: float(result[f"test/{m}"]) for m in METRICS}


def teacher_plugin(temperature: float, alpha: float) -> Distill:
    return Distill(
        TEACHER,
        teacher_model=MLP(64, [128]),
        teacher_plugins=[DeepEnsemble(3, path="sequential")],
        temperature=temperature,
        alpha=alpha,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    seeds, epochs = ((0,), 2) if args.quick else ((0, 1, 2), 15)
    variants = {"student alone": lambda: [], "distilled T=4 a=0.9": lambda: [teacher_plugin(4.0, 0.9)]}
    rows = {name: [fit_and_test(make(), s, epochs) for s in seeds] for name, make in variants.items()}
    lines = ["| student | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, results in rows.items():
        cells = [f"{statistics.mean(r[m] for r in results):.4f}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    report = "\n".join(lines)
    print(report)
    if not args.quick:
        RESULTS.write_text(
            f"# Distillation\n\nCommand: `python benchmarks/distill/run.py` ({date.today().isoformat()}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads). Student MLP 64-64-10, Adam 1e-3, batch 64, "
            f"{epochs} epochs, seeds {list(seeds)} (means), digits test split (seed 0, the teacher's split). "
            f"Teacher: the shipped 3 x MLP 64-128-10 ensemble.\n\n{report}\n"
        )


if __name__ == "__main__":
    main()
