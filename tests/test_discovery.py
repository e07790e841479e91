"""Built-in and third-party (entry-point) plugin discovery, and YAML by short name and class_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from litplug.core import discovery
from litplug.core.errors import PluginLoadError
from litplug.core.plugin import Plugin

THIRD_PARTY = '''
import torch
from litplug.core.hookspecs import hookimpl
from litplug.core.plugin import Plugin

__all__ = ["ScaleLossPlugin"]


class ScaleLossPlugin(Plugin):
    """Adds a scaled copy of the main loss (a third-party test plugin)."""

    name = "scale_loss"

    def __init__(self, factor: float = 0.5) -> None:
        self.check_range("factor", factor, low=0.0)
        self.factor = factor

    @hookimpl
    def litplug_extra_losses(self, outputs, targets):
        return {"scaled": self.factor * torch.nn.functional.cross_entropy(outputs, targets)}
'''


def _install_fake_distribution(site: Path, dist: str, module: str, source: str, entry: str) -> None:
    """Write a minimal installed distribution (dist-info with entry points) into ``site``."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[litplug.plugins]\n{entry}\n")


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _install_fake_distribution(
        tmp_path,
        "litplug-scale-loss",
        "scale_loss_plugin",
        THIRD_PARTY,
        "scale_loss = scale_loss_plugin:ScaleLossPlugin",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtin_plugins_are_plugin_subclasses_with_a_summary() -> None:
    for info in discovery.builtin_plugins():
        assert issubclass(info.cls, Plugin)
        assert info.package == "litplug"
        assert info.summary, f"{info.name} has no one-line summary"


def test_entry_point_plugin_is_discovered(third_party: Path) -> None:
    registry = discovery.available_plugins()
    info = registry["scale_loss"]
    assert info.package == "litplug-scale-loss"
    assert info.entry_point == "scale_loss"
    assert info.summary.startswith("Adds a scaled copy")


def test_autoload_can_be_switched_off(third_party: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(discovery.DISABLE_AUTOLOAD_ENV, "1")
    assert "scale_loss" not in discovery.available_plugins()


def test_broken_entry_point_is_reported_by_distribution_and_name(tmp_path: Path, monkeypatch) -> None:
    _install_fake_distribution(
        tmp_path,
        "litplug-broken",
        "broken_plugin",
        "raise ImportError('missing dependency xyz')",
        "oops = broken_plugin:X",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        PluginLoadError, match=r"'oops' from distribution 'litplug-broken'.*missing dependency xyz"
    ):
        discovery.available_plugins()


@pytest.mark.parametrize("class_path", ["ScaleLossPlugin", "scale_loss_plugin.ScaleLossPlugin"])
def test_third_party_plugin_works_in_yaml(third_party: Path, class_path: str, tmp_path: Path) -> None:
    from litplug.core.cli import LitplugCLI

    discovery.available_plugins()  # what `litplug` does before parsing
    config = tmp_path / "c.yaml"
    config.write_text(
        "model:\n  model:\n    class_path: litplug.core.models.MLP\n"
        f"  plugins:\n    - class_path: {class_path}\n      init_args: {{factor: 0.25}}\n"
        "trainer:\n  logger: false\n  enable_checkpointing: false\n"
    )
    cli = LitplugCLI(run=False, args=["--config", str(config)])
    assert [p.name for p in cli.model.plugins] == ["scale_loss"]
    assert cli.model.plugins[0].factor == 0.25
