"""Evidence cache: content addressing, checksums, damaged entries (and the race of removing one),
modes per umask, write-once publishing (two searches at once on one cache:
tests/test_two_searches.py; the weights' identity in the key: tests/test_cache_keys.py)."""

from __future__ import annotations

import os
import stat
import struct
import threading

import pytest
import torch

import search.core.cache as cache_mod
from methods.base import Evidence
from search.core.cache import EvidenceCache, encode_entry, evidence_key


def _ev(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Evidence({"a": torch.randn(3, 4, generator=g), "b": torch.arange(5).half()},
                    {"size": [3, 4], "name": "x"})


def _same(a: Evidence, b: Evidence) -> bool:
    return a.meta == b.meta and a.tensors.keys() == b.tensors.keys() and \
        all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


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


# --- damaged entries --------------------------------------------------------------------------

def _header_len(raw: bytes) -> int:
    return struct.unpack("<Q", raw[:8])[0]


def _alter_tensor_bytes(raw: bytes) -> bytes:
    n = 8 + _header_len(raw)
    return raw[:n] + bytes(b ^ 0x5A for b in raw[n:])       # header intact, every data byte


def _truncate(raw: bytes) -> bytes:
    return raw[:-7]


def _damage_header(raw: bytes) -> bytes:
    # A shape [3, 4] -> [4, 3] keeps the JSON valid and the data size right: safetensors alone
    # would decode it (transposed garbage).
    assert b"[3,4]" in raw
    return raw.replace(b"[3,4]", b"[4,3]", 1)


def _break_header_json(raw: bytes) -> bytes:
    return raw[:8] + b"#" + raw[9:]


def _damage_length(raw: bytes) -> bytes:
    return struct.pack("<Q", 1 << 40) + raw[8:]


@pytest.mark.parametrize("fault", [_alter_tensor_bytes, _truncate, _damage_header,
                                   _break_header_json, _damage_length])
def test_damaged_entry_is_detected_never_decoded_and_recomputed(tmp_path, monkeypatch, fault):
    cache = EvidenceCache(tmp_path, memory_mb=0)
    k = evidence_key("h", "m", {}, version="v")
    path = cache.put("m", k, _ev())
    path.write_bytes(fault(path.read_bytes()))
    decoded = []
    real = cache_mod.load_bytes
    monkeypatch.setattr(cache_mod, "load_bytes", lambda raw: decoded.append(1) or real(raw))
    assert cache.get("m", k) is None
    assert decoded == []                                  # rejected before safetensors decodes
    assert not path.exists() and cache.stats["damaged"] == 1
    assert list(path.parent.iterdir()) == []              # nothing set aside is left behind
    cache.put("m", k, _ev())                              # the caller recomputes it
    assert _same(EvidenceCache(tmp_path, memory_mb=0).get("m", k), _ev())


def test_the_altered_entry_would_decode_without_the_checksum(tmp_path):
    """The faults above are ones safetensors itself accepts: the checksum is what catches them."""
    from safetensors.torch import load

    raw = encode_entry(_ev())
    for fault in (_alter_tensor_bytes, _damage_header):
        got = load(fault(raw))["a"]
        assert got.shape != (3, 4) or not torch.equal(got, _ev().tensors["a"])


def test_entry_without_checksum_reads_as_missing(tmp_path):
    """An entry written without the checksum (an older version, another tool) is not trusted."""
    from safetensors.torch import save_file

    cache = EvidenceCache(tmp_path, memory_mb=0)
    k = evidence_key("h", "m", {}, version="v")
    path = cache.path("m", k)
    path.parent.mkdir(parents=True)
    tensors, meta = _ev().to_safetensors_dict()
    save_file(tensors, str(path), metadata=meta)
    assert cache.get("m", k) is None and not path.exists()


def test_put_replaces_a_damaged_entry_in_its_way(tmp_path):
    cache = EvidenceCache(tmp_path, memory_mb=0)
    k = evidence_key("h", "m", {}, version="v")
    path = cache.put("m", k, _ev(0))
    path.write_bytes(_truncate(path.read_bytes()))
    other = EvidenceCache(tmp_path, memory_mb=0)
    other.put("m", k, _ev(0))
    assert other.stats == {"published": 1, "discarded": 0, "damaged": 1}
    assert _same(EvidenceCache(tmp_path, memory_mb=0).get("m", k), _ev(0))


def test_removing_a_damaged_entry_keeps_a_good_one_renamed_into_place(tmp_path, monkeypatch):
    """Between the check and the removal another process publishes a good entry: it stays."""
    cache = EvidenceCache(tmp_path, memory_mb=0)
    k = evidence_key("h", "m", {}, version="v")
    path = cache.put("m", k, _ev(1))
    path.write_bytes(_alter_tensor_bytes(path.read_bytes()))
    good = tmp_path / "good.safetensors"
    good.write_bytes(encode_entry(_ev(1)))

    def other_process_publishes(p):
        os.replace(good, p)

    monkeypatch.setattr(cache_mod, "_before_discard", other_process_publishes)
    assert cache.get("m", k) is None                     # what it read was damaged
    monkeypatch.setattr(cache_mod, "_before_discard", None)
    assert path.is_file()
    assert _same(EvidenceCache(tmp_path, memory_mb=0).get("m", k), _ev(1))
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_two_readers_of_one_damaged_entry(tmp_path, monkeypatch):
    """The first reader's removal happens between the second's check and removal: no error."""
    a, b = EvidenceCache(tmp_path, memory_mb=0), EvidenceCache(tmp_path, memory_mb=0)
    k = evidence_key("h", "m", {}, version="v")
    path = a.put("m", k, _ev())
    path.write_bytes(_truncate(path.read_bytes()))
    monkeypatch.setattr(cache_mod, "_before_discard",
                        lambda p: (monkeypatch.setattr(cache_mod, "_before_discard", None),
                                   a.get("m", k)))
    assert b.get("m", k) is None and not path.exists() and a.stats["damaged"] == 1


def test_no_temporary_file_reads_as_entry(tmp_path):
    cache = EvidenceCache(tmp_path, memory_mb=0)
    k = evidence_key("h", "m", {}, version="v")
    cache.put("m", k, _ev())
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert leftovers == []


# --- modes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755),
                                                       (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])
