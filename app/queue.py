"""How an accepted update set reaches the update job: a worker thread in this process (embedded
mode) or an RQ job on Redis (distributed mode). The job itself is the same function either way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from app.settings import Settings

log = logging.getLogger(__name__)


class UpdateQueue(Protocol):
    def start(self) -> None: ...

    def submit(self) -> None:
        """An update set was stored: make sure a job will apply it."""

    def announce(self, version: int) -> None:
        """Tell every API replica that the current version changed (after a promote)."""

    def stop(self) -> None: ...


class EmbeddedQueue:
    """A background thread that applies pending update sets whenever it is woken.

    It also wakes once at start, so sets stored before a crash or restart are applied.
    """

    def __init__(self, settings: Settings, on_step: Callable[[], None]) -> None:
        self.settings = settings
        self.on_step = on_step
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="update-worker", daemon=True)

    def start(self) -> None:
        self._wake.set()
        self._thread.start()

    def submit(self) -> None:
        self._wake.set()

    def announce(self, version: int) -> None:
        """One process, nothing to tell: the promote already swapped it."""

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from worker.jobs import apply_pending_updates  # the worker imports app, not the other way at import time

        while True:
            # Also wake now and then, so sets left by a job that failed outright are retried.
            self._wake.wait(timeout=60)
            if self._stopping.is_set():
                return
            self._wake.clear()
            try:
                apply_pending_updates(self.settings, on_step=lambda _result: self.on_step())
            except Exception:  # the thread must outlive any one job; the sets stay pending
                log.exception("update job failed; its update sets stay queued")
