"""Do litplug's exported programs convert to ONNX, agree with the module, and predict faster?

    python benchmarks/export/run.py            # ~2 minutes on 2 CPU cores
    python benchmarks/export/run.py --quick    # smoke run (tests/test_export.py runs it)

ONNX needs the onnx extra (``pip install -e ".[onnx]"``; ``.[dev]`` has it too); without it the ONNX
columns say so and the rest is measured as usual.

1. Every registered plugin (and none), on its example model and data (``litplug.core.examples``),
   trained a few steps: ``export_predictor`` on 8 test inputs, then ``torch.onnx.export(program,
   dynamo=True)``. Both run on the whole test split (another batch size than the example's): the
   largest difference of their class probabilities from the module's own ``predict_probs`` under
   its evaluation weights, and whether the predicted classes are the same.
2. A character transformer exported with ``dynamic_dims=[1]``: the same comparison at several batch
   sizes and sequence lengths.
3. Prediction latency, median of alternating calls: the module's ``predict_probs`` (eager, under
   ``torch.no_grad``), the ``torch.export`` program's ``.module()``, and an onnxruntime session.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from litplug.core.data import DigitsDataModule
from litplug.core.discovery import available_plugins
from litplug.core.examples import example_run
from litplug.core.export import describe_program, evaluation_weights, export_predictor, save_onnx
from litplug.core.models import SmallCNN, TransformerLanguageModel
from litplug.core.module import LitplugModule
from litplug.plugins.ghost_bn import GhostBatchNormPlugin

HERE = Path(__file__).resolve().parent

try:  # optional: the ONNX columns need all three
    import onnx  # noqa: F401
    import onnxruntime
    import onnxscript  # noqa: F401

    ONNX = (
        f"onnx {onnx.__version__}, onnxscript {onnxscript.__version__}, onnxruntime {onnxruntime.__version__}"
    )
except ImportError:
    onnxruntime = None
    ONNX = ""


def fitted(
    model: torch.nn.Module, data: L.LightningDataModule, plugins: list[Any], steps: int
) -> tuple[LitplugModule, Tensor]:
    """The module trained ``steps`` steps, and its data's whole test split's inputs."""
    module = LitplugModule(model, plugins=plugins, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05))
    trainer = L.Trainer(
        max_steps=steps,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    data.setup("test")
    inputs = torch.cat([batch[0] for batch in data.test_dataloader()])
    return module, inputs


def trained(name: str | None, steps: int) -> tuple[LitplugModule, Tensor]:
    """A registered plugin's example module (``litplug.core.examples``), trained ``steps`` steps."""
    L.seed_everything(0, verbose=False)
    plugin = available_plugins()[name].cls.example() if name else None
    model, data = example_run(plugin)
    return fitted(model, data, [plugin] if plugin else [], steps)


def latency_cases(steps: int, quick: bool) -> list[tuple[str, LitplugModule, Tensor, tuple[int, ...]]]:
    """(label, module, inputs, batch sizes): the registry's small examples, and two larger models."""
    cases = []
    for name in (None, "ghost_bn") if quick else (None, "ghost_bn", "ensemble", "mimo"):
        module, inputs = trained(name, steps)
        cases.append((f"{name or '(none)'}: example MLP", module, inputs, (1, 256)))
    if quick:
        return cases
    L.seed_everything(0, verbose=False)
    cnn, cnn_inputs = fitted(
        SmallCNN(width=32),
        DigitsDataModule(batch_size=64, form="image"),
        [GhostBatchNormPlugin(ghost_batch_size=32)],
        steps,
    )
    cases.append(("ghost_bn: SmallCNN(width=32), digits images", cnn, cnn_inputs, (1, 256)))
    transformer = LitplugModule(  # configs/admin.yaml's model; weights do not change the time
        TransformerLanguageModel(98, d_model=64, num_heads=4, num_layers=12, dim_feedforward=256, max_len=64)
    )
    tokens = torch.randint(0, 98, (32, 64), generator=torch.Generator().manual_seed(0))
    cases.append(("(none): 12-layer transformer, [B, 64] tokens", transformer, tokens, (1, 32)))
    return cases


