"""Shifted digits: Gaussian noise, small rotations and translations at several severities, seeded.

Dataset shift for calibration benchmarks (in the spirit of CIFAR-10-C / MNIST-C, at 8x8 scale),
generated in torch from the digits' own test split: nothing is downloaded. Every corruption acts on
the image in unit scale ([0, 1], background 0) and is then mapped back to the requested
normalisation (``"standard"`` reuses the clean training split's statistics, so shifted and clean
inputs are normalised alike).

Severity ``s`` in ``1..5`` (0 = clean):

- ``gaussian_noise``: add N(0, sigma^2), sigma = (0.04, 0.08, 0.12, 0.18, 0.26)[s-1], clip to [0, 1].
- ``rotation``: rotate about the centre by +-(5, 10, 15, 20, 30)[s-1] degrees (random sign).
- ``translation``: shift by (0.5, 0.75, 1.0, 1.5, 2.0)[s-1] pixels in a uniformly random direction.

Rotations and translations resample bilinearly with zero padding (``affine_grid`` +
``grid_sample``). The randomness (noise, signs, directions) comes from a private generator seeded by
``(seed, kind, severity)``: the global RNG is never touched and every call returns the same images.

Two entry points: :func:`shifted_digits_test_sets` returns a dict of test sets (for benchmarks),
:class:`ShiftedDigitsDataModule` is a :class:`DigitsDataModule` whose test split (optionally also
validation) is shifted, for ``litplug test --data ShiftedDigitsDataModule ...``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from .digits import (
    PIXEL_MAX,
    DigitsDataModule,
    DigitsForm,
    DigitsNormalize,
    load_digits_tensors,
    normalize_digits,
)

__all__ = [
    "SHIFT_KINDS",
    "SHIFT_SEVERITIES",
    "ShiftedDigitsDataModule",
    "shift_images",
    "shifted_digits_test_sets",
]

ShiftKind = Literal["gaussian_noise", "rotation", "translation"]
SHIFT_KINDS: tuple[str, ...] = ("gaussian_noise", "rotation", "translation")
SHIFT_SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),  # noise std, unit pixel scale
    "rotation": (5.0, 10.0, 15.0, 20.0, 30.0),  # degrees
    "translation": (0.5, 0.75, 1.0, 1.5, 2.0),  # pixels
}
MAX_SEVERITY = 5
IMAGE_SIDE = 8


def _check_shift(kind: str, severity: int) -> None:
    if kind not in SHIFT_KINDS:
        raise ValueError(f"shift kind must be one of {SHIFT_KINDS}, got {kind!r}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 0 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be an integer in [0, {MAX_SEVERITY}], got {severity!r}")


def _generator(seed: int, kind: str, severity: int) -> torch.Generator:
    # A distinct, stable stream per (seed, kind, severity): Python's hash() of str is salted per process.
    kind_index = SHIFT_KINDS.index(kind)
    return torch.Generator().manual_seed(seed * 1000 + kind_index * 10 + severity)


def _affine(images: Tensor, theta: Tensor) -> Tensor:
    """Resample ``[N, 1, 8, 8]`` images through per-image affine maps ``[N, 2, 3]`` (output -> input)."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def shift_images(images: Tensor, kind: str, severity: int, seed: int = 0) -> Tensor:
    """Corrupt unit-scale images ``[N, 1, 8, 8]`` (values in [0, 1]); severity 0 returns a copy."""
    _check_shift(kind, severity)
    if images.ndim != 4 or images.shape[1:] != (1, IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(f"expected images [N, 1, 8, 8], got {tuple(images.shape)}")
    images = images.float()
    if severity == 0:
        return images.clone()
    generator = _generator(seed, kind, severity)
    amount = SHIFT_SEVERITIES[kind][severity - 1]
    n = images.shape[0]
    if kind == "gaussian_noise":
        noise = torch.randn(images.shape, generator=generator) * amount
        return (images + noise).clamp(0.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    if kind == "rotation":
        sign = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
        angle = sign * math.radians(amount)
        theta[:, 0, 0] = torch.cos(angle)
        theta[:, 0, 1] = -torch.sin(angle)
        theta[:, 1, 0] = torch.sin(angle)
        theta[:, 1, 1] = torch.cos(angle)
    else:  # translation: affine_grid works in [-1, 1] coordinates, i.e. 2 / 8 per pixel
        direction = torch.rand(n, generator=generator) * 2 * math.pi
        shift = amount * 2.0 / IMAGE_SIDE
        theta[:, 0, 0] = 1.0
        theta[:, 1, 1] = 1.0
        theta[:, 0, 2] = -shift * torch.cos(direction)  # sampling at x - d moves the content by +d
        theta[:, 1, 2] = -shift * torch.sin(direction)
    return _affine(images, theta).clamp(0.0, 1.0)


def _shifted_splits(
    splits: dict[str, tuple[Tensor, Tensor]], names: tuple[str, ...], kind: str, severity: int, seed: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """Replace the raw-pixel splits in ``names`` with their shifted versions (raw 0..16 scale)."""
    out = dict(splits)
    for name in names:
        x, y = splits[name]
        unit = x.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE) / PIXEL_MAX
        shifted = shift_images(unit, kind, severity, seed) * PIXEL_MAX
        out[name] = (shifted.reshape(x.shape), y)
    return out


def _as_dataset(x: Tensor, y: Tensor, form: DigitsForm) -> TensorDataset:
    shape = {"flat": (64,), "image": (1, 8, 8), "sequence": (64, 1), "rows": (8, 8)}[form]
    return TensorDataset(x.reshape(len(x), *shape).contiguous(), y)


def shifted_digits_test_sets(
    kinds: tuple[str, ...] = SHIFT_KINDS,
    severities: tuple[int, ...] = (1, 2, 3, 4, 5),
    form: DigitsForm = "flat",
    normalize: DigitsNormalize = "unit",
    split_seed: int = 0,
    shift_seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> dict[str, TensorDataset]:
    """The digits test split, clean (key ``"clean"``) and shifted (keys ``"<kind>_<severity>"``).

    ``split_seed``, ``val_fraction`` and ``test_fraction`` must match the :class:`DigitsDataModule`
    the model trained on (its ``seed`` and fractions), so the test images were never trained on.
    """
    for kind in kinds:
        for severity in severities:
            _check_shift(kind, severity)
    raw = load_digits_tensors(split_seed, val_fraction, test_fraction)
    sets = {"clean": _as_dataset(*normalize_digits(raw, normalize)["test"], form)}
    for kind in kinds:
        for severity in severities:
            shifted = _shifted_splits(raw, ("test",), kind, severity, shift_seed)
            sets[f"{kind}_{severity}"] = _as_dataset(*normalize_digits(shifted, normalize)["test"], form)
    return sets


class ShiftedDigitsDataModule(DigitsDataModule):
    """:class:`DigitsDataModule` whose test split (and, with ``shift_val``, validation split) is shifted.

    Training data stays clean. Args are those of :class:`DigitsDataModule` plus:

    Args:
        shift: ``"gaussian_noise"``, ``"rotation"`` or ``"translation"``.
        severity: 0 (clean) to 5.
        shift_seed: seed of the corruption's randomness (independent of the split ``seed``).
        shift_val: also shift the validation split.
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
        shift: str = "gaussian_noise",
        severity: int = 3,
        shift_seed: int = 0,
        shift_val: bool = False,
    ) -> None:
        super().__init__(
            batch_size,
            seed,
            val_fraction,
            test_fraction,
            form,
            normalize,
            num_workers,
            pin_memory,
            persistent_workers,
        )
        _check_shift(shift, severity)
        self.shift = shift
        self.severity = severity
        self.shift_seed = shift_seed
        self.shift_val = shift_val

    def setup(self, stage: str | None = None) -> None:
        """Build the clean training split and the shifted evaluation split(s) once (idempotent)."""
        if self.datasets:
            return
        raw = load_digits_tensors(self.seed, self.val_fraction, self.test_fraction)
        names = ("test", "val") if self.shift_val else ("test",)
        # Normalise after shifting with the clean training statistics ("standard" uses train only).
        splits = normalize_digits(
            _shifted_splits(raw, names, self.shift, self.severity, self.shift_seed), self.normalize
        )
        self.datasets = {name: _as_dataset(x, y, self.form) for name, (x, y) in splits.items()}
