"""Every hook is documented and reachable through the typed facade."""

from __future__ import annotations

import inspect

from litplug.core import hookspecs
from litplug.core.manager import PluginHooks

HOOKS = [name for name, obj in vars(hookspecs).items() if name.startswith("litplug_") and callable(obj)]


def test_there_are_hooks_for_every_phase() -> None:
    for needed in (
        "litplug_configure_model",
        "litplug_on_fit_start",
        "litplug_transform_batch",
        "litplug_compute_loss",
        "litplug_extra_losses",
        "litplug_on_after_backward",
        "litplug_on_train_batch_end",
        "litplug_eval_step",
        "litplug_on_task_start",
        "litplug_on_task_end",
        "litplug_on_save_checkpoint",
        "litplug_on_load_checkpoint",
    ):
        assert needed in HOOKS


def test_every_hook_has_a_docstring_that_says_how_results_combine_and_where_it_runs() -> None:
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert len(doc) > 40, name
        assert "Results:" in doc, f"{name} does not say how results combine"
        assert "Ranks:" in doc, f"{name} does not say which ranks run it"


def test_every_hook_has_a_facade_method() -> None:
    for name in HOOKS:
        assert hasattr(PluginHooks, name.removeprefix("litplug_")), name
