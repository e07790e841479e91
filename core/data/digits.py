"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): no download needed."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import TensorDataset

from .sampling import LitplugDataModule

__all__ = ["DigitsDataModule", "load_digits_tensors", "normalize_digits"]

Split = tuple[Tensor, Tensor]
DigitsForm = Literal["flat", "image", "sequence", "rows"]
DigitsNormalize = Literal["unit", "standard"]

NUM_PIXELS = 64
PIXEL_MAX = 16.0
NUM_DIGIT_CLASSES = 10
_FORM_SHAPES: dict[str, tuple[int, ...]] = {
    "flat": (64,),
    "image": (1, 8, 8),
    "sequence": (64, 1),
    "rows": (8, 8),
}


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The sklearn arrays, loaded once per process (float32 pixels 0..16, int64 labels), read-only."""
    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Reject fractions that would leave no training data."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")


def _stratified_take(
    indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (rest, taken) with ``taken`` a stratified ``fraction`` of them."""
    if fraction == 0.0:
        return indices, indices[:0]
    rest, taken = train_test_split(indices, test_size=fraction, random_state=seed, stratify=labels)
    return np.sort(rest), np.sort(taken)


def load_digits_tensors(
    seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> dict[str, Split]:
    """Seeded, stratified train/val/test split of the digits.

    Returns ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` with ``x`` float32 ``[N, 64]`` raw
    pixels in 0..16 (not normalised; see :func:`normalize_digits`) and ``y`` int64 ``[N]``. The
    split is a deterministic function of the arguments and the three parts are disjoint.
    """
    _check_fractions(val_fraction, test_fraction)
    x, y = _raw_digits()
    all_idx = np.arange(len(y))
    trainval, test = _stratified_take(all_idx, y, test_fraction, seed)
    # The val share is taken from what remains, so rescale it to stay a fraction of the whole.
    train, val = _stratified_take(trainval, y[trainval], val_fraction / (1.0 - test_fraction), seed)
    return {
        name: (torch.from_numpy(x[idx].copy()), torch.from_numpy(y[idx].copy()))
        for name, idx in (("train", train), ("val", val), ("test", test))
    }


def normalize_digits(splits: dict[str, Split], normalize: DigitsNormalize) -> dict[str, Split]:
    """Scale raw pixels of every split.

    ``"unit"`` maps pixels to [0, 1] (x / 16); adversarial epsilons in litplug are in this scale.
    ``"standard"`` standardises each pixel with the mean and std of the ``"train"`` split only, so
    no statistic leaks from val/test; constant pixels keep std 1.
    """
    if normalize == "unit":
        return {name: (x / PIXEL_MAX, y) for name, (x, y) in splits.items()}
    if normalize == "standard":
        train_x = splits["train"][0]
        mean = train_x.mean(dim=0)
        std = train_x.std(dim=0)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        return {name: ((x - mean) / std, y) for name, (x, y) in splits.items()}
    raise ValueError(f"normalize must be 'unit' or 'standard', got {normalize!r}")


class DigitsDataModule(LitplugDataModule):
    """The sklearn digits as a classification data module.

    Args:
        batch_size: examples per batch per device.
        seed: seed of the stratified split and of the training order.
        val_fraction: fraction of all examples held out for validation.
        test_fraction: fraction of all examples held out for testing.
        form: example layout: ``"flat"`` [64], ``"image"`` [1, 8, 8], ``"sequence"`` [64, 1]
            (pixel by pixel), ``"rows"`` [8, 8] (8 steps of 8 features).
        normalize: ``"unit"`` (x / 16, in [0, 1]) or ``"standard"`` (train statistics only).
        num_workers, pin_memory, persistent_workers: the DataLoaders' worker options, as for
            :class:`LitplugDataModule`.

    Batches are ``(inputs float32 [B, *input_shape], targets int64 [B])``.
    """

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        form: DigitsForm = "flat",
        normalize: DigitsNormalize = "unit",
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(batch_size, seed, num_workers, pin_memory, persistent_workers)
        _check_fractions(val_fraction, test_fraction)
        if form not in _FORM_SHAPES:
            raise ValueError(f"form must be one of {sorted(_FORM_SHAPES)}, got {form!r}")
        if normalize not in ("unit", "standard"):
            raise ValueError(f"normalize must be 'unit' or 'standard', got {normalize!r}")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.form: DigitsForm = form
        self.normalize: DigitsNormalize = normalize

    @property
    def num_classes(self) -> int:
        return NUM_DIGIT_CLASSES

    @property
    def input_shape(self) -> tuple[int, ...]:
        return _FORM_SHAPES[self.form]

    def setup(self, stage: str | None = None) -> None:
        """Build the three splits once (idempotent)."""
        if self.datasets:
            return
        splits = load_digits_tensors(self.seed, self.val_fraction, self.test_fraction)
        splits = normalize_digits(splits, self.normalize)
        shape = self.input_shape
        self.datasets = {
            name: TensorDataset(x.reshape(len(x), *shape).contiguous(), y) for name, (x, y) in splits.items()
        }
