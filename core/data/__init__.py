"""Offline data modules (nothing is ever downloaded) and the exactly-resumable batch sampler."""

from .digits import DigitsDataModule, load_digits_tensors, normalize_digits
from .sampling import LitplugDataModule, ResumableBatchSampler
from .sequences import AddingTaskDataModule, CopyTaskDataModule, make_adding_task, make_copy_task
from .text import StdlibTextDataModule, load_stdlib_text

__all__ = [
    "AddingTaskDataModule",
    "CopyTaskDataModule",
    "DigitsDataModule",
    "LitplugDataModule",
    "ResumableBatchSampler",
    "StdlibTextDataModule",
    "load_digits_tensors",
    "load_stdlib_text",
    "make_adding_task",
    "make_copy_task",
    "normalize_digits",
]
