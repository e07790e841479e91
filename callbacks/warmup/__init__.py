"""Learning-rate warmup callbacks: linear warmup and LEGW (You et al. 2019).

Both multiply the scheduled learning rate only for the optimizer step itself, so they compose with
any optimizer and any LR scheduler. See ``README.md`` in this folder.
"""

from .callback import LEGW, LinearWarmup, WarmupConfigError

__all__ = ["LEGW", "LinearWarmup", "WarmupConfigError"]
