"""Uncertainty benchmark: a single SmallCNN vs deep ensembles vs MIMO vs weight EMA, on the digits
test split and on shifted digits (Gaussian noise, rotations, translations at 5 severities).

Reports accuracy, NLL, ECE (15 bins, the core metric) and Brier score (mean +- std over seeds),
MIMO's and the ensembles' NLL next to their own members' NLL, training-time and inference-time
ratios to the single model, and two speed targets measured side by side (call-by-call interleaved
repeats, medians): MIMO M=3 evaluation forward vs the single model (the default summed input and the
tiled input), and the ensemble of 4 on the path its ``path="auto"`` chose vs its 4 members run one
after another (and the vmap path's own ratio).

    .venv/bin/python benchmarks/uncertainty/run.py --threads 1      # full run, writes RESULTS.md
    .venv/bin/python benchmarks/uncertainty/run.py --quick          # smoke run (1 seed, 2 epochs)
    .venv/bin/python benchmarks/uncertainty/run.py --speed-only --threads 1   # re-time, keep the tables
    .venv/bin/python benchmarks/uncertainty/run.py --mimo-sweep --threads 1
        # MIMO's capacity question: single vs MIMO M in {2, 3} x rho in {0, 0.5} on wider SmallCNNs
        # (--widths, default 64 96), writes RESULTS_mimo_width.md

The GPU figure of the ensemble target (vmap <= 0.5x sequential) is checked by ``gpu_check.py``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from litplug.core.data import DigitsDataModule
from litplug.core.data.shifted import shifted_digits_test_sets
from litplug.core.metrics import ClassificationMetrics
from litplug.core.models import SmallCNN
from litplug.core.module import LitplugModule
from litplug.core.plots import calibration_bins, plot_reliability_diagram
from litplug.core.plugin import Plugin
from litplug.plugins.ensemble import DeepEnsemble, MemberStack, sum_of_member_losses
from litplug.plugins.mimo import MIMO
from litplug.plugins.mimo import member_metrics as mimo_member_metrics

try:  # built in parallel by a teammate; the benchmark says so when it is missing
    from litplug.plugins.ema import EMA
except ImportError:  # pragma: no cover - depends on the checkout
    EMA = None  # type: ignore[assignment,misc]

HERE = Path(__file__).resolve().parent
METRICS = ("acc", "nll", "ece", "brier")
SPEED_HEADING = "## Speed targets (side by side, call-by-call interleaved repeats, medians)"
WARMUP = 10  # untimed rounds before the timed repeats (allocator, oneDNN primitive and weight caches)


@dataclass
class Method:
    name: str
    make_plugins: Callable[[], list[Plugin]]
    members: int = 1  # ensemble size or MIMO M (for member NLL)
    kind: str = "single"  # single | ensemble | mimo | ema


@dataclass
class Trained:
    method: Method
    module: LitplugModule
    train_seconds: float
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # test set -> metric -> value


def build_methods(args: argparse.Namespace) -> tuple[list[Method], list[str]]:
    methods = [Method("single", lambda: [])]
    if args.mimo_sweep:
        for m in args.sweep_members:
            for rho in args.rhos:
                methods.append(
                    Method(
                        f"MIMO M={m} rho={rho:g}",
                        lambda m=m, rho=rho: [
                            MIMO(m, rho, args.batch_repetitions, reliability_diagram=False)
                        ],
                        m,
                        "mimo",
                    )
                )
        return methods, []
    for n in (3, 4):
        methods.append(
            Method(
                f"ensemble N={n}",
                lambda n=n: [DeepEnsemble(num_members=n, path="auto", reliability_diagram=False)],
                n,
                "ensemble",
            )
        )
    for m in (2, 3, 4):
        for rho in args.rhos:
            methods.append(
                Method(
                    f"MIMO M={m} rho={rho:g}",
                    lambda m=m, rho=rho: [MIMO(m, rho, args.batch_repetitions, reliability_diagram=False)],
                    m,
                    "mimo",
                )
            )
    missing = []
    if EMA is not None:
        methods.append(Method(f"EMA decay={args.ema_decay:g}", lambda: [EMA(decay=args.ema_decay)], 1, "ema"))
    else:
        missing.append("EMA (litplug.plugins.ema not importable in this checkout)")
    return methods, missing


def train(method: Method, seed: int, args: argparse.Namespace, width: int) -> Trained:
    L.seed_everything(seed, verbose=False)
    module = LitplugModule(
        SmallCNN(width=width),
        plugins=method.make_plugins(),
        optimizer=lambda params: torch.optim.Adam(params, lr=args.lr),
        lr_scheduler=(
            (lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs))
            if args.cosine
            else None
        ),
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(args.tmp),
    )
    data = DigitsDataModule(batch_size=args.batch_size, seed=seed, form="image")
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return Trained(method, module, time.perf_counter() - start)


@torch.no_grad()
def eval_forward(module: LitplugModule, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The evaluation path of one test batch: transform (MIMO tiles) -> forward -> log-probs."""
    batch_inputs, _ = module.hooks.transform_batch(module=module, batch=(inputs, targets), stage="test")
    outputs = module(batch_inputs)
    return module.log_probs(outputs, "test"), outputs


