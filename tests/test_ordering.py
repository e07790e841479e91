"""Plugin order resolution, conflicts, duplicate names and hook-name checks."""

from __future__ import annotations

import pytest
import torch
from helpers import Named
from torch import nn

from litplug.core.errors import HookError, PluginSetupError
from litplug.core.hookspecs import hookimpl
from litplug.core.manager import PluginHooks
from litplug.core.module import LitplugModule
from litplug.core.ordering import resolve_order
from litplug.core.plugin import Plugin


def names(plugins: list[Plugin]) -> list[str]:
    return [p.name for p in plugins]


def test_order_keeps_configured_order_without_constraints() -> None:
    assert names(resolve_order([Named("a"), Named("b"), Named("c")])) == ["a", "b", "c"]


def test_run_after_and_run_before_are_honoured() -> None:
    plugins = [Named("a", after=("c",)), Named("b"), Named("c", before=("b",))]
    assert names(resolve_order(plugins)) == ["c", "a", "b"]


def test_constraints_on_unconfigured_plugins_are_ignored() -> None:
    assert names(resolve_order([Named("a", after=("zzz",)), Named("b", before=("yyy",))])) == ["a", "b"]


def test_cycle_is_rejected_naming_the_cycle() -> None:
    plugins = [Named("a", after=("c",)), Named("b", after=("a",)), Named("c", after=("b",)), Named("d")]
    with pytest.raises(PluginSetupError, match=r"cycle: a -> b -> c -> a"):
        resolve_order(plugins)


def test_conflict_is_rejected() -> None:
    with pytest.raises(PluginSetupError, match="'a' conflicts with plugin 'b'"):
        resolve_order([Named("a", conflicts=("b",)), Named("b")])


def test_duplicate_names_are_rejected() -> None:
    with pytest.raises(PluginSetupError, match="configured twice"):
        resolve_order([Named("a"), Named("a")])


def test_hooks_run_in_resolved_order_and_teardown_hooks_in_reverse() -> None:
    log: list[str] = []
    hooks = PluginHooks([Named("a", after=("b",), log=log), Named("b", log=log)])
    module = LitplugModule(nn.Linear(2, 2))
    hooks.transform_batch(module=module, batch=(torch.zeros(1, 2), torch.zeros(1)), stage="train")
    hooks.on_eval_end(module=module, stage="val")
    assert log == ["transform:b", "transform:a", "eval_end:a", "eval_end:b"]


def test_misspelled_hook_is_an_error_naming_the_plugin() -> None:
    class Typo(Plugin):
        name = "typo"

        @hookimpl
        def litplug_on_fitstart(self) -> None:
            pass

    with pytest.raises(PluginSetupError, match="typo"):
        PluginHooks([Typo()])


def test_hook_method_without_hookimpl_is_an_error_naming_plugin_and_method() -> None:
    class Undecorated(Plugin):
        name = "undecorated"

        def litplug_on_fit_start(self) -> None:  # forgot @hookimpl: pluggy would skip it silently
            pass

    with pytest.raises(PluginSetupError, match=r"'undecorated': method 'litplug_on_fit_start' .* @hookimpl"):
        PluginHooks([Undecorated()])


def test_unknown_hook_argument_is_an_error() -> None:
    class BadArg(Plugin):
        name = "badarg"

        @hookimpl
        def litplug_on_fit_start(self, not_an_argument: int) -> None:
            pass

    with pytest.raises(PluginSetupError, match="badarg"):
        PluginHooks([BadArg()])


def test_duplicate_loss_term_names_are_rejected() -> None:
    class Term(Plugin):
        name = "term"

        def __init__(self, label: str) -> None:
            self.name = label  # type: ignore[misc]

        @hookimpl
        def litplug_extra_losses(self) -> dict[str, torch.Tensor]:
            return {"penalty": torch.tensor(1.0)}

    hooks = PluginHooks([Term("x"), Term("y")])
    module = LitplugModule(nn.Linear(2, 2))
    with pytest.raises(Exception, match="'penalty', which plugin 'x' returned too"):
        hooks.extra_losses(module=module, outputs=None, targets=torch.zeros(1), batch=None, stage="train")


def test_duplicate_epoch_metric_names_are_rejected() -> None:
    class EpochMetric(Plugin):
        name = "epoch_metric"

        def __init__(self, label: str) -> None:
            self.name = label  # type: ignore[misc]

        @hookimpl
        def litplug_on_eval_end(self) -> dict[str, float]:
            return {"score": 1.0}

    module = LitplugModule(nn.Linear(2, 2))
    assert PluginHooks([EpochMetric("x")]).on_eval_end(module=module, stage="val") == {"score": 1.0}
    hooks = PluginHooks([EpochMetric("x"), EpochMetric("y")])
    # reversed order: y's result comes first, x's repeats it
    with pytest.raises(
        HookError, match="plugin 'x', hook 'litplug_on_eval_end': returned 'score', which plugin 'y'"
    ):
        hooks.on_eval_end(module=module, stage="val")


def test_required_model_feature_missing_is_rejected() -> None:
    class NeedsLSTM(Plugin):
        name = "needs_lstm"
        requires = ("lstm",)

    with pytest.raises(
        PluginSetupError, match="'needs_lstm' requires a model with at least one torch.nn.LSTM"
    ):
        LitplugModule(nn.Linear(2, 2), plugins=[NeedsLSTM()])


def test_trace_logs_every_hook_with_its_plugins(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    hooks = PluginHooks([Named("a"), Named("b")], trace=True)
    seen: list[tuple[str, list[str]]] = []
    hooks.trace_sink = lambda hook, plugins: seen.append((hook, plugins))
    module = LitplugModule(nn.Linear(2, 2))
    hooks.transform_batch(module=module, batch=(torch.zeros(1, 2), torch.zeros(1)), stage="val")
    hooks.on_fit_start(module=module, sample_batch=None)
    assert seen == [("litplug_transform_batch", ["a", "b"]), ("litplug_on_fit_start", [])]
