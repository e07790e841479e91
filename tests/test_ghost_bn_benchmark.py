"""The ghost batch norm benchmark's smoke run: the script, its per-thread-count child process and
its computed targets table keep working as the kernel changes (timings are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ghost_bn" / "run.py"


@pytest.mark.slow
def test_quick_speed_run_prints_every_target_verdict(tmp_path: Path) -> None:
    env = {**os.environ, "LITPLUG_CACHE_DIR": str(tmp_path)}
    command = [sys.executable, str(SCRIPT), "--quick", "--speed-only", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for target in (
        "| GBN / BN <= 1.3x in every shape (METHODS.md) | 1 |",
        "| loop / GBN >= 3x at >= 32 ghost batches (METHODS.md) | 1 |",
        "| step GBN / BN <= 1.15x, cnn, g = 32 (issue 2) | 1 |",
        "| step loop / GBN >= 2x, cnn, g = 32 (issue 2) | 1 |",
    ):
        line = next((row for row in out.splitlines() if row.startswith(target)), None)
        assert line is not None, f"missing: {target}"
        assert line.rstrip().endswith("|") and ("met" in line.split("|")[-2]), line
    assert "## Speed with 1 torch thread" in out and "### kernel.c's design choices" in out
