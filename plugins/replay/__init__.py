"""Experience replay with a reservoir-sampled memory (a continual-learning baseline)."""

from .functional import ReservoirMemory, reservoir_slots
from .plugin import Replay

__all__ = ["Replay", "ReservoirMemory", "reservoir_slots"]
