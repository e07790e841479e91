"""Framework overhead: LitplugModule with no plugins vs a plain LightningModule, side by side.

    python benchmarks/overhead/run.py            # ~1-2 minutes on 2 CPU cores
    python benchmarks/overhead/run.py --quick    # smoke run

Both train the same MLP on the same digits batches with the same optimizer and log the same
training loss; only the module differs. Runs alternate (A B A B ...) so machine load hits both
alike; the per-step time is the median of the steps after a warm-up. Also measures the cost of the
litplug hook calls one training step makes (0 and 3 no-op plugins). Target: <= 1.03x.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from litplug.core.data import DigitsDataModule
from litplug.core.hookspecs import hookimpl
from litplug.core.manager import PluginHooks
from litplug.core.models import MLP
from litplug.core.module import LitplugModule
from litplug.core.plugin import Plugin

HERE = Path(__file__).resolve().parent


class PlainModule(L.LightningModule):
    """What a user would write by hand for the same job."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = F.cross_entropy(self.model(inputs), targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=targets.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, *args: object) -> None:
        self.times.append(time.perf_counter())


def time_fit(kind: str, steps: int, batch_size: int) -> list[float]:
    L.seed_everything(0)
    model = MLP(64, [256, 256])
    module = LitplugModule(model) if kind == "litplug" else PlainModule(model)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=batch_size))
    return [b - a for a, b in zip(timer.times, timer.times[1:], strict=False)][5:]  # drop warm-up steps


class NoOp(Plugin):
    name = "noop"

    def __init__(self, label: str = "noop") -> None:
        self.name = label  # type: ignore[misc]

    @hookimpl
    def litplug_transform_batch(self) -> None: ...

    @hookimpl
    def litplug_extra_losses(self) -> None: ...

    @hookimpl
    def litplug_on_train_batch_end(self) -> None: ...


def hook_cost_per_step(num_plugins: int, repeats: int) -> float:
    """Seconds spent calling the hooks of one training step, with ``num_plugins`` no-op plugins."""
    hooks = PluginHooks([NoOp(f"noop{i}") for i in range(num_plugins)])
    module = LitplugModule(torch.nn.Linear(2, 2))
    batch = (torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    loss = torch.zeros(())
    start = time.perf_counter()
    for _ in range(repeats):
        hooks.transform_batch(module=module, batch=batch, stage="train")
        hooks.compute_loss(module=module, outputs=loss, targets=batch[1], batch=batch, stage="train")
        hooks.extra_losses(module=module, outputs=loss, targets=batch[1], batch=batch, stage="train")
        hooks.on_after_backward(module=module)
        hooks.on_before_optimizer_step(module=module, optimizer=None)  # type: ignore[arg-type]
        hooks.on_train_batch_end(module=module, batch=batch, loss=loss, batch_idx=0)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 20
    torch.set_num_threads(2)
    per_kind: dict[str, list[float]] = {"plain": [], "litplug": []}
    for _ in range(args.rounds):
        for kind in ("plain", "litplug"):
            per_kind[kind].extend(time_fit(kind, args.steps, args.batch_size))
    plain = statistics.median(per_kind["plain"])
    litplug = statistics.median(per_kind["litplug"])
    hook0 = hook_cost_per_step(0, 20_000)
    hook3 = hook_cost_per_step(3, 20_000)
    command = "python benchmarks/overhead/run.py" + (" --quick" if args.quick else "")
    lines = [
        "# Framework overhead: LitplugModule (no plugins) vs a plain LightningModule",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; lightning "
        f"{L.__version__}; {torch.get_num_threads()} threads; {platform.processor() or platform.machine()}  ",
        f"Setup: MLP 64-256-256-10 on digits, batch {args.batch_size}, Adam; {args.rounds} alternating rounds "
        f"x {args.steps} steps per module; median step time after 5 warm-up steps.",
        "",
        "| module | median step (ms) | ratio to plain |",
        "| --- | ---: | ---: |",
        f"| plain LightningModule | {plain * 1e3:.3f} | 1.000 |",
        f"| LitplugModule, no plugins | {litplug * 1e3:.3f} | {litplug / plain:.3f} |",
        "",
        f"Target <= 1.03x: {'met' if litplug / plain <= 1.03 else 'NOT met'}.",
        "",
        "Hook calls of one training step (transform, loss, extra losses, after-backward, before-step, "
        "batch-end), measured in isolation:",
        "",
        "| plugins | microseconds per step |",
        "| ---: | ---: |",
        f"| 0 | {hook0 * 1e6:.1f} |",
        f"| 3 no-op | {hook3 * 1e6:.1f} |",
        "",
        "LitplugModule also computes validation metrics (accuracy, NLL, ECE, Brier) that the plain module "
        "does not; validation is off here so only the training step is compared.",
    ]
    text = "\n".join(lines) + "\n"
    (HERE / ("RESULTS.quick.md" if args.quick else "RESULTS.md")).write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
