"""Does ``LitplugModule(compile_model=True)`` pay on a CPU? Eager vs compiled, side by side.

    python benchmarks/compile/run.py            # ~3-5 minutes on 2 CPU cores
    python benchmarks/compile/run.py --quick    # smoke run

Three of the shipped configs' models, each trained with its plugins through Lightning, eager and
compiled (``torch.compile`` of the network after the plugins' model surgery), in alternating fits
(A B A B ...) so machine load hits both alike. Per fit: the time to the end of the first training
step (the compiled one includes compiling) and the median step time after a warm-up. The final
training loss of each pair is compared too: compiling should not change what is learned.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
import torch._functorch.config
import torch._inductor.config
from lightning.pytorch.callbacks import Callback

from litplug.core.data import DigitsDataModule
from litplug.core.models import MLP, LSTMClassifier, SmallCNN
from litplug.core.module import LitplugModule
from litplug.core.plugin import Plugin
from litplug.plugins.binary_gates import BinaryGatesPlugin
from litplug.plugins.ghost_bn import GhostBatchNormPlugin

HERE = Path(__file__).resolve().parent
WARMUP_STEPS = 5  # not counted in the median: compiling (and recompiling for a last short batch)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], tuple[torch.nn.Module, list[Plugin], DigitsDataModule]]
    optimizer: Callable[..., torch.optim.Optimizer]


CASES = [
    Case(
        "MLP 64-256-256-10, batch 64 (configs/quickstart.yaml)",
        lambda: (MLP(64, [256, 256], 10), [], DigitsDataModule(batch_size=64, form="flat")),
        lambda params: torch.optim.Adam(params, lr=1e-3),
    ),
    Case(
        "SmallCNN(width=32) + ghost_bn g=32, batch 512 (configs/ghost_bn.yaml)",
        lambda: (
            SmallCNN(in_channels=1, num_classes=10, width=32, batch_norm=True),
            [GhostBatchNormPlugin(ghost_batch_size=32)],
            DigitsDataModule(batch_size=512, form="image"),
        ),
        lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.9),
    ),
    Case(
        "LSTM(64) on digit rows + binary_gates, batch 64 (configs/binary_gates.yaml)",
        lambda: (
            LSTMClassifier(input_size=8, hidden_size=64, num_classes=10),
            [BinaryGatesPlugin(p=0.2, tau=1.0, gates=["input", "forget"])],
            DigitsDataModule(batch_size=64, form="rows"),
        ),
        lambda params: torch.optim.Adam(params, lr=5e-3),
    ),
]


class StepTimer(Callback):
    def __init__(self) -> None:
        self.start = 0.0
        self.ends: list[float] = []

    def on_train_start(self, *args: object) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args: object) -> None:
        self.ends.append(time.perf_counter())


@dataclass(frozen=True)
class Fit:
    first_step_s: float
    step_times_s: list[float]
    final_loss: float


def time_fit(case: Case, compiled: bool, steps: int) -> Fit:
    L.seed_everything(0)
    model, plugins, data = case.build()
    module = LitplugModule(model, plugins=plugins, optimizer=case.optimizer, compile_model=compiled)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=data)
    step_times = [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)][WARMUP_STEPS:]
    return Fit(timer.ends[0] - timer.start, step_times, float(trainer.callback_metrics["train/loss"]))


def measure(case: Case, rounds: int, steps: int) -> dict[str, list[Fit]]:
    fits: dict[str, list[Fit]] = {"eager": [], "compiled": []}
    for _ in range(rounds):
        for kind in fits:
            torch._dynamo.reset()  # every compiled fit compiles from nothing, as a new run would
            fits[kind].append(time_fit(case, kind == "compiled", steps))
    return fits


def row(case: Case, fits: dict[str, list[Fit]]) -> str:
    eager = statistics.median(t for fit in fits["eager"] for t in fit.step_times_s)
    compiled = statistics.median(t for fit in fits["compiled"] for t in fit.step_times_s)
    first_eager = statistics.median(fit.first_step_s for fit in fits["eager"])
    first_compiled = statistics.median(fit.first_step_s for fit in fits["compiled"])
    loss_gap = max(
        abs(a.final_loss - b.final_loss) for a, b in zip(fits["eager"], fits["compiled"], strict=True)
    )
    breakeven = (first_compiled - first_eager) / (eager - compiled) if compiled < eager else float("inf")
    return (
        f"| {case.name} | {eager * 1e3:.2f} | {compiled * 1e3:.2f} | {compiled / eager:.2f}x | "
        f"{first_eager:.2f} | {first_compiled:.2f} | "
        f"{'never' if breakeven == float('inf') else f'{breakeven:.0f}'} | {loss_gap:.1e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 12
    torch.set_num_threads(2)
    # Compile from nothing in every fit, as a new run on a new machine would: no on-disk caches.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    started = time.perf_counter()
    rows = [row(case, measure(case, args.rounds, args.steps)) for case in CASES]
    command = "python benchmarks/compile/run.py" + (" --quick" if args.quick else "")
    if not args.quick and (args.rounds, args.steps) != (4, 100):
        command += f" --rounds {args.rounds} --steps {args.steps}"
    lines = [
        "# torch.compile of the network (`compile_model=True`) against eager, on a CPU",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; wall time {time.perf_counter() - started:.0f} s",
        f"- torch {torch.__version__}; lightning {L.__version__}; {torch.get_num_threads()} torch threads; "
        f"{os.cpu_count()} CPUs; {platform.machine()}",
        f"- Each model trained with its plugins through Lightning, {args.rounds} alternating rounds of an "
        f"eager and a compiled fit of {args.steps} steps; step times are medians over every step after "
        f"the first {WARMUP_STEPS} of each fit; the first step's time includes compiling from nothing "
        "(`torch._dynamo.reset()` before every fit, inductor's on-disk caches off). Break-even: steps after which compiling has paid "
        "for itself. Loss gap: the largest difference in final training loss of a pair.",
        "",
        "| model and plugins | eager step ms | compiled step ms | compiled / eager | eager first step s "
        "| compiled first step s | break-even steps | loss gap |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    (HERE / ("RESULTS.quick.md" if args.quick else "RESULTS.md")).write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
