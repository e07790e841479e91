"""Distillation: a small student (MLP 64-64-10) trained alone vs distilled from the shipped ensemble teacher.

Two teachers: the shipped ensemble (15 epochs, weaker than a student trained 40 epochs) and the same
recipe retrained for longer (``--teacher-epochs``). Temperature T and the soft-target weight alpha are chosen on the VALIDATION split (a grid, the
student's validation NLL, mean over the tuning seeds); only the chosen setting and the student alone
are then run on the test split, with other seeds. Every run uses the teacher's data split (split
seed 0), so no test or validation example was seen by the teacher.

python benchmarks/distill/run.py            # both teachers: grid + test runs (~15 min on a busy 2-core VM), writes RESULTS.md
python benchmarks/distill/run.py --quick    # smoke run (tiny grid, 2 epochs), prints only
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from litplug.core.data import DigitsDataModule
from litplug.core.metrics import ClassificationMetrics
from litplug.core.models import MLP
from litplug.core.module import LitplugModule
from litplug.plugins.distill import Distill, load_teacher, save_teacher_checkpoint
from litplug.plugins.ensemble import DeepEnsemble

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_teacher import train_teacher  # noqa: E402  (this folder's teacher recipe)

RESULTS = Path(__file__).with_name("RESULTS.md")
TEACHER = "plugins/distill/assets/digits_ensemble3_mlp128.pt"
METRICS = ("acc", "nll", "ece", "brier")


def fit_and_score(plugins: list, seed: int, epochs: int, lr: float, stage: str) -> dict[str, float]:
    """Train the student with ``plugins`` and score it on the ``stage`` split ("val" or "test")."""
    L.seed_everything(seed, verbose=False)
    module = LitplugModule(MLP(64, [64]), plugins=plugins, optimizer=lambda p: torch.optim.Adam(p, lr=lr))
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    data = DigitsDataModule(batch_size=64)  # split seed 0: the teacher's split (no leakage)
    trainer.fit(module, datamodule=data)
    if stage == "val":
        trainer.limit_val_batches = 1.0
        result = trainer.validate(module, datamodule=data, verbose=False)[0]
    else:
        result = trainer.test(module, datamodule=data, verbose=False)[0]
    return {m: float(result[f"{stage}/{m}"]) for m in METRICS}


def teacher_plugin(path: str, temperature: float, alpha: float) -> Distill:
    return Distill(
        path,
        teacher_model=MLP(64, [128]),
        teacher_plugins=[DeepEnsemble(3, path="sequential", reliability_diagram=False)],
        temperature=temperature,
        alpha=alpha,
    )


@torch.no_grad()
def teacher_scores(path: str) -> dict[str, dict[str, float]]:
    """The teacher's own metrics on the validation and test splits (context for the student rows)."""
    teacher = load_teacher(
        path, MLP(64, [128]), [DeepEnsemble(3, path="sequential", reliability_diagram=False)]
    )
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    data.setup("test")
    scores = {}
    for stage, loader in (("val", data.val_dataloader()), ("test", data.test_dataloader())):
        metrics = ClassificationMetrics(num_classes=10)
        for inputs, targets in loader:
            metrics.update(teacher.log_probs(teacher(inputs), "test"), targets)
        scores[stage] = {k: float(m.compute()) for k, m in metrics.metrics().items()}
    return scores


