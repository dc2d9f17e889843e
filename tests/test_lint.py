"""The code base stays ruff-clean (rules in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    beside = Path(sys.executable).parent / "ruff"   # the venv's, when its bin is not on PATH
    ruff = str(beside) if beside.is_file() else shutil.which("ruff")
    assert ruff, "ruff is part of the test extras: pip install -e '.[test]'"
    proc = subprocess.run([ruff, "check", "--output-format", "concise", "search", "methods",
                           "rewards", "bench", "tests"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
