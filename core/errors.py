"""Errors raised by litplug. Each one names the plugin, the argument or hook, and the cause."""

from __future__ import annotations


class LitplugError(Exception):
    """Base class of every error litplug raises on purpose."""


class PluginConfigError(LitplugError, ValueError):
    """A plugin was configured with a value it cannot work with.

    Raised at construction or at setup, always before the first training step.
    """

    def __init__(self, plugin: str, argument: str, problem: str) -> None:
        self.plugin = plugin
        self.argument = argument
        self.problem = problem
        super().__init__(f"plugin '{plugin}': argument '{argument}' {problem}")


class ModuleConfigError(LitplugError, ValueError):
    """An argument of ``LitplugModule`` itself has a value it cannot work with (at construction)."""

    def __init__(self, argument: str, problem: str) -> None:
        self.argument = argument
        self.problem = problem
        super().__init__(f"LitplugModule: argument '{argument}' {problem}")


class DataConfigError(LitplugError, ValueError):
    """A data module was configured with a value it cannot work with (at construction)."""

    def __init__(self, data_module: str, problem: str) -> None:
        self.data_module = data_module
        self.problem = problem
        super().__init__(f"data module {data_module}: {problem}")


class ModelConfigError(LitplugError, ValueError):
    """A reference model (``litplug.core.models``) was built with a value it cannot work with."""

    def __init__(self, model: str, problem: str) -> None:
        self.model = model
        self.problem = problem
        super().__init__(f"model {model}: {problem}")


class PluginSetupError(LitplugError):
    """The set of configured plugins cannot run together or on this model (order, conflicts, features)."""


class PluginLoadError(LitplugError):
    """A third-party plugin could not be imported from its entry point."""


class ExportError(LitplugError, ValueError):
    """``export_predictor`` / ``litplug export`` was asked for a program it cannot write as asked."""


class CheckpointError(LitplugError):
    """A checkpoint does not fit the configured plugins."""


class HookError(LitplugError):
    """A plugin's hook implementation returned something the hook's contract does not allow."""

    def __init__(self, plugin: str, hook: str, problem: str) -> None:
        self.plugin = plugin
        self.hook = hook
        super().__init__(f"plugin '{plugin}', hook '{hook}': {problem}")


class StrategyError(LitplugError, ValueError):
    """The trainer's strategy cannot run this command correctly (checked before training)."""