def onnx_session(program: Any, example: Tensor, path: Path) -> Callable[[Tensor], Tensor] | None:
    """The program converted to ONNX as ``litplug export --format onnx`` does, run by onnxruntime
    (None without the ONNX packages)."""
    if onnxruntime is None:
        return None
    save_onnx(program, example, path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda inputs: torch.from_numpy(session.run(None, {input_name: inputs.numpy()})[0])


def compare(expected: Tensor, got: Tensor | None) -> str:
    if got is None:
        return "not installed"
    same = bool((got.argmax(-1) == expected.argmax(-1)).all())
    return f"{(got - expected).abs().max().item():.1e}, {'same' if same else 'DIFFERENT'} classes"


def conversion_rows(steps: int, names: list[str | None], workdir: Path) -> list[str]:
    rows = []
    for name in names:
        module, inputs = trained(name, steps)
        program = export_predictor(module, inputs[:8])
        run_onnx = onnx_session(program, inputs[:8], workdir / f"{name}.onnx")
        with evaluation_weights(module), torch.no_grad():
            expected = module.predict_probs(inputs)
        takes, gives = describe_program(program)
        rows.append(
            f"| {name or '(none)'} | {takes} -> {gives} | {len(inputs)} | "
            f"{compare(expected, program.module()(inputs))} | "
            f"{compare(expected, run_onnx(inputs) if run_onnx else None)} |"
        )
    return rows


def free_length_rows(workdir: Path) -> tuple[str, list[str]]:
    torch.manual_seed(0)
    module = LitplugModule(TransformerLanguageModel(98, d_model=32, num_heads=2, num_layers=2, max_len=64))
    tokens = torch.randint(0, 98, (16, 64), generator=torch.Generator().manual_seed(0))
    program = export_predictor(module, tokens[:4, :32], dynamic_dims=[1])
    run_onnx = onnx_session(program, tokens[:4, :32], workdir / "transformer.onnx")
    rows = []
    with evaluation_weights(module), torch.no_grad():
        for batch, length in ((1, 2), (3, 7), (16, 64), (5, 33)):
            inputs = tokens[:batch, :length]
            expected = module.predict_probs(inputs)
            rows.append(
                f"| [{batch}, {length}] | {compare(expected, program.module()(inputs))} | "
                f"{compare(expected, run_onnx(inputs) if run_onnx else None)} |"
            )
    return " -> ".join(describe_program(program)), rows


def median_ms(calls: dict[str, Callable[[], Any]], rounds: int, budget_s: float) -> dict[str, float]:
    """Median ms per call of each, alternating call by call so machine load hits all alike; up to
    ``rounds`` rounds, fewer (but at least 21) once ``budget_s`` is spent."""
    for call in calls.values():
        call()  # warm-up: allocations, onnxruntime's first-run setup
    times: dict[str, list[float]] = {name: [] for name in calls}
    started_all = time.perf_counter()
    for done in range(rounds):
        if done >= 21 and time.perf_counter() - started_all > budget_s:
            break
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - started) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def latency_rows(
    steps: int, rounds: int, repeats: int, budget_s: float, workdir: Path, quick: bool
) -> list[str]:
    """One row per model and batch size: the first repeat's medians, then every repeat's ratios."""
    rows = []
    for index, (label, module, inputs, batches) in enumerate(latency_cases(steps, quick)):
        program = export_predictor(module, inputs[:8])
        exported = program.module()
        run_onnx = onnx_session(program, inputs[:8], workdir / f"latency-{index}.onnx")
        for batch in batches:
            x = inputs[:batch]
            with evaluation_weights(module), torch.no_grad():
                calls: dict[str, Callable[[], Any]] = {
                    "eager": partial(module.predict_probs, x),
                    "export": partial(exported, x),
                }
                if run_onnx is not None:
                    calls["onnx"] = partial(run_onnx, x)
                runs = [median_ms(calls, rounds, budget_s) for _ in range(repeats)]
            first = runs[0]
            export_ratios = ", ".join(f"{ms['export'] / ms['eager']:.2f}x" for ms in runs)
            onnx_cells = (
                f"{first['onnx']:.3f} | " + ", ".join(f"{ms['onnx'] / ms['eager']:.2f}x" for ms in runs)
                if "onnx" in first
                else "not installed | -"
            )
            rows.append(
                f"| {label} | {batch} | {first['eager']:.3f} | {first['export']:.3f} | "
                f"{export_ratios} | {onnx_cells} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two plugins, few calls (a smoke run)")
    parser.add_argument("--steps", type=int, default=20, help="training steps before exporting")
    parser.add_argument("--rounds", type=int, default=200, help="most timed calls per variant and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="latency measurements per row")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per latency measurement")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()
    names: list[str | None] = [None, *sorted(available_plugins())]
    steps, rounds, repeats = (args.steps, args.rounds, args.repeats) if not args.quick else (2, 5, 1)
    if args.quick:
        names = [None, "ema"]
    workdir = HERE / ".onnx"
    workdir.mkdir(exist_ok=True)
    conversion = conversion_rows(steps, names, workdir)
    free_shapes, free_rows = free_length_rows(workdir)
    latency = latency_rows(steps, rounds, repeats, args.budget, workdir, args.quick)
    command = "python benchmarks/export/run.py" + (" --quick" if args.quick else "")
    lines = [
        "# Exported predictors: ONNX conversion, agreement, latency",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; wall time {time.perf_counter() - started:.0f} s",
        f"- torch {torch.__version__} ({torch.get_num_threads()} threads); lightning {L.__version__}; "
        f"{ONNX or 'ONNX packages not installed'}; {os.cpu_count()} CPUs; {platform.machine()}; "
        f"Python {platform.python_version()}",
        f"- Each module trained {steps} steps on its plugin's example model and data, then exported on "
        "8 test inputs with a free batch size.",
        "",
        "## Every plugin's program, on the whole test split",
        "",
        "Largest difference of the class probabilities from the module's own `predict_probs` (under "
        "its evaluation weights), and whether the predicted classes are the same.",
        "",
        "| plugin | program | test examples | torch.export program | ONNX (onnxruntime) |",
        "|---|---|---|---|---|",
        *conversion,
        "",
        "## A transformer's free sequence length (`dynamic_dims=[1]`, exported at [4, 32])",
        "",
        f"Program: `{free_shapes}`.",
        "",
        "| input [batch, length] | torch.export program | ONNX (onnxruntime) |",
        "|---|---|---|",
        *free_rows,
        "",
        "## Prediction latency",
        "",
        f"Median ms of 21-{rounds} alternating calls (fewer once {args.budget:g} s are spent), measured "
        f"{repeats} time(s) per row: the ms columns are the first measurement, the ratio columns every "
        "one's. On this shared 2-core machine the same call's time moves by up to 2x between "
        "measurements, so only a ratio that holds in every measurement says something.",
        "",
        "| plugin: model | batch | eager predict_probs ms | torch.export ms | export / eager | onnxruntime ms | onnx / eager |",
        "|---|---|---|---|---|---|---|",
        *latency,
    ]
    text = "\n".join(lines) + "\n"
    (HERE / ("RESULTS.quick.md" if args.quick else "RESULTS.md")).write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
