"""Shifted digits (core/data/shifted.py): seeded, severity-graded, leaves training data and RNG alone."""

from __future__ import annotations

import pytest
import torch

from litplug.core.data import DigitsDataModule
from litplug.core.data.shifted import (
    SHIFT_KINDS,
    ShiftedDigitsDataModule,
    shift_images,
    shifted_digits_test_sets,
)


def _blob() -> torch.Tensor:
    """A 2x2 bright square in the middle of an 8x8 image, batch of 64 copies."""
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 3:5, 3:5] = 1.0
    return image.repeat(64, 1, 1, 1)


def _center_of_mass(images: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(8, dtype=torch.float32)
    mass = images.sum((1, 2, 3))
    rows = (images.sum(3).squeeze(1) * coords).sum(1) / mass
    cols = (images.sum(2).squeeze(1) * coords).sum(1) / mass
    return torch.stack([rows, cols], 1)


@pytest.mark.parametrize("kind", SHIFT_KINDS)
def test_shift_is_seeded_and_leaves_the_global_rng_alone(kind: str) -> None:
    images = torch.rand(16, 1, 8, 8)
    state = torch.get_rng_state()
    first = shift_images(images, kind, 3, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, shift_images(images, kind, 3, seed=0))
    assert not torch.equal(first, shift_images(images, kind, 3, seed=1))
    assert torch.equal(shift_images(images, kind, 0), images)
    assert first.min() >= 0 and first.max() <= 1


@pytest.mark.parametrize("kind", SHIFT_KINDS)
def test_corruption_grows_with_severity(kind: str) -> None:
    images = _blob() if kind != "gaussian_noise" else torch.rand(64, 1, 8, 8) * 0.5 + 0.25
    change = [(shift_images(images, kind, s) - images).abs().mean().item() for s in range(6)]
    assert change[0] == 0.0
    assert all(a < b for a, b in zip(change, change[1:], strict=False)), change


def test_gaussian_noise_has_the_documented_std() -> None:
    images = torch.full((256, 1, 8, 8), 0.5)  # far from the clip bounds
    noise = shift_images(images, "gaussian_noise", 2) - images
    assert noise.std().item() == pytest.approx(0.08, rel=0.05)


def test_translation_moves_the_center_of_mass_by_the_documented_distance() -> None:
    moved = _center_of_mass(shift_images(_blob(), "translation", 3)) - _center_of_mass(_blob())
    distance = moved.norm(dim=1)
    assert torch.allclose(distance, torch.full_like(distance, 1.0), atol=0.02)
    assert moved[:, 0].std() > 0.1 and moved[:, 1].std() > 0.1  # random directions


def test_rotation_keeps_a_central_blob_in_place_and_its_mass() -> None:
    image = torch.zeros(8, 1, 8, 8)
    image[:, 0, 2:6, 2:6] = 1.0
    rotated = shift_images(image, "rotation", 5)
    assert not torch.equal(rotated, image)
    assert torch.allclose(_center_of_mass(rotated), _center_of_mass(image), atol=1e-4)
    assert torch.allclose(rotated.sum((1, 2, 3)), image.sum((1, 2, 3)), rtol=0.05)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="shift kind"):
        shift_images(torch.zeros(1, 1, 8, 8), "blur", 1)
    with pytest.raises(ValueError, match="severity"):
        shift_images(torch.zeros(1, 1, 8, 8), "rotation", 6)
    with pytest.raises(ValueError, match="images"):
        shift_images(torch.zeros(1, 64), "rotation", 1)
    with pytest.raises(ValueError, match="severity"):
        ShiftedDigitsDataModule(severity=-1)


@pytest.mark.parametrize("normalize", ["unit", "standard"])
def test_test_sets_match_the_datamodule_and_training_data_stays_clean(normalize: str) -> None:
    sets = shifted_digits_test_sets(kinds=("rotation",), severities=(2,), form="image", normalize=normalize)
    assert set(sets) == {"clean", "rotation_2"}
    clean = DigitsDataModule(form="image", normalize=normalize)
    clean.setup()
    shifted = ShiftedDigitsDataModule(form="image", normalize=normalize, shift="rotation", severity=2)
    shifted.setup()
    for name in ("train", "val"):
        assert torch.equal(shifted.datasets[name].tensors[0], clean.datasets[name].tensors[0])
    assert torch.equal(sets["clean"].tensors[0], clean.datasets["test"].tensors[0])
    assert torch.equal(sets["rotation_2"].tensors[0], shifted.datasets["test"].tensors[0])
    assert torch.equal(sets["rotation_2"].tensors[1], clean.datasets["test"].tensors[1])
    assert not torch.equal(sets["rotation_2"].tensors[0], sets["clean"].tensors[0])


def test_shift_val_also_shifts_validation() -> None:
    shifted = ShiftedDigitsDataModule(shift="gaussian_noise", severity=1, shift_val=True)
    shifted.setup()
    clean = DigitsDataModule()
    clean.setup()
    assert not torch.equal(shifted.datasets["val"].tensors[0], clean.datasets["val"].tensors[0])
    assert torch.equal(shifted.datasets["train"].tensors[0], clean.datasets["train"].tensors[0])