def test_entry_modes_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        cache = EvidenceCache(tmp_path / "c", memory_mb=0)
        k = evidence_key("h", "m", {}, version="v")
        path = cache.put("m", k, _ev())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == file_mode
    for d in (tmp_path / "c", tmp_path / "c" / "m", path.parent):
        assert stat.S_IMODE(d.stat().st_mode) == dir_mode, d


def test_unreadable_or_unwritable_cache_is_a_one_line_error(tmp_path, monkeypatch):
    import builtins

    import methods.io as mio
    from methods.base import OvssError

    cache = EvidenceCache(tmp_path, memory_mb=0)
    k = evidence_key("h", "m", {}, version="v")
    path = cache.put("m", k, _ev())
    real_open = builtins.open

    def denied(p, *a, **kw):
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **kw)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(OvssError, match="permission denied.*umask"):
        cache.get("m", k)
    monkeypatch.setattr(builtins, "open", real_open)
    assert path.is_file()                                 # not taken for a damaged entry

    def no_write(*a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(mio.os, "open", no_write)
    with pytest.raises(OvssError, match="--cache-dir"):
        cache.put("m", evidence_key("h2", "m", {}, version="v"), _ev())


# --- write once ---------------------------------------------------------------------------------

def test_two_writers_same_key_threads_publish_once(tmp_path):
    k = evidence_key("h", "m", {}, version="v")
    caches = [EvidenceCache(tmp_path, memory_mb=0) for _ in range(4)]
    go = threading.Barrier(len(caches))
    errors = []

    def write(i):
        try:
            go.wait()
            caches[i].put("m", k, _ev(i))
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(caches))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    published = [i for i, c in enumerate(caches) if c.stats["published"]]
    assert len(published) == 1
    assert sum(c.stats["discarded"] for c in caches) == len(caches) - 1
    # The entry on disk is the first writer's, whole: later writers never replaced it.
    assert _same(EvidenceCache(tmp_path, memory_mb=0).get("m", k), _ev(published[0]))


def _put_in_process(root, key, seed, barrier):
    barrier.wait()
    cache = EvidenceCache(root, memory_mb=0)
    cache.put("m", key, _ev(seed))
    return cache.stats["published"]


def test_two_writers_same_key_processes_publish_once(tmp_path):
    import concurrent.futures as cf
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    k = evidence_key("h", "m", {}, version="v")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(3)
        with cf.ProcessPoolExecutor(3, mp_context=ctx) as pool:
            futures = [pool.submit(_put_in_process, str(tmp_path), k, i, barrier)
                       for i in range(3)]
            published = [f.result(timeout=120) for f in futures]
    assert sorted(published) == [0, 0, 1]
    assert _same(EvidenceCache(tmp_path, memory_mb=0).get("m", k), _ev(published.index(1)))


def test_memory_lru_is_bounded(tmp_path):
    cache = EvidenceCache(tmp_path, memory_mb=(3 * 4 * 4 + 10) * 2.5 / 2**20)
    keys = [evidence_key(f"h{i}", "m", {}, version="v") for i in range(4)]
    for k in keys:
        cache.put("m", k, _ev())
    assert len(cache._lru) == 2 and keys[-1] in cache._lru and keys[0] not in cache._lru
    assert cache.get("m", keys[0]) is not None        # still on disk


# --- two searches, one cache directory ----------------------------------------------------------

def test_a_trial_recomputes_a_damaged_entry(tmp_path, monkeypatch, voc_root):
    """Through the trial code: a damaged base entry is re-extracted, the right evidence used."""
    from search.core import trial
    from search.core.trial import ImageItem, SearchContext, evidence_for, extract_item
    from search.data import open_dataset
    from tests import toy_method

    monkeypatch.setenv("OVSS_METHOD_MODULES", "toy=tests.toy_method")
    data = open_dataset("voc21", str(voc_root))
    item = ImageItem(0, data.ids()[0], cache_mod.file_hash(data.image_path(0)),
                     tuple(data.image_labels(0)))
    ctx = SearchContext(method="toy", backbone={"name": "tiny"}, settings={"seed": 0},
                        defaults={"temp": 0.1, "thr": 0.3, "mode": "linear", "pool": 1},
                        classes=data.classes.to_dict(),
                        dataset={"name": "voc21", "root": str(voc_root), "split": "val"},
                        items=[item], rungs=[1], reward={"name": "miou"},
                        cache_dir=str(tmp_path / "c"), settings_key={"s": 1},
                        extraction_knobs=())
    monkeypatch.setattr(trial, "_MEMO", {})
    assert extract_item(ctx, item) is True
    want = trial.get_cache(ctx).get("toy", ctx.base_key(item))
    path = trial.get_cache(ctx).path("toy", ctx.base_key(item))
    path.write_bytes(_alter_tensor_bytes(path.read_bytes()))
    monkeypatch.setattr(trial, "_MEMO", {})               # a new worker: nothing in memory
    calls = toy_method.CALLS["extract"]
    got = evidence_for(ctx, item, ctx.defaults)
    assert toy_method.CALLS["extract"] == calls + 1      # recomputed, not read
    assert _same(got, want) and _same(EvidenceCache(tmp_path / "c").get("toy", path.stem), want)

