"""Center-loss regularisation for continual learning (features pulled to per-class centers)."""

from .functional import center_loss, update_centers
from .plugin import CenterLoss

__all__ = ["CenterLoss", "center_loss", "update_centers"]
