"""A checkpoint saved when SIGTERM stops a fit (preemption, ``kill``). See ``README.md`` in this folder."""

from .callback import PreemptionCheckpoint

__all__ = ["PreemptionCheckpoint"]
