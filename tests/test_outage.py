"""The MLflow server dies in the middle of a search: the trials go on, the error is reported once,
and ``python -m search.sync`` makes the record whole when the server is back (a second sync adds
nothing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from search.sync import main as sync_main
from tests.servers import mlflow_server, stop

pytestmark = pytest.mark.slow

#: MLflow's client retries a refused connection 7 times with exponential backoff (minutes) before
#: the first failing call returns; what is tested here is what the search does after that call
#: fails, so the search's client gives up after one retry.
QUICK_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def _children(url):
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("toy/tiny/voc21")
    if exp is None:
        return client, [], []
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return (client, [r for r in runs if r.data.tags.get("ovss_role") == "search"],
            [r for r in runs if r.data.tags.get("ovss_role") == "trial"])


def test_server_killed_mid_search_then_sync(workdir, voc_root, capsys):
    server_dir = Path(tempfile.mkdtemp(prefix="ovo", dir="/tmp"))
    backend = f"sqlite:///{server_dir}/mlflow.db"
    url, server = mlflow_server(server_dir, backend)
    n = 6      # the server dies after the third trial started: three or more trials are left
    proc = subprocess.Popen(
        [sys.executable, "-m", "search.run", "--method", "toy", "--dataset", "voc21",
         "--data-root", str(voc_root), "--num-samples", str(n), "--rungs", "2",
         "--max-concurrent", "1", "--name", "outage", "--tracking-uri", url, "--set",
         "settings.decode_delay=0.2"],
        cwd=workdir, env={**os.environ, **QUICK_FAIL}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")),
                              daemon=True)
    reader.start()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if "evidence cache" in "".join(lines) and len(_children(url)[2]) >= 3:
                break
        assert proc.poll() is None, "".join(lines)[-3000:]
        stop(server)                                   # the server dies mid-search
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        stop(server)                                   # (again: on a failure before it)
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 2, err[-3000:]
    assert err.count("warning: the MLflow store") == 1          # reported once
    last = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(last) == 1 and "python -m search.sync --name outage" in last[0]
    storage = workdir / ".ovss" / "ray_results"
    assert (storage / "outage" / "best_config.yaml").is_file()

    url2, server2 = mlflow_server(server_dir, backend)    # back, on another port
    try:
        _, parents, before = _children(url2)
        assert len(before) < n and parents[0].info.status == "RUNNING"
        capsys.readouterr()
        argv = ["--name", "outage", "--storage", str(storage), "--tracking-uri", url2]
        assert sync_main(argv) == 0
        client, parents, trials = _children(url2)
        assert len(trials) == n and not [t for t in trials if t.info.status == "RUNNING"]
        assert sorted(int(t.data.tags["ovss_trial_number"]) for t in trials) == list(range(n))
        assert any(t.data.tags.get("ovss_synced") == "true" for t in trials)
        full = [t for t in trials if "ovss_pruned" not in t.data.tags]
        assert full and all("miou" in t.data.metrics for t in full)
        assert parents[0].info.status == "FINISHED"
        arts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
        assert "best_config.yaml" in arts
        assert parents[0].data.metrics["best_score"] == pytest.approx(
            max(t.data.metrics["miou"] for t in full))
        first = capsys.readouterr().out
        assert sync_main(argv) == 0                      # a second sync adds nothing
        assert "0 trial runs created, 0 completed" in capsys.readouterr().out, first
        assert len(_children(url2)[2]) == n
    finally:
        stop(server2)
        shutil.rmtree(server_dir, ignore_errors=True)
