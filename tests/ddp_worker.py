"""Runs under ``torchrun --nproc-per-node=2``: one short DDP fit per registered plugin and callback.

Each rank trains with half the single-process batch, so the global batch equals the single-process
run in tests/test_ddp.py. Rank 0 saves the final weights (or the error) per case to ``OUT_DIR``.
Launching the two processes once for every case keeps the suite fast: process start and imports
dominate a short CPU run.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

sys.path.insert(0, str(Path(__file__).parent))

from helpers import example_run  # noqa: E402

from litplug.callbacks.ddp import DistributedPlugins  # noqa: E402
from litplug.core.discovery import available_plugins, builtin_callbacks  # noqa: E402
from litplug.core.module import LitplugModule  # noqa: E402

STEPS = 4
SINGLE_PROCESS_BATCH = 128


def ddp_cases() -> dict[str, tuple[type | None, type | None]]:
    """Every case, or only those named in ``LITPLUG_DDP_CASES`` (comma-separated) when it is set."""
    cases: dict[str, tuple[type | None, type | None]] = {"no-plugin": (None, None)}
    for info in available_plugins().values():
        cases[f"plugin-{info.name}"] = (info.cls, None)
    for callback in builtin_callbacks():
        cases[f"callback-{callback.__name__}"] = (None, callback)
    selected = [name for name in os.environ.get("LITPLUG_DDP_CASES", "").split(",") if name]
    if selected:
        unknown = sorted(set(selected) - set(cases))
        if unknown:
            raise ValueError(f"LITPLUG_DDP_CASES names unknown case(s) {unknown}; known: {sorted(cases)}")
        cases = {name: cases[name] for name in selected}
    return cases


def build(
    plugin_cls: type | None, callback_cls: type | None, devices: int
) -> tuple[L.Trainer, LitplugModule, L.LightningDataModule]:
    """The same model, data and optimizer for a run on ``devices`` processes (same global batch)."""
    L.seed_everything(0)
    plugin = plugin_cls.example() if plugin_cls is not None else None
    model, data = example_run(plugin, batch_size=SINGLE_PROCESS_BATCH, dropout=0.0)
    data.batch_size = data.batch_size // devices  # type: ignore[attr-defined]
    module = LitplugModule(
        model,
        plugins=[plugin] if plugin else [],
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    )
    callbacks = [DistributedPlugins()]
    if callback_cls is not None and callback_cls is not DistributedPlugins:
        callbacks.append(callback_cls.example())
    elif callback_cls is DistributedPlugins:
        callbacks = [DistributedPlugins.example()]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto",
        max_steps=STEPS,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
    )
    return trainer, module, data


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    for name, (plugin_cls, callback_cls) in ddp_cases().items():
        result: dict[str, object]
        try:
            trainer, module, data = build(plugin_cls, callback_cls, devices=2)
            trainer.fit(module, datamodule=data)
            result = {"state": {k: v.detach().cpu() for k, v in module.state_dict().items()}}
        except Exception as err:  # recorded per case so one broken plugin does not hide the others
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if int(torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == 0:
            torch.save(result, out_dir / f"{name}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
