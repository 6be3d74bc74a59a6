"""The RQ side of distributed mode: the worker process and the job it runs."""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from redis.exceptions import RedisError
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from app.ledger import Ledger
from app.queue import announce_swap, enqueue_update_job, queued_key
from app.settings import Settings, get_settings
from worker.jobs import StepResult, apply_pending_updates

log = logging.getLogger(__name__)


_ledgers: dict[str, Ledger] = {}


def worker_ledger(settings: Settings) -> Ledger:
    """This worker process's ledger, kept from job to job (a worker serves one home for its life)."""
    key = settings.model_dump_json()
    if key not in _ledgers:
        _ledgers[key] = Ledger(settings)
    return _ledgers[key]


def run_update_job() -> list[dict[str, Any]]:
    """The RQ job: apply everything pending, announcing each new version to the API replicas."""
    settings = get_settings()
    connection = redis.Redis.from_url(settings.redis_url)
    connection.delete(queued_key(settings))  # sets stored from now on queue the next job

    def announce(result: StepResult) -> None:
        if result.version is not None:
            announce_swap(connection, settings, result.version)

    results = apply_pending_updates(settings, on_step=announce, ledger=worker_ledger(settings))
    return [{"status": r.status, "update_ids": r.update_ids, "version": r.version, "reason": r.reason} for r in results]


def run_rq_worker(settings: Settings) -> None:
    """An RQ worker for update jobs, queueing one first if sets are pending; survives Redis outages.

    SimpleWorker runs each job in this process: no fork, so a CUDA context stays valid, and a
    SIGKILL stops the job together with its worker.
    """
    connection = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2)
    while True:
        try:
            if Ledger(settings).pending():
                enqueue_update_job(connection, settings)
            SimpleWorker([settings.queue_name], connection=connection, serializer=JSONSerializer).work(with_scheduler=False)
            return
        except RedisError as exc:
            log.warning("Redis unreachable (%s); retrying in %.0fs", exc, settings.poll_interval_s)
            time.sleep(settings.poll_interval_s)