def member_nll(trained: Trained, outputs: Tensor, targets: Tensor) -> float:
    """Mean NLL of the individual members (MIMO heads / ensemble members); the model itself otherwise."""
    kind = trained.method.kind
    if kind == "mimo":
        return float(mimo_member_metrics(outputs, targets, trained.method.members)["member_nll"])
    if kind == "ensemble":  # outputs [N, B, K]
        log_probs = F.log_softmax(outputs.float(), -1)
        return float(-log_probs.gather(-1, targets.expand(outputs.shape[0], -1).unsqueeze(-1)).mean())
    return float(F.cross_entropy(outputs.float(), targets))


def score(trained: Trained, test_sets: dict[str, Any]) -> None:
    module = trained.module
    module.eval()
    module.hooks.on_eval_start(module=module, stage="test")  # EMA swaps its weights in here
    try:
        for name, dataset in test_sets.items():
            inputs, targets = dataset.tensors
            log_probs, outputs = eval_forward(module, inputs, targets)
            metrics = ClassificationMetrics(num_classes=10)
            metrics.update(log_probs, targets)
            values = {k: float(m.compute()) for k, m in metrics.metrics().items()}
            values["member_nll"] = member_nll(trained, outputs, targets)
            trained.scores[name] = values
    finally:
        module.hooks.on_eval_end(module=module, stage="test")


