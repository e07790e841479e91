"""Binarised LSTM gates (G2-LSTM, Li et al. 2018): speed of GumbelGateLSTM and its effect at small scale.

    python benchmarks/binary_gates/run.py            # full run, minutes on 2 CPU cores, writes RESULTS.md
    python benchmarks/binary_gates/run.py --quick    # smoke run (seconds), prints only

Speed: forward + backward of one LSTM layer at batch 64, 64 steps, input 8, hidden 128, in training
mode, for ``nn.LSTM``, ``GumbelGateLSTM`` (fused: hand-written BPTT, TorchScript loops; the same
with plain-Python loops; and the reference Python time-step loop through autograd), repeats
interleaved, medians reported as ratios to nn.LSTM measured in the same run.

Effect: for each task, a baseline LSTM and the binary_gates plugin (p = 0.2, the paper's, and
p = 1.0) trained through LitplugModule with the same seeds; then, without retraining, the
evaluation loss/accuracy of the trained model and of copies whose input/forget gate blocks (both
weight matrices) were rounded to a grid or truncated to low rank, and the gate saturation
(fraction of input/forget gate values < 0.1 or > 0.9 on the evaluation data).

- ``digits``: row-by-row LSTM classifier on the 8x8 digits (8 steps of 8 pixels), test split.
- ``charlm``: character LM on standard-library text (1 layer, hidden 128), validation split.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from litplug.core.data import DigitsDataModule, StdlibTextDataModule
from litplug.core.models import LSTMClassifier, LSTMLanguageModel
from litplug.core.module import LitplugModule
from litplug.plugins.binary_gates import (
    BinaryGatesPlugin,
    GateStatistics,
    GumbelGateLSTM,
    collect_gate_values,
    compress_gates_low_precision,
    compress_gates_low_rank,
)
from litplug.plugins.binary_gates import functional as gates_functional

#: Methods compared in the effect benchmark: name -> plugin p (None = plain nn.LSTM).
METHODS: dict[str, float | None] = {"baseline": None, "g2 p=0.2": 0.2, "g2 p=1.0": 1.0}
#: Compressions applied to the trained models: name -> function of the model.
COMPRESSIONS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "round 0.5": partial(compress_gates_low_precision, step=0.5),
    "round 1.0": partial(compress_gates_low_precision, step=1.0),
    "3 bits": partial(compress_gates_low_precision, bits=3),
    "rank 4": partial(compress_gates_low_rank, rank=4),
    "rank 16": partial(compress_gates_low_rank, rank=16),
}


# ---------------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeedResult:
    threads: int
    name: str
    median_ms: float
    ratio: float


def _python_loops() -> Callable[[], None]:
    """Swap the TorchScript loops of the fused path for their Python originals; returns the undo."""
    saved = (gates_functional._FORWARD_LOOP, gates_functional._BACKWARD_LOOP)
    gates_functional._FORWARD_LOOP = gates_functional._forward_loop
    gates_functional._BACKWARD_LOOP = gates_functional._backward_loop

    def undo() -> None:
        gates_functional._FORWARD_LOOP, gates_functional._BACKWARD_LOOP = saved

    return undo


def measure_speed(
    threads: int, repeats: int, batch: int = 64, steps: int = 64, inputs: int = 8, hidden: int = 128
) -> list[SpeedResult]:
    """Median fwd+bwd time per variant, repeats interleaved so load changes hit all variants alike."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    reference = nn.LSTM(inputs, hidden, batch_first=True)
    fused = GumbelGateLSTM.from_lstm(reference, p=0.2)
    naive = GumbelGateLSTM.from_lstm(reference, p=0.2, implementation="autograd")
    x = torch.randn(batch, steps, inputs)

    def run(lstm: nn.Module) -> None:
        lstm.zero_grad(set_to_none=True)
        output, _ = lstm(x)
        output.square().mean().backward()

    def run_python_loops() -> None:
        undo = _python_loops()
        try:
            run(fused)
        finally:
            undo()

    variants: dict[str, Callable[[], None]] = {
        "nn.LSTM": partial(run, reference),
        "GumbelGateLSTM fused (TorchScript loops)": partial(run, fused),
        "GumbelGateLSTM fused (Python loops)": run_python_loops,
        "GumbelGateLSTM autograd time-step loop": partial(run, naive),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats + 2):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if repeat >= 2:  # the first two rounds warm up (TorchScript profiling runs)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["nn.LSTM"])
    return [
        SpeedResult(threads, name, 1e3 * statistics.median(t), statistics.median(t) / base)
        for name, t in times.items()
    ]


