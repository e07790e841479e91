"""The README's Python example and CONTRIBUTING's example plugin run as printed."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer, subprocess_env, toy_loaders
from torch import nn

from litplug.core.discovery import available_plugins
from litplug.core.errors import PluginSetupError
from litplug.core.module import LitplugModule
from litplug.core.ordering import resolve_order

README = Path(__file__).resolve().parents[1] / "README.md"
CONTRIBUTING = README.with_name("CONTRIBUTING.md")


def _python_example() -> str:
    section = README.read_text().split("### From Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README: no python block under 'From Python'"
    return match.group(1)


@pytest.mark.slow
def test_the_readme_python_example_trains_and_tests(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_python_example())
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert results["test/acc"] > 0.5, results  # 3 epochs learn the digits well above chance (0.1)


def test_the_contributing_example_plugin_trains_resumes_and_declares_its_conflict() -> None:
    section = CONTRIBUTING.read_text().split("## Writing a plugin", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "CONTRIBUTING: no python block under 'Writing a plugin'"
    namespace: dict[str, object] = {}
    exec(compile(match.group(1), "CONTRIBUTING.md", "exec"), namespace)
    anchor_cls = namespace["L2Anchor"]
    plugin = anchor_cls(strength=0.1)  # type: ignore[operator]
    train, _ = toy_loaders()
    module = LitplugModule(nn.Linear(8, 3), plugins=[plugin], num_classes=3)
    quiet_trainer(max_steps=3, limit_val_batches=0, log_every_n_steps=1).fit(module, train)
    assert plugin.anchor is not None and len(plugin.anchor) == 2
    assert "train/loss_anchor" in module.trainer.logged_metrics
    copy = anchor_cls()  # type: ignore[operator]
    copy.load_state_dict(plugin.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(copy.anchor, plugin.anchor, strict=True))
    ewc = available_plugins()["ewc"].cls.example()
    with pytest.raises(PluginSetupError, match="both pull the weights toward a fixed point"):
        resolve_order([plugin, ewc])
