"""Content-addressed evidence cache: checksummed safetensors files, write-once, shareable.

Key = sha256 over (image bytes hash, method, segmenter settings key, extraction knobs, code
version); the settings key holds the weights' identity (:func:`weights_identity`).

File = a safetensors file whose JSON metadata holds ``ovss_sha256``: the sha256 of the header (less
that field, as canonical JSON) and of every tensor byte. A read checks it *before* decoding, so an
entry with altered tensor bytes, a truncated one or a damaged header reads as missing (the caller
recomputes it) and is removed. Removal renames the file aside and deletes it only if it is still
the very file found damaged (device, inode, size, mtime); a good entry another process published
in between is put back. Entries are published with :func:`methods.io.atomic_write`
(``overwrite=False``: ``os.link``), so every entry is written once: when two searches compute the
same image, the second writer discards its copy. Files are ``0o666`` and directories ``0o777``
less the umask, so a cache shared by users or pods of other uids works when the umask allows it.
Nothing in an entry can run code (safetensors: tensors and JSON only).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from methods.base import Evidence, OvssError

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


CHECKSUM = "ovss_sha256"


class DamagedEntry(ValueError):
    """A cache file that fails its checksum or does not parse."""


def _digest(header: Mapping[str, Any], data: bytes | memoryview) -> str:
    head = {k: v for k, v in header.items() if k != "__metadata__"}
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != CHECKSUM}
    h = hashlib.sha256(json.dumps({**head, "__metadata__": meta}, sort_keys=True,
                                  separators=(",", ":")).encode())
    h.update(data)
    return h.hexdigest()


def encode_entry(evidence: Evidence) -> bytes:
    """Evidence -> safetensors bytes with the checksum in the metadata."""
    tensors, metadata = evidence.to_safetensors_dict()
    raw = save_bytes(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = memoryview(raw)[8 + n:]
    header.setdefault("__metadata__", {})[CHECKSUM] = _digest(header, data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)          # safetensors keeps the data 8-byte aligned
    return struct.pack("<Q", len(head)) + head + bytes(data)


def decode_entry(raw: bytes) -> Evidence:
    """Verify the checksum of safetensors bytes, then decode them; DamagedEntry if it fails."""
    if len(raw) < 8:
        raise DamagedEntry("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise DamagedEntry("header length beyond the end of the file")
    try:
        header = json.loads(raw[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DamagedEntry("header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise DamagedEntry("header has no metadata")
    want = header["__metadata__"].get(CHECKSUM)
    if not want or _digest(header, memoryview(raw)[8 + n:]) != want:
        raise DamagedEntry("checksum mismatch")
    return Evidence.from_safetensors_dict(load_bytes(raw), header["__metadata__"])


#: Test hook, called with the path of a damaged entry between its check and its removal.
_before_discard: Callable[[Path], None] | None = None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == \
        (b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns)


class EvidenceCache:
    """A directory of ``<method>/<k[:2]>/<k>.safetensors`` files, with a small in-process LRU.

    ``stats`` counts this object's ``published`` entries, ``discarded`` copies (another writer
    was first) and ``damaged`` entries found and removed. ``on_publish`` (class attribute, for
    audits and tests) is called with ``(path, published: bool)`` after every ``put``.
    """

    on_publish: Callable[[Path, bool], None] | None = None

    def __init__(self, root: str | os.PathLike, memory_mb: float = 1024.0):
        self.root = Path(root)
        self.memory_bytes = int(memory_mb * 2**20)
        self._lru: OrderedDict[str, Evidence] = OrderedDict()
        self._lru_bytes = 0
        self.stats = {"published": 0, "discarded": 0, "damaged": 0}

    def path(self, method: str, key: str) -> Path:
        return self.root / method / key[:2] / f"{key}.safetensors"

    def has(self, method: str, key: str) -> bool:
        return key in self._lru or self.path(method, key).is_file()

    def get(self, method: str, key: str) -> Evidence | None:
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        ev = self._read(self.path(method, key))
        if ev is not None:
            self._remember(key, ev)
        return ev

    def _read(self, path: Path) -> Evidence | None:
        """The verified entry at ``path``; None (and the entry removed) if missing or damaged."""
        try:
            with open(path, "rb") as f:
                seen = os.fstat(f.fileno())
                raw = f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except PermissionError:
            raise OvssError(f"cannot read evidence cache entry {path}: permission denied (a "
                            "cache shared by several users needs a umask that lets them read, "
                            "e.g. 002 or 022)") from None
        try:
            return decode_entry(raw)
        except Exception:  # noqa: BLE001 - DamagedEntry, or a safetensors parse error
            self.stats["damaged"] += 1
            self._discard(path, seen)
            return None

    def _discard(self, path: Path, seen: os.stat_result) -> None:
        """Remove the damaged file ``seen`` at ``path``, never a good one published since."""
        if _before_discard is not None:
            _before_discard(path)
        aside = path.parent / f".{path.name}.damaged-{uuid.uuid4().hex}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return                               # another reader removed it already
        try:
            if not _same_file(os.stat(aside), seen):   # a good entry published meanwhile
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass                         # and a newer one since: keep that
        finally:
            aside.unlink(missing_ok=True)

    def put(self, method: str, key: str, evidence: Evidence) -> Path:
        """Publish ``evidence`` under ``key`` unless a valid entry is there already."""
        from methods.io import atomic_write

        path = self.path(method, key)
        raw = encode_entry(evidence)
        try:
            published = atomic_write(path, raw, overwrite=False)
        except PermissionError:
            raise OvssError(f"cannot write to the evidence cache {self.root}: permission denied "
                            "(give --cache-dir a directory you can write)") from None
        if not published and self._read(path) is None:   # what was there was damaged
            published = atomic_write(path, raw, overwrite=False)
        self.stats["published" if published else "discarded"] += 1
        if EvidenceCache.on_publish is not None:
            EvidenceCache.on_publish(path, published)
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


# --- the weights' identity --------------------------------------------------------------------

#: Backbone / settings fields that name local weight files or directories.
_PATH_FIELDS = ("path", "sam_checkpoint", "presence_path", "checkpoint")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_HASHES: dict[tuple[Any, ...], str] = {}


def _file_identity(p: Path) -> dict[str, Any]:
    """size, mtime and sha256 of a file. The hash is computed once per process for each (path,
    size, mtime), and again when the inode or ctime says the file was replaced or rewritten
    (``cp -p`` or ``os.utime`` can restore an old mtime, not a ctime)."""
    st = p.stat()
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if memo not in _HASHES:
        _HASHES[memo] = file_hash(p)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _HASHES[memo]}


def _path_identity(value: Any) -> dict[str, Any]:
    p = Path(str(value)).expanduser()
    if p.is_file():
        return _file_identity(p)
    if p.is_dir():   # a local Hugging Face directory: every file in it (config, weights, ...)
        files = sorted(f for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        return {"files": {str(f.relative_to(p)): _file_identity(f) for f in files}}
    return {"missing": True}


def hub_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit a Hugging Face hub ``revision`` (default main) resolves to in the local HF
    cache, or None when the cache does not have it (the model is then downloaded at load)."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "refs" / \
        (revision or "main")
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def weights_identity(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies the weights a backbone (or settings) entry loads, for the cache key.

    - a local file or directory named by ``path`` / ``sam_checkpoint`` / ``presence_path`` /
      ``checkpoint``: its size, mtime and sha256 (a directory: those of every file in it), so
      weights replaced at the same path give a new key;
    - a hub id ``model`` (``org/name``, when no ``path`` overrides it): the id, the ``revision``
      (default main) and the commit the local HF cache resolves it to;
    - an open_clip ``model`` + ``pretrained`` tag (also ``presence_model`` +
      ``presence_pretrained``): the tag and the commit of its hub repo in the HF cache.
    - clipseg's second vision models: the identity of each ``vision_models`` entry that
      ``vision`` or ``sam`` names (each entry is a spec of its own: a hub id or a path).
    ``tiny`` backbones (random weights from a seed) have no files: {}, unless they name
    ``shipped`` weights (methods/weights/): that file's identity.
    """
    out: dict[str, Any] = {}
    from methods.open_clip_backbone import shipped_names, shipped_path

    if spec.get("shipped"):
        out["shipped"] = _file_identity(shipped_path(str(spec["shipped"])))
    if spec.get("presence_model") and str(spec["presence_model"]) in shipped_names():
        out["presence_model"] = {"shipped": _file_identity(shipped_path(
            str(spec["presence_model"])))}
    for field in _PATH_FIELDS:
        if spec.get(field):
            out[field] = _path_identity(spec[field])
    models = spec.get("vision_models")
    if isinstance(models, Mapping):
        names = [*(spec.get("vision") or []), *([spec["sam"]] if spec.get("sam") else [])]
        ids = {str(n): weights_identity(models[n]) for n in names
               if isinstance(models.get(n), Mapping)}
        if ids:
            out["vision_models"] = ids
    if spec.get("tiny") is not None:
        return out
    model, revision = spec.get("model"), spec.get("revision")
    for name_field, tag_field in (("model", "pretrained"),
                                  ("presence_model", "presence_pretrained")):
        name, tag = spec.get(name_field), spec.get(tag_field)
        overridden = spec.get("path" if name_field == "model" else "presence_path")
        if name and tag and not overridden:
            import open_clip

            hub = str(open_clip.get_pretrained_cfg(str(name), str(tag)).get("hf_hub", ""))
            repo = os.path.split(hub)[0] if hub else ""
            out[name_field] = {"open_clip": name, "pretrained": tag, "hub": repo or None,
                               "commit": hub_commit(repo) if repo else None}
    if model and not spec.get("pretrained") and not spec.get("path") and \
            _HUB_ID.fullmatch(str(model)):
        out["model"] = {"hub": model, "revision": revision or "main",
                        "commit": hub_commit(str(model), revision)}
    return out