def time_inference(runs: list[Trained], inputs: Tensor, targets: Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of the evaluation path per method, repeats interleaved across methods."""
    samples: dict[str, list[float]] = {r.method.name: [] for r in runs}
    for run in runs:
        run.module.eval()
        run.module.hooks.on_eval_start(module=run.module, stage="test")
        eval_forward(run.module, inputs, targets)  # warm-up
    try:
        for _ in range(repeats):
            for run in runs:
                start = time.perf_counter()
                eval_forward(run.module, inputs, targets)
                samples[run.method.name].append(time.perf_counter() - start)
    finally:
        for run in runs:
            run.module.hooks.on_eval_end(module=run.module, stage="test")
    return {name: statistics.median(values) for name, values in samples.items()}


def mimo_plugin(module: LitplugModule) -> MIMO:
    return next(p for p in module.plugins if isinstance(p, MIMO))


def time_mimo_eval(
    single: LitplugModule, mimo: LitplugModule, inputs: Tensor, targets: Tensor, repeats: int
) -> dict[str, float]:
    """Median seconds of the evaluation path: single, MIMO with the summed input, MIMO tiled.

    Call-by-call interleaved, in a fresh random order every round. The two MIMO variants are the
    same trained module with its plugin's evaluation input switched between calls.
    """
    plugin = mimo_plugin(mimo)
    variants = {"single": (single, None), "summed": (mimo, "summed"), "tiled": (mimo, "tiled")}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for module, _ in variants.values():
        module.eval()
        module.hooks.on_eval_start(module=module, stage="test")
    saved = plugin._eval_input
    try:
        order = random.Random(0)
        names = list(variants)
        for repeat in range(WARMUP + repeats):
            order.shuffle(names)  # a fresh order each round: no variant always follows the same one
            for name in names:
                module, mode = variants[name]
                if mode is not None:
                    plugin._eval_input = mode
                start = time.perf_counter()
                eval_forward(module, inputs, targets)
                if repeat >= WARMUP:
                    samples[name].append(time.perf_counter() - start)
    finally:
        plugin._eval_input = saved
        for module, _ in variants.values():
            module.hooks.on_eval_end(module=module, stage="test")
    return {name: statistics.median(values) for name, values in samples.items()}


def time_ensemble_paths(stack: MemberStack, inputs: Tensor, targets: Tensor, repeats: int) -> dict[str, Any]:
    """Median seconds per path (the one ``path="auto"`` chose at fit start, sequential, vmap) of an
    evaluation forward and of a training step (forward + backward), call-by-call interleaved in a
    fresh random order every round (``auto`` is timed as its own calls even when it chose sequential, so
    the ``auto / sequential`` ratio also shows the noise floor).

    The stack is left as it was (RNG forked, buffers restored, mode reset).
    """
    chosen = {"train": stack.train_path, "eval": stack.eval_path}
    params = [p for p in stack.parameters() if p.requires_grad]
    saved_buffers = [b.detach().clone() for b in stack.buffers()]
    was_training = stack.training

    def run(kind: str, path: str) -> None:
        if kind == "eval":
            stack.eval()
            with torch.no_grad():
                stack.forward_with(path, inputs)  # type: ignore[arg-type]
        else:
            stack.train()
            loss = sum_of_member_losses(stack.forward_with(path, inputs), targets)  # type: ignore[arg-type]
            torch.autograd.grad(loss, params)

    variants = [(kind, label) for kind in ("eval", "train") for label in ("auto", "sequential", "vmap")]
    samples: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    try:
        with torch.random.fork_rng(devices=[]):
            order = random.Random(0)
            for kind in ("eval", "train"):  # each kind on its own: an eval call never follows a train step
                labels = ["auto", "sequential", "vmap"]
                for repeat in range(WARMUP + repeats):
                    order.shuffle(labels)  # a fresh order each round: no path always follows the same one
                    for label in labels:
                        path = chosen[kind] if label == "auto" else label
                        start = time.perf_counter()
                        run(kind, path)
                        if repeat >= WARMUP:
                            samples[(kind, label)].append(time.perf_counter() - start)
    finally:
        with torch.no_grad():
            for buffer, saved in zip(stack.buffers(), saved_buffers, strict=True):
                buffer.copy_(saved)
        stack.train(was_training)
    result: dict[str, Any] = {f"{k}_{lab}": statistics.median(v) for (k, lab), v in samples.items()}
    result["chosen_train"], result["chosen_eval"] = chosen["train"], chosen["eval"]
    return result


# ---------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def shifted_mean(scores: dict[str, dict[str, float]], metric: str, severity: int | None = None) -> float:
    keys = [k for k in scores if k != "clean" and (severity is None or k.endswith(f"_{severity}"))]
    return statistics.mean(scores[k][metric] for k in keys)


def metric_table(
    methods: list[Method], runs: dict[str, list[Trained]], pick: Callable[[Trained, str], float]
) -> list[str]:
    lines = [
        "| method | accuracy | NLL | ECE | Brier | members' NLL | NLL gain over members |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        rs = runs[method.name]
        cells = [mean_std([pick(r, metric) for r in rs]) for metric in METRICS]
        members = [pick(r, "member_nll") for r in rs]
        gain = [pick(r, "member_nll") - pick(r, "nll") for r in rs]
        has_members = method.kind in ("mimo", "ensemble")
        lines.append(
            f"| {method.name} | "
            + " | ".join(cells)
            + f" | {mean_std(members) if has_members else '-'} | {mean_std(gain) if has_members else '-'} |"
        )
    return lines


def severity_table(methods: list[Method], runs: dict[str, list[Trained]], severities: list[int]) -> list[str]:
    head = "| method | " + " | ".join(f"sev {s} NLL / ECE" for s in severities) + " |"
    lines = [head, "|---|" + "---|" * len(severities)]
    for method in methods:
        rs = runs[method.name]
        cells = []
        for s in severities:
            nll = statistics.mean(shifted_mean(r.scores, "nll", s) for r in rs)
            ece = statistics.mean(shifted_mean(r.scores, "ece", s) for r in rs)
            cells.append(f"{nll:.3f} / {ece:.3f}")
        lines.append(f"| {method.name} | " + " | ".join(cells) + " |")
    return lines


def cost_table(
    methods: list[Method], runs: dict[str, list[Trained]], infer: dict[str, float], params: dict[str, int]
) -> list[str]:
    lines = [
        "| method | parameters | training time ratio (median over seeds) | inference time ratio |",
        "|---|---|---|---|",
    ]
    single_train = [r.train_seconds for r in runs["single"]]
    for method in methods:
        ratios = [r.train_seconds / s for r, s in zip(runs[method.name], single_train, strict=True)]
        lines.append(
            f"| {method.name} | {params[method.name]:,} | {statistics.median(ratios):.2f}x | "
            f"{infer[method.name] / infer['single']:.2f}x |"
        )
    return lines


def save_reliability_diagrams(picked: list[Trained], test_set: Any, out_dir: Path) -> list[str]:
    inputs, targets = test_set.tensors
    names = []
    for run in picked:
        run.module.hooks.on_eval_start(module=run.module, stage="test")
        try:
            log_probs, _ = eval_forward(run.module, inputs, targets)
        finally:
            run.module.hooks.on_eval_end(module=run.module, stage="test")
        slug = run.method.name.replace(" ", "_").replace("=", "").replace(".", "")
        path = out_dir / f"reliability_{slug}.png"
        plot_reliability_diagram(calibration_bins(log_probs.exp(), targets), path, title=run.method.name)
        names.append(path.name)
    return names


# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--width", type=int, default=32, help="SmallCNN stem width")
    parser.add_argument(
        "--mimo-sweep",
        action="store_true",
        help="only single vs MIMO (M in --sweep-members, rho in --rhos) at each of --widths",
    )
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="only the speed targets (3 models, seed 0); replaces the speed section of --out",
    )
    parser.add_argument(
        "--widths", type=int, nargs="+", default=[64, 96], help="SmallCNN widths of --mimo-sweep"
    )
    parser.add_argument("--sweep-members", type=int, nargs="+", default=[2, 3], help="MIMO M of --mimo-sweep")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--cosine", action="store_true", help="cosine learning-rate decay to 0")
    parser.add_argument("--batch-repetitions", type=int, default=2, help="MIMO batch repetitions")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.0, 0.5], help="MIMO input repetition")
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="default RESULTS.md (RESULTS_mimo_width.md)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = HERE / ("RESULTS_mimo_width.md" if args.mimo_sweep else "RESULTS.md")
    if args.quick:
        args.seeds, args.epochs, args.timing_repeats = 1, 2, 5
        if args.out.parent == HERE:
            args.out = Path("/tmp") / f"uncertainty_quick_{args.out.name}"
    args.tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "litplug_uncertainty"
    return args


def train_all(
    methods: list[Method], args: argparse.Namespace, width: int
) -> tuple[dict[str, list[Trained]], list[Trained]]:
    """Train and score every method on every seed; seed 0's modules are kept (for timing)."""
    runs: dict[str, list[Trained]] = {m.name: [] for m in methods}
    first_seed: list[Trained] = []
    for seed in range(args.seeds):
        test_sets = shifted_digits_test_sets(form="image", split_seed=seed, shift_seed=seed)
        for method in methods:
            trained = train(method, seed, args, width)
            score(trained, test_sets)
            runs[method.name].append(trained)
            clean = trained.scores["clean"]
            print(
                f"width {width} seed {seed} {method.name:22s} train {trained.train_seconds:6.1f}s  "
                f"clean acc {clean['acc']:.4f} nll {clean['nll']:.4f} ece {clean['ece']:.4f} "
                f"(members {clean['member_nll']:.4f})  shifted nll {shifted_mean(trained.scores, 'nll'):.4f}",
                flush=True,
            )
            if seed == 0:
                first_seed.append(trained)
            else:
                trained.module = None  # type: ignore[assignment] # keep memory flat
    return runs, first_seed


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.mimo_sweep:
        main_sweep(args)
        return
    if args.speed_only:
        main_speed(args)
        return
    methods, missing = build_methods(args)
    wall_start = time.perf_counter()
    runs, first_seed = train_all(methods, args, args.width)
    params = {r.method.name: sum(p.numel() for p in r.module.parameters()) for r in first_seed}

    # -- inference cost and speed targets (seed 0's trained models, side by side) -----------------
    clean_set = shifted_digits_test_sets(kinds=(), form="image", split_seed=0)["clean"]
    test_x, test_y = clean_set.tensors
    infer = time_inference(first_seed, test_x, test_y, args.timing_repeats)
    by_name = {r.method.name: r for r in first_seed}
    speed_mimo, ens_times = speed_targets(by_name, test_x, test_y, args)
    diagrams = save_reliability_diagrams(
        [by_name["single"], by_name["ensemble N=4"], by_name["MIMO M=3 rho=0.5"], by_name["MIMO M=3 rho=0"]],
        clean_set,
        args.out.parent,
    )
    elapsed = time.perf_counter() - wall_start
    write_results(args, methods, runs, infer, params, speed_mimo, ens_times, diagrams, missing, elapsed)
    print(f"wrote {args.out} ({elapsed / 60:.1f} min)")


def speed_targets(
    by_name: dict[str, Trained], test_x: Tensor, test_y: Tensor, args: argparse.Namespace
) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, Any]]]:
    """MIMO M=3 vs single and the ensemble of 4's paths, at batch 64 and the whole test split."""
    speed_mimo = {}
    for batch in (64, test_x.shape[0]):
        speed_mimo[batch] = time_mimo_eval(
            by_name["single"].module,
            by_name["MIMO M=3 rho=0"].module,
            test_x[:batch],
            test_y[:batch],
            args.timing_repeats * 10,
        )
    stack = by_name["ensemble N=4"].module.model
    ens_times = {}
    for batch in (args.batch_size, test_x.shape[0]):
        ens_times[batch] = time_ensemble_paths(stack, test_x[:batch], test_y[:batch], args.timing_repeats * 2)
    return speed_mimo, ens_times


