"""Checks that run before Ray starts: the tracking store answers, the Ray address is reachable.

Each failure is one :class:`OvssError` line naming the thing, within a bounded time (a dead
tracking server used to cost minutes of MLflow's own retries, after Ray had started; a wrong
``--address`` used to hang). Nothing is started or written here.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from methods.base import OvssError

TRACKING_TIMEOUT_S = 10.0   # one request to the tracking server
ADDRESS_TIMEOUT_S = 15.0    # one TCP connect to the Ray head's GCS port
# MLflow's own HTTP settings for the rest of the search: a few retries of bounded length, so an
# outage mid-search costs seconds per call, not minutes (see search.record.tracking).
MLFLOW_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def check_tracking_store(uri: str, timeout: float = TRACKING_TIMEOUT_S) -> None:
    """An http(s) tracking server must answer one API request within ``timeout`` seconds; a
    sqlite or file store must be a writable place. Sets bounded MLflow HTTP retry settings
    (unless the user set them)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        for k, v in MLFLOW_HTTP_ENV.items():
            os.environ.setdefault(k, v)
        url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
        req = urllib.request.Request(url, headers=_auth_headers())
        start = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                resp.read(1 << 16)
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise OvssError(f"--tracking-uri {uri}: the server refused us (HTTP {e.code}); "
                                "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
                                "(or MLFLOW_TRACKING_TOKEN)") from None
            raise OvssError(f"--tracking-uri {uri}: not an MLflow tracking server "
                            f"(HTTP {e.code} on the experiments API)") from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            why = getattr(e, "reason", e)
            raise OvssError(f"--tracking-uri {uri}: no MLflow server answers "
                            f"({why}; gave up after {time.monotonic() - start:.0f} s)") from None
        return
    if parsed.scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        if path and path != ":memory:":
            _writable_dir(Path(path).parent, f"--tracking-uri {uri}")
    elif parsed.scheme in ("", "file"):
        _writable_dir(Path(parsed.path or uri), f"--tracking-uri {uri}", create=True)


def _auth_headers() -> dict[str, str]:
    import base64

    user, pw = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get(
        "MLFLOW_TRACKING_PASSWORD")
    if user and pw:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _writable_dir(d: Path, what: str, create: bool = False) -> None:
    probe = d
    while not probe.exists() and create and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OvssError(f"{what}: directory {d} does not exist")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OvssError(f"{what}: directory {probe} is not writable")


def resolve_address(address: str) -> str:
    """``auto`` -> the address of the cluster this machine runs (``RAY_ADDRESS``, else Ray's
    current-cluster file); anything else unchanged."""
    if address != "auto":
        return address
    env = os.environ.get("RAY_ADDRESS")
    if env and env != "auto":
        return env
    tmp = os.environ.get("RAY_TMPDIR", "/tmp")
    f = Path(tmp) / "ray" / "ray_current_cluster"
    if f.is_file() and f.read_text().strip():
        return f.read_text().strip()
    raise OvssError("--address auto: no running Ray cluster found on this machine (start one "
                    "with `ray start --head`, or give --address HOST:PORT)")


def check_ray_address(address: str | None, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """``--address`` must name a Ray head whose GCS port accepts a TCP connection within
    ``timeout`` seconds. ``ray://`` (Ray Client) needs the ``ray[client]`` extra."""
    if not address or address == "local":
        return
    resolved = resolve_address(address)
    if resolved.startswith("ray://"):
        try:
            import grpc  # noqa: F401
        except ImportError:
            raise OvssError(f"--address {address}: Ray Client (ray://) needs the ray[client] "
                            "extra, which is not installed; run the search on a node of the "
                            "cluster with --address HOST:6379 (or auto)") from None
        hostport = resolved.removeprefix("ray://")
    else:
        hostport = resolved
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise OvssError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.5:6379), auto "
                        "or ray://HOST:10001")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise OvssError(f"--address {address}: nothing answers at {host}:{port} within "
                        f"{timeout:g} s ({e.strerror or e})") from None


def _probe_task(probe: str, token: str, paths: list[str]) -> tuple[str, str, list[str]]:
    """On one node: does it see the driver's probe file and the data? -> (node id, ip, problems)."""
    import ray

    problems = []
    try:
        if Path(probe).read_text() != token:
            problems.append(f"{Path(probe).parent} (the cache directory holds another file "
                            "under the probe's name: not the driver's directory)")
    except OSError as e:
        problems.append(f"{Path(probe).parent} (the driver's probe file is not there: "
                        f"{e.strerror or e}; put --cache-dir on storage every node mounts)")
    for p in paths:
        if not os.access(p, os.R_OK):
            problems.append(f"{p} (not readable here)")
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), problems


def check_nodes_see_inputs(cache_dir: str | Path, paths: list[str],
                           timeout: float = 120.0) -> int:
    """Every alive node of the Ray cluster must see the evidence cache (a probe file the driver
    writes there) and the data (``paths``: the data root and one image). One OvssError line
    naming the node and the path otherwise; returns the number of nodes checked."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = cache / f".ovss-probe-{token}"
    probe.write_text(token)
    try:
        task = ray.remote(_probe_task)
        refs = {task.options(num_cpus=0, max_retries=0, scheduling_strategy=
                             NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                                 str(probe), token, paths): n for n in nodes}
        done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        if pending:
            n = refs[pending[0]]
            raise OvssError(f"node {n.get('NodeManagerAddress')} ({n['NodeID'][:12]}) did not "
                            f"answer the input check within {timeout:g} s")
        for node_id, ip, problems in ray.get(done):
            if problems:
                raise OvssError(f"node {ip} ({node_id[:12]}) cannot see {problems[0]}")
    finally:
        probe.unlink(missing_ok=True)
    return len(nodes)
