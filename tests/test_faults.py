"""Faults injected for real: the driver SIGKILLed before, during and after tuning, then
``--resume``; a trial worker and an extraction worker SIGKILLed; trials that fail for good (rerun
by ``--resume`` once their cause is gone); a finished search resumed. The MLflow record must stay
true through all of it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from search.run import main as run_main
from tests.procs import kill_own

pytestmark = pytest.mark.slow

EXP = "toy/tiny/voc21"


def _argv(voc_root, name, n, *extra):
    return ["--method", "toy", "--dataset", "voc21", "--data-root", str(voc_root),
            "--num-samples", str(n), "--rungs", "2", "--seed", "1", "--name", name, *extra]


def _runs(workdir):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXP)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    parents = [r for r in runs if r.data.tags.get("ovss_role") == "search"]
    children = [r for r in runs if r.data.tags.get("ovss_role") == "trial"]
    return client, parents, children


def _kill_driver_at(workdir, argv, fault: str | None, env_extra=None, min_trials=0):
    """Start a search in a subprocess with its own Ray temp dir; SIGKILL it at the fault point
    (or once ``min_trials`` child runs exist); then SIGKILL whatever else it started."""
    tmp = tempfile.mkdtemp(prefix="ovr", dir="/tmp")   # short: Ray's socket paths are limited
    env = {**os.environ, "RAY_TMPDIR": tmp, **(env_extra or {})}
    if fault:
        env["OVSS_FAULT_PAUSE"] = fault
    proc = subprocess.Popen([sys.executable, "-m", "search.run", *argv], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")),
                              daemon=True)
    reader.start()
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.3)
            seen = "".join(lines)
            if fault and f"ovss fault point: {fault}" in seen:
                break
            # The store exists once the driver printed the cache line (after the parent run).
            if not fault and "evidence cache" in seen:
                _, _, children = _runs(workdir)
                if len(children) >= min_trials:
                    break
        seen = "".join(lines)
        assert proc.poll() is None, f"the search ended before the fault: {seen[-2000:]}"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        kill_own(tmp, remove=True)
        proc.stderr.close()
    return seen


def _check_record(workdir, n):
    client, parents, children = _runs(workdir)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert not [r for r in parents + children if r.info.status == "RUNNING"]
    trials = [c for c in children if "ovss_orphaned" not in c.data.tags]
    orphans = [c for c in children if "ovss_orphaned" in c.data.tags]
    assert len(trials) == n, [c.info.run_name for c in children]
    assert {c.info.status for c in trials} <= {"FINISHED", "FAILED"}
    assert sorted(int(c.data.tags["ovss_trial_number"]) for c in trials) == list(range(n))
    assert len({c.data.tags["ovss_trial_id"] for c in trials}) == n
    assert all(c.info.status == "KILLED" and "ovss_trial_number" not in c.data.tags
               for c in orphans)
    return parents[0], trials, orphans


@pytest.mark.parametrize("fault", ["before_tuning", "during_tuning", "after_tuning"])
@pytest.mark.ready_store
def test_driver_sigkill_then_resume_keeps_one_run_per_trial(ray_session, workdir, voc_root,
                                                            fault):
    # Killed while trials run: enough trials, each slow enough, for the kill to land mid-tuning.
    # Killed at a fault point before or after tuning: the point decides, four trials do.
    during = fault == "during_tuning"
    n = 10 if during else 4
    # Two trials at once where the kill lands among running trials; one at a time otherwise
    # (one Tune actor less: ~4 CPU-s of start-up on the 2-core CI machine).
    argv = _argv(voc_root, f"crash-{fault}", n,
                 *(["--set", "settings.decode_delay=0.15"] if during
                   else ["--max-concurrent", "1"]))
    if during:
        _kill_driver_at(workdir, argv, None, min_trials=4)
    else:
        _kill_driver_at(workdir, argv, fault)
    _, parents, children = _runs(workdir)
    assert [p.info.status for p in parents] == ["RUNNING"]   # what a dead driver leaves
    if fault == "during_tuning":
        assert len(children) >= 4
    assert run_main([*argv, "--resume"]) == 0
    parent, trials, orphans = _check_record(workdir, n)
    assert parent.data.tags.get("ovss_resumed") == "true"
    if orphans:
        assert parent.data.tags["ovss_orphaned_runs"] == str(len(orphans))
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert "best_config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.ready_store
def test_resume_of_a_finished_search_is_refused_before_ray(ray_session, workdir, voc_root,
                                                           capsys, monkeypatch):
    argv = _argv(voc_root, "done", 4)
    assert run_main(argv) == 0
    _, parents, children = _runs(workdir)
    import search.engine.session as session

    def no_ray(address):
        raise AssertionError("Ray must not start for a refused --resume")

    monkeypatch.setattr(session, "init_ray", no_ray)
    capsys.readouterr()
    for extra in ([], ["--num-samples", "8"]):
        assert run_main([*argv, *extra, "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "already finished" in err and "'done'" in err
    _, parents2, children2 = _runs(workdir)
    assert [p.info.status for p in parents2] == ["FINISHED"]      # never turned KILLED
    assert len(children2) == len(children)
    assert run_main([*argv[:-2], "--name", "never-ran", "--resume"]) == 2
    assert "no search named 'never-ran'" in capsys.readouterr().err


@pytest.mark.ready_store
def test_killed_trial_and_extraction_workers_are_retried(ray_session, workdir, voc_root):
    trial_flag, extract_flag = workdir / "kill-trial", workdir / "kill-extract"
    trial_flag.write_text("1")
    extract_flag.write_text("1")
    n = 6
    argv = _argv(voc_root, "workers", n, "--set", f"settings.die_once_decode={trial_flag}",
                 "--set", f"settings.die_once_extract={extract_flag}")
    assert run_main(argv) == 0
    assert not trial_flag.exists() and not extract_flag.exists()   # both workers were killed
    parent, trials, orphans = _check_record(workdir, n)
    assert not orphans
    assert {c.info.status for c in trials} == {"FINISHED"}


@pytest.mark.ready_store
def test_a_trial_that_fails_for_good_is_failed_with_its_error_and_resume_reruns_it(
        ray_session, workdir, voc_root):
    """Trials that raise (pool=2 while the flag file exists) end FAILED with their error and are
    left out of the best; once the cause is gone, ``--resume`` reruns them into the same child
    runs. (One search for both: until 2026-12-08 each had its own, here and in
    tests/test_search_e2e.py.)"""
    flag = workdir / "crash"
    flag.write_text("1")
    argv = ["--method", "toy", "--dataset", "voc21", "--data-root", str(voc_root),
            "--num-samples", "4", "--rungs", "1", "--seed", "0", "--name", "resumable",
            "--set", f"settings.fail_flag={flag}", "--set", "space.pool.low=1"]
    assert run_main(argv) == 0
    client, parents, trials = _runs(workdir)
    failed = [c for c in trials if c.info.status == "FAILED"]
    assert failed, "the seed should sample pool=2 at least once"
    assert len(failed) < len(trials)
    for c in failed:
        assert c.data.params["pool"] == "2"
        assert "simulated crash" in c.data.tags["ovss_error"]
        assert "\n" not in c.data.tags["ovss_error"]
        assert "error.txt" in {a.path for a in client.list_artifacts(c.info.run_id)}
    assert parents[0].data.tags["best.pool"] != "2"                # the best ignores them

    flag.unlink()
    assert run_main([*argv, "--resume"]) == 0
    _, parents, after = _runs(workdir)
    assert len(after) == len(trials)                   # no new trials, same child runs
    assert {t.info.status for t in after} == {"FINISHED"}
    assert {t.info.run_id for t in after} >= {c.info.run_id for c in failed}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags.get("ovss_resumed") == "true"
