"""Adversarial robustness on digits: standard training, PGD-AT, ADT_EXP, ADT_EXP-AM, ADT_IMP-AM.

    .venv/bin/python benchmarks/adversarial/run.py --threads 1             # MLP, full run
    .venv/bin/python benchmarks/adversarial/run.py --threads 1 --arch cnn  # SmallCNN on 8x8 images
    .venv/bin/python benchmarks/adversarial/run.py --quick                 # smoke run

Trains each method with LitplugModule + Lightning on scikit-learn's digits (inputs in [0, 1]) for
several seeds, evaluates clean accuracy and robust accuracy under FGSM, PGD-20 and margin-loss PGD-20
with restarts over a range of epsilons on the test split, runs gradient-masking sanity checks, and
times one training step of every method side by side (interleaved repeats, medians). Writes
``RESULTS.md`` next to this file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from litplug.core.data import DigitsDataModule
from litplug.core.models import MLP, SmallCNN
from litplug.core.module import LitplugModule
from litplug.core.plugin import Plugin
from litplug.plugins.adt import AdversarialDistributionalTraining
from litplug.plugins.attacks import evaluation_attack_context, pgd, robust_accuracies
from litplug.plugins.pgd_at import PGDAdversarialTraining

HERE = Path(__file__).resolve().parent
DEFAULT_THREADS = 2
METHODS = ("standard", "pgd_at", "adt_exp", "adt_exp_am", "adt_imp_am")
#: Optional rows: the amortised variants with a 10x generator learning rate (2e-3 instead of the
#: paper's 2e-4), to separate "the generator had too few steps" from the method (RESULTS.md).
EXTRA_METHODS = ("adt_exp_am_glr2e-3", "adt_imp_am_glr2e-3")
ATTACKS = ["fgsm", "pgd", "margin_pgd"]
#: Generator width per architecture: the MLP generator (width 64) costs about one classifier pass;
#: a conv generator of 64 channels at 8x8 would cost ~30 SmallCNN passes, so the CNN gets 16
#: channels (about two SmallCNN passes), keeping the generator small relative to the classifier.
GENERATOR_WIDTH = {"mlp": 64, "cnn": 16}


def make_plugins(method: str, epsilon: float, generator_width: int = 64) -> list[Plugin]:
    if method == "standard":
        return []
    if method == "pgd_at":
        return [PGDAdversarialTraining(epsilon=epsilon, steps=7)]
    name, _, generator_lr = method.partition("_glr")
    variant = {"adt_exp": "exp", "adt_exp_am": "exp_am", "adt_imp_am": "imp_am"}[name]
    return [
        AdversarialDistributionalTraining(
            variant=variant,
            epsilon=epsilon,
            generator_width=generator_width,
            generator_lr=float(generator_lr) if generator_lr else 2e-4,
        )
    ]


def make_model(arch: str) -> nn.Module:
    if arch == "mlp":
        return MLP(input_dim=64, hidden_dims=[256, 256])
    return SmallCNN(width=32)


def make_data(arch: str, seed: int) -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, seed=seed, form="flat" if arch == "mlp" else "image")


def train(method: str, arch: str, seed: int, epsilon: float, epochs: int) -> nn.Module:
    L.seed_everything(seed, verbose=False)
    model = make_model(arch)
    module = LitplugModule(
        model,
        plugins=make_plugins(method, epsilon, GENERATOR_WIDTH[arch]),
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=make_data(arch, seed))
    return module.model.eval()


def test_split(arch: str, seed: int) -> tuple[Tensor, Tensor]:
    data = make_data(arch, seed)
    data.setup()
    x, y = data.datasets["test"].tensors
    return x, y


def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, epsilons: list[float], restarts: int
) -> dict[str, float]:
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    results = {"clean": clean}
    robust = robust_accuracies(model, x, y, epsilons, ATTACKS, margin_restarts=restarts, seed=0)
    results.update({k: v.item() for k, v in robust.items()})
    return results


def pgd_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, epsilon: float, steps: int, source: nn.Module | None = None
) -> float:
    """PGD accuracy of ``model``; with ``source`` the attack is crafted on ``source`` (transfer)."""
    attacker = model if source is None else source
    with evaluation_attack_context(attacker, seed=0):
        x_adv = pgd(attacker, x, y, epsilon, 2.5 * epsilon / steps, steps)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


# -- timing -------------------------------------------------------------------------------------------


def step_fn(method: str, arch: str, epsilon: float, batch: tuple[Tensor, Tensor]) -> Callable[[], None]:
    """One full training step of ``method`` (transform, forward, loss, backward, both optimizers)
    outside Lightning, so the timing compares the methods and not the trainer's overhead."""
    torch.manual_seed(0)
    module = LitplugModule(make_model(arch), plugins=make_plugins(method, epsilon, GENERATOR_WIDTH[arch]))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    module.hooks.on_fit_start(module=module, sample_batch=batch)
    module.train()

    def step() -> None:
        transformed = module.hooks.transform_batch(module=module, batch=batch, stage="train")
        inputs, targets = transformed
        outputs = module(inputs)
        loss = module.main_loss(outputs, targets, transformed, "train")
        extras = module.hooks.extra_losses(
            module=module, outputs=outputs, targets=targets, batch=transformed, stage="train"
        )
        total = loss + sum(extras.values()) if extras else loss
        total.backward()
        module.hooks.on_before_optimizer_step(module=module, optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


#: Forward/backward passes of batch size B per training step (ADT_EXP's inner passes are batches
#: of samples * B, counted as ``samples`` passes); the amortised variants add a generator pass.
def passes_per_step(method: str) -> int:
    base = method.partition("_glr")[0]
    return {"standard": 1, "pgd_at": 8, "adt_exp": 7 * 5 + 1, "adt_exp_am": 3, "adt_imp_am": 3}[base]


def time_steps(arch: str, epsilon: float, repeats: int, inner: int) -> dict[str, float]:
    """Medians of interleaved timings; the generator learning rate does not change the cost, so the
    extra ``_glr`` rows are not timed separately."""
    data = make_data(arch, 0)
    data.setup()
    x, y = data.datasets["train"].tensors
    batch = (x[:64], y[:64])
    steps = {m: step_fn(m, arch, epsilon, batch) for m in METHODS}
    for fn in steps.values():  # warm up
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(repeats):  # interleaved: every method sees the same machine load
        for method, fn in steps.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[method].append((time.perf_counter() - start) / inner)
    return {m: statistics.median(v) for m, v in samples.items()}


# -- report -------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 epochs")
    parser.add_argument("--arch", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--train-epsilon", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="default: RESULTS_<arch>.md next to this file")
    parser.add_argument(
        "--extra",
        action="store_true",
        help="also train the amortised variants with generator lr 2e-3 (rows adt_*_glr2e-3)",
    )
    parser.add_argument(
        "--epsilons", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5], help="test epsilons"
    )
    parser.add_argument("--timing-repeats", type=int, default=21, help="interleaved timing rounds")
    parser.add_argument(
        "--timing-only", action="store_true", help="only the step timing, written to TIMING_<arch>.md"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="torch threads (1 if the machine is oversubscribed)",
    )
    args = parser.parse_args()
    if args.out is None:
        args.out = HERE / (f"TIMING_{args.arch}.md" if args.timing_only else f"RESULTS_{args.arch}.md")
    args.load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    methods = METHODS + (EXTRA_METHODS if args.extra else ())
    epochs, seeds = (2, 1) if args.quick else (args.epochs, args.seeds)
    epsilons = list(args.epsilons)
    restarts = 1 if args.quick else 3
    started = time.time()
    if args.timing_only:
        write_timing_report(args, time_steps(args.arch, args.train_epsilon, args.timing_repeats, 5), started)
        return

    tables: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    sanity: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    for seed in range(seeds):
        x, y = test_split(args.arch, seed)
        models = {}
        for method in methods:
            t0 = time.time()
            models[method] = train(method, args.arch, seed, args.train_epsilon, epochs)
            print(f"seed {seed} {method}: trained in {time.time() - t0:.1f}s", flush=True)
            for key, value in evaluate(models[method], x, y, epsilons, restarts).items():
                tables[method].setdefault(key, []).append(value)
        for method, model in models.items():
            checks = sanity[method]
            for steps in (10, 20, 50, 100):
                checks.setdefault(f"pgd{steps}", []).append(
                    pgd_accuracy(model, x, y, args.train_epsilon, steps)
                )
            checks.setdefault("pgd20_eps1.0", []).append(pgd_accuracy(model, x, y, 1.0, 20))
            checks.setdefault("transfer", []).append(
                pgd_accuracy(model, x, y, args.train_epsilon, 20, source=models["standard"])
            )
        print(f"seed {seed} done at {time.time() - started:.0f}s", flush=True)

    timing_repeats, inner = (3, 2) if args.quick else (args.timing_repeats, 5)
    timings = time_steps(args.arch, args.train_epsilon, timing_repeats, inner)
    write_report(args, epochs, seeds, epsilons, restarts, tables, sanity, timings, time.time() - started)


def write_report(
    args: Any,
    epochs: int,
    seeds: int,
    epsilons: list[float],
    restarts: int,
    tables: dict[str, dict[str, list[float]]],
    sanity: dict[str, dict[str, list[float]]],
    timings: dict[str, float],
    elapsed: float,
) -> None:
    command = ".venv/bin/python benchmarks/adversarial/run.py" + (" --quick" if args.quick else "")
    for flag, value, default in (
        ("--arch", args.arch, "mlp"),
        ("--threads", args.threads, DEFAULT_THREADS),
        ("--epochs", args.epochs, 20),
        ("--seeds", args.seeds, 3),
        ("--train-epsilon", args.train_epsilon, 0.1),
        ("--timing-repeats", args.timing_repeats, 21),
        ("--epsilons", " ".join(f"{e:g}" for e in args.epsilons), "0.05 0.1 0.2 0.3 0.5"),
    ):
        if value != default:
            command += f" {flag} {value}"
    if args.extra:
        command += " --extra"
    load_end = os.getloadavg()
    lines = [
        "# Adversarial robustness on digits: standard, PGD-AT, ADT_EXP, ADT_EXP-AM, ADT_IMP-AM",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"{args.threads} thread(s); total {elapsed / 60:.1f} min; load average (1/5/15 min) "
        f"{'/'.join(f'{v:.1f}' for v in args.load_start)} at start, "
        f"{'/'.join(f'{v:.1f}' for v in load_end)} at end on {os.cpu_count()} cores",
        f"- Setup: {args.arch.upper()} on digits (inputs in [0, 1]), Adam 1e-3, batch 64, {epochs} epochs, "
        f"{seeds} seed(s) (mean ± std); training epsilon {args.train_epsilon} (L-inf) for every robust method; "
        "PGD-AT 7 steps of eps/4 with random start; ADT with the paper's defaults (7 steps, lr 0.3, "
        "5 samples, lambda 0.01; AM: generator Adam 2e-4, b1 0.5; IMP-AM lambda 1, 64 noise dims); "
        f"generator width {GENERATOR_WIDTH[args.arch]}"
        + ("; rows `_glr2e-3`: the same with generator lr 2e-3." if args.extra else "."),
        f"- Evaluation on the test split (270 images): FGSM; PGD-20 (CE, step 2.5 eps/20, random start); "
        f"margin (CW) PGD-20 with {restarts} restart(s). Attacks in eval mode, inputs clipped to [0, 1].",
        "- Absolute times depend on the machine's load (above); compare ratios.",
        "",
        "## Accuracy (clean and robust) per test epsilon",
        "",
    ]
    header = (
        "| method | clean | "
        + " | ".join(f"{a} {e:g}" for e in epsilons for a in ("FGSM", "PGD-20", "margin-PGD"))
        + " |"
    )
    lines += [header, "|" + "---|" * (2 + 3 * len(epsilons))]
    for method, results in tables.items():
        cells = [mean_std(results["clean"])]
        for eps in epsilons:
            for attack in ATTACKS:
                cells.append(mean_std(results[f"robust_acc_{attack}_eps{eps:g}"]))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Gradient-masking sanity checks (PGD at the training epsilon {args.train_epsilon} unless noted)",
        "",
        "| method | PGD-10 | PGD-20 | PGD-50 | PGD-100 | PGD-20 eps 1.0 | transfer PGD-20 from standard |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, checks in sanity.items():
        keys = ["pgd10", "pgd20", "pgd50", "pgd100", "pgd20_eps1.0", "transfer"]
        lines.append(f"| {method} | " + " | ".join(mean_std(checks[k]) for k in keys) + " |")
    lines += ["", "Automatic verdicts (per method, mean over seeds):", ""]
    for method in tables:
        lines.append(f"- {method}: " + "; ".join(sanity_verdicts(tables[method], sanity[method], epsilons)))
    lines += timing_lines(timings)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


def timing_lines(timings: dict[str, float]) -> list[str]:
    pgd7 = timings["pgd_at"]
    lines = [
        "",
        "## Time per training step (batch 64, medians of interleaved repeats, outside Lightning)",
        "",
        "| method | ms / step | × PGD-AT-7 | passes / step | ms / pass | per-pass × PGD-AT-7 |",
        "|---|---|---|---|---|---|",
    ]
    for method, seconds in timings.items():
        passes = passes_per_step(method)
        per_pass = seconds / passes
        lines.append(
            f"| {method} | {seconds * 1e3:.2f} | {seconds / pgd7:.2f} | {passes} | {per_pass * 1e3:.3f} | "
            f"{per_pass / (pgd7 / passes_per_step('pgd_at')):.2f} |"
        )
    lines += [
        "",
        "Passes: PGD-AT-7 = 7 attack + 1 training; ADT_EXP = 7 steps × 5 samples (one batched forward of "
        "5B per step) + 1 training; AM variants = 2 gradient passes (at x and at the FGSM point) + 1 training "
        "pass through classifier and generator. Targets: ADT_EXP per pass ≤ 1.1× PGD-AT; AM per step ≤ 1.0×. "
        "ADT_EXP's 5B batch runs as 5 forwards of B for images on CPU (`sample_batching='auto'`).",
        "",
    ]
    return lines


def write_timing_report(args: Any, timings: dict[str, float], started: float) -> None:
    command = f".venv/bin/python benchmarks/adversarial/run.py --timing-only --arch {args.arch} --threads {args.threads}"
    if args.timing_repeats != 21:
        command += f" --timing-repeats {args.timing_repeats}"
    lines = [
        f"# Adversarial training: time per step on digits ({args.arch.upper()}), timing only",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"{args.threads} thread(s); {args.timing_repeats} interleaved rounds × 5 steps; total "
        f"{(time.time() - started) / 60:.1f} min; load average (1/5/15 min) "
        f"{'/'.join(f'{v:.1f}' for v in args.load_start)} at start, "
        f"{'/'.join(f'{v:.1f}' for v in os.getloadavg())} at end on {os.cpu_count()} cores",
        f"- Generator width {GENERATOR_WIDTH[args.arch]}; training epsilon {args.train_epsilon}.",
        *timing_lines(timings),
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


def sanity_verdicts(
    table: dict[str, list[float]], checks: dict[str, list[float]], epsilons: list[float]
) -> list[str]:
    mean = statistics.mean
    pgd_curve = [mean(table[f"robust_acc_pgd_eps{e:g}"]) for e in epsilons]
    falls = all(b <= a + 1e-9 for a, b in zip(pgd_curve, pgd_curve[1:], strict=False))
    steps = [mean(checks[k]) for k in ("pgd10", "pgd20", "pgd50", "pgd100")]
    more_steps_ok = all(b <= a + 0.01 for a, b in zip(steps, steps[1:], strict=False))
    large = mean(checks["pgd20_eps1.0"])
    transfer_ok = mean(checks["transfer"]) >= mean(checks["pgd20"]) - 0.01
    return [
        f"PGD-20 accuracy {'falls' if falls else 'does NOT fall'} monotonically with epsilon",
        f"eps 1.0 accuracy {large:.3f} ({'~0' if large < 0.02 else 'NOT ~0'})",
        f"more PGD steps {'never raise' if more_steps_ok else 'RAISE'} accuracy (tolerance 0.01)",
        f"transfer {'is not stronger than' if transfer_ok else 'is STRONGER than'} white-box (tolerance 0.01)",
    ]


if __name__ == "__main__":
    main()