def make_teacher(epochs: int, out_dir: Path) -> str:
    """A deep-ensemble teacher like the shipped one (3 x MLP 64-128-10, seed 0, split seed 0), trained
    for ``epochs`` epochs, written to ``out_dir`` (not the shipped asset)."""
    path = out_dir / f"teacher_ensemble3_mlp128_{epochs}ep.pt"
    save_teacher_checkpoint(train_teacher(epochs=epochs), path)
    return str(path)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(rows: dict[str, list[dict[str, float]]]) -> list[str]:
    lines = ["| student | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, results in rows.items():
        lines.append(f"| {name} | " + " | ".join(mean_std([r[m] for r in results]) for m in METRICS) + " |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: T, alpha in {4} x {0.5}, 2 epochs")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--tune-seeds", type=int, nargs="+", default=[100, 101])
    parser.add_argument("--test-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--teacher-epochs",
        type=int,
        nargs="+",
        default=[0, 15],
        help="teachers to distil from: 0 = the shipped asset (60 epochs), N = the same recipe retrained N epochs",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "litplug_distill"
    if args.quick:
        args.epochs, args.temperatures, args.alphas = 2, [4.0], [0.5]
        args.tune_seeds, args.test_seeds, args.teacher_epochs = [100], [0], [0, 1]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    start = time.perf_counter()
    alone_val = [fit_and_score([], s, args.epochs, args.lr, "val") for s in args.tune_seeds]
    alone_test = [fit_and_score([], s, args.epochs, args.lr, "test") for s in args.test_seeds]
    print(f"student alone: val nll {statistics.mean(r['nll'] for r in alone_val):.4f}", flush=True)
    studies = []
    for teacher_epochs in args.teacher_epochs:
        path = TEACHER if teacher_epochs == 0 else make_teacher(teacher_epochs, args.tmp)
        label = (
            "shipped teacher (60 epochs)"
            if teacher_epochs == 0
            else f"teacher retrained {teacher_epochs} epochs"
        )
        studies.append(tune_and_test(args, path, label))
    elapsed = time.perf_counter() - start
    for study in studies:
        print(study["label"])
        print("\n".join(table({"student alone": alone_test, **study["test"]})))
    if not args.quick:
        write_results(args, alone_val, alone_test, studies, elapsed)


def tune_and_test(args: argparse.Namespace, path: str, label: str) -> dict:
    """Grid on the validation split, then the chosen (T, alpha) on the test split."""
    grid: dict[tuple[float, float], list[dict[str, float]]] = {}
    for temperature in args.temperatures:
        for alpha in args.alphas:
            grid[(temperature, alpha)] = [
                fit_and_score([teacher_plugin(path, temperature, alpha)], s, args.epochs, args.lr, "val")
                for s in args.tune_seeds
            ]
            val = grid[(temperature, alpha)]
            print(
                f"{label}: val T={temperature:g} a={alpha:g}: acc {statistics.mean(r['acc'] for r in val):.4f} "
                f"nll {statistics.mean(r['nll'] for r in val):.4f}",
                flush=True,
            )
    best = min(grid, key=lambda key: statistics.mean(r["nll"] for r in grid[key]))
    print(f"{label}: chosen on validation NLL: T={best[0]:g} alpha={best[1]:g}", flush=True)
    chosen = f"distilled T={best[0]:g} a={best[1]:g} (chosen on val)"
    test = {
        chosen: [
            fit_and_score([teacher_plugin(path, *best)], s, args.epochs, args.lr, "test")
            for s in args.test_seeds
        ]
    }
    return {"label": label, "grid": grid, "best": best, "test": test, "teacher": teacher_scores(path)}


def write_results(
    args: argparse.Namespace,
    alone_val: list[dict[str, float]],
    alone_test: list[dict[str, float]],
    studies: list[dict],
    elapsed: float,
) -> None:
    load = os.getloadavg()
    command = ".venv/bin/python benchmarks/distill/run.py " + " ".join(sys.argv[1:])
    alone_nll = statistics.mean(r["nll"] for r in alone_val)
    lines = [
        "# Distillation",
        "",
        f"- Command: `{command.strip()}`",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"{args.threads} thread(s); wall time {elapsed / 60:.1f} min; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared 2-core machine).",
        f"- Student: MLP 64-64-10, Adam lr {args.lr}, batch 64, {args.epochs} epochs, digits split seed 0 "
        "(the teachers' split: no teacher saw a validation or test example).",
        "- Teachers: deep ensembles of 3 x MLP 64-128-10 (benchmarks/distill/make_teacher.py, seed 0): the "
        "shipped asset (15 epochs) and, where listed, the same recipe retrained for longer.",
        f"- Tuning: T in {args.temperatures} x alpha in {args.alphas}, each with seeds {args.tune_seeds} "
        "(init + data order), scored on the validation split; the setting with the lowest mean validation "
        f"NLL is run on the test split with seeds {args.test_seeds}, next to the student alone (same "
        "schedule). Loss: (1 - alpha) CE + alpha T^2 KL(teacher_T || student_T).",
        "",
    ]
    for study in studies:
        teacher = study["teacher"]
        lines += [
            f"## {study['label']}",
            "",
            f"Teacher: val acc {teacher['val']['acc']:.4f} / NLL {teacher['val']['nll']:.4f}; test acc "
            f"{teacher['test']['acc']:.4f} / NLL {teacher['test']['nll']:.4f} / ECE {teacher['test']['ece']:.4f}.",
            "",
            "Validation grid (mean over the tuning seeds):",
            "",
            "| T | alpha | val acc | val NLL | val ECE | NLL vs student alone |",
            "|---|---|---|---|---|---|",
            f"| (student alone) | - | {statistics.mean(r['acc'] for r in alone_val):.4f} | {alone_nll:.4f} | "
            f"{statistics.mean(r['ece'] for r in alone_val):.4f} | - |",
        ]
        for (temperature, alpha), results in study["grid"].items():
            nll = statistics.mean(r["nll"] for r in results)
            mark = " **chosen**" if (temperature, alpha) == study["best"] else ""
            lines.append(
                f"| {temperature:g} | {alpha:g} | {statistics.mean(r['acc'] for r in results):.4f} | "
                f"{nll:.4f}{mark} | {statistics.mean(r['ece'] for r in results):.4f} | {nll - alone_nll:+.4f} |"
            )
        lines += [
            "",
            "Test split (mean ± std over the test seeds):",
            "",
            *table({"student alone": alone_test, **study["test"]}),
            "",
        ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