# ---------------------------------------------------------------------------------------------------
# Effect
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    name: str
    make_model: Callable[[], nn.Module]
    make_data: Callable[[int], L.LightningDataModule]
    eval_split: str
    lr: float
    max_steps: int


@dataclass
class EffectResult:
    task: str
    method: str
    seed: int
    nll: float
    acc: float
    saturation: dict[str, float]
    compressed: dict[str, tuple[float, float]]  # name -> (nll, acc)
    seconds: float


def _tasks(quick: bool, digits_epochs: int, lm_steps: int) -> dict[str, Task]:
    digits_steps = (2 if quick else digits_epochs) * 18  # 1149 training digits / 64 per batch
    return {
        "digits": Task(
            "digits",
            lambda: LSTMClassifier(input_size=8, hidden_size=64, num_classes=10),
            lambda seed: DigitsDataModule(batch_size=64, seed=seed, form="rows"),
            "test",
            5e-3,
            digits_steps,
        ),
        "charlm": Task(
            "charlm",
            lambda: LSTMLanguageModel(
                StdlibTextDataModule(seq_len=64).vocab_size, embed_dim=32, hidden_size=128
            ),
            lambda seed: StdlibTextDataModule(
                seq_len=64, batch_size=32, seed=0, num_files=40, max_chars=300_000
            ),
            "val",
            3e-3,
            20 if quick else lm_steps,
        ),
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Mean per-prediction NLL and accuracy (per example for digits, per character for the LM)."""
    model.eval()
    total_nll, correct, count = 0.0, 0, 0
    for inputs, targets in loader:
        logits = model(inputs).reshape(-1, model_classes(model))
        flat = targets.reshape(-1)
        total_nll += float(F.cross_entropy(logits, flat, reduction="sum"))
        correct += int((logits.argmax(-1) == flat).sum())
        count += flat.numel()
    return total_nll / count, correct / count


def model_classes(model: nn.Module) -> int:
    head = model.head if isinstance(model, LSTMClassifier) else model.decoder  # type: ignore[union-attr]
    return int(head.out_features)


def gate_saturation(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """Saturation of the input/forget gates over the evaluation data (eval-mode gates, any LSTM)."""
    model.eval()
    stats = GateStatistics()
    for inputs, _ in loader:
        stats.update_from(collect_gate_values(model, inputs))
    return stats.summary()


def run_effect(task: Task, method: str, seed: int) -> EffectResult:
    """Train one (task, method, seed), then evaluate it and its compressed copies."""
    L.seed_everything(seed, workers=True, verbose=False)
    data = task.make_data(seed)
    data.setup()
    p = METHODS[method]
    plugins = [] if p is None else [BinaryGatesPlugin(p=p, log_gate_statistics=False)]
    module = LitplugModule(
        task.make_model(), plugins=plugins, optimizer=partial(torch.optim.Adam, lr=task.lr)
    )
    trainer = L.Trainer(
        max_steps=task.max_steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    model = module.model
    loader = data.test_dataloader() if task.eval_split == "test" else data.val_dataloader()
    nll, acc = evaluate(model, loader)
    compressed = {name: evaluate(compress(model), loader) for name, compress in COMPRESSIONS.items()}
    return EffectResult(
        task.name, method, seed, nll, acc, gate_saturation(model, loader), compressed, seconds
    )


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def _ms(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def speed_table(results: list[SpeedResult]) -> str:
    lines = ["| threads | variant | median fwd+bwd (ms) | ratio to nn.LSTM |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.threads} | {r.name} | {r.median_ms:.1f} | {r.ratio:.2f}x |")
    return "\n".join(lines)


def effect_tables(results: list[EffectResult], task: str) -> str:
    rows = [r for r in results if r.task == task]
    methods = [m for m in METHODS if any(r.method == m for r in rows)]
    seeds = sorted({r.seed for r in rows})
    lines = [
        f"Seeds {seeds}; mean ± std over seeds.",
        "",
        "| method | NLL | accuracy | saturation (i+f) | saturation input | saturation forget | train s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        sel = [r for r in rows if r.method == method]
        lines.append(
            f"| {method} | {_ms([r.nll for r in sel])} | {_ms([r.acc for r in sel])} | "
            f"{_ms([r.saturation['saturation'] for r in sel], 2)} | "
            f"{_ms([r.saturation['saturation_input'] for r in sel], 2)} | "
            f"{_ms([r.saturation['saturation_forget'] for r in sel], 2)} | {statistics.mean(r.seconds for r in sel):.0f} |"
        )
    lines += [
        "",
        "Change under compression of the input/forget gate blocks (no retraining): ΔNLL / Δaccuracy.",
        "",
    ]
    names = list(COMPRESSIONS)
    lines.append("| method | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for method in methods:
        sel = [r for r in rows if r.method == method]
        cells = []
        for name in names:
            d_nll = [r.compressed[name][0] - r.nll for r in sel]
            d_acc = [r.compressed[name][1] - r.acc for r in sel]
            cells.append(f"{_ms(d_nll)} / {_ms(d_acc)}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, 1 seed, prints only")
    parser.add_argument("--tasks", nargs="+", default=["digits", "charlm"], choices=["digits", "charlm"])
    parser.add_argument("--digits-seeds", type=int, default=3)
    parser.add_argument("--lm-seeds", type=int, default=2)
    parser.add_argument("--digits-epochs", type=int, default=25)
    parser.add_argument("--lm-steps", type=int, default=500)
    parser.add_argument("--speed-repeats", type=int, default=15)
    parser.add_argument("--speed-threads", type=int, nargs="+", default=[1, 2])
    # Training at one intra-op thread: on the shared 2-core machine two threads measured several
    # times slower for these small LSTMs (thread contention); the speed section reports both.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.digits_seeds, args.lm_seeds, args.speed_repeats, args.speed_threads = 1, 1, 3, [1]
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    start = time.perf_counter()
    speed: list[SpeedResult] = []
    for threads in args.speed_threads:
        speed += measure_speed(threads, args.speed_repeats)
    print(speed_table(speed), flush=True)
    torch.set_num_threads(args.threads)
    tasks = _tasks(args.quick, args.digits_epochs, args.lm_steps)
    effect: list[EffectResult] = []
    for task_name in args.tasks:
        seeds = args.digits_seeds if task_name == "digits" else args.lm_seeds
        for seed in range(seeds):
            for method in METHODS:
                r = run_effect(tasks[task_name], method, seed)
                effect.append(r)
                deltas = " ".join(f"{n}: {c[0] - r.nll:+.3f}" for n, c in r.compressed.items())
                print(
                    f"{task_name} seed {seed} {method:9s} nll {r.nll:.3f} acc {r.acc:.3f} "
                    f"sat {r.saturation['saturation']:.2f} | dNLL {deltas} ({r.seconds:.0f}s)",
                    flush=True,
                )
    elapsed = time.perf_counter() - start
    sections = {t: effect_tables(effect, t) for t in args.tasks}
    for t, text in sections.items():
        print(f"\n## {t}\n{text}")
    print(f"total {elapsed:.0f}s")
    if not args.quick:
        write_results(args, speed, sections, tasks, elapsed)
    return 0


def write_results(
    args: argparse.Namespace,
    speed: list[SpeedResult],
    sections: dict[str, str],
    tasks: dict[str, Task],
    elapsed: float,
) -> None:
    command = "python benchmarks/binary_gates/run.py " + " ".join(sys.argv[1:])
    task_lines = {
        "digits": (
            f"Row-by-row LSTMClassifier (8 steps x 8 pixels, hidden 64) on DigitsDataModule(form='rows'), "
            f"Adam lr {tasks['digits'].lr:g}, batch 64, {tasks['digits'].max_steps} steps "
            f"({args.digits_epochs} epochs), gradient clipping 1.0; metrics on the test split (per example)."
        ),
        "charlm": (
            f"LSTMLanguageModel (embedding 32, 1 layer, hidden 128) on StdlibTextDataModule (seq_len 64, "
            f"batch 32, 300k characters), Adam lr {tasks['charlm'].lr:g}, {tasks['charlm'].max_steps} steps, "
            "gradient clipping 1.0; metrics on the validation split (per character, NLL in nats)."
        ),
    }
    text = [
        "# Binarised LSTM gates: benchmark results",
        "",
        f"Command: `{command}`  ",
        f"Date: {date.today().isoformat()}; torch {torch.__version__}; Python {platform.python_version()}; "
        f"training threads {args.threads}, speed threads {args.speed_threads}; total {elapsed:.0f} s.",
        "",
        "Machine: a 2-core CPU shared with several other engineers' test and benchmark runs while this "
        "ran, so absolute times are inflated and noisy; ratios are measured side by side (repeats "
        "interleaved, medians).",
        "",
        "## Speed (batch 64, 64 steps, input 8, hidden 128, training mode, p = 0.2, forward + backward)",
        "",
        speed_table(speed),
    ]
    for name, section in sections.items():
        text += ["", f"## Effect: {name}", "", task_lines[name], "", section]
    args.out.write_text("\n".join(text) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
