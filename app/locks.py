"""The lineage lock: updates of one model lineage are applied one at a time.

Embedded mode locks a file in WARMTUNE_HOME (the kernel drops it when its holder dies);
distributed mode takes a Redis lock with a lease that a heartbeat renews and that expires
lock_lease_s after its holder dies.
"""

from __future__ import annotations

import fcntl
import logging
import threading
from collections.abc import Callable
from typing import IO, Protocol

import redis
from redis.exceptions import LockError, RedisError

from app.settings import Settings

log = logging.getLogger(__name__)


class _Backend(Protocol):
    def acquire(self) -> None: ...
    def renew(self) -> bool: ...
    def release(self) -> None: ...


class _FileBackend:
    def __init__(self, settings: Settings) -> None:
        self.path = settings.home / "lineage.lock"
        self.file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def renew(self) -> bool:
        return True

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


class _RedisBackend:
    def __init__(self, settings: Settings) -> None:
        client = redis.Redis.from_url(settings.redis_url)
        self.lease_s = settings.lock_lease_s
        self.lock = client.lock(f"{settings.queue_name}:lineage", timeout=self.lease_s, thread_local=False)

    def acquire(self) -> None:
        self.lock.acquire(blocking=True)

    def renew(self) -> bool:
        try:
            self.lock.extend(self.lease_s, replace_ttl=True)
            return True
        except LockError:
            return False
        except RedisError as exc:  # Redis unreachable for a moment: the lease may still hold
            log.warning("could not renew the lineage lease: %s", exc)
            return True

    def release(self) -> None:
        try:
            self.lock.release()
        except (LockError, RedisError) as exc:
            log.warning("lineage lock was not released cleanly: %s", exc)


class LineageLock:
    """Context manager holding the lineage lock, renewing it (and calling on_renew) until exit."""

    def __init__(self, settings: Settings, on_renew: Callable[[], None] | None = None) -> None:
        self.backend: _Backend = _RedisBackend(settings) if settings.redis_url else _FileBackend(settings)
        self.interval = settings.lock_lease_s / 3
        self.on_renew = on_renew
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LineageLock:
        self.backend.acquire()
        self._thread = threading.Thread(target=self._heartbeat, name="lineage-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.backend.release()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.backend.renew():
                log.error("lost the lineage lock: another worker may hold it now")
                self.lost = True
                return
            if self.on_renew is not None:
                self.on_renew()
