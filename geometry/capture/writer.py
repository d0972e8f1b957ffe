"""The store's background writer: one thread running queued jobs in order, off the training thread.

The training thread only copies tensors to the CPU and queues a job; it blocks when ``queue_size`` jobs
are waiting, so host memory stays bounded. A failing job does not stop the thread: its error is kept,
and the owner (geometry.capture.store) reports it on the training thread at its next call.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

THREAD_NAME = "geometry-store-writer"  # tests check that none outlives its test


class Writer:
    """One daemon thread running queued (what, job) pairs in order; ``idle`` runs when no job came for
    ``idle_seconds``. Errors are kept, with what failed, until ``errors()`` takes them."""

    def __init__(self, queue_size: int, idle: Callable[[], None], idle_seconds: float):
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._idle, self._idle_seconds = idle, idle_seconds
        self._errors: list[tuple[str, BaseException]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def submit(self, what: str, job: Callable[[], None]) -> None:
        """Queue a job; blocks while the queue is full (bounded memory)."""
        self._q.put((what, job))

    def errors(self) -> list[tuple[str, BaseException]]:
        """The errors since the last call, oldest first."""
        with self._lock:
            errs, self._errors = self._errors, []
        return errs

    def close(self) -> None:
        """Run every job queued so far, then end the thread."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                item = self._q.get(timeout=self._idle_seconds)
            except queue.Empty:
                self._do("the manifest", self._idle)
                continue
            if item is None:
                return
            self._do(*item)

    def _do(self, what: str, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - reported to the training thread
            with self._lock:
                self._errors.append((what, e))
