"""Center-loss regularisation for continual learning (features pulled to per-class centers)."""

from .functional import apply_center_update, center_loss, center_statistics, update_centers
from .plugin import CenterLoss

__all__ = ["CenterLoss", "apply_center_update", "center_loss", "center_statistics", "update_centers"]
