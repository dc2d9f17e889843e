"""The import structure of the code base, read from the source (nothing is imported).

    python bench/imports.py                 # this checkout
    python bench/imports.py --root DIR      # another checkout (e.g. one before issue #18)

Prints, for every ``.py`` under search/, methods/, rewards/, bench/ and tests/: the import circles
(strongly connected components of the module graph, imports inside functions and under
``TYPE_CHECKING`` counted), imports of search/ from methods/ or rewards/, private names
(``from x import _y``) taken from another module, files over 400 lines; and for search/: its
modules, its import arrows, the levels of its module graph and the arrows that point up across
its layers (entry points > engine > record > core > data). ``tests/test_architecture.py`` asserts
the same facts with these functions.

An arrow ``a -> b`` is one or more import statements in module ``a`` that name module ``b``:
``import p.q`` and ``from p import q`` (``q`` a module) name ``p.q``; ``from p.q import f``
(``f`` not a module) names ``p.q``. A package's ``__init__`` is the module ``p``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("search", "methods", "rewards", "bench", "tests")
MAX_LINES = 400

#: The layers of search/, top to bottom. A module of search/ belongs to the first layer one of
#: whose prefixes it equals or lies under; ``search`` itself (its ``__init__``) is an entry.
SEARCH_LAYERS = (
    ("entry", ("search.run", "search.evaluate", "search.transfer", "search.export",
               "search.sync", "search.mlflow_app")),
    ("engine", ("search.engine",)),
    ("record", ("search.record",)),
    ("core", ("search.core",)),
    ("data", ("search.data",)),
)
#: Where the modules of the tree before issue #18 would sit in those layers (to measure it).
BEFORE_18 = {
    "engine": ("search.orchestrate", "search.tune", "search.rerank", "search.holdout",
               "search.backbones"),
    "record": ("search.tracking", "search.progress", "search.model"),
    "core": ("search.config", "search.space", "search.cache", "search.preflight",
             "search.trial"),
}


@dataclass(frozen=True)
class Import:
    """One imported module or name: ``source`` imports ``target`` (a module of ours), taking
    ``name`` from it (``""`` for ``import target`` or when ``target`` is the named module)."""

    source: str
    target: str
    name: str
    line: int
    in_function: bool


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = REPO) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under the packages (``__pycache__`` aside)."""
    out = {}
    for top in PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[module_name(path.relative_to(root))] = path
    return out


