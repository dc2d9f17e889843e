"""Finding and stopping exactly the processes a test started (never by a broad name)."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from tests.servers import free_port  # noqa: F401  (re-exported for the tests)


def own_processes(marker: str) -> list[int]:
    """Pids of the processes whose command line or environment contains ``marker`` (a temp dir
    the test made and gave only to what it started)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            blob = (d / "cmdline").read_bytes() + (d / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in blob:
            pids.append(int(d.name))
    return pids


def kill_own(marker: str, remove: bool = False) -> None:
    """SIGKILL the processes of :func:`own_processes`; ``remove``: then remove the folder
    ``marker`` too (a temp dir the test made: Ray's sessions, a server's store)."""
    for pid in own_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if remove:
        shutil.rmtree(marker, ignore_errors=True)
