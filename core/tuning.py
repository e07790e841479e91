"""Lightning's tuner callbacks on a resumed fit: what they found is in the checkpoint; no new search.

``LearningRateFinder`` and ``BatchSizeFinder`` search in ``on_fit_start`` of every fit, a resumed one
included: they train trial steps on the half-trained weights and pick another learning rate or
batch size, so the resumed run no longer continues the interrupted one. Their first result is in
the checkpoint already: the learning rate in the optimizer's state, the batch size in a litplug
data module's state. So a resumed fit takes those and drops the callbacks for this fit.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from litplug.core.data.sampling import LitplugDataModule

__all__ = ["keep_the_tuned_values_on_resume"]


def keep_the_tuned_values_on_resume(trainer: L.Trainer, checkpoint: dict[str, Any]) -> None:
    """Remove the tuner callbacks of a fit resuming from ``checkpoint``, restoring what they found."""
    callbacks: list[L.Callback] = trainer.callbacks  # type: ignore[attr-defined]
    dropped: list[L.Callback] = [c for c in callbacks if isinstance(c, LearningRateFinder)]
    for finder in (c for c in callbacks if isinstance(c, BatchSizeFinder)):
        saved = _saved_batch_size(trainer, finder, checkpoint)
        if saved is None:
            rank_zero_warn(
                "BatchSizeFinder searches again on this resumed fit: only a litplug data module's "
                "batch_size is saved in checkpoints, so the size the first run found is unknown here"
            )
            continue
        datamodule: LitplugDataModule = trainer.datamodule  # type: ignore[attr-defined]
        datamodule.batch_size = saved
        dropped.append(finder)
    if not dropped:
        return
    callbacks[:] = [c for c in callbacks if c not in dropped]
    found = {LearningRateFinder: "learning rate", BatchSizeFinder: "batch size"}
    kinds = sorted({kind for c in dropped for cls, kind in found.items() if isinstance(c, cls)})
    names = " and ".join(sorted({type(c).__name__ for c in dropped}))
    rank_zero_info(
        f"litplug: resuming, so {names} does not search again: the checkpoint's {' and '.join(kinds)}, "
        "chosen by the first run's search, continue"
    )


def _saved_batch_size(trainer: L.Trainer, finder: BatchSizeFinder, checkpoint: dict[str, Any]) -> int | None:
    datamodule = trainer.datamodule  # type: ignore[attr-defined]
    if not isinstance(datamodule, LitplugDataModule) or finder._batch_arg_name != "batch_size":
        return None
    state = checkpoint.get(type(datamodule).__qualname__) or {}
    saved = state.get("batch_size")
    return int(saved) if saved is not None else None
