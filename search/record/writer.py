"""The tracking record's writer thread: store calls made off Tune's event loop, in order, and
hooks that take the record offline (not the search down) when the store fails."""

from __future__ import annotations

import functools
import queue
import threading
from typing import Protocol


class GoesOffline(Protocol):
    """What the writer and :func:`guarded` need of their owner (a Tune callback)."""

    offline: str | None

    def go_offline(self, error: BaseException) -> None: ...


def guarded(hook):
    """A callback hook that never lets a tracking-store error end the search: the first error
    is reported once, the callback goes offline (no more calls to the store), and trials go on;
    their results stay in Tune's results directory for ``python -m search.sync``."""
    @functools.wraps(hook)
    def run(self, *args, **kwargs):
        if self.offline:
            return None
        try:
            return hook(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any store failure: MlflowException, HTTP, OS
            self.go_offline(e)
            return None

    return run


class Writer:
    """One thread that makes a callback's store calls, in the order they were submitted, off
    Tune's event loop: the loop hands a trial's record over and goes on scheduling trials while
    the store answers. The first failing call puts the owner offline; later calls are dropped."""

    def __init__(self, owner: GoesOffline):
        self.owner = owner
        self.queue: queue.Queue = queue.Queue()
        self.thread = None

    def submit(self, call) -> None:
        if self.owner.offline:
            return
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._loop, name="ovss-mlflow-writer",
                                           daemon=True)
            self.thread.start()
        self.queue.put(call)

    def _loop(self) -> None:   # a daemon thread: it waits for calls as long as the driver lives
        while True:
            call = self.queue.get()
            try:
                if not self.owner.offline:
                    call()
            except Exception as e:  # noqa: BLE001 - any store failure: MlflowException, HTTP, OS
                self.owner.go_offline(e)
            finally:
                self.queue.task_done()

    def flush(self) -> None:
        """Wait until every submitted call has been made (or dropped)."""
        if self.thread is not None:
            self.queue.join()
