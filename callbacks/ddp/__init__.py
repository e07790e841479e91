"""Multi-process (DDP) support for litplug plugins. See ``README.md`` in this folder."""

from .callback import DistributedConfigError, DistributedPlugins, StateDisagreementError, lr_scale

__all__ = ["DistributedConfigError", "DistributedPlugins", "StateDisagreementError", "lr_scale"]
