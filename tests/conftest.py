"""Shared fixtures: one local Ray for the whole session, the toy method registered, and every
search test in its own working directory (its own sqlite MLflow store and caches)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Registered before anything imports Ray, so the Ray workers inherit them.
os.environ["OVSS_CONF_PATH"] = str(REPO / "tests" / "conf")
os.environ["OVSS_METHOD_MODULES"] = "toy=tests.toy_method,toycost=tests.toy_cost_method"
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compute thread per process (torch's OpenMP pool, and what the searches and Ray workers
# started here inherit): the suite runs two test processes on two cores beside Ray workers and
# servers, and an OpenMP pool of one thread per core spin-waits for cores the other processes
# hold. tests/test_pnp.py, test_contract.py and test_pnp_settings.py with `pytest -n 2`:
# 114 s and 225 busy CPU-s with torch's default (2 threads), 19 s and 37 CPU-s with 1.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# The Rays that searches started by tests start themselves (two CPUs here) keep four workers
# before they kill idle ones (Ray reads RAY_<setting> from the environment; its default is the CPU
# count, 2): with two Tune actors running, Ray's default killed the idle extraction workers, and
# the overlays after tuning started a fresh worker that imported torch and the method again. A
# 2-trial toy search in a subprocess (`python -m search.run --method toy ... --num-samples 2
# --rungs 1`, busy CPU-s from /proc/stat, three runs each, interleaved): 36.0, 33.2, 36.3 with
# Ray's default, 31.0, 31.3, 31.8 with 4; wall 28.1 vs 26.2 s (means). Test files with such
# searches (`pytest -n 2` of test_smoke_methods, test_console, test_evaluate_holdout and one of
# test_faults; two pairs, interleaved): 413 and 285 busy CPU-s without, 371 and 258 with it.
# The session Ray below sets its own limit.
os.environ.setdefault("RAY_num_workers_soft_limit", "4")
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def ray_session():
    """The Ray every in-process search of a test process joins. One CPU: those searches run one
    trial (one Tune actor, a Ray worker process of its own) and one extraction task at a time.
    Each Tune actor is a fresh process (~3-4 CPU-s of imports: Ray, torch, Tune), and a search on
    two CPUs starts two: 17.2 vs 10.7 CPU-s, 11.0 vs 8.4 s for a 6-trial toy search on this
    2-core machine (`python bench/search_floor.py`), and the suite is CPU-bound. Concurrent
    trials and extraction are tested by the searches that start their own Ray (two CPUs):
    tests/test_faults.py's driver killed during tuning, test_gpu_packing (four trials at once)
    and test_cluster (two nodes); the other searches that start their own Ray (test_faults'
    other kills, test_outage, test_search_e2e's Ctrl-C, test_two_searches: two searches, each
    its own Ray, at once) run one trial at a time (``--max-concurrent 1``: one Tune actor, ~4
    CPU-s of start-up, less each).

    ``num_workers_soft_limit`` 2 (Ray's default: the CPU count, 1): a Ray worker that is idle
    while a Tune actor runs is kept, not killed after a second, so the next extraction or
    overlay task of this test process finds a worker that has imported torch and the method
    already. Ray starts every actor (a Tune trial) in a fresh worker process, never in an idle
    task worker (Ray 2.60: an actor made after four tasks got a new pid), so with Ray's default
    the one task worker is killed at every search's tuning and another started after it. On the
    13 files of in-process searches (`pytest -n 2` of those files, busy CPU-s from /proc/stat,
    two runs each, interleaved): 441 and 411 CPU-s with Ray's default, 304 and 341 with 2;
    with OMP_NUM_THREADS=1 (above), 324 with Ray's default and 284 with 2."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _system_config={"num_workers_soft_limit": 2})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """An MLflow sqlite store as a search's first connection leaves it: every migration applied,
    nothing logged (its Default experiment only)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch, request):
    """The test's working directory (a search's default store, cache and Tune state go there).

    Marked ``ready_store``: it starts with a copy of :func:`empty_store` as ``mlflow.db``, so the
    search opens a store instead of creating it, without MLflow's schema migrations: 9.7 vs
    10.7 CPU-s for a 6-trial toy search (`python bench/search_floor.py`). Tests that check what
    a first connection does, or that a refused input leaves no store, start without one."""
    monkeypatch.chdir(tmp_path)
    if request.node.get_closest_marker("ready_store"):
        import shutil

        shutil.copyfile(request.getfixturevalue("empty_store"), tmp_path / "mlflow.db")
    return tmp_path


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory):
    from search.data.synthetic import make_dataset

    return make_dataset("voc", tmp_path_factory.mktemp("voc"), n=8, seed=0)
