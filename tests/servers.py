"""Servers that tests start and stop themselves: an MLflow tracking server on 127.0.0.1 (any
backend store) and a throwaway PostgreSQL cluster in a temp dir.

Everything is started in its own process group and stopped by that group's id (MLflow) or by its
data directory (``pg_ctl stop -D``), never by name: other agents on this machine run their own.

    url, proc = mlflow_server(tmp_path, f"sqlite:///{tmp_path}/mlflow.db")
    try:
        ...  # mlflow.set_tracking_uri(url)
    finally:
        stop(proc)
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from search.core.console import MLFLOW_SERVER_ENV

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_bin() -> str:
    """The ``mlflow`` CLI of the Python running the tests."""
    return str(Path(sys.executable).parent / "mlflow")


def http_status(url: str, host: str | None = None, timeout: float = 5.0) -> int:
    """HTTP status of a GET of ``url`` (optionally with a given Host header); 0 if no answer."""
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Wait until ``url`` answers 200; raise with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if http_status(url, timeout=2.0) == 200:
            return
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"server at {url} not up after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a new process group, stdout+stderr into ``log``."""
    full_env = {**os.environ, **(env or {})}
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True, cwd=REPO)


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop ``proc`` and everything in its process group (TERM, then KILL)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:  # the group's other members (uvicorn workers) outlive a leader that already exited
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _commands_where(field: int, value: int) -> list[str]:
    """Command lines of the live processes whose /proc/PID/stat field ``field`` (counted from
    the state, 0; 1 the parent pid, 2 the process group) is ``value``."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            st = (d / "stat").read_text()
            if int(st[st.rfind(")") + 2:].split()[field]) == value:
                found.append((d / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError, IndexError):
            continue
    return found


def group_commands(pgid: int) -> list[str]:
    """Command lines of the live processes in process group ``pgid``."""
    return _commands_where(2, pgid)


def child_commands(ppid: int) -> list[str]:
    """Command lines of the live children of process ``ppid``."""
    return _commands_where(1, ppid)


def job_runner(pgid: int) -> list[str]:
    """The processes of MLflow's job runner (and its huey consumers) in group ``pgid``."""
    return [c for c in group_commands(pgid) if "mlflow.server.jobs" in c or "huey" in c]


def mlflow_server(tmp: Path, backend_uri: str, env: dict[str, str] | None = None,
                  timeout: float = 120.0, extra: list[str] | None = None
                  ) -> tuple[str, subprocess.Popen]:
    """Start ``mlflow server`` on 127.0.0.1 and a free port, one worker, with ``backend_uri`` as
    its store and ``tmp/mlartifacts`` served as its artifact root; wait until /health answers.

    ``extra``: more ``mlflow server`` arguments (e.g. ``["--app-name", "ovss"]``).
    Returns ``(url, proc)``: the tracking URI ``http://127.0.0.1:PORT`` and the process to hand to
    ``stop`` (which stops its process group). Its log is ``tmp/mlflow-server.log``.
    """
    tmp = Path(tmp)
    port = free_port()
    log = tmp / "mlflow-server.log"
    cmd = [mlflow_bin(), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", backend_uri,
           "--artifacts-destination", str(tmp / "mlartifacts"), "--serve-artifacts",
           *(extra or [])]
    # without MLflow's job runner, as ovss-tune's own servers (search.core.console)
    proc = start(cmd, log, {**MLFLOW_SERVER_ENV, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", proc, log, timeout)
    return url, proc


# -- PostgreSQL ---------------------------------------------------------------------------------

@dataclass
class Postgres:
    """A running throwaway PostgreSQL: ``dsn`` (``postgresql://...``) of its database."""

    dsn: str
    datadir: Path
    pg_ctl: str
    user: str | None  # the OS user it runs as (None: this process's user)
    base: Path  # temp dir holding the data dir, socket and log

    def stop(self) -> None:
        """Stop the server by its data dir (if it runs) and remove its temp dir."""
        if (self.datadir / "postmaster.pid").exists():
            run_as(self.user, [self.pg_ctl, "stop", "-D", str(self.datadir), "-m", "fast", "-w"],
                   check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def pg_bindir() -> Path | None:
    """Directory of Debian's PostgreSQL server binaries (``initdb``, ``pg_ctl``), newest first."""
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True,
                    key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    return None


def run_as(user: str | None, cmd: list[str], check: bool = True,
           timeout: float = 120.0) -> subprocess.CompletedProcess:
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)


def start_postgres(dbname: str = "mlflow") -> tuple[Postgres | None, str]:
    """initdb a cluster in a fresh temp dir, start it on 127.0.0.1 and a free port (its Unix
    socket in that dir too), create ``dbname``. As root, it runs as the ``postgres`` OS user
    (PostgreSQL refuses root), with the temp dir owned by that user (pytest's tmp_path is not
    reachable for another user). ``Postgres.stop`` stops it by data dir and removes the temp dir.

    Returns ``(Postgres, "")``, or ``(None, reason)`` when PostgreSQL cannot start here.
    """
    bindir = pg_bindir()
    if bindir is None:
        return None, "PostgreSQL server binaries (initdb, pg_ctl) not installed"
    user = None
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return None, "running as root and there is no 'postgres' user to run PostgreSQL as"
        user = "postgres"
    base = Path(tempfile.mkdtemp(prefix="ovss-pg-"))
    if user is not None:
        shutil.chown(base, user)
    datadir, log = base / "data", base / "server.log"
    port = free_port()
    pg = Postgres(f"postgresql://ovss@127.0.0.1:{port}/{dbname}", datadir,
                  str(bindir / "pg_ctl"), user, base)
    try:
        run_as(user, [str(bindir / "initdb"), "-D", str(datadir), "-U", "ovss", "-A", "trust",
                      "-E", "UTF8", "--no-sync"])
        run_as(user, [str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(log), "-w",
                      "-t", "60", "-o",
                      f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
                      "start"])
        run_as(user, [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "ovss",
                      dbname])
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        out = (getattr(e, "stderr", "") or "").strip()[-500:]
        tail = log.read_text()[-500:].strip() if log.exists() else ""
        pg.stop()
        return None, f"PostgreSQL did not start: {e} {out} {tail}".strip()
    return pg, ""
