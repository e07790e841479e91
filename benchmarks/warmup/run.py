"""LEGW vs plain large-batch scaling: row-by-row LSTM on the 8x8 digits (You et al. 2019, small scale).

    python benchmarks/warmup/run.py            # full run, minutes on 2 CPU cores, writes RESULTS.md
    python benchmarks/warmup/run.py --quick    # smoke run (seconds), prints only

Recipe tuned at B0 = 16: SGD lr0 (no momentum), linear warmup w0 epochs, then polynomial decay to 0
(torch PolynomialLR, stepped every optimizer step; the warmup multiplies it). At batch B = k * B0:

- ``linear``: lr = k * lr0, warmup w0 epochs (fixed in epochs, so k times fewer iterations);
- ``sqrt``: lr = sqrt(k) * lr0, warmup w0 epochs;
- ``legw``: the LEGW callback: lr = sqrt(k) * lr0, warmup k * w0 epochs (fixed in iterations).

At k = 1 the three are the same run, so it is run once. Test accuracy of the last epoch's weights.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from litplug.callbacks.warmup import LEGW, LinearWarmup
from litplug.core.data import DigitsDataModule
from litplug.core.models import LSTMClassifier
from litplug.core.module import LitplugModule

BASE_BATCH = 16
METHODS = ("linear", "sqrt", "legw")


@dataclass(frozen=True)
class Setting:
    """One benchmark configuration (shared by every run)."""

    epochs: int
    lr0: float
    w0: float
    hidden: int
    poly_power: float


@dataclass(frozen=True)
class Result:
    method: str
    k: int
    seed: int
    lr: float
    test_acc: float
    steps: int
    warmup_steps: int
    seconds: float


def _callback(method: str, k: int, setting: Setting) -> tuple[Callback, float]:
    """The warmup callback of ``method`` and the lr to configure the optimizer with."""
    if method == "legw":  # LEGW scales the B0 lr itself
        return LEGW(base_batch_size=BASE_BATCH, base_warmup_epochs=setting.w0, lr_scaling="sqrt"), setting.lr0
    scale = k if method == "linear" else math.sqrt(k)
    return LinearWarmup(warmup_epochs=setting.w0), setting.lr0 * scale


def run_one(method: str, k: int, seed: int, setting: Setting) -> Result:
    """Train one configuration and return its test accuracy."""
    L.seed_everything(seed, workers=True, verbose=False)
    batch = k * BASE_BATCH
    data = DigitsDataModule(batch_size=batch, seed=seed, form="rows")
    data.setup()
    steps_per_epoch = math.ceil(len(data.datasets["train"]) / batch)
    total_steps = setting.epochs * steps_per_epoch
    callback, lr = _callback(method, k, setting)
    module = LitplugModule(
        LSTMClassifier(input_size=8, hidden_size=setting.hidden, num_classes=10),
        optimizer=partial(torch.optim.SGD, lr=lr),
        lr_scheduler=partial(
            torch.optim.lr_scheduler.PolynomialLR, total_iters=total_steps, power=setting.poly_power
        ),
        scheduler_interval="step",
    )
    trainer = L.Trainer(
        max_epochs=setting.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    seconds = time.perf_counter() - start
    assert isinstance(callback, LinearWarmup) and callback.total_steps is not None
    peak = lr * (callback.lr_scale or 1.0) if isinstance(callback, LEGW) else lr
    acc = float(metrics["test/acc"])
    return Result(method, k, seed, peak, acc, int(trainer.global_step), callback.total_steps, seconds)


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def table(results: list[Result], ks: list[int]) -> str:
    """Markdown table: one row per (k, method), accuracy mean +- std over seeds."""
    lines = [
        "| k | B | method | peak lr | warmup (optimizer steps) | optimizer steps | test acc (mean +- std) | runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in ks:
        for method in METHODS if k > 1 else ("legw",):
            rows = [r for r in results if r.k == k and r.method == method]
            if not rows:
                continue
            label = method if k > 1 else "all (same run at k=1)"
            accs = [r.test_acc for r in rows]
            lines.append(
                f"| {k} | {k * BASE_BATCH} | {label} | {rows[0].lr:.3g} | {rows[0].warmup_steps} | "
                f"{rows[0].steps} | {_mean_std(accs)} | {len(rows)} |"
            )
    return "\n".join(lines)


def lr_sweep(lrs: list[float], seed: int, setting: Setting) -> list[tuple[float, float]]:
    """Test accuracy at k = 1 for several lr0: where is the stability edge?"""
    out = []
    for lr0 in lrs:
        swept = Setting(setting.epochs, lr0, setting.w0, setting.hidden, setting.poly_power)
        out.append((lr0, run_one("legw", 1, seed, swept).test_acc))
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, 1 seed, k in {1, 16}")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--lr0", type=float, default=0.5)
    parser.add_argument("--w0", type=float, default=0.25, help="warmup epochs at B0")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--poly-power", type=float, default=1.0)
    parser.add_argument(
        "--sweep", type=float, nargs="*", default=[0.25, 1.0, 2.0], help="more lr0 values at k=1"
    )
    # One intra-op thread: this tiny LSTM gains nothing from two, and on a busy 2-core machine two
    # threads measured 3x slower (10.6 vs 3.5 ms per fwd+bwd at batch 16).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.epochs, args.seeds, args.ks, args.sweep = 2, 1, [1, 16], []
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Lightning's few-workers / longer-than-run notes
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    setting = Setting(args.epochs, args.lr0, args.w0, args.hidden, args.poly_power)
    start = time.perf_counter()
    results: list[Result] = []
    for seed in range(args.seeds):
        for k in args.ks:
            for method in METHODS if k > 1 else ("legw",):
                result = run_one(method, k, seed, setting)
                results.append(result)
                print(
                    f"seed {seed} k {k:3d} {method:6s} lr {result.lr:7.3f} warmup {result.warmup_steps:4d} "
                    f"steps {result.steps:5d} acc {result.test_acc:.3f} ({result.seconds:.1f}s)",
                    flush=True,
                )
    main_run = [(args.lr0, r.test_acc) for r in results if r.k == 1 and r.seed == 0]
    sweep = sorted(lr_sweep(args.sweep, 0, setting) + main_run) if 1 in args.ks else []
    for lr0, acc in sweep:
        print(f"k=1 lr0 {lr0:g}: acc {acc:.3f}", flush=True)
    elapsed = time.perf_counter() - start
    results_table = table(results, args.ks)
    print(results_table)
    print(f"total {elapsed:.0f}s")
    if not args.quick:
        write_results(args, setting, results_table, sweep, elapsed)
    return 0


def write_results(
    args: argparse.Namespace,
    setting: Setting,
    results_table: str,
    sweep: list[tuple[float, float]],
    elapsed: float,
) -> None:
    """Write RESULTS.md with the command, environment, settings and tables (analysis added by hand)."""
    sweep_rows = "\n".join(f"| {lr0:g} | {acc:.3f} |" for lr0, acc in sweep)
    command = "python benchmarks/warmup/run.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    settings: dict[str, Any] = {
        "epochs": setting.epochs,
        "B0": BASE_BATCH,
        "lr0 (SGD, no momentum)": setting.lr0,
        "w0 (warmup epochs at B0)": setting.w0,
        "LSTM hidden size": setting.hidden,
        "decay": f"PolynomialLR power {setting.poly_power:g} to 0 over all optimizer steps",
        "seeds": args.seeds,
        "threads": args.threads,
    }
    text = f"""# Warmup / LEGW benchmark results

Command: `{command}`
Date: {date.today().isoformat()}; torch {torch.__version__}, lightning {L.__version__}, Python {platform.python_version()},
{args.threads} CPU threads; whole run {elapsed:.0f} s.

Task: row-by-row LSTM (8 steps of 8 pixels) on sklearn digits, 1,257 train / 270 test examples
(DigitsDataModule form="rows", split seed = run seed). Test accuracy of the final weights.

Settings: {"; ".join(f"{k} = {v}" for k, v in settings.items())}.

## Large-batch scaling (mean +- std over seeds)

{results_table}

## Where is the stability edge? (k = 1, seed 0)

| lr0 | test acc |
|---|---|
{sweep_rows}
"""
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
