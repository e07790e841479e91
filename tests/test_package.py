"""The installed distribution puts everything under `litplug.*` and nothing generic at top level."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.slow
def test_the_wheel_holds_only_litplug_with_its_types_and_data(tmp_path: Path) -> None:
    """What `pip install litplug` puts in site-packages (the tests above see an editable install)."""
    # a copy without build/: setuptools would reuse stale files from an earlier build there
    source = tmp_path / "source"
    skipped = (".git", ".venv", "build", "*.egg-info", "runs", "benchmarks", "__pycache__", "wandb")
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*skipped))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path,
            source,
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("litplug-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"litplug"}, top
    for root in ("core", "plugins", "callbacks"):
        assert f"litplug/{root}/py.typed" in names, f"litplug.{root} is not marked typed (PEP 561)"
    assert "litplug/plugins/ghost_bn/kernel.c" in names
    assert "litplug/plugins/ghost_bn/README.md" in names
    assert "litplug/callbacks/warmup/README.md" in names
