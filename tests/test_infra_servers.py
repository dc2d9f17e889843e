"""infra/mlflow-server.sh's allowed hosts, and an MLflow server on PostgreSQL, for real: each test
starts its servers on 127.0.0.1 and free ports and stops them by process group / data dir."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.servers import (
    REPO,
    free_port,
    http_status,
    job_runner,
    mlflow_bin,
    mlflow_server,
    pg_bindir,
    start_postgres,
    stop,
    wait_http,
)

SCRIPT = REPO / "infra" / "mlflow-server.sh"
API = "/api/2.0/mlflow/experiments/search?max_results=1"


def _start_script(tmp_path, allowed: str | None):
    port = free_port()
    env = {"MLFLOW_PORT": str(port), "MLFLOW_BIN": mlflow_bin(), "MLFLOW_WORKERS": "1",
           "MLFLOW_BACKEND": f"sqlite:///{tmp_path}/mlflow.db",
           "MLFLOW_ARTIFACTS": str(tmp_path / "mlartifacts")}
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("MLFLOW_ALLOWED_HOSTS", "MLFLOW_HOST", "MLFLOW_SERVER_ALLOWED_HOSTS")},
           **env}
    if allowed is not None:
        env["MLFLOW_ALLOWED_HOSTS"] = allowed
    log = tmp_path / f"script-{port}.log"
    proc = subprocess.Popen(["bash", str(SCRIPT)], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc, log)
    return url, port, proc


@pytest.mark.slow
def test_mlflow_server_sh_allows_named_host_only(tmp_path):
    url, port, proc = _start_script(tmp_path, "mlflow")
    try:
        assert job_runner(proc.pid) == []       # the script starts MLflow without its job runner
        assert http_status(url + API, host=f"mlflow:{port}") == 200
        assert http_status(url + API, host="mlflow") == 200
        assert http_status(url + API, host=f"127.0.0.1:{port}") == 200  # loopback still works
        assert http_status(url + API, host=f"evil.example:{port}") == 403
    finally:
        stop(proc)
    url, port, proc = _start_script(tmp_path, None)
    try:
        # Not named: MLflow's default list (loopback, private IPs) refuses the README's host.
        assert http_status(url + API, host=f"mlflow:{port}") == 403
        assert http_status(url + API, host=f"localhost:{port}") == 200
    finally:
        stop(proc)


def _script_args(tmp_path, **env) -> list[str]:
    """The arguments mlflow-server.sh passes to `mlflow` (a stand-in that prints them)."""
    fake = tmp_path / "fake-mlflow"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run(["bash", str(SCRIPT)], env={**base, "MLFLOW_BIN": str(fake), **env},
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.splitlines()


def test_mlflow_server_sh_shared_mode_names_mlflow_by_default(tmp_path):
    args = _script_args(tmp_path, MLFLOW_HOST="0.0.0.0")
    hosts = args[args.index("--allowed-hosts") + 1].split(",")
    assert {"mlflow", "mlflow:*", "localhost:*", "10.*"} <= set(hosts)
    assert args[args.index("--host") + 1] == "0.0.0.0"
    args = _script_args(tmp_path, MLFLOW_HOST="0.0.0.0", MLFLOW_ALLOWED_HOSTS="tracking.corp:443")
    hosts = args[args.index("--allowed-hosts") + 1].split(",")
    assert "tracking.corp:443" in hosts and "mlflow" not in hosts
    # Loopback and nothing named: MLflow's own defaults, no --allowed-hosts.
    args = _script_args(tmp_path)
    assert "--allowed-hosts" not in args and args[args.index("--host") + 1] == "127.0.0.1"


def _has_pg_driver() -> bool:
    """psycopg (3): SQLAlchemy 2.1's driver for a plain postgresql:// URI."""
    r = subprocess.run([sys.executable, "-c", "import psycopg"], capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
def test_mlflow_server_on_postgresql_logs_and_reads_back(tmp_path):
    if not _has_pg_driver():
        reason = "psycopg not installed (pyproject's test extra psycopg[binary])"
        print("SKIP:", reason)
        pytest.skip(reason)
    pg, why = start_postgres()
    if pg is None:
        print("SKIP:", why)
        pytest.skip(why)
    proc = None
    try:
        url, proc = mlflow_server(tmp_path, pg.dsn)
        from mlflow.artifacts import download_artifacts
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=url)
        exp = client.create_experiment("ovss-pg")
        run = client.create_run(exp, run_name="trial-0")
        rid = run.info.run_id
        client.log_param(rid, "tau", "6")
        client.log_metric(rid, "miou", 0.4375, step=2)
        client.log_text(rid, "layer: 11\n", "tuned/clipseg.yaml")
        client.set_terminated(rid)

        back = MlflowClient(tracking_uri=url).get_run(rid)
        assert back.data.params == {"tau": "6"}
        assert back.data.metrics == {"miou": 0.4375}
        assert back.info.status == "FINISHED"
        path = download_artifacts(run_id=rid, artifact_path="tuned/clipseg.yaml",
                                  tracking_uri=url, dst_path=str(tmp_path / "dl"))
        assert open(path).read() == "layer: 11\n"
        # The run is in PostgreSQL (not in some default local store).
        q = subprocess.run([str(pg_bindir() / "psql"), pg.dsn, "-tAc",
                            f"select key, value from params where run_uuid = '{rid}'"],
                           capture_output=True, text=True, timeout=30)
        assert q.stdout.strip() == "tau|6", q.stderr
    finally:
        if proc is not None:
            stop(proc)
        pg.stop()
    assert not pg.base.exists()


@pytest.mark.slow
def test_servers_fixture_sqlite_and_stop(tmp_path):
    url, proc = mlflow_server(tmp_path, f"sqlite:///{tmp_path}/m.db")
    try:
        assert http_status(url + API) == 200
    finally:
        stop(proc)
    assert proc.poll() is not None and http_status(url + "/health", timeout=2) == 0
