"""GPU check: every plugin and callback for a few steps with DDP over NCCL and bf16 mixed precision.

    python -m litplug.callbacks.ddp.gpu_check                       # all visible GPUs, bf16, NCCL
    python -m litplug.callbacks.ddp.gpu_check --devices 1 --only ghost_bn
    python -m litplug.callbacks.ddp.gpu_check --accelerator cpu --devices 1 --precision 32-true  # CPU dry run
    python -m litplug.callbacks.ddp.gpu_check --accelerator cpu --devices 2 --precision 32-true  # 2 ranks, gloo

CI has no GPU; run this on a GPU machine after changing a plugin. It prints one line per case
(ok / unsupported / FAILED with the error) per rank and exits non-zero if any case failed. With more
than one device every case runs under ``DDPStrategy`` with a bounded collective timeout
(``--timeout-s``), so a case that fails on one rank only cannot hang the check. One GPU gives a
one-process run (CUDA and bf16 paths only): NCCL refuses two ranks on the same GPU, so the
cross-rank code needs two or more GPUs.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from litplug.callbacks.ddp.callback import DistributedPlugins
from litplug.core.discovery import available_plugins, builtin_callbacks
from litplug.core.errors import PluginSetupError
from litplug.core.examples import example_run
from litplug.core.module import LitplugModule


def run_case(plugin_name: str | None, callback_cls: type | None, args: argparse.Namespace) -> str:
    L.seed_everything(0)
    plugin = available_plugins()[plugin_name].cls.example() if plugin_name else None
    model, data = example_run(plugin, batch_size=args.batch_size)
    callbacks: list = [DistributedPlugins()]
    if callback_cls is not None and callback_cls is not DistributedPlugins:
        callbacks.append(callback_cls.example())  # type: ignore[attr-defined]
    module = LitplugModule(
        model, plugins=[plugin] if plugin else [], optimizer=functools.partial(torch.optim.SGD, lr=0.01)
    )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        # A bounded collective timeout: a case failing on one rank only then fails the other rank's
        # collective within timeout_s instead of hanging the whole check (NCCL's default is minutes).
        strategy=DDPStrategy(timeout=timedelta(seconds=args.timeout_s))
        if args.devices != 1  # on CPU (gloo) too: a 2-process dry run of the same launch path
        else "auto",
        precision=args.precision,
        max_steps=args.steps,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
    )
    try:
        trainer.fit(module, datamodule=data)
    except PluginSetupError as err:
        if "do not support multi-process" in str(err):
            return "unsupported under DDP (declared)"
        raise
    loss = trainer.callback_metrics.get("train/loss")
    if loss is None or not torch.isfinite(loss):
        raise RuntimeError(f"training loss is {loss}")
    return f"ok (train/loss {float(loss):.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--devices", default=-1, type=int, help="-1: every visible device")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--steps", default=5, type=int)
    parser.add_argument("--batch-size", default=64, type=int)
    parser.add_argument("--only", nargs="*", help="plugin names / callback class names to run")
    parser.add_argument("--timeout-s", default=180, type=int, help="DDP collective timeout (seconds)")
    args = parser.parse_args(argv)
    cases: list[tuple[str, str | None, type | None]] = [("no-plugin", None, None)]
    cases += [(f"plugin {name}", name, None) for name in sorted(available_plugins())]
    cases += [(f"callback {cb.__name__}", None, cb) for cb in builtin_callbacks()]
    if args.only:
        cases = [c for c in cases if c[0].split()[-1] in args.only]
    failed = 0
    for label, plugin_name, callback_cls in cases:
        started = time.monotonic()
        try:
            outcome = run_case(plugin_name, callback_cls, args)
        except Exception as err:  # report every case, then fail at the end
            failed += 1
            outcome = f"FAILED: {type(err).__name__}: {err}\n{traceback.format_exc()}"
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        print(f"[gpu_check rank {rank}] {label}: {outcome} [{time.monotonic() - started:.1f}s]", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
