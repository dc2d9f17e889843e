"""One search across machines, for real on loopback: a two-node Ray cluster (`ray start --head`
and a second `ray start --address`, own temp dir), an `mlflow server` over HTTP, and the
preflight that refuses a dead tracking server or a wrong --address in seconds, before Ray."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import search.engine.session as session
from search.run import main as run_main
from tests.procs import free_port, kill_own

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _argv(voc_root, *extra):
    return ["--method", "toy", "--dataset", "voc21", "--data-root", str(voc_root),
            "--num-samples", "4", "--rungs", "1", *extra]


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(address):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(session, "init_ray", refuse)


@pytest.mark.parametrize("flag, value, words", [
    ("--address", "127.0.0.1:{port}", "nothing answers at 127.0.0.1:"),
    ("--address", "no-port", "expected HOST:PORT"),
    ("--address", "ray://127.0.0.1:{port}", "ray[client]"),
    ("--tracking-uri", "http://127.0.0.1:{port}", "no MLflow server answers"),
    ("--tracking-uri", "sqlite:////no/such/dir/mlflow.db", "does not exist"),
])
def test_unreachable_address_or_store_is_one_line_before_ray(workdir, voc_root, capsys, no_ray,
                                                             flag, value, words):
    value = value.format(port=free_port())     # nothing listens there
    start = time.monotonic()
    assert run_main(_argv(voc_root, flag, value)) == 2
    took = time.monotonic() - start
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and value in err, err
    assert took < 15
    assert not (workdir / "mlflow.db").exists() or flag != "--tracking-uri"


def _start_two_nodes(tmp: str, port: int) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}   # both sides agree (Ray 2.60 token auth)
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    subprocess.run([RAY, "start", "--head", "--port", str(port), "--temp-dir", tmp,
                    "--include-dashboard", "false", "--resources", '{"node_a": 1}', *common],
                   env=env, check=True, capture_output=True, timeout=120)
    subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", "--resources",
                    '{"node_b": 1}', *common], env=env, check=True, capture_output=True,
                   timeout=120)
    return env


@pytest.mark.slow
def test_search_on_a_two_node_cluster_logs_to_an_mlflow_server_and_exports(workdir, voc_root):
    """One search as across machines: its trials and extraction on both nodes of the cluster, its
    record on the MLflow server over HTTP (nothing in a local store), the export read from
    there. (Until 2026-12-08 a search on the cluster and one to the server were two tests.)"""
    from search.export import main as export_main
    from tests.servers import mlflow_server, stop

    tmp = tempfile.mkdtemp(prefix="ovc", dir="/tmp")
    server_dir = Path(tempfile.mkdtemp(prefix="ovm", dir="/tmp"))
    port = free_port()
    url, server = mlflow_server(server_dir, f"sqlite:///{server_dir}/mlflow.db")
    try:
        env = _start_two_nodes(tmp, port)
        proc = subprocess.run(
            [sys.executable, "-m", "search.run", *_argv(voc_root, "--address",
                                                         f"127.0.0.1:{port}"),
             "--tracking-uri", url, "--num-samples", "6",
             "--set", "settings.extract_delay=1.0", "--set", "settings.decode_delay=0.2"],
            cwd=workdir, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        client = MlflowClient(url)
        exp = client.get_experiment_by_name("toy/tiny/voc21")
        runs = client.search_runs([exp.experiment_id])
        parent = [r for r in runs if r.data.tags.get("ovss_role") == "search"][0]
        trials = [r for r in runs if r.data.tags.get("ovss_role") == "trial"]
        assert parent.info.status == "FINISHED"
        assert len(trials) == 6 and {t.info.status for t in trials} == {"FINISHED"}
        assert len({t.data.tags["ovss_node_id"] for t in trials}) == 2        # trials on both
        assert len(parent.data.tags["ovss_extract_nodes"].split(",")) == 2   # extraction on both
        assert {t.data.tags["ovss_device"] for t in trials} == {"cpu"}
        # One cache for both nodes: each image extracted once, on one node or the other.
        assert parent.data.tags["ovss_extracted_images"] == "8"
        arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert "best_config.yaml" in arts
        assert not (workdir / "mlflow.db").exists()          # nothing went to a local store
        out = workdir / "tuned.yaml"
        assert export_main(["--method", "toy", "--tracking-uri", url, "--out", str(out)]) == 0
        assert "provenance" in out.read_text()
    finally:
        kill_own(tmp, remove=True)
        stop(server)
        shutil.rmtree(server_dir, ignore_errors=True)


def _args(**kw):
    from search.run import build_parser

    argv = ["--method", "toy"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return build_parser().parse_args(argv)


def test_resources_fit_the_work(monkeypatch, capsys):
    import ray
    import ray.autoscaler.sdk as sdk

    from methods.base import OvssError

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    r = session.plan_resources(_args())
    assert r == {"extract_gpus": 1.0, "extract_cpus": 1.0, "trial_gpus": 0.0, "trial_cpus": 1.0}
    assert "the Ray cluster has 2 GPU(s); trials decode on CPU" in capsys.readouterr().err
    r = session.plan_resources(_args(gpus_per_trial=0.25, gpus_per_extract=0.5))
    assert (r["extract_gpus"], r["trial_gpus"]) == (0.5, 0.25)
    assert capsys.readouterr().err == ""

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})   # GPUs scale from 0
    assert session.plan_resources(_args())["extract_gpus"] == 0.0
    with pytest.raises(OvssError, match=r"--gpus-per-extract 1 asked for, .* 0 GPU\(s\)"):
        session.plan_resources(_args(gpus_per_extract=1))
    asked = []
    monkeypatch.setattr(sdk, "request_resources", lambda bundles: asked.append(bundles))
    r = session.plan_resources(_args(gpus_per_extract=1, gpus_per_trial=0.5, autoscale=True))
    assert asked == [[{"GPU": 1.0, "CPU": 1.0}, {"GPU": 0.5, "CPU": 1.0}]]
    assert "asked the autoscaler for 1 GPU, 0.5 GPU" in capsys.readouterr().err


def test_every_node_must_see_the_cache_and_the_data(ray_session, tmp_path, voc_root):
    from methods.base import OvssError
    from search.core.preflight import check_nodes_see_inputs

    cache = tmp_path / "cache"
    assert check_nodes_see_inputs(cache, [str(voc_root)]) == len(
        [n for n in ray_session.nodes() if n["Alive"]])
    assert list(cache.iterdir()) == []                        # the probe is removed
    missing = tmp_path / "not-mounted-here"
    with pytest.raises(OvssError, match=r"node \S+ \(\w+\) cannot see .*not-mounted-here"):
        check_nodes_see_inputs(cache, [str(voc_root), str(missing)])
    assert list(cache.iterdir()) == []
