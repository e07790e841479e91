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
        assert info.summary.endswith((".", ")")), f"{info.name}: summary cut mid-sentence: {info.summary}"


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


MODULE_WITHOUT_ALL = '''
from litplug.core.plugin import Plugin
from litplug.plugins.ema import EMA  # used, not exported


class OwnPlugin(Plugin):
    """A plugin defined here."""

    name = "own_plugin"
'''


def test_module_entry_point_without_all_exports_only_its_own_classes(tmp_path: Path, monkeypatch) -> None:
    _install_fake_distribution(
        tmp_path, "litplug-own", "own_plugins", MODULE_WITHOUT_ALL, "own = own_plugins"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = discovery.available_plugins()
    assert registry["own_plugin"].package == "litplug-own"
    assert registry["ema"].package == "litplug", "an imported built-in is not credited to the importer"


def test_module_entry_point_exporting_no_plugin_is_reported(tmp_path: Path, monkeypatch) -> None:
    _install_fake_distribution(tmp_path, "litplug-empty", "empty_plugins", "X = 1\n", "empty = empty_plugins")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        PluginLoadError, match=r"'empty' from distribution 'litplug-empty'.*exports no plugin"
    ):
        discovery.available_plugins()


def test_third_party_class_named_like_a_builtin_is_reported(tmp_path: Path, monkeypatch) -> None:
    source = "from litplug.core.plugin import Plugin\n\nclass EMA(Plugin):\n    name = 'my_ema'\n"
    _install_fake_distribution(tmp_path, "litplug-my-ema", "my_ema", source, "my_ema = my_ema:EMA")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        PluginLoadError, match=r"'ema' .*'my_ema' \(my_ema.EMA, litplug-my-ema\) are both classes named EMA"
    ):
        discovery.available_plugins()


@pytest.fixture
def broken_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    source = "raise ImportError('missing dependency xyz')"
    _install_fake_distribution(tmp_path, "litplug-broken", "broken_plugin", source, "oops = broken_plugin:X")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_plugins_command_lists_builtins_and_reports_a_broken_package(broken_package: Path, capsys) -> None:
    from litplug.core.cli import main

    assert main(["plugins"]) == 2
    out, err = capsys.readouterr()
    assert "ghost_bn" in out and "GhostBatchNorm" in out
    assert "'oops' from distribution 'litplug-broken'" in err


def test_help_works_despite_a_broken_package(broken_package: Path, capsys) -> None:
    from litplug.core.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out, err = capsys.readouterr()
    assert "--trainer" in out
    assert "warning" in err and "litplug-broken" in err
    assert main(["fit", "--config", "configs/quickstart.yaml"]) == 2, "other commands still stop"


def test_short_name_with_autoload_off_hints_at_the_switch(tmp_path: Path, monkeypatch, capsys) -> None:
    from litplug.core.cli import main

    # a class no test has imported: jsonargparse finds short names among imported subclasses
    source = THIRD_PARTY.replace("ScaleLossPlugin", "NeverLoadedPlugin").replace("scale_loss", "never_loaded")
    _install_fake_distribution(tmp_path, "litplug-never", "never_loaded", source, "n = never_loaded")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(discovery.DISABLE_AUTOLOAD_ENV, "1")
    config = tmp_path / "c.yaml"
    config.write_text(
        "model:\n  model:\n    class_path: litplug.core.models.MLP\n"
        "  plugins:\n    - class_path: NeverLoadedPlugin\n"
    )
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--trainer.logger=false", "--trainer.fast_dev_run=true"])
    err = capsys.readouterr().err
    assert (
        f"'NeverLoadedPlugin' is a third-party plugin class, it is not loaded: {discovery.DISABLE_AUTOLOAD_ENV}"
        in err
    )
