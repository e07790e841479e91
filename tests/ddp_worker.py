"""Runs under ``torchrun --nproc-per-node=2``: short DDP fits per registered plugin, per callback and
for a few combinations of plugins.

Each rank trains with half the single-process batch, so the global batch equals the single-process
run in tests/test_ddp.py. Rank 0 saves the final weights (or the error) per case to ``OUT_DIR``.
Then the same 2-process run is stopped after ``KILL_AT`` steps with a checkpoint and resumed from
it to ``STEPS``; every rank saves its weights and plugin states from both the uninterrupted and the
resumed run (``<case>-rank<r>.pt``). Launching the two processes once for every case keeps the suite
fast: process start and imports dominate a short CPU run.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

sys.path.insert(0, str(Path(__file__).parent))

from helpers import example_run  # noqa: E402

from litplug.callbacks.ddp import DistributedPlugins  # noqa: E402
from litplug.core.discovery import available_plugins, builtin_callbacks  # noqa: E402
from litplug.core.distributed import to_cpu  # noqa: E402
from litplug.core.module import LitplugModule  # noqa: E402

STEPS = 4
KILL_AT = 2  # mid-epoch
SINGLE_PROCESS_BATCH = 128


#: Plugins combined under DDP (tests/test_composition.py pairs them all in one process).
COMBINATIONS = (("ghost_bn", "ema", "center_loss"), ("ensemble", "pgd_at"), ("mimo", "replay"))

Case = tuple[tuple[type, ...], type | None]  # (plugin classes, callback class)


def ddp_cases() -> dict[str, Case]:
    """Every case, or only those named in ``LITPLUG_DDP_CASES`` (comma-separated) when it is set."""
    cases: dict[str, Case] = {"no-plugin": ((), None)}
    plugins = {info.name: info.cls for info in available_plugins().values()}
    for name, cls in plugins.items():
        cases[f"plugin-{name}"] = ((cls,), None)
    for names in COMBINATIONS:
        cases[f"plugins-{'+'.join(names)}"] = (tuple(plugins[n] for n in names), None)
    for callback in builtin_callbacks():
        cases[f"callback-{callback.__name__}"] = ((), callback)
    selected = [name for name in os.environ.get("LITPLUG_DDP_CASES", "").split(",") if name]
    if selected:
        unknown = sorted(set(selected) - set(cases))
        if unknown:
            raise ValueError(f"LITPLUG_DDP_CASES names unknown case(s) {unknown}; known: {sorted(cases)}")
        cases = {name: cases[name] for name in selected}
    return cases


def build(
    plugin_classes: tuple[type, ...],
    callback_cls: type | None,
    devices: int,
    checkpoint_dir: Path | None = None,
) -> tuple[L.Trainer, LitplugModule, L.LightningDataModule]:
    """The same model, data and optimizer for a run on ``devices`` processes (same global batch)."""
    L.seed_everything(0)
    plugins = [cls.example() for cls in plugin_classes]
    needing = [p for p in plugins if p.requires] or plugins  # the model fits the plugin with needs
    model, data = example_run(needing[0] if needing else None, batch_size=SINGLE_PROCESS_BATCH, dropout=0.0)
    data.batch_size = data.batch_size // devices  # type: ignore[attr-defined]
    module = LitplugModule(
        model,
        plugins=plugins,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    )
    callbacks = [DistributedPlugins()]
    if callback_cls is not None and callback_cls is not DistributedPlugins:
        callbacks.append(callback_cls.example())
    elif callback_cls is DistributedPlugins:
        callbacks = [DistributedPlugins.example()]
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=KILL_AT, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto",
        max_steps=STEPS,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=checkpoint_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
    )
    return trainer, module, data


def snapshot(module: LitplugModule) -> dict[str, object]:
    """This rank's weights and plugin states, on the CPU."""
    return {
        "state": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "plugins": {p.name: to_cpu(p.state_dict()) for p in module.plugins},
    }


def stop_and_resume(
    plugin_classes: tuple[type, ...], callback_cls: type | None, checkpoints: Path
) -> dict[str, object]:
    """The run stopped with a checkpoint at ``KILL_AT`` (as if killed), then resumed to ``STEPS``."""
    trainer, module, data = build(plugin_classes, callback_cls, devices=2, checkpoint_dir=checkpoints)
    trainer.fit_loop.epoch_loop.max_steps = KILL_AT
    trainer.fit(module, datamodule=data)
    trainer, module, data = build(plugin_classes, callback_cls, devices=2)
    trainer.fit(module, datamodule=data, ckpt_path=checkpoints / f"epoch=0-step={KILL_AT}.ckpt")
    return snapshot(module)


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    for name, (plugin_classes, callback_cls) in ddp_cases().items():
        result: dict[str, object]
        per_rank: dict[str, object] = {}
        try:
            trainer, module, data = build(plugin_classes, callback_cls, devices=2)
            trainer.fit(module, datamodule=data)
            result = {"state": {k: v.detach().cpu() for k, v in module.state_dict().items()}}
            per_rank["uninterrupted"] = snapshot(module)
        except Exception as err:  # recorded per case so one broken plugin does not hide the others
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        if "error" not in result:
            try:
                per_rank["resumed"] = stop_and_resume(
                    plugin_classes, callback_cls, out_dir / f"{name}-checkpoints"
                )
            except Exception as err:
                per_rank["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
        rank = int(torch.distributed.get_rank() if torch.distributed.is_initialized() else 0)
        torch.save(per_rank, out_dir / f"{name}-rank{rank}.pt")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if rank == 0:
            torch.save(result, out_dir / f"{name}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
