"""The typed facade through which the core calls plugin hooks.

Nothing else in litplug spells ``pm.hook.x(...)``: every hook has a method here with typed
arguments, so mypy checks call sites and the combination rule (collected, first result, chained,
reversed; see :mod:`litplug.core.hookspecs`) lives in one place.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

from litplug.core import hookspecs
from litplug.core.errors import HookError, PluginSetupError
from litplug.core.ordering import resolve_order
from litplug.core.plugin import Plugin

if TYPE_CHECKING:
    import torch
    from lightning.pytorch import LightningModule, Trainer
    from torch import Tensor, nn
    from torch.utils.data import DataLoader

TRACE_ENV = "LITPLUG_TRACE_HOOKS"
trace_log = logging.getLogger("litplug.hooks")


def tracing_requested() -> bool:
    return os.environ.get(TRACE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


class PluginHooks:
    """Registers plugins with pluggy in their resolved order and calls hooks on them."""

    def __init__(self, plugins: Sequence[Plugin], trace: bool | None = None) -> None:
        self.plugins: list[Plugin] = resolve_order(plugins)
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        # pluggy calls the last registered implementation first, so register in reverse.
        for plugin in reversed(self.plugins):
            try:
                self.pm.register(plugin, name=plugin.name)
            except pluggy.PluginValidationError as err:
                raise PluginSetupError(f"plugin '{plugin.name}': invalid hook implementation: {err}") from err
        self._check_pending()
        self._check_undecorated_hooks()
        self._check_special_hooks()
        self.trace_enabled = tracing_requested() if trace is None else trace
        self.trace_sink: Callable[[str, list[str]], None] = _log_trace
        if self.trace_enabled:
            _ensure_trace_handler()
            self.pm.add_hookcall_monitoring(self._before_pluggy_call, lambda *args: None)

    # -- pickling (ddp_spawn sends the module to new processes) ---------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"plugins": self.plugins, "trace": self.trace_enabled}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["plugins"], trace=state["trace"])  # type: ignore[misc]

    # -- setup checks -----------------------------------------------------------------------------

    def _check_pending(self) -> None:
        """A hook implementation whose name matches no hook is an error, not silence."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as err:
            raise PluginSetupError(
                f"plugin '{self.pm.get_name(err.plugin)}': {err} "
                f"(see litplug.core.hookspecs for the hooks that exist)"
            ) from err

    def _check_undecorated_hooks(self) -> None:
        """A method named like a hook but without ``@hookimpl`` would never be called: say so."""
        marker = f"{hookspecs.PROJECT_NAME}_impl"  # the attribute pluggy's HookimplMarker sets
        for plugin in self.plugins:
            for name in dir(type(plugin)):
                method = getattr(type(plugin), name, None)
                if name.startswith("litplug_") and callable(method) and not hasattr(method, marker):
                    raise PluginSetupError(
                        f"plugin '{plugin.name}': method '{name}' is named like a litplug hook but is "
                        "not decorated with @hookimpl (from litplug.core.hookspecs import hookimpl), "
                        "so it would never be called; decorate it, or rename it if it is not a hook"
                    )

    def _check_special_hooks(self) -> None:
        """Chained and reversed hooks are called implementation by implementation: no wrappers."""
        for name in hookspecs.CHAINED_HOOKS | hookspecs.REVERSED_HOOKS:
            for impl in getattr(self.pm.hook, name).get_hookimpls():
                if impl.hookwrapper or impl.wrapper:
                    raise PluginSetupError(
                        f"plugin '{impl.plugin_name}': hook '{name}' cannot be implemented as a wrapper"
                    )

    # -- tracing ----------------------------------------------------------------------------------

    def _before_pluggy_call(
        self, hook_name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]
    ) -> None:
        self.trace_sink(hook_name, [impl.plugin_name for impl in reversed(impls)])

    def order(self) -> list[str]:
        return [p.name for p in self.plugins]

    # -- call helpers -----------------------------------------------------------------------------

    def _impls(self, name: str, reverse: bool) -> list[Any]:
        impls = getattr(self.pm.hook, name).get_hookimpls()  # registration order = reverse call order
        calls = impls if reverse else list(reversed(impls))
        if self.trace_enabled:
            self.trace_sink(name, [impl.plugin_name for impl in calls])
        return calls

    @staticmethod
    def _invoke(impl: Any, kwargs: dict[str, Any]) -> Any:
        return impl.function(**{arg: kwargs[arg] for arg in impl.argnames})

    def _chain(self, name: str, key: str, kwargs: dict[str, Any]) -> Any:
        for impl in self._impls(name, reverse=False):
            result = self._invoke(impl, kwargs)
            if result is not None:
                kwargs[key] = result
        return kwargs[key]

    def _reversed(self, name: str, kwargs: dict[str, Any]) -> list[Any]:
        results = [self._invoke(impl, kwargs) for impl in self._impls(name, reverse=True)]
        return [r for r in results if r is not None]

    def _merge_named(self, name: str, kwargs: dict[str, Any], reverse: bool = False) -> dict[str, Any]:
        """Call a collected hook whose results are dicts, merging them and rejecting duplicates."""
        merged: dict[str, Any] = {}
        owner: dict[str, str] = {}
        impls = self._impls(name, reverse=reverse)
        for impl in impls:
            result = self._invoke(impl, kwargs)
            if result is None:
                continue
            if not isinstance(result, dict):
                raise HookError(impl.plugin_name, name, f"must return a dict or None, got {type(result)}")
            for key, value in result.items():
                if key in merged:
                    raise HookError(
                        impl.plugin_name, name, f"returned '{key}', which plugin '{owner[key]}' returned too"
                    )
                merged[key] = value
                owner[key] = impl.plugin_name
        return merged

    # -- setup ------------------------------------------------------------------------------------

    def check_setup(self, module: LightningModule, trainer: Trainer) -> None:
        self.pm.hook.litplug_check_setup(module=module, trainer=trainer)

    def configure_model(self, model: nn.Module, module: LightningModule) -> nn.Module:
        return self._chain("litplug_configure_model", "model", {"model": model, "module": module})

    def on_fit_start(self, module: LightningModule, sample_batch: Any) -> None:
        self.pm.hook.litplug_on_fit_start(module=module, sample_batch=sample_batch)

    # -- batches ----------------------------------------------------------------------------------

    def transform_batch(self, module: LightningModule, batch: Any, stage: str) -> Any:
        return self._chain(
            "litplug_transform_batch", "batch", {"module": module, "batch": batch, "stage": stage}
        )

    def compute_loss(
        self, module: LightningModule, outputs: Any, targets: Tensor, batch: Any, stage: str
    ) -> Tensor | None:
        return self.pm.hook.litplug_compute_loss(
            module=module, outputs=outputs, targets=targets, batch=batch, stage=stage
        )

    def extra_losses(
        self, module: LightningModule, outputs: Any, targets: Tensor, batch: Any, stage: str
    ) -> dict[str, Tensor]:
        kwargs = {"module": module, "outputs": outputs, "targets": targets, "batch": batch, "stage": stage}
        return self._merge_named("litplug_extra_losses", kwargs)

    def log_probs(self, module: LightningModule, outputs: Any, stage: str) -> Tensor | None:
        return self.pm.hook.litplug_log_probs(module=module, outputs=outputs, stage=stage)

    # -- training step internals ------------------------------------------------------------------

    def on_after_backward(self, module: LightningModule) -> None:
        self.pm.hook.litplug_on_after_backward(module=module)

    def on_before_optimizer_step(self, module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        self.pm.hook.litplug_on_before_optimizer_step(module=module, optimizer=optimizer)

    def on_train_batch_end(self, module: LightningModule, batch: Any, loss: Tensor, batch_idx: int) -> None:
        self.pm.hook.litplug_on_train_batch_end(module=module, batch=batch, loss=loss, batch_idx=batch_idx)

    def on_train_epoch_end(self, module: LightningModule) -> None:
        self.pm.hook.litplug_on_train_epoch_end(module=module)

    # -- evaluation -------------------------------------------------------------------------------

    def on_eval_start(self, module: LightningModule, stage: str) -> None:
        self.pm.hook.litplug_on_eval_start(module=module, stage=stage)

    def eval_step(
        self,
        module: LightningModule,
        batch: Any,
        raw_batch: Any,
        outputs: Any,
        log_probs: Tensor | None,
        targets: Tensor,
        stage: str,
        dataloader_idx: int = 0,
    ) -> dict[str, Any]:
        kwargs = {
            "module": module,
            "batch": batch,
            "raw_batch": raw_batch,
            "outputs": outputs,
            "log_probs": log_probs,
            "targets": targets,
            "stage": stage,
            "dataloader_idx": dataloader_idx,
        }
        return self._merge_named("litplug_eval_step", kwargs)

    def on_eval_end(self, module: LightningModule, stage: str) -> dict[str, float]:
        return self._merge_named("litplug_on_eval_end", {"module": module, "stage": stage}, reverse=True)

    def on_eval_interrupted(self, module: LightningModule, stage: str) -> None:
        self._reversed("litplug_on_eval_interrupted", {"module": module, "stage": stage})

    # -- continual learning -----------------------------------------------------------------------

    def on_task_start(self, module: LightningModule, task_id: int) -> None:
        self.pm.hook.litplug_on_task_start(module=module, task_id=task_id)

    def on_task_end(self, module: LightningModule, task_id: int, dataloader: DataLoader) -> None:
        self.pm.hook.litplug_on_task_end(module=module, task_id=task_id, dataloader=dataloader)

    # -- checkpoints and teardown -----------------------------------------------------------------

    def on_save_checkpoint(self, module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.pm.hook.litplug_on_save_checkpoint(module=module, checkpoint=checkpoint)

    def on_load_checkpoint(self, module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.pm.hook.litplug_on_load_checkpoint(module=module, checkpoint=checkpoint)

    def on_fit_end(self, module: LightningModule) -> None:
        self._reversed("litplug_on_fit_end", {"module": module})


def _log_trace(hook_name: str, plugin_names: list[str]) -> None:
    trace_log.info("%s -> %s", hook_name, ", ".join(plugin_names) if plugin_names else "(no plugin)")


def _ensure_trace_handler() -> None:
    if not trace_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[litplug.hooks] %(message)s"))
        trace_log.addHandler(handler)
        trace_log.setLevel(logging.INFO)
        trace_log.propagate = False