def main_speed(args: argparse.Namespace) -> None:
    """Only the speed targets: seed 0's single, MIMO M=3 rho=0 and ensemble N=4 are trained, timed,
    and the speed section of ``--out`` (RESULTS.md) is replaced, with this run's command and date."""
    wall_start = time.perf_counter()
    methods, _ = build_methods(args)
    needed = [m for m in methods if m.name in ("single", "MIMO M=3 rho=0", "ensemble N=4")]
    by_name = {m.name: train(m, 0, args, args.width) for m in needed}
    clean_set = shifted_digits_test_sets(kinds=(), form="image", split_seed=0)["clean"]
    test_x, test_y = clean_set.tensors
    speed_mimo, ens_times = speed_targets(by_name, test_x, test_y, args)
    elapsed = time.perf_counter() - wall_start
    load = os.getloadavg()
    command = ".venv/bin/python benchmarks/uncertainty/run.py " + " ".join(sys.argv[1:])
    section = speed_lines(speed_mimo, ens_times)
    section[1:1] = [
        "",
        f"Measured by `{command.strip()}` (seed 0's models retrained, {args.epochs} epochs; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {args.threads} thread(s); "
        f"{elapsed / 60:.1f} min; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}). "
        f"MIMO: {args.timing_repeats * 10} repeats per variant; ensemble: {args.timing_repeats * 2}.",
    ]
    text = "\n".join(section) + "\n"
    old = args.out.read_text() if args.out.exists() else ""
    if SPEED_HEADING in old:
        head, _, rest = old.partition(SPEED_HEADING)
        tail = rest[rest.index("\nReliability diagrams") :] if "\nReliability diagrams" in rest else ""
        args.out.write_text(head + text + tail)
    else:
        args.out.write_text(old + "\n" + text)
    print(text)
    print(f"wrote the speed section of {args.out} ({elapsed / 60:.1f} min)")


