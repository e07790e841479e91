"""What do DataLoader workers cost on litplug's in-memory data, and what does keeping them save?

    python benchmarks/data_loading/run.py            # ~1-2 minutes on 2 CPU cores
    python benchmarks/data_loading/run.py --quick    # smoke run

The quickstart model (MLP 64-64-10 on digits, batch 64, validation every epoch) fitted for a few
short epochs three ways, in alternating rounds so machine load hits all alike: no workers, 2
workers started again for every loader pass (DataLoader's default), and 2 persistent workers
(``persistent_workers=True``). Reported: the median wall time of a fit, and its final validation
accuracy (the three must train on the same batches, so it must be identical).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch

from litplug.core.data import DigitsDataModule
from litplug.core.models import MLP
from litplug.core.module import LitplugModule

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "no workers": {"num_workers": 0},
    "2 workers, restarted each pass": {"num_workers": 2},
    "2 persistent workers": {"num_workers": 2, "persistent_workers": True},
}


def fit_seconds(epochs: int, loader_options: dict[str, object]) -> tuple[float, float]:
    """Wall time of one fit and its final validation accuracy."""
    L.seed_everything(0, verbose=False)
    module = LitplugModule(MLP(64, [64]), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    started = time.perf_counter()
    trainer.fit(module, DigitsDataModule(batch_size=64, **loader_options))  # type: ignore[arg-type]
    return time.perf_counter() - started, float(trainer.callback_metrics["val/acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 2 epochs (a smoke run)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    rounds, epochs = (1, 2) if args.quick else (args.rounds, args.epochs)
    started = time.perf_counter()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    accuracy: dict[str, set[float]] = {name: set() for name in VARIANTS}
    for _ in range(rounds):
        for name, options in VARIANTS.items():
            seconds, acc = fit_seconds(epochs, options)
            times[name].append(seconds)
            accuracy[name].add(round(acc, 6))
    baseline = statistics.median(times["no workers"])
    rows = [
        f"| {name} | {statistics.median(t):.2f} | {min(t):.2f}-{max(t):.2f} | "
        f"{statistics.median(t) / baseline:.2f}x | {', '.join(f'{a:.4f}' for a in sorted(accuracy[name]))} |"
        for name, t in times.items()
    ]
    command = "python benchmarks/data_loading/run.py" + (" --quick" if args.quick else "")
    lines = [
        "# DataLoader workers on litplug's in-memory data",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; wall time {time.perf_counter() - started:.0f} s",
        f"- torch {torch.__version__}; lightning {L.__version__}; {os.cpu_count()} CPUs; {platform.machine()}",
        f"- The quickstart model (MLP 64-64-10, digits, batch 64: 20 training and 5 validation batches "
        f"per epoch), {epochs} epochs per fit, {rounds} alternating rounds of the three variants.",
        "",
        "| loaders | median fit s | range s | / no workers | final val acc |",
        "|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    (HERE / ("RESULTS.quick.md" if args.quick else "RESULTS.md")).write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
