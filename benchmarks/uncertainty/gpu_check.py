"""GPU check of the ensemble and MIMO fast paths: agreement on the device, then the speed targets.

The CPU figures live in RESULTS.md (run.py). This script is what a session with a CUDA machine runs
for the GPU half of the targets; it never fakes a number: on a machine without CUDA it refuses to
run unless told ``--device cpu`` (a smoke run of the same code path, reported as CPU).

    .venv/bin/python benchmarks/uncertainty/gpu_check.py                   # CUDA: writes RESULTS_gpu.md
    .venv/bin/python benchmarks/uncertainty/gpu_check.py --device cpu --quick --out /tmp/gpu_check.md

Checks, in this order:

1. Agreement on the device: the vmap and sequential ensemble paths give the same evaluation outputs,
   training-mode outputs, gradients and BatchNorm statistics (SmallCNN and MLP members); MIMO's
   summed evaluation input gives the same outputs as the tiled input.
2. ``DeepEnsemble(path="auto")`` fitted for a few steps on the device: the path it picks for
   training and evaluation (its own timing at fit start) and the timings it stored.
3. Speed, side by side (call-by-call interleaved, CUDA-synchronised, medians): ensemble of 4 on the
   vmap path vs its 4 members one after another, evaluation forward and training step, batch 64 and
   512 (target: vmap <= 0.5x sequential on a GPU); MIMO M=3 evaluation forward vs the single model
   (target <= 1.10x).

Exit status 1 when an agreement check fails; with ``--strict`` also when a speed target is missed.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from litplug.core.models import MLP, SmallCNN
from litplug.core.module import LitplugModule
from litplug.plugins.ensemble import DeepEnsemble, MemberStack, make_members, sum_of_member_losses
from litplug.plugins.mimo import ensemble_log_probs, repeat_inputs, widen_model

HERE = Path(__file__).resolve().parent
ENSEMBLE_TARGET = 0.5  # vmap / sequential on a GPU (the target; METHODS.md "Speed facts")
MIMO_TARGET = 1.10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Median seconds per function: a fresh random order every round, synchronised around each call."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    order = random.Random(0)
    warmup = max(3, repeats // 5)
    for repeat in range(warmup + repeats):
        order.shuffle(names)
        for name in names:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            if repeat >= warmup:
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


# -------------------------------------------------------------------------------------------------
# 1. agreement
# -------------------------------------------------------------------------------------------------


def ensemble_agreement(
    make: Callable[[], nn.Module], inputs: Tensor, device: torch.device
) -> dict[str, float]:
    """Largest absolute differences between the vmap and sequential paths on ``device``."""
    torch.manual_seed(0)
    stack = MemberStack(make_members(make(), 4, base_seed=0)).to(device)
    twin = copy.deepcopy(stack)
    targets = torch.randint(0, 10, (inputs.shape[0],), device=device)
    stack.eval()
    with torch.no_grad():
        eval_diff = (
            (stack.forward_with("vmap", inputs) - stack.forward_with("sequential", inputs)).abs().max()
        )
    stack.train()
    twin.train()
    out_v = stack.forward_with("vmap", inputs)
    out_s = twin.forward_with("sequential", inputs)
    sum_of_member_losses(out_v, targets).backward()
    sum_of_member_losses(out_s, targets).backward()
    grad_diff = max(
        (a.grad - b.grad).abs().max().item()
        for a, b in zip(stack.parameters(), twin.parameters(), strict=True)
        if a.grad is not None
    )
    buffer_diff = max(
        (
            (a.float() - b.float()).abs().max().item()
            for a, b in zip(stack.buffers(), twin.buffers(), strict=True)
        ),
        default=0.0,
    )
    return {
        "eval": float(eval_diff),
        "train": float((out_v - out_s).abs().max()),
        "grad": grad_diff,
        "buffers": buffer_diff,
    }


def mimo_agreement(inputs: Tensor, device: torch.device) -> float:
    torch.manual_seed(0)
    model = widen_model(SmallCNN(width=32), 3).to(device).eval()
    with torch.no_grad():
        return float((model(inputs) - model(repeat_inputs(inputs, 3))).abs().max())


# -------------------------------------------------------------------------------------------------
# 2. the plugin's automatic choice on the device
# -------------------------------------------------------------------------------------------------


def auto_choice(device: torch.device, steps: int) -> dict[str, object]:
    """Fit ``DeepEnsemble(path="auto")`` for a few steps on ``device``: the paths it chose and its timings."""
    from litplug.core.data import DigitsDataModule

    L.seed_everything(0, verbose=False)
    plugin = DeepEnsemble(num_members=4, path="auto", timing_repeats=5, reliability_diagram=False)
    module = LitplugModule(SmallCNN(width=32), plugins=[plugin])
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "litplug_gpu_check"),
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64, form="image"))
    return {"train_path": plugin.train_path, "eval_path": plugin.eval_path, "timings": dict(plugin.timings)}


# -------------------------------------------------------------------------------------------------
# 3. speed
# -------------------------------------------------------------------------------------------------


def ensemble_speed(
    make: Callable[[], nn.Module], inputs: Tensor, device: torch.device, repeats: int
) -> dict[str, float]:
    """vmap / sequential ratios of an evaluation forward and a training step (forward + backward)."""
    torch.manual_seed(0)
    stack = MemberStack(make_members(make(), 4, base_seed=0)).to(device)
    targets = torch.randint(0, 10, (inputs.shape[0],), device=device)
    params = [p for p in stack.parameters() if p.requires_grad]

    def eval_step(path: str) -> None:
        stack.eval()
        with torch.no_grad():
            stack.forward_with(path, inputs)  # type: ignore[arg-type]

    def train_step(path: str) -> None:
        stack.train()
        torch.autograd.grad(sum_of_member_losses(stack.forward_with(path, inputs), targets), params)  # type: ignore[arg-type]

    result = {}
    for kind, step in (("eval", eval_step), ("train", train_step)):
        fns: dict[str, Callable[[], object]] = {
            path: (lambda path=path, step=step: step(path)) for path in ("vmap", "sequential")
        }
        t = interleaved_medians(fns, device, repeats)
        result[kind] = t["vmap"] / t["sequential"]
        result[f"{kind}_sequential_ms"] = t["sequential"] * 1e3
    return result


def mimo_speed(inputs: Tensor, device: torch.device, repeats: int) -> dict[str, float]:
    """MIMO M=3 (summed and tiled input) / single model, evaluation forward with the averaging."""
    torch.manual_seed(0)
    single = SmallCNN(width=32).to(device).eval()
    wide = widen_model(SmallCNN(width=32), 3).to(device).eval()

    @torch.no_grad()
    def run_single() -> None:
        torch.log_softmax(single(inputs), -1)

    @torch.no_grad()
    def run_summed() -> None:
        ensemble_log_probs(wide(inputs), 3)

    @torch.no_grad()
    def run_tiled() -> None:
        ensemble_log_probs(wide(repeat_inputs(inputs, 3)), 3)

    t = interleaved_medians({"single": run_single, "summed": run_summed, "tiled": run_tiled}, device, repeats)
    return {
        "summed": t["summed"] / t["single"],
        "tiled": t["tiled"] / t["single"],
        "single_ms": t["single"] * 1e3,
    }


# -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cuda", help="cuda (the check) or cpu (a smoke run of the code path)"
    )
    parser.add_argument("--quick", action="store_true", help="few repeats, batch 64 only, 2 fit steps")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a speed target is missed too")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS_gpu.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 3
    return args


def run_checks(args: argparse.Namespace) -> tuple[list[str], bool]:
    """All checks; returns the report's lines and whether every agreement check passed."""
    device = torch.device(args.device)
    batches = [64] if args.quick else [64, 512]
    models: dict[str, Callable[[], nn.Module]] = {
        "SmallCNN width 32": lambda: SmallCNN(width=32),
        "MLP 64-256-256-10": lambda: MLP(64, [256, 256]),
    }
    tol = 1e-4  # float32 on a GPU: the paths may use different kernels (TF32 is off by default for matmul)
    ok = True
    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run, not a GPU figure)"
    )
    lines = [
        "# GPU check: ensemble (vmap vs sequential) and MIMO (summed vs tiled) on the device",
        "",
        f"- Command: `.venv/bin/python benchmarks/uncertainty/gpu_check.py {' '.join(sys.argv[1:])}`".rstrip()
        + "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"device: {name}; load average {os.getloadavg()[0]:.1f}.",
        f"- Timing: medians of {args.repeats} call-by-call interleaved repeats (fresh random order each round), "
        "CUDA-synchronised around each call.",
        "",
        "## 1. Agreement (largest absolute difference)",
        "",
        "| check | eval | train outputs | gradients | BN buffers | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for label, make in models.items():
        x = _inputs(label, 64, device)
        d = ensemble_agreement(make, x, device)
        good = max(d.values()) <= tol
        ok &= good
        lines.append(
            f"| ensemble of 4 {label}: vmap vs sequential | {d['eval']:.1e} | {d['train']:.1e} | "
            f"{d['grad']:.1e} | {d['buffers']:.1e} | {'ok' if good else 'FAILED'} |"
        )
    m = mimo_agreement(_inputs("SmallCNN", 64, device), device)
    ok &= m <= tol
    lines += [
        f"| MIMO M=3 SmallCNN: summed vs tiled input | {m:.1e} | - | - | - | {'ok' if m <= tol else 'FAILED'} |",
        "",
    ]
    choice = auto_choice(device, steps=2 if args.quick else 5)
    timings = ", ".join(
        f"{k} {v * 1e3:.2f} ms" if isinstance(v, float) else f"{k} {v}" for k, v in choice["timings"].items()
    )
    lines += [
        "## 2. DeepEnsemble(path='auto') fitted on the device",
        "",
        f"Chose train path **{choice['train_path']}**, eval path **{choice['eval_path']}** "
        f"(its fit-start timings: {timings}).",
        "",
        "## 3. Speed",
        "",
        "| target | measured | goal | verdict |",
        "|---|---|---|---|",
    ]
    speed_ok = True
    for label, make in models.items():
        for batch in batches:
            s = ensemble_speed(make, _inputs(label, batch, device), device, args.repeats)
            for kind in ("eval", "train"):
                met = s[kind] <= ENSEMBLE_TARGET
                speed_ok &= met
                what = "evaluation forward" if kind == "eval" else "training step"
                lines.append(
                    f"| ensemble of 4 {label}, vmap / sequential, {what}, batch {batch} (sequential "
                    f"{s[f'{kind}_sequential_ms']:.2f} ms) | {s[kind]:.2f}x | <= {ENSEMBLE_TARGET}x | "
                    f"{'met' if met else 'NOT met'} |"
                )
    for batch in batches:
        s = mimo_speed(_inputs("SmallCNN", batch, device), device, args.repeats)
        met = s["summed"] <= MIMO_TARGET
        speed_ok &= met
        lines.append(
            f"| MIMO M=3 SmallCNN eval forward / single, batch {batch} (single {s['single_ms']:.2f} ms; "
            f"tiled input {s['tiled']:.2f}x) | {s['summed']:.2f}x | <= {MIMO_TARGET}x | {'met' if met else 'NOT met'} |"
        )
    lines.append("")
    return lines, ok and (speed_ok or not args.strict)


def _inputs(label: str, batch: int, device: torch.device) -> Tensor:
    shape = (batch, 64) if label.startswith("MLP") else (batch, 1, 8, 8)
    return torch.rand(*shape, generator=torch.Generator().manual_seed(batch)).to(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing measured (use --device cpu for a smoke run)")
        return 2
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    lines, ok = run_checks(args)
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.write_text(report)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
