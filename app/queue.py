"""How an accepted update set reaches the update job: a worker thread in this process (embedded
mode) or an RQ job on Redis (distributed mode). The job itself is the same function either way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Protocol

import redis
from redis.exceptions import RedisError
from rq import Queue
from rq.serializers import JSONSerializer

from app.settings import Settings

log = logging.getLogger(__name__)


# The update job (worker.jobs.apply_pending_updates), handed in by the CLI entry point:
# app never imports worker.
UpdateJob = Callable[..., Any]


class UpdateQueue(Protocol):
    def start(self) -> None: ...

    def submit(self) -> None:
        """An update set was stored: make sure a job will apply it."""

    def announce(self, version: int) -> None:
        """Tell every API replica that the current version changed (after a promote)."""

    def reconcile(self, pending: int) -> None:
        """Called on every poll with the number of pending sets: make sure none is forgotten."""

    def stop(self) -> None: ...


class EmbeddedQueue:
    """A background thread that applies pending update sets whenever it is woken.

    It also wakes once at start, so sets stored before a crash or restart are applied.
    """

    def __init__(self, settings: Settings, job: UpdateJob, on_step: Callable[[], None]) -> None:
        self.settings = settings
        self.job = job
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

    def reconcile(self, pending: int) -> None:
        if pending:
            self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._stopping.is_set():
                return
            self._wake.clear()
            try:
                self.job(self.settings, on_step=lambda _result: self.on_step())
            except Exception:  # the thread must outlive any one job; the sets stay pending
                log.exception("update job failed; its update sets stay queued")


# The RQ job, by name: app never imports worker. Jobs are JSON, never pickles: whoever can write
# to Redis must not be able to run code in a worker.
UPDATE_JOB = "worker.rq.run_update_job"


def queued_key(settings: Settings) -> str:
    """Set while an update job waits in the queue: at most one waits, and it takes every pending set."""
    return f"{settings.queue_name}:job-queued"


def swap_channel(settings: Settings) -> str:
    return f"{settings.queue_name}:swaps"


def enqueue_update_job(connection: redis.Redis, settings: Settings) -> bool:
    """Queue one update job unless one is already waiting; True if this call queued it."""
    if not connection.set(queued_key(settings), "1", nx=True, ex=settings.job_timeout_s):
        return False
    try:
        Queue(settings.queue_name, connection=connection, serializer=JSONSerializer).enqueue(
            UPDATE_JOB, job_timeout=settings.job_timeout_s, failure_ttl=7 * 24 * 3600
        )
    except Exception:
        # A flag left behind would block every later enqueue until it expires.
        with suppress(RedisError):
            connection.delete(queued_key(settings))
        raise
    return True


def announce_swap(connection: redis.Redis, settings: Settings, version: int) -> None:
    connection.publish(swap_channel(settings), str(version))


class RedisQueue:
    """Update jobs on RQ, swap announcements over Redis pub/sub.

    A Redis outage never loses an update set: it is stored before the queue is touched, and
    reconcile(), which the API runs on every poll, queues a job for whatever is pending once
    Redis answers again (also after a worker died mid-job and its lease ran out).
    """

    def __init__(self, settings: Settings, on_announce: Callable[[], None]) -> None:
        self.settings = settings
        self.on_announce = on_announce
        self.connection = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
        self._stopping = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="swap-listener", daemon=True)

    def start(self) -> None:
        self._listener.start()

    def submit(self) -> None:
        try:
            enqueue_update_job(self.connection, self.settings)
        except RedisError as exc:
            log.warning("Redis unreachable (%s): the update set is stored and will be queued when it answers", exc)

    def reconcile(self, pending: int) -> None:
        """Queue a job for sets stored while Redis was down or left by a dead worker."""
        if pending:
            self.submit()

    def announce(self, version: int) -> None:
        try:
            announce_swap(self.connection, self.settings, version)
        except RedisError as exc:  # the other replicas' pointer polling converges anyway
            log.warning("could not announce version %d: %s", version, exc)

    def stop(self) -> None:
        self._stopping.set()

    def _listen(self) -> None:
        """Refresh on every swap announcement; reconnect after Redis errors."""
        while not self._stopping.is_set():
            try:
                pubsub = self.connection.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(swap_channel(self.settings))
                while not self._stopping.is_set():
                    if pubsub.get_message(timeout=1.0) is not None:
                        self.on_announce()
            except RedisError as exc:
                log.warning("swap announcements interrupted (%s); pointer polling covers the gap", exc)
                self._stopping.wait(self.settings.poll_interval_s)