def main_sweep(args: argparse.Namespace) -> None:
    """MIMO on wider SmallCNNs: single vs MIMO (M, rho) per width, with the members' NLL."""
    methods, _ = build_methods(args)
    wall_start = time.perf_counter()
    by_width = {width: train_all(methods, args, width)[0] for width in args.widths}
    elapsed = time.perf_counter() - wall_start
    write_sweep(args, methods, by_width, elapsed)
    print(f"wrote {args.out} ({elapsed / 60:.1f} min)")


def header_lines(args: argparse.Namespace, title: str, elapsed: float, widths: str) -> list[str]:
    command = ".venv/bin/python benchmarks/uncertainty/run.py " + " ".join(sys.argv[1:])
    load = os.getloadavg()
    return [
        f"# {title}",
        "",
        f"- Command: `{command.strip()}`",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"{args.threads} thread(s); wall time {elapsed / 60:.1f} min; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.",
        "- Absolute times depend on the machine's load (above); the side-by-side ratios (interleaved",
        "  repeats, medians) are what to compare.",
        f"- Model: SmallCNN width {widths} (stem conv -> strided conv -> pool -> head) on 8x8 digits "
        f"(form=image, unit scale), Adam lr {args.lr}{' with cosine decay to 0' if args.cosine else ''}, "
        f"batch {args.batch_size}, {args.epochs} epochs, seeds 0..{args.seeds - 1} (seed = split + init + order). "
        f"MIMO: batch_repetitions={args.batch_repetitions} (each step trains on "
        f"{args.batch_repetitions}x{args.batch_size} rows), loss = sum over heads.",
        "- Shifted digits: core/data/shifted.py, Gaussian noise / rotation / translation, severities 1..5, "
        "generated from each seed's test split (seeded).",
        "- Metrics: accuracy, NLL, ECE (15 bins, torchmetrics, the core metric), Brier; mean ± std over seeds. "
        "'members' NLL' is the mean NLL of the individual MIMO heads / ensemble members on the same data; "
        "'gain' = members' NLL - combined NLL (positive: combining helps).",
        "",
    ]


