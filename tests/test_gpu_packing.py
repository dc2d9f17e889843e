"""Ray's GPU packing, for real, on a machine without a GPU: a search started with
``OVSS_LOCAL_GPUS=2`` (a local Ray advertising two logical GPUs) and ``--gpus-per-extract 1
--gpus-per-trial 0.5`` runs at most two extraction tasks and four trials at once, one trial
GPU never shared by more than two; and a worker whose GPU is no CUDA device runs on CPU with one
warning line per node and role, never a CUDA traceback.

Ray's view comes from the workers themselves (tests/gpu_packing_method.py): each extract and
decode call records its start and end, ``get_assigned_resources()``, ``get_accelerator_ids()``
and the ``CUDA_VISIBLE_DEVICES`` Ray set. Calls wait at a barrier until as many calls as Ray
should allow are inside at once, and stay a moment longer, so a scheduler that allowed one more
would show it. CPUs are asked for in tenths (0.1 per task and trial, 20 slots on 2 CPUs): the
GPUs are what limits the concurrency.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.procs import kill_own

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
LOCAL_GPUS, EXTRACT_GPUS, TRIAL_GPUS = 2, 1.0, 0.5
MAX_EXTRACT = int(LOCAL_GPUS // EXTRACT_GPUS)          # 2 extraction tasks at once
MAX_TRIALS = int(LOCAL_GPUS // TRIAL_GPUS)              # 4 trials at once (2 CPUs: the GPUs
#                                                         limit, not the CPUs)
PER_GPU = int(1 // TRIAL_GPUS)                          # 2 trials on one GPU


def peak(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment (an end before a start at the same time)."""
    events = sorted([(t0, 1) for t0, _ in intervals] + [(t1, -1) for _, t1 in intervals])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def test_peak_counts_overlaps():
    assert peak([(0, 2), (1, 3), (2.5, 4)]) == 2
    assert peak([(0, 1), (1, 2)]) == 1
    assert peak([(0, 5), (1, 2), (1.5, 3), (4, 6)]) == 3


def _search(workdir: Path, log: Path, barrier: Path) -> subprocess.CompletedProcess:
    tmp = tempfile.mkdtemp(prefix="ovg", dir="/tmp")    # short: Ray's socket paths are limited
    env = {**os.environ, "RAY_TMPDIR": tmp, "OVSS_LOCAL_GPUS": str(LOCAL_GPUS),
           "OVSS_METHOD_MODULES": "toy=tests.gpu_packing_method",
           "OVSS_TEST_PACKING_LOG": str(log), "OVSS_TEST_PACKING_BARRIER": str(barrier),
           "OVSS_TEST_PACKING_EXTRACT_TARGET": str(MAX_EXTRACT),
           "OVSS_TEST_PACKING_DECODE_TARGET": str(MAX_TRIALS)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    argv = ["--method", "toy", "--preset", "smoke", "--max-images", "3", "--rungs", "1",
            "--num-samples", "10", "--gpus-per-extract", str(EXTRACT_GPUS),
            "--gpus-per-trial", str(TRIAL_GPUS), "--cpus-per-extract", "0.1",
            "--cpus-per-trial", "0.1", "--set", "settings.decode_delay=0.1"]
    try:
        return subprocess.run([sys.executable, "-m", "search.run", *argv], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=240)
    finally:
        kill_own(tmp, remove=True)   # whatever of its Ray is left (nothing, when it stopped
                                     # cleanly), and its temp dir


def test_logical_gpus_pack_two_extractions_and_four_trials(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the CPU fallback cannot be seen here")
    log, barrier = tmp_path / "calls.jsonl", tmp_path / "barrier"
    proc = _search(tmp_path, log, barrier)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "CUDA" not in proc.stdout

    rows = [json.loads(line) for line in log.read_text().splitlines()]
    extract = [r for r in rows if r["role"] == "extract"]
    decode = [r for r in rows if r["role"] == "decode"]
    assert len(extract) == 3 and len(decode) >= 10 * 3

    # Ray's own view: what each worker was given, and what it set for CUDA.
    for r in extract:
        assert r["assigned"] == {"GPU": EXTRACT_GPUS, "CPU": 0.1}, r
    for r in decode:
        assert r["assigned"]["GPU"] == TRIAL_GPUS, r
    for r in rows:
        assert len(r["gpu_ids"]) == 1 and r["gpu_ids"][0] in {"0", "1"}, r
        assert r["cuda_visible_devices"] == r["gpu_ids"][0], r
        # ... a GPU torch cannot see: the segmenter was built on the CPU instead
        assert not r["cuda_available"] and r["device"] == "cpu" == r["tensor_device"], r
    assert len({r["node"] for r in rows}) == 1

    # At most (and, with enough work waiting, exactly) what the GPUs allow ran at once.
    assert peak([(r["t0"], r["t1"]) for r in extract]) == MAX_EXTRACT
    assert {r["gpu_ids"][0] for r in extract} == {"0", "1"}
    assert peak([(r["t0"], r["t1"]) for r in decode]) == MAX_TRIALS
    for gpu in ("0", "1"):
        assert peak([(r["t0"], r["t1"]) for r in decode if r["gpu_ids"] == [gpu]]) <= PER_GPU

    # The fallback is said once per role and node, in one line each, and tagged on the runs.
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("warning: extraction on node ")
    assert warnings[1].startswith("warning: trials on node ")
    assert all("is no CUDA device" in w and w.endswith("running on CPU") for w in warnings)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              max_results=100)
    trials = [r for r in runs if r.data.tags.get("ovss_role") == "trial"]
    parent = [r for r in runs if r.data.tags.get("ovss_role") == "search"]
    assert len(trials) == 10 and {t.info.status for t in trials} == {"FINISHED"}
    assert {t.data.tags["ovss_device"] for t in trials} <= {
        "cpu (Ray GPU 0 is no CUDA device)", "cpu (Ray GPU 1 is no CUDA device)"}
    assert "Ray assigned GPU" in parent[0].data.tags["ovss_device_fallback"]


def test_local_gpus_is_checked_before_ray(monkeypatch):
    from methods.base import OvssError
    from search.core.devices import local_gpus

    monkeypatch.setenv("OVSS_LOCAL_GPUS", "2")
    assert local_gpus(None) == 2
    with pytest.raises(OvssError, match="not to --address"):
        local_gpus("10.0.0.5:6379")
    for bad in ("two", "1.5", "-1"):
        monkeypatch.setenv("OVSS_LOCAL_GPUS", bad)
        with pytest.raises(OvssError, match="whole number"):
            local_gpus(None)
    monkeypatch.delenv("OVSS_LOCAL_GPUS")
    assert local_gpus("10.0.0.5:6379") is None


def test_worker_device_outside_ray():
    from search.core.devices import worker_device

    assert worker_device("cpu").device == "cpu" and not worker_device("cpu").note
    import torch

    if torch.cuda.is_available():
        assert worker_device("cuda").device == "cuda"
    else:
        dev = worker_device("cuda")
        assert dev.device == "cpu" and dev.label == "cpu (no CUDA device)"
        # the node is "this machine" without Ray, its address when the suite's Ray is up
        assert dev.note.startswith("node ") and ": Ray assigned a GPU" in dev.note
