"""Small convolutional classifier for 8x8 digit images."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SmallCNN"]


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class SmallCNN(nn.Module):
    """``stem`` conv -> BN -> ReLU -> strided conv -> BN -> ReLU -> global average pool -> ``head``.

    Sized for ``[B, 1, 8, 8]`` digits (8x8 -> 4x4 after the strided conv). The first conv is named
    ``stem`` and the classifier ``head`` so plugins (e.g. MIMO) can widen them.

    Args:
        in_channels: input channels.
        num_classes: output logits.
        width: channels after the stem; the second conv has ``2 * width``.
        batch_norm: use BatchNorm2d after each conv (otherwise the convs have biases).
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 32, batch_norm: bool = True
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=not batch_norm)
        self.stem_norm = _norm(width, batch_norm)
        self.conv = nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1, bias=not batch_norm)
        self.conv_norm = _norm(2 * width, batch_norm)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` from images ``[B, C, H, W]``."""
        if x.dim() != 4:
            raise ValueError(f"SmallCNN expects [B, C, H, W] images, got shape {tuple(x.shape)}")
        h = self.act(self.stem_norm(self.stem(x)))
        h = self.act(self.conv_norm(self.conv(h)))
        return self.head(self.pool(h).flatten(1))
