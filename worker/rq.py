"""The RQ side of distributed mode: the worker process and the job it runs."""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from redis.exceptions import RedisError
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from app.queue import announce_swap, enqueue_update_job, queued_key
from app.settings import Settings, get_settings
from app.stores import Attempt, Stores
from worker.jobs import apply_pending_updates

log = logging.getLogger(__name__)


_stores_by_home: dict[str, Stores] = {}


def worker_stores(settings: Settings) -> Stores:
    """This worker process's stores, kept from job to job (a worker serves one home for its life)."""
    key = settings.model_dump_json()
    if key not in _stores_by_home:
        _stores_by_home[key] = Stores(settings)
    return _stores_by_home[key]


def run_update_job() -> list[dict[str, Any]]:
    """The RQ job: apply everything pending, announcing each new version to the API replicas."""
    settings = get_settings()
    connection = redis.Redis.from_url(settings.redis_url)
    connection.delete(queued_key(settings))  # sets stored from now on queue the next job

    def announce(result: Attempt) -> None:
        if result.status == "applied":
            announce_swap(connection, settings, result.model_version)

    results = apply_pending_updates(settings, on_step=announce, stores=worker_stores(settings))
    return [
        {"status": r.status, "update_ids": r.update_ids, "version": r.model_version if r.status == "applied" else None, "reason": r.reason}
        for r in results
    ]


def run_rq_worker(settings: Settings) -> None:
    """An RQ worker for update jobs, queueing one first if sets are pending; survives Redis outages.

    SimpleWorker runs each job in this process: no fork, so a CUDA context stays valid, and a
    SIGKILL stops the job together with its worker.
    """
    connection = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2)
    while True:
        try:
            if Stores(settings).pending():
                enqueue_update_job(connection, settings)
            SimpleWorker([settings.queue_name], connection=connection, serializer=JSONSerializer).work(with_scheduler=False)
            return
        except RedisError as exc:
            log.warning("Redis unreachable (%s); retrying in %.0fs", exc, settings.poll_interval_s)
            time.sleep(settings.poll_interval_s)
