"""Plugin state in checkpoints: versioned keys, weights_only loading, surgery replay, clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import CountingPlugin, quiet_trainer, toy_loaders
from torch import nn

from litplug.core.errors import CheckpointError, PluginConfigError
from litplug.core.hookspecs import hookimpl
from litplug.core.module import LitplugModule
from litplug.core.plugin import Plugin


class ScaledLinear(nn.Module):
    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner
        self.scale = nn.Parameter(torch.full((inner.out_features,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


class WrapLinear(Plugin):
    """Surgery: wraps the model's Linear in a ScaledLinear with a new parameter."""

    name = "wrap_linear"

    @hookimpl
    def litplug_configure_model(self, model: nn.Module) -> nn.Module | None:
        return ScaledLinear(model) if isinstance(model, nn.Linear) else None


def _fit(plugins: list[Plugin], path: Path, steps: int = 3) -> LitplugModule:
    torch.manual_seed(0)
    module = LitplugModule(nn.Linear(8, 3), plugins=plugins, num_classes=3)
    train, _ = toy_loaders()
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0)
    trainer.fit(module, train)
    trainer.save_checkpoint(path)
    return module


def test_plugin_state_is_stored_under_a_versioned_key(tmp_path: Path) -> None:
    _fit([CountingPlugin()], tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=True)
    entry = checkpoint["litplug"]["plugins"]["counter"]
    assert entry["version"] == CountingPlugin.state_version
    assert entry["class_path"] == "helpers.CountingPlugin"
    assert entry["state"]["steps"] == 3
    assert checkpoint["litplug"]["order"] == ["counter"]


def test_load_from_checkpoint_restores_plugin_state_with_weights_only(tmp_path: Path) -> None:
    trained = _fit([CountingPlugin()], tmp_path / "a.ckpt")
    fresh = CountingPlugin()
    loaded = LitplugModule.load_from_checkpoint(
        tmp_path / "a.ckpt", model=nn.Linear(8, 3), plugins=[fresh], weights_only=True
    )
    assert fresh.steps == 3
    assert torch.equal(fresh.anchor, trained.plugins[0].anchor)
    assert torch.equal(loaded.model.weight, trained.model.weight)


def test_surgery_is_replayed_before_weights_load(tmp_path: Path) -> None:
    trained = _fit([WrapLinear()], tmp_path / "w.ckpt")
    assert isinstance(trained.model, ScaledLinear)
    loaded = LitplugModule.load_from_checkpoint(
        tmp_path / "w.ckpt", model=nn.Linear(8, 3), plugins=[WrapLinear()], weights_only=True
    )
    assert isinstance(loaded.model, ScaledLinear)
    assert torch.equal(loaded.model.scale, trained.model.scale)
    assert not torch.equal(loaded.model.scale, torch.full((3,), 2.0))  # the trained value, not the init


def test_checkpoint_needing_an_unconfigured_plugin_is_a_clear_error(tmp_path: Path) -> None:
    _fit([CountingPlugin()], tmp_path / "a.ckpt")
    with pytest.raises(CheckpointError, match=r"needs plugin\(s\) 'counter' \(helpers.CountingPlugin\)"):
        LitplugModule.load_from_checkpoint(tmp_path / "a.ckpt", model=nn.Linear(8, 3), plugins=[])


def test_old_state_version_goes_through_upgrade_state(tmp_path: Path) -> None:
    _fit([CountingPlugin()], tmp_path / "a.ckpt")

    class CountingV2(CountingPlugin):
        state_version = 2

    with pytest.raises(
        CheckpointError, match=r"layout version 1, this CountingV2 reads version 2 .*upgrade_state"
    ):
        LitplugModule.load_from_checkpoint(tmp_path / "a.ckpt", model=nn.Linear(8, 3), plugins=[CountingV2()])

    class CountingV2Upgrading(CountingPlugin):
        state_version = 2

        def upgrade_state(self, state: dict[str, Any], from_version: int) -> dict[str, Any]:
            return {**state, "steps": state["steps"] * 10}

    upgraded = CountingV2Upgrading()
    LitplugModule.load_from_checkpoint(tmp_path / "a.ckpt", model=nn.Linear(8, 3), plugins=[upgraded])
    assert upgraded.steps == 30


def test_plugin_without_state_support_is_not_silently_dropped(tmp_path: Path) -> None:
    _fit([CountingPlugin()], tmp_path / "a.ckpt")

    class Stateless(Plugin):
        name = "counter"

    with pytest.raises(CheckpointError, match="does not override load_state_dict"):
        LitplugModule.load_from_checkpoint(tmp_path / "a.ckpt", model=nn.Linear(8, 3), plugins=[Stateless()])


def test_bad_hyperparameter_fails_at_construction_naming_plugin_and_argument() -> None:
    with pytest.raises(PluginConfigError, match=r"plugin 'counter': argument 'weight' must be in \[0, inf\]"):
        CountingPlugin(weight=-1.0)


class RankLocal(Plugin):
    """State that differs per rank by design (like a replay memory of a shard)."""

    name = "rank_local"
    rank_local_state = True

    def __init__(self) -> None:
        self.value = -1

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = int(state["value"])


def _saved_entry(states: list[int]) -> dict[str, Any]:
    return {
        "rank_local": {
            "class_path": RankLocal.class_path(),
            "version": 1,
            "state": {"value": states[0]},
            "rank_states": [{"value": v} for v in states],
        }
    }


def test_rank_local_state_saved_by_more_processes_resumes_from_the_matching_rank_with_a_warning() -> None:
    """Per-rank states (written under DDP, see tests/test_ddp.py for the 2-process round trip): a run
    with another number of processes continues each rank from saved rank ``rank % saved`` and says so."""
    module = LitplugModule(nn.Linear(2, 2), plugins=[RankLocal()])
    with pytest.warns(
        RuntimeWarning, match=r"'rank_local'.*per-rank state of 2 processes and this run has 1"
    ):
        module._restore_plugin_states(_saved_entry([7, 9]))
    assert module.plugins[0].value == 7
    module._restore_plugin_states(_saved_entry([5]))  # same world size: no warning, its own state
    assert module.plugins[0].value == 5


def test_single_process_checkpoint_of_a_rank_local_plugin_has_no_per_rank_copy(tmp_path: Path) -> None:
    module = LitplugModule(nn.Linear(2, 2), plugins=[RankLocal()])
    checkpoint: dict[str, Any] = {}
    module.on_save_checkpoint(checkpoint)
    assert "rank_states" not in checkpoint["litplug"]["plugins"]["rank_local"]


def test_rank_local_state_is_moved_to_the_cpu_for_the_gather_keeping_containers() -> None:
    from collections import namedtuple

    from litplug.core.distributed import all_gather_object, to_cpu

    Pair = namedtuple("Pair", "first second")
    state = {"memory": [torch.ones(2), (3, "x")], "pair": Pair(torch.zeros(1), 4)}
    moved = to_cpu(state)
    assert isinstance(moved["pair"], Pair) and moved["pair"].second == 4
    assert isinstance(moved["memory"][1], tuple) and moved["memory"][1] == (3, "x")
    assert all(t.device.type == "cpu" for t in (moved["memory"][0], moved["pair"].first))
    assert all_gather_object(moved) == [moved]  # one process: its own state only