def paired_delta(runs: dict[str, list[Trained]], name: str, pick: Callable[[Trained], float]) -> str:
    """Mean ± std over seeds of (method - single of the same seed); negative NLL delta = MIMO better."""
    deltas = [pick(r) - pick(s) for r, s in zip(runs[name], runs["single"], strict=True)]
    wins = sum(d < 0 for d in deltas)
    return f"{mean_std(deltas)} ({wins}/{len(deltas)} seeds lower)"


def write_sweep(
    args: argparse.Namespace,
    methods: list[Method],
    by_width: dict[int, dict[str, list[Trained]]],
    elapsed: float,
) -> None:
    lines = header_lines(
        args, "MIMO on wider SmallCNNs: capacity sweep", elapsed, "/".join(str(w) for w in args.widths)
    )
    summary = [
        "## Summary: MIMO minus the single model of the same width and seed (NLL; negative = MIMO better)",
        "",
        "| width | method | clean NLL - single | shifted NLL - single | clean NLL gain over own members |",
        "|---|---|---|---|---|",
    ]
    for width, runs in by_width.items():
        for method in methods[1:]:
            gain = [r.scores["clean"]["member_nll"] - r.scores["clean"]["nll"] for r in runs[method.name]]
            summary.append(
                f"| {width} | {method.name} | "
                f"{paired_delta(runs, method.name, lambda r: r.scores['clean']['nll'])} | "
                f"{paired_delta(runs, method.name, lambda r: shifted_mean(r.scores, 'nll'))} | {mean_std(gain)} |"
            )
    lines += summary + [""]
    for width, runs in by_width.items():
        params = ""
        lines += [f"## Width {width}{params}", "", "### Clean digits test split", ""]
        lines += metric_table(methods, runs, lambda r, m: r.scores["clean"][m]) + [""]
        lines += ["### Shifted digits (mean over 3 kinds x 5 severities)", ""]
        lines += metric_table(methods, runs, lambda r, m: shifted_mean(r.scores, m)) + [""]
        single_train = [r.train_seconds for r in runs["single"]]
        ratios = []
        for method in methods:
            per_seed = [r.train_seconds / s for r, s in zip(runs[method.name], single_train, strict=True)]
            ratios.append(f"{method.name} {statistics.median(per_seed):.2f}x")
        lines += ["Training time / single (median over seeds): " + ", ".join(ratios) + ".", ""]
    args.out.write_text("\n".join(lines) + "\n")


