"""Why are the amortised ADT variants weaker than PGD-AT on digits? Generator strength over training.

    .venv/bin/python benchmarks/adversarial/generator_diagnostics.py      # ~5 min on a loaded 2-core machine

Trains the digits MLP (as ``run.py``: Adam 1e-3, batch 64, training epsilon 0.1, seed 0) with PGD-AT-7
and with ADT_EXP-AM / ADT_IMP-AM under several generator learning rates, entropy weights and run
lengths, in a plain loop through the plugin's hooks (no Lightning). Every few epochs it measures, on
a fixed batch of 128 training images with the classifier in eval mode: the classifier's CE on clean
inputs, on the generator's perturbation and on a PGD-7 perturbation (eps 0.1, step eps/4), and the
mean |delta| / eps of the generator's perturbation. At the end: clean and PGD-20 test accuracy at
eps 0.1. Writes ``DIAGNOSTICS.md`` next to this file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402

from litplug.core.module import LitplugModule  # noqa: E402
from litplug.plugins.adt import AdversarialDistributionalTraining  # noqa: E402
from litplug.plugins.adt.functional import amortized_inputs  # noqa: E402
from litplug.plugins.attacks import evaluation_attack_context, pgd  # noqa: E402
from litplug.plugins.pgd_at import PGDAdversarialTraining  # noqa: E402

#: (method, generator lr, entropy weight or None for the paper's, epochs)
CONFIGS = [
    ("pgd_at", 0.0, None, 20),
    ("exp_am", 2e-4, None, 20),
    ("exp_am", 2e-3, None, 20),
    ("exp_am", 2e-4, None, 80),
    ("imp_am", 2e-4, None, 20),
    ("imp_am", 2e-3, None, 20),
    ("imp_am", 2e-4, 0.0, 20),
    ("imp_am", 2e-3, 0.0, 20),
    ("imp_am", 2e-4, None, 80),
]


def diagnose(method: str, generator_lr: float, entropy_weight: float | None, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    if method == "pgd_at":
        plugin: Any = PGDAdversarialTraining(epsilon=0.1, steps=7)
    else:
        plugin = AdversarialDistributionalTraining(
            variant=method, epsilon=0.1, generator_lr=generator_lr, entropy_weight=entropy_weight
        )
    module = LitplugModule(run.make_model("mlp"), plugins=[plugin])
    optimizer = torch.optim.Adam(module.model.parameters(), lr=1e-3)
    data = run.make_data("mlp", seed)
    data.setup()
    x_train, y_train = data.datasets["train"].tensors
    x_test, y_test = data.datasets["test"].tensors
    module.hooks.on_fit_start(module=module, sample_batch=(x_train[:64], y_train[:64]))
    order = torch.Generator().manual_seed(seed)
    probe_x, probe_y = x_train[:128], y_train[:128]
    log, steps = [], 0
    every = max(1, epochs // 4)
    for epoch in range(1, epochs + 1):
        module.train()
        permutation = torch.randperm(len(x_train), generator=order)
        for start in range(0, len(x_train) - 63, 64):
            index = permutation[start : start + 64]
            batch = module.hooks.transform_batch(
                module=module, batch=(x_train[index], y_train[index]), stage="train"
            )
            outputs = module(batch[0])
            loss = F.cross_entropy(outputs, batch[1])
            extras = module.hooks.extra_losses(
                module=module, outputs=outputs, targets=batch[1], batch=batch, stage="train"
            )
            (loss + sum(extras.values()) if extras else loss).backward()
            module.hooks.on_before_optimizer_step(module=module, optimizer=optimizer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
        if epoch % every == 0 or epoch == epochs:
            model = module.model.eval()
            with evaluation_attack_context(model, seed=0):
                x_pgd = pgd(model, probe_x, probe_y, 0.1, 0.025, 7)
                row = {
                    "epoch": epoch,
                    "steps": steps,
                    "ce_clean": F.cross_entropy(model(probe_x), probe_y).item(),
                    "ce_pgd7": F.cross_entropy(model(x_pgd), probe_y).item(),
                }
                if method != "pgd_at":
                    x_gen, _ = amortized_inputs(
                        model,
                        plugin.generator,
                        probe_x,
                        probe_y,
                        0.1,
                        method,
                        plugin.resolved_entropy_weight,
                        plugin.encoder,
                    )
                    row["ce_generator"] = F.cross_entropy(model(x_gen), probe_y).item()
                    row["delta_over_eps"] = ((x_gen - probe_x).abs() / 0.1).mean().item()
            log.append(row)
    model = module.model.eval()
    with torch.no_grad():
        clean = (model(x_test).argmax(1) == y_test).float().mean().item()
    return {"clean": clean, "pgd20": run.pgd_accuracy(model, x_test, y_test, 0.1, 20), "log": log}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "DIAGNOSTICS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, load = time.time(), os.getloadavg()
    summary = [
        "| method | generator lr | lambda | epochs (steps) | clean | PGD-20 eps 0.1 | final CE clean / generator / PGD-7 | final mean abs(delta)/eps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    curves = []
    for method, generator_lr, entropy_weight, epochs in CONFIGS:
        result = diagnose(method, generator_lr, entropy_weight, epochs, args.seed)
        last = result["log"][-1]
        lam = "-" if method == "pgd_at" else ("paper" if entropy_weight is None else f"{entropy_weight:g}")
        lr = "-" if method == "pgd_at" else f"{generator_lr:g}"
        summary.append(
            f"| {method} | {lr} | {lam} | {epochs} ({last['steps']}) | {result['clean']:.3f} | {result['pgd20']:.3f} | "
            f"{last['ce_clean']:.3f} / {last.get('ce_generator', float('nan')):.3f} / {last['ce_pgd7']:.3f} | "
            f"{last.get('delta_over_eps', float('nan')):.3f} |"
        )
        curve = "; ".join(
            f"{r['steps']}: {r.get('ce_generator', float('nan')):.2f} vs {r['ce_pgd7']:.2f}"
            for r in result["log"]
        )
        curves.append(f"- {method}, lr {lr}, lambda {lam}, {epochs} epochs: {curve}")
        print(summary[-1], flush=True)
    lines = [
        "# Amortised ADT generator diagnostics (digits MLP, training epsilon 0.1)",
        "",
        "- Command: `.venv/bin/python benchmarks/adversarial/generator_diagnostics.py`"
        + (f" --seed {args.seed}" if args.seed else ""),
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"1 thread; seed {args.seed} (one seed: indicative); total {(time.time() - started) / 60:.1f} min; "
        f"load average {'/'.join(f'{v:.1f}' for v in load)} at start on {os.cpu_count()} cores",
        "- CE columns: classifier (eval mode) on a fixed batch of 128 training images: clean, the generator's "
        "perturbation, PGD-7 (eps 0.1, step eps/4). abs(delta)/eps: mean over pixels of the generator's "
        "perturbation after clipping to [0, 1] (1 = every pixel at a corner of the ball).",
        "",
        *summary,
        "",
        "CE on the generator's perturbation vs on PGD-7 over training (step: generator vs PGD-7):",
        "",
        *curves,
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
