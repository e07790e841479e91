"""Center loss (Wen et al. 2016): the penalty and the center update against hand computations."""

from __future__ import annotations

import pytest
import torch

from litplug.plugins.center_loss.functional import center_loss, update_centers


def test_penalty_is_half_lambda_mean_squared_distance_and_centers_get_no_gradient() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 0])
    centers = torch.tensor([[1.0, 1.0], [0.0, 0.0]], requires_grad=True)
    loss = center_loss(features, labels, centers, strength=0.4)
    expected = 0.5 * 0.4 * (1.0 + 4.0 + 8.0) / 3
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert centers.grad is None
    assert torch.allclose(features.grad[0], 0.4 * (features[0] - centers[0]).detach() / 3)


def test_penalty_is_zero_at_the_centers() -> None:
    centers = torch.randn(3, 5)
    labels = torch.tensor([2, 0, 1, 2])
    assert center_loss(centers[labels], labels, centers, strength=1.0).item() == 0.0


def test_update_matches_the_paper_formula_and_respects_frozen_classes() -> None:
    centers = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    features = torch.tensor([[2.0, 0.0], [4.0, 2.0], [3.0, 3.0]])
    labels = torch.tensor([0, 0, 1])
    alpha = 0.5
    # class 0: n=2, sum(c - h) = (0-2 + 0-4, 0-0 + 0-2) = (-6, -2); delta = (-6, -2) / 3
    expected0 = torch.tensor([0.0, 0.0]) - alpha * torch.tensor([-6.0, -2.0]) / 3
    frozen = torch.tensor([False, True, False])
    update_centers(centers, features, labels, alpha=alpha, frozen=frozen)
    assert torch.allclose(centers[0], expected0)
    assert torch.equal(centers[1], torch.tensor([1.0, 1.0]))  # frozen
    assert torch.equal(centers[2], torch.tensor([5.0, 5.0]))  # no examples: unchanged
    with pytest.raises(ValueError, match="alpha"):
        update_centers(centers, features, labels, alpha=1.5)
    with pytest.raises(ValueError, match="strength"):
        center_loss(features, labels, centers, strength=-1.0)
