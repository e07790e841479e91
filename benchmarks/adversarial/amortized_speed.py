"""ADT_EXP-AM / ADT_IMP-AM time per training step against PGD-AT-7, side by side, before and after.

    .venv/bin/python benchmarks/adversarial/amortized_speed.py                 # MLP and CNN
    .venv/bin/python benchmarks/adversarial/amortized_speed.py --rounds 41 --arch mlp

Builds one full training step (as ``run.py`` times it: transform, forward, loss, backward, both
optimizers, outside Lightning) for PGD-AT-7 and the amortised variants of the working tree and of the
``adt`` plugin at git revision ``--before`` (loaded from ``git show`` into a temporary package), then
times them interleaved (every round runs every variant ``--inner`` times) with one torch thread. The
ratio to PGD-AT-7 is taken per round and the median reported, so load drifting between rounds cancels.
Both wall-clock and this thread's CPU time (``time.thread_time``; with one torch thread the ops run on
it) are reported: CPU time does not count the time the process waits for a core on a shared machine.
Writes ``SPEED.md`` next to this file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402


def plugin_at_revision(revision: str, package_dir: Path) -> type:
    """The ``AdversarialDistributionalTraining`` class of ``plugins/adt`` at ``revision``."""
    name = f"adt_{revision[:8]}"
    target = package_dir / name
    target.mkdir(parents=True)
    for file in ("__init__.py", "functional.py", "plugin.py"):
        text = subprocess.run(
            ["git", "show", f"{revision}:plugins/adt/{file}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (target / file).write_text(text)
    sys.path.insert(0, str(package_dir))
    return importlib.import_module(f"{name}.plugin").AdversarialDistributionalTraining


def old_step(plugin_class: type, variant: str, arch: str, batch: tuple) -> Callable[[], None]:
    original = run.make_plugins
    width = run.GENERATOR_WIDTH[arch]

    def make_plugins(method: str, epsilon: float, generator_width: int = width) -> list:
        return [plugin_class(variant=variant, epsilon=epsilon, generator_width=generator_width)]

    run.make_plugins = make_plugins
    try:
        return run.step_fn(f"adt_{variant}", arch, 0.1, batch)
    finally:
        run.make_plugins = original


def measure(arch: str, before: type, revision: str, rounds: int, inner: int) -> list[str]:
    data = run.make_data(arch, 0)
    data.setup()
    x, y = data.datasets["train"].tensors
    batch = (x[:64], y[:64])
    steps = {
        "pgd_at (7 steps)": run.step_fn("pgd_at", arch, 0.1, batch),
        f"adt_exp_am @ {revision[:7]}": old_step(before, "exp_am", arch, batch),
        "adt_exp_am (now)": run.step_fn("adt_exp_am", arch, 0.1, batch),
        f"adt_imp_am @ {revision[:7]}": old_step(before, "imp_am", arch, batch),
        "adt_imp_am (now)": run.step_fn("adt_imp_am", arch, 0.1, batch),
    }
    for fn in steps.values():
        for _ in range(5):
            fn()
    load = os.getloadavg()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            for _ in range(inner):
                fn()
            cpu[name].append((time.thread_time() - start_cpu) / inner)
            samples[name].append((time.perf_counter() - start) / inner)
    reference, reference_cpu = samples["pgd_at (7 steps)"], cpu["pgd_at (7 steps)"]
    lines = [
        f"### {arch.upper()} (generator width {run.GENERATOR_WIDTH[arch]}); load average "
        f"{'/'.join(f'{v:.1f}' for v in load)} -> {'/'.join(f'{v:.1f}' for v in os.getloadavg())}",
        "",
        "| step | median ms (wall) | median per-round ratio × PGD-AT-7 (wall) | rounds ≤ 1.0 (wall) | "
        "median ms (thread CPU) | median per-round ratio (thread CPU) | rounds ≤ 1.0 (CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, values in samples.items():
        ratios = [v / r for v, r in zip(values, reference, strict=True)]
        cpu_ratios = [v / r for v, r in zip(cpu[name], reference_cpu, strict=True)]
        lines.append(
            f"| {name} | {statistics.median(values) * 1e3:.2f} | {statistics.median(ratios):.3f} | "
            f"{sum(r <= 1.0 for r in ratios)}/{len(ratios)} | {statistics.median(cpu[name]) * 1e3:.2f} | "
            f"{statistics.median(cpu_ratios):.3f} | {sum(r <= 1.0 for r in cpu_ratios)}/{len(cpu_ratios)} |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("mlp", "cnn", "both"), default="both")
    parser.add_argument("--before", default="29eaf91", help="git revision of the plugin to compare with")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "SPEED.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        before = plugin_at_revision(args.before, Path(tmp))
        arches = ("mlp", "cnn") if args.arch == "both" else (args.arch,)
        body = [
            line for arch in arches for line in measure(arch, before, args.before, args.rounds, args.inner)
        ]
    command = ".venv/bin/python benchmarks/adversarial/amortized_speed.py"
    for flag, value, default in (
        ("--arch", args.arch, "both"),
        ("--before", args.before, "29eaf91"),
        ("--rounds", args.rounds, 31),
        ("--inner", args.inner, 5),
    ):
        if value != default:
            command += f" {flag} {value}"
    lines = [
        "# Amortised ADT: time per training step vs PGD-AT-7, before and after the speed work",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"1 thread; {os.cpu_count()} cores shared with other jobs; {args.rounds} interleaved rounds × "
        f"{args.inner} steps; total {(time.time() - started) / 60:.1f} min",
        f"- `@ {args.before[:7]}`: the `adt` plugin as it was at that revision; `(now)`: the working tree.",
        "",
        *body,
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
