"""Deep-ensemble speed: vectorised (vmap) vs sequential members, training and inference, side by side.

    python benchmarks/ensemble/run.py            # full run (a few minutes on 2 CPU cores), writes RESULTS.md
    python benchmarks/ensemble/run.py --quick    # smoke run (seconds), prints only

For each model / batch size / ensemble size M, on the same stack of members:

- ``train``: one training step, forward + backward of the summed member loss + an Adam step;
- ``eval``: one evaluation forward under ``no_grad`` (the vmap path reuses its stacked parameters,
  as it does in a validation epoch).

Repeats are interleaved (sequential, vmap, sequential, ...), each timing a block of iterations;
medians are reported. ``auto`` is what ``DeepEnsemble(path="auto")`` picks with its own quick
measurement (``time_forward_paths``, 3 repeats) for the same setting: the ratio of the picked path's
benchmark time to the sequential time is the CPU target (<= 1.0).
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
from datetime import date
from pathlib import Path

import torch
from torch import nn

from litplug.core.models import MLP, SmallCNN
from litplug.plugins.ensemble import (
    DeepEnsemble,
    MemberStack,
    faster_path,
    make_members,
    sum_of_member_losses,
    time_forward_paths,
)

RESULTS = Path(__file__).with_name("RESULTS.md")


@dataclass(frozen=True)
class Setting:
    model: str
    members: int
    batch: int


@dataclass(frozen=True)
class Row:
    setting: Setting
    train_seq: float
    train_vmap: float
    eval_seq: float
    eval_vmap: float
    auto_train: str
    auto_eval: str

    def chosen(self, kind: str) -> float:
        path = self.auto_train if kind == "train" else self.auto_eval
        return getattr(self, f"{kind}_{'vmap' if path == 'vmap' else 'seq'}")


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "MLP 64-256-256-10": (lambda: MLP(64, [256, 256]), (64,)),
    "MLP 64-64-10": (lambda: MLP(64, [64]), (64,)),
    "SmallCNN w32 (BN)": (lambda: SmallCNN(width=32), (1, 8, 8)),
}


def _block_time(fn: Callable[[], None], iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations


def measure(setting: Setting, repeats: int, iterations: int) -> Row:
    make_model, input_shape = MODELS[setting.model]
    torch.manual_seed(0)
    stack = MemberStack(make_members(make_model(), setting.members, base_seed=0))
    inputs = torch.rand(setting.batch, *input_shape)
    targets = torch.randint(0, 10, (setting.batch,))
    optimizer = torch.optim.Adam(stack.parameters(), lr=1e-3)

    def train(path: str) -> Callable[[], None]:
        def step() -> None:
            stack.train()
            optimizer.zero_grad(set_to_none=True)
            sum_of_member_losses(stack.forward_with(path, inputs), targets).backward()  # type: ignore[arg-type]
            optimizer.step()

        return step

    def evaluate(path: str) -> Callable[[], None]:
        def forward() -> None:
            stack.eval()
            with torch.no_grad():
                stack.forward_with(path, inputs)  # type: ignore[arg-type]

        return forward

    timings = time_forward_paths(stack, inputs, targets, repeats=3)
    # the plugin's own rule: the device's expected winner unless the other path is >10% faster
    prefer = DeepEnsemble.rule_path(inputs.device)
    auto_train = faster_path(timings, "train", prefer, DeepEnsemble.SWITCH_MARGIN)
    auto_eval = faster_path(timings, "eval", prefer, DeepEnsemble.SWITCH_MARGIN)
    samples: dict[str, list[float]] = {k: [] for k in ("train_seq", "train_vmap", "eval_seq", "eval_vmap")}
    for fn in (train("sequential"), train("vmap"), evaluate("sequential"), evaluate("vmap")):
        fn()  # warm-up
    for _ in range(repeats):
        samples["train_seq"].append(_block_time(train("sequential"), iterations))
        samples["train_vmap"].append(_block_time(train("vmap"), iterations))
        # the evaluation pair runs in one eval phase: the vmap cache holds, as within an epoch
        samples["eval_seq"].append(_block_time(evaluate("sequential"), iterations))
        samples["eval_vmap"].append(_block_time(evaluate("vmap"), iterations))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return Row(setting, **medians, auto_train=auto_train, auto_eval=auto_eval)


def table(rows: list[Row]) -> str:
    lines = [
        "| model | M | batch | train seq (ms) | train vmap (ms) | vmap/seq | auto picks | auto/seq "
        "| eval seq (ms) | eval vmap (ms) | vmap/seq | auto picks | auto/seq |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.setting
        lines.append(
            f"| {s.model} | {s.members} | {s.batch} "
            f"| {r.train_seq * 1e3:.2f} | {r.train_vmap * 1e3:.2f} | {r.train_vmap / r.train_seq:.2f} "
            f"| {r.auto_train} | {r.chosen('train') / r.train_seq:.2f} "
            f"| {r.eval_seq * 1e3:.2f} | {r.eval_vmap * 1e3:.2f} | {r.eval_vmap / r.eval_seq:.2f} "
            f"| {r.auto_eval} | {r.chosen('eval') / r.eval_seq:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: one setting, few repeats, no RESULTS.md"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.quick:
        settings = [Setting("MLP 64-64-10", 4, 64)]
        repeats, iterations = 3, 3
    else:
        settings = [
            Setting(model, members, batch) for model in MODELS for members in (4,) for batch in (64, 256)
        ] + [Setting("MLP 64-256-256-10", 2, 64), Setting("MLP 64-256-256-10", 8, 64)]
        repeats, iterations = 7, 10
    rows = []
    for setting in settings:
        row = measure(setting, repeats, iterations)
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    report = table(rows)
    print("\n" + report)
    if args.quick:
        return
    command = "python benchmarks/ensemble/run.py"
    RESULTS.write_text(
        f"""# Deep ensemble: vectorised vs sequential members

Command: `{command}` ({date.today().isoformat()}, torch {torch.__version__}, {torch.get_num_threads()} threads,
{platform.processor() or platform.machine()}, Python {sys.version.split()[0]}, CPU only: no GPU on this machine).

Times are per iteration, medians of {repeats} interleaved repeats of {iterations} iterations each.
`train` = forward + backward of the summed member loss + Adam step; `eval` = forward under no_grad.
`auto picks` is the path `DeepEnsemble(path="auto")` chose with its own quick measurement at the
start of this setting; `auto/seq` is that path's benchmark time over the sequential time (CPU target
<= 1.0). Load average (1 / 5 / 15 min) when this was written: {" / ".join(f"{v:.1f}" for v in os.getloadavg())}
on {os.cpu_count()} CPUs: absolute times depend on it; ratios are measured side by side.

{report}

GPU target (vmap <= 0.5x sequential for 4 members): not measured, no GPU was available to this run.
"""
    )
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
