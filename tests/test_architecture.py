"""The house rules of the code base, read from the code (docs/architecture.md):

- the import contracts of ``[tool.importlinter]`` in pyproject.toml (the layers of ``search``,
  the phases of ``search.engine``, ``methods`` / ``rewards`` alone), checked by import-linter;
- what import-linter cannot say, from the AST (bench/imports.py), over every ``.py`` of search/,
  methods/, rewards/, bench/ and tests/ (test modules and their helpers included): no import
  circle (imports inside functions counted), ``methods`` / ``rewards`` never import ``search``,
  no private name (``from x import _y``) taken from another module, no source file over 400
  lines; and a docstring in every package's ``__init__`` that says what it may import.

Each check also runs on a small tree with the fault planted, where it must fail.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import imports

REPO = Path(__file__).resolve().parent.parent
#: The method families' own packages describe their method; what a method package may import is
#: said once, in methods/__init__.py (and a method's files are hashed into its cache keys).
METHOD_FAMILIES = {"methods.pnp", "methods.clipseg", "methods.fseg"}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    beside = Path(sys.executable).parent / "lint-imports"
    exe = str(beside) if beside.is_file() else shutil.which("lint-imports")
    assert exe, "import-linter is part of the test extras: pip install -e '.[test]'"
    return subprocess.run([exe, "--no-cache", "--no-logo"], cwd=root, capture_output=True,
                          text=True, timeout=300)


# --- this tree ----------------------------------------------------------------------------------
def test_import_contracts_are_kept():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "5 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


@pytest.fixture(scope="module")
def tree():
    return imports.report(REPO)


def test_no_import_circle(tree):
    assert tree["circles"] == []


def test_methods_and_rewards_never_import_search(tree):
    assert tree["wrong_way"] == []


def test_no_private_name_imported_from_another_module(tree):
    assert tree["private"] == []


def test_no_source_file_over_400_lines(tree):
    assert tree["long_files"] == []


def test_no_arrow_points_up_across_the_layers_of_search(tree):
    assert tree["search_up"] == []


def package_docstrings(root: Path) -> dict[str, str | None]:
    """Package -> the docstring of its ``__init__`` (None when it has none)."""
    out = {}
    for name, path in imports.modules(root).items():
        if path.name == "__init__.py" and name not in METHOD_FAMILIES:
            out[name] = ast.get_docstring(ast.parse(path.read_text()))
    return out


def test_every_package_says_what_it_may_import():
    docs = package_docstrings(REPO)
    assert {"search", "search.engine", "search.record", "search.core", "search.data",
            "methods", "rewards", "bench", "tests"} <= set(docs)
    silent = [name for name, doc in docs.items() if not doc or "may import" not in doc.lower()]
    assert silent == []


# --- the same checks on a planted fault -----------------------------------------------------------
def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


CLEAN = {
    "search/__init__.py": '"""May import: everything below."""\n',
    "search/core/__init__.py": '"""May import: methods."""\n',
    "search/core/cache.py": "from methods.base import Thing\n",
    "search/engine/__init__.py": '"""May import: search.core."""\n',
    "search/engine/plan.py": "from search.core.cache import Thing\n",
    "methods/__init__.py": '"""May import: methods."""\n',
    "methods/base.py": "Thing = 1\n_hidden = 2\n",
    "rewards/__init__.py": '"""May import: methods."""\n',
}


def test_the_clean_tree_passes(tmp_path):
    r = imports.report(write(tmp_path, CLEAN))
    assert (r["circles"], r["wrong_way"], r["private"], r["long_files"], r["search_up"]) == (
        [], [], [], [], [])
    assert all(package_docstrings(tmp_path).values())


def test_a_circle_through_a_function_level_import_is_found(tmp_path):
    write(tmp_path, {**CLEAN, "methods/base.py": "def f():\n    import search.engine.plan\n"})
    assert imports.report(tmp_path)["circles"] == [
        ["methods.base", "search.core.cache", "search.engine.plan"]]


def test_a_circle_under_type_checking_is_found(tmp_path):
    write(tmp_path, {**CLEAN, "search/core/cache.py": "from typing import TYPE_CHECKING\n"
                     "from methods.base import Thing\nif TYPE_CHECKING:\n"
                     "    from search.engine import plan\n"})
    assert imports.report(tmp_path)["circles"] == [["search.core.cache", "search.engine.plan"]]


def test_methods_importing_search_is_found(tmp_path):
    write(tmp_path, {**CLEAN, "methods/extra.py": "def f():\n    from search.core import cache\n"})
    assert imports.report(tmp_path)["wrong_way"] == ["methods.extra:2 -> search.core.cache"]


def test_a_private_name_or_module_of_another_module_is_found(tmp_path):
    write(tmp_path, {**CLEAN, "search/engine/plan.py": "from methods.base import _hidden\n",
                     "search/engine/other.py": "from methods import _secret\n",
                     "methods/_secret.py": "x = 1\n"})
    assert imports.report(tmp_path)["private"] == [
        "search.engine.other:1 from methods._secret import (module)",
        "search.engine.plan:1 from methods.base import _hidden"]


def test_a_file_over_400_lines_is_found(tmp_path):
    write(tmp_path, {**CLEAN, "rewards/long.py": "x = 1\n" * 401, "rewards/ok.py": "x = 1\n" * 400})
    assert imports.report(tmp_path)["long_files"] == [("rewards/long.py", 401)]


def test_an_arrow_up_across_layers_is_found(tmp_path):
    write(tmp_path, {**CLEAN, "search/core/space.py": "from search.engine import plan\n"})
    assert imports.report(tmp_path)["search_up"] == ["search.core.space -> search.engine.plan"]


def test_a_package_without_its_rule_is_found(tmp_path):
    write(tmp_path, {**CLEAN, "search/record/__init__.py": '"""The record."""\n'})
    docs = package_docstrings(tmp_path)
    assert [n for n, d in docs.items() if "may import" not in (d or "").lower()] == [
        "search.record"]


@pytest.mark.parametrize("plant, contract", [
    (("search/core/cache.py", "\n\ndef _planted():\n    from search.engine import plan\n"),
     "search flows one way"),
    (("search/engine/session.py", "\n\ndef _planted():\n    from search.engine import tuning\n"),
     "engine phases"),
    (("methods/io.py", "\n\ndef _planted():\n    import search.core.cache\n"),
     "methods and rewards never import the search"),
    (("rewards/miou.py", "\n\ndef _planted():\n    import mlflow\n"),
     "methods and rewards know nothing of Ray"),
])
def test_import_linter_finds_a_planted_import(tmp_path, plant, contract):
    """The contracts bind: a copy of the tree with one wrong (function-level) import fails."""
    for top in ("search", "methods", "rewards", "bench", "tests"):
        shutil.copytree(REPO / top, tmp_path / top,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    rel, text = plant
    with open(tmp_path / rel, "a") as f:
        f.write(text)
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "0 broken" not in proc.stdout, proc.stdout[-3000:]
    broken = proc.stdout.split("Broken contracts")[-1]
    assert contract in broken, broken[-3000:]
