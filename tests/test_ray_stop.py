"""The Ray a search started is stopped in the background as soon as nothing needs it: right
after the overlays when the driver decodes them (clipseg's decode head) and nothing is held out,
and only after the held-out images are scored otherwise."""

from __future__ import annotations

import pytest

import search.engine.holdout as holdout
import search.engine.outputs as outputs
import search.engine.session as session
import search.record.model as model
from search.run import main as run_main


def _events(monkeypatch) -> list[str]:
    events: list[str] = []

    def wrap(module, name):
        real = getattr(module, name)

        def call(*a, **k):
            events.append(name)
            return real(*a, **k)

        monkeypatch.setattr(module, name, call)

    wrap(outputs, "_plots")
    wrap(holdout, "score_holdout")
    wrap(model, "log_tuned_model")
    # As if this search had started Ray (the tests share one session Ray, which stays up).
    monkeypatch.setattr(session, "init_ray", lambda address: True)
    monkeypatch.setattr(session, "shutdown_ray", lambda: events.append("ray.shutdown"))
    return events


@pytest.mark.slow
@pytest.mark.parametrize("holdout_n, before", [(0, "_plots"), (2, "log_tuned_model")])
@pytest.mark.ready_store
def test_ray_stops_once_nothing_needs_it(ray_session, workdir, monkeypatch, capsys, holdout_n,
                                         before):
    events = _events(monkeypatch)
    argv = ["--method", "clipseg", "--preset", "smoke", "--num-samples", "1", "--rungs", "1"]
    if holdout_n:
        argv += ["--holdout", str(holdout_n)]
    assert run_main(argv) == 0, capsys.readouterr().err[-2000:]
    assert events.count("ray.shutdown") == 1
    stop = events.index("ray.shutdown")
    assert stop < events.index(before)
    if holdout_n:   # the held-out images were scored with Ray up
        assert events.index("score_holdout") < stop


_LOCAL_RAY = r"""
import json, os, sys, time
import ray
from search.engine.session import LOCAL_RAY_ENV, init_ray, shutdown_ray
from tests.servers import child_commands

os.environ["RAY_raylet_client_num_connect_attempts"] = "7"     # the user's own value wins
assert init_ray(None)
node = ray._private.worker._global_node
raylet = node.all_processes["raylet"][0].process
env = dict(line.split("=", 1) for line in
           open(f"/proc/{raylet.pid}/environ").read().split("\0") if "=" in line)
monitor = node.all_processes["monitor"][0].process


def workers():   # the raylet's worker processes (not its agents)
    return [c for c in child_commands(raylet.pid)
            if "Agent" not in c and ("default_worker" in c or c.startswith("ray::"))]


time.sleep(2)                       # workers started ahead would be up by now
idle_at_start = workers()
assert ray.get(ray.remote(lambda: 1).remote()) == 1
seen = {"idle_at_start": len(idle_at_start), "after_a_task": len(workers())}
procs = [i.process for infos in node.all_processes.values() for i in infos]
real = ray.shutdown

def shutdown(*a, **k):
    seen["monitor_alive_at_shutdown"] = monitor.poll() is None
    return real(*a, **k)

ray.shutdown = shutdown
shutdown_ray()
print(json.dumps({"raylet_env": {k: env.get(k) for k in LOCAL_RAY_ENV},
                  "driver_env": {k: os.environ.get(k) for k in LOCAL_RAY_ENV},
                  "alive_after": [p.pid for p in procs if p.poll() is None], **seen}))
"""


def test_a_local_ray_starts_with_the_fast_connect_settings_and_stops_its_monitor_first():
    """init_ray hands LOCAL_RAY_ENV to the processes of a local Ray (the raylet's environment)
    without leaving it in the driver's, and never over the user's own value; shutdown_ray kills
    the autoscaler monitor before ray.shutdown (which would give it 1 s to ignore SIGTERM) and
    leaves no process of that Ray running. Its own Python: the tests' session Ray stays up."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_raylet_client",
                                                                     "RAY_enable_worker_prestart",
                                                                     "RAY_prestart_worker"))}
    tmp = tempfile.mkdtemp(prefix="ovr", dir="/tmp")     # Ray's socket paths: <= 107 bytes
    env.update(PYTHONPATH=str(repo), RAY_TMPDIR=tmp, OMP_NUM_THREADS="1")
    try:
        out = subprocess.run([sys.executable, "-c", _LOCAL_RAY], env=env, capture_output=True,
                             text=True, timeout=120, cwd=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["raylet_env"] == {"RAY_raylet_client_connect_timeout_milliseconds": "100",
                                 "RAY_raylet_client_num_connect_attempts": "7",
                                 "RAY_enable_worker_prestart": "0",
                                 "RAY_prestart_worker_first_driver": "0"}
    assert got["driver_env"] == {"RAY_raylet_client_connect_timeout_milliseconds": None,
                                 "RAY_raylet_client_num_connect_attempts": "7",
                                 "RAY_enable_worker_prestart": None,
                                 "RAY_prestart_worker_first_driver": None}
    # no idle worker started ahead of the first task (one per CPU with Ray's default); the
    # task started what it needed
    assert got["idle_at_start"] == 0 and got["after_a_task"] >= 1
    assert got["monitor_alive_at_shutdown"] is False
    assert got["alive_after"] == []
