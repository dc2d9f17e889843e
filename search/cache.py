"""Content-addressed evidence cache: safetensors files, atomic writes, shareable directory.

Key = sha256 over (image bytes hash, method, segmenter settings key, extraction knobs, code
version). A file is written to a unique temporary name in the same directory, flushed and
``os.replace``-d into place, so a reader sees either nothing or a whole file, two writers of the
same key are harmless (same content, last rename wins), and a crash mid-write leaves only a
``.tmp-*`` file that never reads as an entry. A file that fails to parse is removed and treated as
missing. The directory can live on a file system every node of a Ray cluster mounts.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from methods.base import Evidence

_CODE_VERSIONS: dict[str, str] = {}


def code_version(method: str) -> str:
    """Hash of the method package's source (and methods/base.py): editing the method's code
    invalidates its cache entries."""
    if method not in _CODE_VERSIONS:
        import methods

        root = Path(methods.__file__).parent
        h = hashlib.sha256()
        pkg = root / method
        files = sorted(pkg.rglob("*.py")) if pkg.is_dir() else []
        mod = root / f"{method}.py"
        if mod.is_file():
            files.append(mod)
        if not files:  # a method living outside methods/ (tests): hash its module file
            import importlib

            from methods import method_module_name

            spec = importlib.util.find_spec(method_module_name(method))
            if spec and spec.origin:
                files.append(Path(spec.origin))
        for f in [root / "base.py", *files]:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        _CODE_VERSIONS[method] = h.hexdigest()[:16]
    return _CODE_VERSIONS[method]


def file_hash(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def evidence_key(
    image_hash: str,
    method: str,
    settings_key: Mapping[str, Any],
    knobs: Mapping[str, Any] | None = None,
    version: str | None = None,
) -> str:
    payload = {
        "image": image_hash,
        "method": method,
        "settings": settings_key,
        "knobs": dict(sorted((knobs or {}).items())),
        "code": version if version is not None else code_version(method),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class EvidenceCache:
    """A directory of ``<method>/<k[:2]>/<k>.safetensors`` files, with a small in-process LRU."""

    def __init__(self, root: str | os.PathLike, memory_mb: float = 1024.0):
        self.root = Path(root)
        self.memory_bytes = int(memory_mb * 2**20)
        self._lru: OrderedDict[str, Evidence] = OrderedDict()
        self._lru_bytes = 0

    def path(self, method: str, key: str) -> Path:
        return self.root / method / key[:2] / f"{key}.safetensors"

    def has(self, method: str, key: str) -> bool:
        return key in self._lru or self.path(method, key).is_file()

    def get(self, method: str, key: str) -> Evidence | None:
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        path = self.path(method, key)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata()
            ev = Evidence.from_safetensors_dict(load_file(str(path)), metadata)
        except Exception:
            # A damaged entry must never read as valid: drop it, the caller recomputes.
            path.unlink(missing_ok=True)
            return None
        self._remember(key, ev)
        return ev

    def put(self, method: str, key: str, evidence: Evidence) -> Path:
        path = self.path(method, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, metadata = evidence.to_safetensors_dict()
        tmp = path.parent / f".tmp-{key[:12]}-{uuid.uuid4().hex}"
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._remember(key, evidence)
        return path

    def _remember(self, key: str, ev: Evidence) -> None:
        size = ev.nbytes()
        if size > self.memory_bytes:
            return
        self._lru[key] = ev
        self._lru_bytes += size
        while self._lru_bytes > self.memory_bytes and self._lru:
            _, old = self._lru.popitem(last=False)
            self._lru_bytes -= old.nbytes()
