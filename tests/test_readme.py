"""The README's Python example runs as printed."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env

README = Path(__file__).resolve().parents[1] / "README.md"


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
