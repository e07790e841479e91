"""The base class of every litplug plugin.

A plugin is a small object of hook implementations (methods marked with ``@hookimpl``, see
:mod:`litplug.core.hookspecs`) plus declarations the core checks before training starts:

- ``name``: unique id used in ordering declarations, checkpoints and logs.
- ``run_after`` / ``run_before``: names of plugins this one must follow / precede when both are
  configured; the core sorts plugins topologically and rejects cycles.
- ``conflicts_with``: names of plugins that cannot be combined with this one;
  ``conflict_reasons`` maps some of them to why, which the setup error quotes.
- ``requires``: names of model features (:mod:`litplug.core.features`) the model must have.
- ``supports_ddp``: whether the plugin is correct under multi-process data parallelism.
- ``rank_local_state``: under DDP the plugin's state legitimately differs per rank (the DDP
  callback then skips its cross-rank agreement check, the fit-start broadcast leaves it alone, and
  checkpoints store every rank's state so each rank resumes from its own); by default state must
  agree.
- ``stochastic_training``: the plugin draws random numbers while training (noise, sampling,
  random starts), so a multi-process run matches a single-process one in distribution only.
- ``state_version``: bumped when the layout of ``state_dict()`` changes.

Hyperparameters are constructor arguments stored as attributes of the same name and validated in
``__init__`` with :meth:`Plugin.check`, so a bad value fails when the config is parsed.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch

from litplug.core.errors import CheckpointError, PluginConfigError, PluginSetupError


class Plugin:
    """Base class: subclass it, set ``name``, implement hooks with ``@hookimpl``."""

    name: ClassVar[str] = ""
    run_after: tuple[str, ...] = ()
    run_before: tuple[str, ...] = ()
    conflicts_with: tuple[str, ...] = ()
    conflict_reasons: ClassVar[dict[str, str]] = {}
    requires: tuple[str, ...] = ()
    supports_ddp: ClassVar[bool] = True
    rank_local_state: ClassVar[bool] = False
    stochastic_training: ClassVar[bool] = False
    state_version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.name and not inspect.isabstract(cls):
            raise TypeError(f"plugin class {cls.__module__}.{cls.__qualname__} must set a `name`")

    # -- validation helpers -----------------------------------------------------------------------

    def check(self, ok: bool, argument: str, problem: str) -> None:
        """Raise a :class:`PluginConfigError` naming this plugin and ``argument`` unless ``ok``."""
        if not ok:
            raise PluginConfigError(self.name, argument, problem)

    def check_range(
        self,
        argument: str,
        value: float,
        *,
        low: float | None = None,
        high: float | None = None,
        low_inclusive: bool = True,
        high_inclusive: bool = True,
    ) -> None:
        """Check ``low <= value <= high`` (bounds optional, inclusivity configurable)."""
        too_low = low is not None and (value < low if low_inclusive else value <= low)
        too_high = high is not None and (value > high if high_inclusive else value >= high)
        if too_low or too_high:
            left = "[" if low_inclusive else "("
            right = "]" if high_inclusive else ")"
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            raise PluginConfigError(self.name, argument, f"must be in {left}{lo}, {hi}{right}, got {value!r}")

    def check_batch(self, batch: Any, *, float_inputs: bool = False, class_targets: bool = False) -> None:
        """Reject a batch of a kind this plugin cannot work on (called on the first training batch,
        so a wrong pairing of plugin and data fails before the first step).

        ``float_inputs``: the inputs must be a floating-point tensor (an attack perturbs them; token
        ids cannot be). ``class_targets``: the targets must be one class index per example, ``[B]``.
        """
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            return  # the core's split_batch reports malformed batches
        inputs, targets = batch
        if float_inputs and isinstance(inputs, torch.Tensor) and not inputs.is_floating_point():
            raise PluginSetupError(
                f"plugin '{self.name}' perturbs its inputs, so it needs floating-point inputs "
                f"(images, features); the batches hold {inputs.dtype} inputs of shape "
                f"{tuple(inputs.shape)} (token ids?)"
            )
        if class_targets and isinstance(targets, torch.Tensor):
            if targets.dim() != 1 or targets.is_floating_point():
                raise PluginSetupError(
                    f"plugin '{self.name}' needs one class index per example (targets [B] of "
                    f"integers); the batches hold {targets.dtype} targets of shape {tuple(targets.shape)}"
                )

    def check_choice(self, argument: str, value: object, allowed: tuple[object, ...]) -> None:
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise PluginConfigError(self.name, argument, f"must be one of {choices}, got {value!r}")

    # -- introspection ----------------------------------------------------------------------------

    @classmethod
    def summary(cls) -> str:
        """First paragraph of the class docstring, on one line: shown by ``litplug plugins``."""
        doc = inspect.getdoc(cls) or ""
        return " ".join(doc.split("\n\n", 1)[0].split())

    @classmethod
    def example(cls) -> Plugin:
        """A small, fast instance for the registry-wide tests (resume, fast_dev_run, DDP).

        Override when the defaults are too slow for a few CPU steps or need arguments.
        """
        return cls()

    @classmethod
    def example_setup(cls) -> tuple[Any, Any] | None:
        """``(model, datamodule)`` for the registry-wide tests, or ``None`` to let the tests pick a
        small model with the features in ``requires`` on digits. Override when the plugin needs a
        particular architecture or data (task sequences, named layers)."""
        return None

    @classmethod
    def class_path(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"

    def hyperparameters(self) -> dict[str, Any]:
        """Constructor arguments and their current values (logged to the run config)."""
        params = inspect.signature(type(self).__init__).parameters
        return {
            p: getattr(self, p)
            for p in params
            if p != "self" and hasattr(self, p) and params[p].kind is not inspect.Parameter.VAR_KEYWORD
        }

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a checkpoint (tensors, numbers, strings, lists and dicts only,
        so checkpoints load with ``weights_only=True``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise CheckpointError(
                f"plugin '{self.name}' received checkpoint state but does not override load_state_dict"
            )

    def upgrade_state(self, state: dict[str, Any], from_version: int) -> dict[str, Any]:
        """Convert state saved by an older ``state_version``; the default refuses."""
        raise CheckpointError(
            f"plugin '{self.name}': the checkpoint holds its state in layout version {from_version}, "
            f"this {type(self).__name__} reads version {self.state_version} and cannot convert it "
            f"({type(self).__name__}.upgrade_state does not handle version {from_version}). Resume "
            "with the litplug / plugin release that wrote the checkpoint, or start from its weights only"
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"
