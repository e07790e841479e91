"""The installed distribution puts everything under `litplug.*` and nothing generic at top level."""

from __future__ import annotations

import importlib
from importlib.metadata import distribution


def test_packages_are_under_the_litplug_namespace() -> None:
    for name in (
        "litplug.core",
        "litplug.plugins",
        "litplug.callbacks",
        "litplug.core.data",
        "litplug.core.models",
    ):
        assert importlib.import_module(name).__name__ == name


def test_no_generic_top_level_package_is_installed() -> None:
    dist = distribution("litplug")
    top_level = (dist.read_text("top_level.txt") or "").split()
    assert top_level == ["litplug"], top_level
    assert dist.entry_points.select(group="console_scripts")["litplug"].value == "litplug.core.cli:main"
