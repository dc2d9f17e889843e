"""The README never lies: CI runs its test line, and its smoke line names a real method/preset."""

from __future__ import annotations

import re
from pathlib import Path

from search.run import build_parser

REPO = Path(__file__).resolve().parent.parent


def _block_after(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    after = text.split(marker, 1)[1]
    return re.search(r"```\n(.+?)\n```", after, re.S).group(1).strip()


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "<!-- ci:test -->" in ci
    assert "pytest" in _block_after("<!-- ci:test -->")


def test_readme_smoke_command_parses():
    line = _block_after("<!-- ci:smoke -->")
    argv = line.split("-m search.run", 1)[1].split()
    args = build_parser().parse_args(argv)
    assert args.preset == "smoke" and args.method in ("pnp", "clipseg", "fseg")
