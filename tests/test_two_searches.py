"""Two real searches at once, each in a fresh process that starts its own local Ray (as two
users' searches on one machine do), each in its own directory (its own MLflow store) but on one
evidence cache directory: both complete, every cache entry is published once (the loser of each
race discards its copy) and reads as valid (search.core.cache), and each prints what its user
reads, the libraries' chatter only with ``--verbose`` (search.core.console).

One pair of searches serves both checks: each search in a fresh process costs ~30 CPU-s on the
2-core CI machine (Ray, Tune actors, the imports), and these were two tests of two searches
each (tests/test_cache.py, tests/test_console.py) until 2026-12-08."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from search.core.cache import EvidenceCache

pytestmark = pytest.mark.slow

#: What the libraries print that a search keeps behind ``--verbose``.
NOISE = ("A new study created", "View detailed results", "Configuration for experiment",
         "Downloading artifacts", "Token authentication is enabled", "INFO mlflow")


def test_two_searches_share_one_cache_and_each_prints_its_own(tmp_path, voc_root):
    shared = tmp_path / "shared-cache"
    log = tmp_path / "writes.log"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = []
    for sid, extra in (("quiet", []), ("loud", ["--verbose"])):
        work = tmp_path / sid
        work.mkdir()
        env = {**os.environ, "OVSS_METHOD_MODULES": "toy=tests.cache_race_method",
               "OVSS_TEST_WRITE_LOG": str(log), "OVSS_TEST_BARRIER": str(barrier),
               "OVSS_TEST_SEARCH_ID": sid, "OMP_NUM_THREADS": "1"}
        env.pop("RAY_ADDRESS", None)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "search.run", "--method", "toy", "--dataset", "voc21",
             "--data-root", str(voc_root), "--num-samples", "4", "--rungs", "1", "--seed", "3",
             "--cache-dir", str(shared), "--max-concurrent", "1", *extra],
            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    (q_out, q_err), (l_out, l_err) = (p.communicate(timeout=600) for p in procs)
    assert procs[0].returncode == 0, q_err[-3000:]
    assert procs[1].returncode == 0, l_err[-3000:]

    # One cache, two writers: each entry on disk was published exactly once.
    lines = [line.split() for line in log.read_text().splitlines()]
    published = [name for what, name in lines if what == "published"]
    discarded = [name for what, name in lines if what == "discarded"]
    on_disk = sorted(p.name for p in shared.rglob("*.safetensors"))
    assert sorted(published) == on_disk
    assert len(set(published)) == len(published)
    assert discarded and set(discarded) <= set(published)  # the race happened and was lost
    assert len(on_disk) >= 8                              # 8 images' base evidence at least
    assert [p for p in shared.rglob("*") if p.name.startswith(".")] == []
    reader = EvidenceCache(shared, memory_mb=0)
    for path in shared.rglob("*.safetensors"):
        assert reader.get(path.parent.parent.name, path.stem) is not None
    assert reader.stats["damaged"] == 0

    # What each user reads: ours only, and the libraries' chatter back with --verbose.
    assert not [n for n in NOISE if n in q_err + q_out]
    assert "trials 4/4 done" in q_err and q_out.startswith("best mIoU ")
    heard = [n for n in NOISE[:3] if n in l_err + l_out]
    assert len(heard) == 3, l_err[-3000:]
