"""What an ``mlflow server`` costs to start, with MLflow 3's job runner (its default) and without
it (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``, what ovss-tune's servers and printed ``mlflow
ui`` commands use: ``search.core.console.MLFLOW_SERVER_ENV``).

    python bench/mlflow_server.py            # 4 starts of each kind, interleaved
    python bench/mlflow_server.py --ui-workers   # the local UI: 4 workers (MLflow's default)
                                                 # against 1 (the printed `mlflow ui` command)

Each start: ``mlflow server`` on a fresh sqlite store, in its own process group; the CPU seconds
of every process of that group (the CLI, uvicorn, and with the runner its huey consumers),
sampled every 0.2 s, from the start until ``--settle`` seconds after ``/health`` answers; then
the group is stopped. Prints the medians of each kind (seconds to /health, CPU seconds,
processes) and the ratio of the CPU medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _group_cpu(pgid: int, seen: dict[str, float]) -> None:
    """Update ``seen`` (pid:start -> CPU seconds) with every live process of group ``pgid``."""
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                st = f.read()
        except OSError:
            continue
        rest = st[st.rfind(")") + 2:].split()
        if int(rest[2]) == pgid:             # field 5: the process group
            seen[f"{p}:{rest[19]}"] = (int(rest[11]) + int(rest[12])) / TICK


def _one(jobs: bool, settle: float, ui_workers: int | None = None) -> tuple[float, float, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="ovb"))
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true" if jobs else "false"}
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    if ui_workers is None:
        cmd = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
               "--artifacts-destination", str(tmp / "mlartifacts")]
    else:   # the local UI as search.record.tracking.ui_link prints it, with this many workers
        cmd = [mlflow, "ui", "--app-name", "ovss", "--workers", str(ui_workers), "--port",
               str(port), "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db"]
    seen: dict[str, float] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    up = None
    try:
        while True:
            _group_cpu(proc.pid, seen)
            now = time.perf_counter()
            if up is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                        up = now - t0
                except OSError:
                    if proc.poll() is not None or now - t0 > 300:
                        raise SystemExit(f"mlflow server did not start: {' '.join(cmd)}") from None
            elif now - t0 > up + settle:
                break
            time.sleep(0.2)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return up, sum(seen.values()), len(seen)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--settle", type=float, default=8.0,
                    help="seconds after /health answers that still count (default 8)")
    ap.add_argument("--ui-workers", action="store_true",
                    help="compare `mlflow ui` with 4 workers against 1 (job runner off)")
    args = ap.parse_args(argv)
    if args.ui_workers:
        kinds = [((False, 4), "mlflow ui, 4 workers (default)"),
                 ((False, 1), "mlflow ui, 1 worker (ovss-tune)")]
    else:
        kinds = [((True, None), "job runner on (MLflow's default)"),
                 ((False, None), "job runner off (ovss-tune)")]
    rows: dict[tuple, list[tuple[float, float, int]]] = {k: [] for k, _ in kinds}
    for _ in range(args.runs):
        for (jobs, workers), _name in kinds:
            rows[(jobs, workers)].append(_one(jobs, args.settle, workers))
    med = []
    for key, name in kinds:
        up, cpu, n = (statistics.median(x) for x in zip(*rows[key]))
        med.append(cpu)
        print(f"{name:34s} /health after {up:5.1f} s  CPU {cpu:5.1f} s  processes {n:3.0f}  "
              f"(median of {args.runs})")
    print(f"CPU to start, first / second: {med[0] / med[1]:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