def _ours(name: str, mods: dict[str, Path]) -> str | None:
    """The deepest module of ours that ``name`` (dotted) lies in, or None."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        cand = ".".join(parts[:k])
        if cand in mods:
            return cand
    return None


def imports_of(mod: str, path: Path, mods: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            in_function = True
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _ours(alias.name, mods)
                if target is not None:
                    out.append(Import(mod, target, "", node.lineno, in_function))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: from the package of this module
                pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join([*pkg, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in mods:
                    out.append(Import(mod, sub, "", node.lineno, in_function))
                elif (target := _ours(base, mods)) is not None:
                    out.append(Import(mod, target, alias.name, node.lineno, in_function))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)

    visit(tree, False)
    return out


def all_imports(root: Path = REPO) -> tuple[dict[str, Path], list[Import]]:
    mods = modules(root)
    return mods, [imp for m, p in mods.items() for imp in imports_of(m, p, mods)]


def graph(imps: Iterable[Import]) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for imp in imps:
        if imp.target != imp.source:
            g.setdefault(imp.source, set()).add(imp.target)
    return g


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    nodes = sorted(set(g) | {t for ts in g.values() for t in ts})
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(g.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)


def private_imports(imps: Iterable[Import]) -> list[str]:
    """``source:line from target import _name`` (or a private module) of another module."""
    bad = []
    for imp in imps:
        private_mod = any(p.startswith("_") and not p.startswith("__")
                          for p in imp.target.split("."))
        if imp.name.startswith("_") and not imp.name.startswith("__") or private_mod:
            bad.append(f"{imp.source}:{imp.line} from {imp.target} import {imp.name or '(module)'}")
    return sorted(set(bad))


def wrong_way(imps: Iterable[Import]) -> list[str]:
    """Imports of search/ from methods/ or rewards/ (they must never know of the search)."""
    return sorted({f"{i.source}:{i.line} -> {i.target}" for i in imps
                   if i.source.split(".")[0] in ("methods", "rewards")
                   and i.target.split(".")[0] == "search"})


def long_files(mods: dict[str, Path], root: Path = REPO, limit: int = MAX_LINES
               ) -> list[tuple[str, int]]:
    out = []
    for path in mods.values():
        n = len(path.read_text().splitlines())
        if n > limit:
            out.append((path.relative_to(root).as_posix(), n))
    return sorted(out, key=lambda x: -x[1])


def search_layer(mod: str) -> int | None:
    """Rank of a module of search/ in :data:`SEARCH_LAYERS` (0 = entry points), else None."""
    if mod == "search":
        return 0
    for rank, (name, prefixes) in enumerate(SEARCH_LAYERS):
        for p in (*prefixes, *BEFORE_18.get(name, ())):
            if mod == p or mod.startswith(p + "."):
                return rank
    return None


def levels(g: dict[str, set[str]], nodes: set[str]) -> int:
    """Levels of the module graph restricted to ``nodes``: 1 + the longest chain of arrows
    (the modules of a circle share a level)."""
    sub = {m: {t for t in g.get(m, ()) if t in nodes} for m in nodes}
    comp = {m: i for i, c in enumerate(circles(sub)) for m in c}
    key = {m: comp.get(m, m) for m in nodes}
    dag: dict = {}
    for m, ts in sub.items():
        for t in ts:
            if key[t] != key[m]:
                dag.setdefault(key[m], set()).add(key[t])
    memo: dict = {}

    def depth(k) -> int:
        if k not in memo:
            memo[k] = 1 + max((depth(t) for t in dag.get(k, ())), default=0)
        return memo[k]

    return max((depth(k) for k in set(key.values())), default=0)


def report(root: Path = REPO) -> dict:
    mods, imps = all_imports(root)
    g = graph(imps)
    search = {m for m in mods if m == "search" or m.startswith("search.")}
    arrows = {(s, t) for s, ts in g.items() if s in search for t in ts if t in search}
    up = sorted(f"{s} -> {t}" for s, t in arrows
                if search_layer(s) is not None and search_layer(t) is not None
                and search_layer(t) < search_layer(s))
    return {"circles": circles(g), "wrong_way": wrong_way(imps),
            "private": private_imports(imps), "long_files": long_files(mods, root),
            "search_modules": len(search), "search_arrows": len(arrows),
            "search_levels": levels(g, search), "search_up": up,
            "modules": len(mods)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=REPO, help="checkout to read (default: this)")
    args = ap.parse_args(argv)
    r = report(args.root.resolve())
    print(f"modules read: {r['modules']} ({', '.join(PACKAGES)})")
    print(f"import circles: {len(r['circles'])}")
    for c in r["circles"]:
        print("  " + " <-> ".join(c))
    print(f"methods/ or rewards/ importing search/: {len(r['wrong_way'])}")
    for x in r["wrong_way"]:
        print("  " + x)
    print(f"private names imported from another module: {len(r['private'])}")
    for x in r["private"]:
        print("  " + x)
    print(f"files over {MAX_LINES} lines: {len(r['long_files'])}")
    for f, n in r["long_files"]:
        print(f"  {f} {n}")
    print(f"search/: {r['search_modules']} modules, {r['search_arrows']} import arrows, "
          f"{r['search_levels']} levels, {len(r['search_up'])} arrows up across layers "
          "(entry > engine > record > core > data)")
    for x in r["search_up"]:
        print("  " + x)
    return 0


if __name__ == "__main__":
    sys.exit(main())
