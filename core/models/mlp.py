"""Multi-layer perceptron classifier."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from litplug.core.errors import ModelConfigError

__all__ = ["MLP"]


class MLP(nn.Module):
    """Fully connected classifier: ``[Linear -> (BatchNorm) -> ReLU -> (Dropout)] * k -> head``.

    Any input is flattened to ``[B, -1]`` first, so it works on every digits form.

    Args:
        input_dim: features per example after flattening.
        hidden_dims: widths of the hidden layers (empty for a linear model).
        num_classes: output logits.
        batch_norm: add BatchNorm1d after each hidden Linear.
        dropout: dropout probability after each hidden activation.
    """

    def __init__(
        self,
        input_dim: int = 64,
        hidden_dims: Sequence[int] = (256, 256),
        num_classes: int = 10,
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ModelConfigError("MLP", f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_dim
        for hidden in hidden_dims:
            # A bias before BatchNorm is redundant: BN's shift replaces it.
            layers.append(nn.Linear(width, hidden, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU())
            if dropout > 0.0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]``."""
        return self.head(self.body(x))
