"""The token-auth setting the README documents, for real: a `ray start --head` with
RAY_AUTH_MODE=token on loopback (own temp dir, free ports, stopped by its process group), a
driver with an explicit address is refused without RAY_AUTH_MODE=token and admitted with it and
the cluster's RAY_AUTH_TOKEN."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.servers import free_port, start, stop

RAY = str(Path(sys.executable).parent / "ray")


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)  # no ~/.ray/auth_token of this machine's user
    return env


def _kill_leftovers(tmp: Path) -> None:
    """Ray processes whose command line names our temp dir (none should outlive the group)."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(tmp) in cmd and int(p.name) != os.getpid():
            try:
                os.kill(int(p.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


DRIVER = ("import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); "
          "print('CPU', ray.cluster_resources().get('CPU')); ray.shutdown()")


@pytest.mark.slow
def test_explicit_address_needs_ray_auth_mode_token_and_the_token():
    tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths
    token = uuid.uuid4().hex
    port = free_port()
    env = {**_clean_env(tmp), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    ports = {f"--{k}": str(free_port()) for k in (
        "node-manager-port", "object-manager-port", "metrics-export-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")}
    cmd = [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false",
           f"--temp-dir={tmp / 'ray'}", *[f"{k}={v}" for k, v in ports.items()]]
    head = start(cmd, tmp / "head.log", env)
    addr = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "Ray runtime started" not in \
                (tmp / "head.log").read_text():
            assert head.poll() is None, (tmp / "head.log").read_text()[-3000:]
            time.sleep(1)
        # With the mode and the token: admitted.
        ok = subprocess.run([sys.executable, "-c", DRIVER, addr], capture_output=True,
                            text=True, timeout=180,
                            env={**_clean_env(tmp), "RAY_AUTH_MODE": "token",
                                 "RAY_AUTH_TOKEN": token})
        assert ok.returncode == 0 and "CPU 1.0" in ok.stdout, ok.stderr[-3000:]
        # No mode (an explicit address never turns it on): refused. Ray retries its GCS
        # connection 20 times, 1 s apart, before it gives up; 3 are enough to be refused.
        bad = subprocess.run([sys.executable, "-c", DRIVER, addr], capture_output=True,
                             text=True, timeout=180,
                             env={**_clean_env(tmp), "RAY_gcs_server_port_wait_time_s": "3"})
        assert bad.returncode != 0, bad.stdout
        assert "auth" in bad.stderr.lower(), bad.stderr[-3000:]
    finally:
        stop(head, timeout=3)   # `ray start --block` takes ~30 s to end on SIGTERM; then KILL
        _kill_leftovers(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
