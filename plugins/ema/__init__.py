"""EMA of the weights (temporal ensemble), evaluated at validation and test."""

from .functional import ema_decay, ema_multi_avg_fn, ema_update_reference, make_averaged_model
from .plugin import EMA

__all__ = ["EMA", "ema_decay", "ema_multi_avg_fn", "ema_update_reference", "make_averaged_model"]
