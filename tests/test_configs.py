"""Every config in configs/ runs (one batch of each loop, `--trainer.fast_dev_run=true`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from litplug.core.cli import main


@pytest.fixture(autouse=True)
def _no_open_wandb_run() -> Iterator[None]:
    """WandbLogger reuses a run left open in the process (in another test's directory): close it."""
    import wandb

    wandb.finish()
    yield
    wandb.finish()


CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_there_is_a_quickstart_config() -> None:
    assert any(c.name == "quickstart.yaml" for c in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_runs_with_fast_dev_run(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # configs write under runs/ relative to the working directory
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    code = main(
        ["fit", "--config", str(config), "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false"]
    )
    assert code == 0


def test_wandb_offline_run_has_the_plugin_order_and_no_secret(tmp_path: Path) -> None:
    """configs/wandb.yaml writes an offline W&B run whose config holds the resolved plugin order,
    and a W&B API key in the environment is never written into anything the run leaves behind.

    Runs `litplug` in a fresh process: wandb fixes its directories once per process."""
    secret = "litplug-test-secret-0123456789abcdef"
    # Drop wandb's own variables (e.g. the service address an in-process run of another test left).
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_API_KEY=secret)
    config = Path(__file__).resolve().parent.parent / "configs" / "wandb.yaml"
    args = ["fit", "--config", str(config), "--trainer.max_steps=2", "--trainer.enable_progress_bar=false"]
    completed = subprocess.run(
        [sys.executable, "-m", "litplug.core.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert b"args parameter is intended" not in completed.stderr  # LightningCLI reads argv itself
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in written) and any(p.suffix == ".wandb" for p in written)
    leaking = [str(p) for p in written if secret.encode() in p.read_bytes()]
    assert leaking == []
    records = b"".join(p.read_bytes() for p in written if p.suffix == ".wandb")  # the offline run's log
    assert b"litplug/plugin_order" in records


def test_a_resumed_wandb_run_continues_the_checkpoints_run(tmp_path: Path) -> None:
    """`--ckpt_path last` with configs/wandb.yaml logs into the W&B run the checkpoint came from
    (Lightning's WandbLogger would start a new one and split the curves). Two fresh processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path))
    config = Path(__file__).resolve().parent.parent / "configs" / "wandb.yaml"
    args = ["fit", "--config", str(config), "--trainer.enable_progress_bar=false", "--test_after_fit=false"]
    runs = []
    for more in (["--trainer.max_steps=2"], ["--trainer.max_steps=4", "--ckpt_path", "last"]):
        completed = subprocess.run(
            [sys.executable, "-m", "litplug.core.cli", *args, *more],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        runs.append(completed.stdout)
    offline_runs = sorted(p.name for p in tmp_path.rglob("offline-run-*") if p.is_dir())
    assert len(offline_runs) == 2, offline_runs
    run_ids = {name.rsplit("-", 1)[1] for name in offline_runs}
    assert len(run_ids) == 1, offline_runs
    assert f"litplug fit: continuing W&B run {run_ids.pop()}, the checkpoint's" in runs[1]
