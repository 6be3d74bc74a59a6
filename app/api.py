"""The FastAPI application: the served model, the update queue and the routes, and the one place
where domain errors become HTTP answers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.errors import WarmtuneError
from app.ledger import Ledger
from app.metrics import Metrics
from app.queue import EmbeddedQueue, RedisQueue, UpdateJob, UpdateQueue
from app.routes import models, ops, predict, updates
from app.serving import ModelServer
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)


def make_queue(settings: Settings, job: UpdateJob, server: ModelServer, loop: asyncio.AbstractEventLoop) -> UpdateQueue:
    """Embedded worker thread without Redis; RQ with it. Either way a new version triggers a refresh."""

    def refresh_soon() -> None:
        asyncio.run_coroutine_threadsafe(server.refresh(), loop)

    if settings.redis_url:
        return RedisQueue(settings, on_announce=refresh_soon)
    return EmbeddedQueue(settings, job, on_step=refresh_soon)


async def poll(server: ModelServer, queue: UpdateQueue, ledger: Ledger, interval_s: float) -> None:
    """Converge on the snapshot pointer even when an announcement was missed, and leave no set unqueued."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await server.refresh()
            pending = len(await asyncio.to_thread(ledger.pending))
            await asyncio.to_thread(queue.reconcile, pending)
        except Exception:
            log.exception("polling the stores failed")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    state.server = ModelServer(state.settings, state.ledger, state.metrics)
    state.queue = make_queue(state.settings, state.update_job, state.server, asyncio.get_running_loop())
    await state.server.refresh()  # a restarted replica serves at once
    tasks = [
        asyncio.create_task(state.server.run_batches(), name="batcher"),
        asyncio.create_task(poll(state.server, state.queue, state.ledger, state.settings.poll_interval_s), name="poller"),
    ]
    state.queue.start()
    log.info("serving version %s; updates run %s", state.server.served_version, type(state.queue).__name__)
    try:
        yield
    finally:
        state.queue.stop()
        for task in tasks:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        state.server.close()


async def domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, WarmtuneError)
    return JSONResponse({"detail": str(exc)}, status_code=exc.status_code)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's parameter errors as one readable sentence, like every other error."""
    assert isinstance(exc, RequestValidationError)
    problems = ["{} {}: {}".format(e["loc"][0], ".".join(map(str, e["loc"][1:])), e["msg"]) for e in exc.errors()]
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)


def create_app(update_job: UpdateJob, settings: Settings | None = None) -> FastAPI:
    """The service; update_job runs pending updates in embedded mode (in distributed mode RQ workers do)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="warmtune",
        summary="Online model updates: warm-started fine-tuning with replay, atomic model swaps.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.update_job = update_job
    app.state.ledger = Ledger(settings)
    app.state.metrics = Metrics()
    app.state.metrics.watch_ledger(app.state.ledger)
    app.add_exception_handler(WarmtuneError, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    for module in (predict, updates, models, ops):
        app.include_router(module.router)
    return app