def speed_lines(speed_mimo: dict[int, dict[str, float]], ens_times: dict[int, dict[str, Any]]) -> list[str]:
    """The speed-target section (MIMO eval vs single; the ensemble's auto path vs sequential)."""
    lines = [SPEED_HEADING, "", "| target | measured | goal |", "|---|---|---|"]
    for batch, t in speed_mimo.items():
        ratio = t["summed"] / t["single"]
        verdict = "met" if ratio <= 1.10 else "NOT met"
        lines.append(
            f"| MIMO M=3 eval forward / single, batch {batch} (default: summed input weights) | "
            f"{ratio:.2f}x ({verdict}) | <= 1.10x |"
        )
        lines.append(
            f"| MIMO M=3 eval forward / single, batch {batch}, tiled input (eval_input='tiled', before) | "
            f"{t['tiled'] / t['single']:.2f}x | (reference) |"
        )
    for batch, t in ens_times.items():
        for kind in ("eval", "train"):
            what = "evaluation forward" if kind == "eval" else "training step (fwd+bwd)"
            chosen = t[f"chosen_{kind}"]
            noise = float(t[f"{kind}_auto"]) / float(t[f"{kind}_sequential"])
            vmap_ratio = float(t[f"{kind}_vmap"]) / float(t[f"{kind}_sequential"])
            if chosen == "sequential":  # the same calls as the baseline: 1.00x by identity
                measured = (
                    f"1.00x (met: auto chose sequential, the baseline's own path; two interleaved timings "
                    f"of it differed by {noise:.2f}x, the noise floor)"
                )
            else:
                verdict = "met" if noise <= 1.0 else "NOT met"
                measured = f"{noise:.2f}x ({verdict}; auto chose vmap)"
            lines.append(
                f"| ensemble of 4, path='auto' / 4 sequential members, {what}, batch {batch} | {measured} | "
                "<= 1.0x on CPU |"
            )
            lines.append(
                f"| ensemble of 4, vmap path / 4 sequential members, {what}, batch {batch} | {vmap_ratio:.2f}x | "
                "GPU: <= 0.5x (`gpu_check.py`; a CPU figure is no evidence either way) |"
            )
    lines += [
        "",
        "The ensemble's path was chosen by `DeepEnsemble(path='auto')` at fit start (timing both paths on "
        "the first training batch, keeping the CPU's sequential path unless vmap is >10% faster). The GPU "
        "target is not measured here: `benchmarks/uncertainty/gpu_check.py` measures it on a CUDA machine.",
    ]
    return lines


def write_results(
    args: argparse.Namespace,
    methods: list[Method],
    runs: dict[str, list[Trained]],
    infer: dict[str, float],
    params: dict[str, int],
    speed_mimo: dict[int, dict[str, float]],
    ens_times: dict[int, dict[str, Any]],
    diagrams: list[str],
    missing: list[str],
    elapsed: float,
) -> None:
    severities = sorted({int(k.rsplit("_", 1)[1]) for k in runs["single"][0].scores if k != "clean"})
    lines = header_lines(
        args, "Uncertainty benchmark: single model, deep ensembles, MIMO, EMA", elapsed, str(args.width)
    )
    lines.insert(
        -1,
        "- Ensembles: DeepEnsemble(path='auto'). "
        + (f"EMA: decay {args.ema_decay}. " if not missing else "")
        + "MIMO evaluation: the plugin's default eval_input='auto' (summed input-layer weights).",
    )
    lines += [
        "MIMO's capacity question (wider SmallCNNs, longer schedule): `RESULTS_mimo_width.md` and "
        "`RESULTS_mimo_width_30ep.md` (`--mimo-sweep`). The GPU half of the speed targets: `gpu_check.py`.",
        "",
    ]
    if missing:
        lines += ["**Missing:** " + "; ".join(missing), ""]
    lines += ["## Clean digits test split", ""]
    lines += metric_table(methods, runs, lambda r, m: r.scores["clean"][m]) + [""]
    lines += ["## Shifted digits (mean over 3 kinds x 5 severities)", ""]
    lines += metric_table(methods, runs, lambda r, m: shifted_mean(r.scores, m)) + [""]
    lines += ["### NLL / ECE by severity (mean over kinds and seeds)", ""]
    lines += severity_table(methods, runs, severities) + [""]
    lines += ["## Cost", ""]
    lines += [
        "Training time: wall-clock `trainer.fit`, ratio to the single model of the same seed. Inference: "
        "the evaluation path (MIMO's default summed input and head averaging included) on the clean test "
        "split in one batch, "
        f"median of {args.timing_repeats} interleaved repeats, seed 0's models.",
        "",
    ]
    lines += cost_table(methods, runs, infer, params) + [""]
    lines += speed_lines(speed_mimo, ens_times)
    lines += [
        "",
        "Reliability diagrams (clean test split, seed 0): " + ", ".join(f"`{d}`" for d in diagrams),
        "",
    ]
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
