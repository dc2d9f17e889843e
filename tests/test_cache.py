"""Evidence cache: content addressing, atomic writes, damaged entries, two writers."""

from __future__ import annotations

import threading

import torch

from methods.base import Evidence
from search.cache import EvidenceCache, evidence_key


def _ev(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Evidence({"a": torch.randn(3, 4, generator=g), "b": torch.arange(5).half()},
                    {"size": [3, 4], "name": "x"})


def test_roundtrip_and_key_sensitivity(tmp_path):
    cache = EvidenceCache(tmp_path, memory_mb=0)
    k = evidence_key("h1", "m", {"s": 1}, version="v")
    assert cache.get("m", k) is None
    cache.put("m", k, _ev())
    got = cache.get("m", k)
    assert torch.equal(got.tensors["a"], _ev().tensors["a"])
    assert got.tensors["b"].dtype == torch.float16 and got.meta == {"size": [3, 4], "name": "x"}
    keys = {k, evidence_key("h2", "m", {"s": 1}, version="v"),
            evidence_key("h1", "m", {"s": 2}, version="v"),
            evidence_key("h1", "m", {"s": 1}, {"layer": 3}, version="v"),
            evidence_key("h1", "m", {"s": 1}, version="w"),
            evidence_key("h1", "n", {"s": 1}, version="v")}
    assert len(keys) == 6
    assert evidence_key("h1", "m", {"s": 1}, {"a": 1, "b": 2}, "v") == \
        evidence_key("h1", "m", {"s": 1}, {"b": 2, "a": 1}, "v")


def test_damaged_entry_reads_as_missing_and_is_removed(tmp_path):
    cache = EvidenceCache(tmp_path, memory_mb=0)
    k = evidence_key("h", "m", {}, version="v")
    path = cache.put("m", k, _ev())
    path.write_bytes(path.read_bytes()[:40])           # truncated by a crash elsewhere
    assert cache.get("m", k) is None
    assert not path.exists()


def test_no_temporary_file_reads_as_entry(tmp_path):
    cache = EvidenceCache(tmp_path, memory_mb=0)
    k = evidence_key("h", "m", {}, version="v")
    cache.put("m", k, _ev())
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith(".tmp")]
    assert leftovers == []


def test_two_writers_same_key(tmp_path):
    k = evidence_key("h", "m", {}, version="v")
    errors = []

    def write(seed):
        try:
            for _ in range(20):
                EvidenceCache(tmp_path, memory_mb=0).put("m", k, _ev(0))
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    got = EvidenceCache(tmp_path, memory_mb=0).get("m", k)
    assert torch.equal(got.tensors["a"], _ev(0).tensors["a"])


def test_memory_lru_is_bounded(tmp_path):
    cache = EvidenceCache(tmp_path, memory_mb=(3 * 4 * 4 + 10) * 2.5 / 2**20)
    keys = [evidence_key(f"h{i}", "m", {}, version="v") for i in range(4)]
    for k in keys:
        cache.put("m", k, _ev())
    assert len(cache._lru) == 2 and keys[-1] in cache._lru and keys[0] not in cache._lru
    assert cache.get("m", keys[0]) is not None        # still on disk
