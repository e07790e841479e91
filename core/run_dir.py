"""Where a run's files go: the folder its checkpoints' folder is in.

Lightning's ``trainer.log_dir`` is that folder for CSV and TensorBoard loggers, but the logger's
``save_dir`` for every other one: with a ``WandbLogger`` every run in a directory would write its
``results.json``, ``config.yaml`` and plots to the same place, each over the last. ``ModelCheckpoint``
puts checkpoints under ``<save_dir>/<name>/<version>/checkpoints`` for every logger (the W&B run id
for W&B); :func:`run_directory` is that ``<save_dir>/<name>/<version>``.

No collective: rank zero's answer is the run's (Lightning broadcasts rank zero's), and only rank
zero writes there. On other ranks a CSVLogger may number its version differently.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L


def run_directory(trainer: L.Trainer) -> Path:
    """``<save_dir>/<name>/<version>`` of the first logger, as ModelCheckpoint has it; without a
    logger, ``default_root_dir``. Use it on rank zero."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return Path(save_dir) / str(logger.name) / version
