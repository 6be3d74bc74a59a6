"""The FastAPI application: the served model, the update queue, the routes and their error handlers."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from app.auth import browser_request_refusal, roles_by_digest
from app.errors import Forbidden, WarmtuneError
from app.labelstudio.annotations import AnnotationIndex, retry_failed
from app.labelstudio.client import LabelStudioClient
from app.metrics import Metrics
from app.queue import EmbeddedQueue, RedisQueue, UpdateJob, UpdateQueue
from app.routes import labelstudio, models, ops, predict, updates
from app.routes.errors import domain_error, error_response, validation_error
from app.serving import ModelServer
from app.settings import Settings, get_settings
from app.stores import Stores

log = logging.getLogger(__name__)


def make_queue(settings: Settings, job: UpdateJob, stores: Stores, server: ModelServer, loop: asyncio.AbstractEventLoop) -> UpdateQueue:
    """Embedded worker thread without Redis; RQ with it. Either way a new version triggers a refresh.

    The embedded job shares this process's stores, so what it read from the stores stays read.
    """

    def refresh_soon() -> None:
        asyncio.run_coroutine_threadsafe(server.refresh(), loop)

    if settings.redis_url:
        return RedisQueue(settings, on_announce=refresh_soon)
    return EmbeddedQueue(settings, partial(job, stores=stores), on_step=refresh_soon)


async def poll(server: ModelServer, queue: UpdateQueue, stores: Stores, interval_s: float) -> None:
    """Converge on the snapshot pointer even when an announcement was missed, and leave no set unqueued."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await server.refresh()
            pending = len(await asyncio.to_thread(stores.pending))
            await asyncio.to_thread(queue.reconcile, pending)
        except Exception:
            log.exception("polling the stores failed")


async def retry_annotations(state: State, interval_s: float) -> None:
    """Label Studio sends each event once: an annotation whose image it could not give is tried again here."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            if await retry_failed(state.stores, state.annotation_index, state.labelstudio):
                await asyncio.to_thread(state.queue.submit)
        except Exception:
            log.exception("retrying Label Studio annotations failed")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    state.server = ModelServer(state.settings, state.stores, state.metrics)
    state.queue = make_queue(state.settings, state.update_job, state.stores, state.server, asyncio.get_running_loop())
    await state.server.refresh()  # a restarted replica serves at once
    # Everything loaded so far (torch, the app, the model) lives as long as the process: left to
    # the cyclic collector, each full collection walks all of it while holding the GIL, a pause of
    # tens of milliseconds that every request in flight waits out (bench/predict.py: p99 of
    # /predict at concurrency 32 about halved when frozen). Garbage is collected first, so none is frozen.
    gc.collect()
    gc.freeze()
    state.server.start()
    tasks = [
        asyncio.create_task(poll(state.server, state.queue, state.stores, state.settings.poll_interval_s), name="poller"),
    ]
    if state.settings.labelstudio_url:
        tasks.append(asyncio.create_task(retry_annotations(state, state.settings.labelstudio_retry_s), name="labelstudio-retry"))
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


class RefuseBrowserRequests:
    """Without API keys: serve loopback clients only, not web pages that reach loopback (see app.auth).

    Plain ASGI: starlette's BaseHTTPMiddleware (app.middleware("http")) costs a task and a body
    stream per request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
            reason = browser_request_refusal(scope["method"], headers)
            if reason is not None:
                await error_response(Forbidden(reason))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(update_job: UpdateJob, settings: Settings | None = None) -> FastAPI:
    """The service; update_job runs pending updates in embedded mode (in distributed mode RQ workers do)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="warmtune",
        summary="Online model updates: warm-started fine-tuning with replay, atomic model swaps.",
        lifespan=lifespan,
        # Served by app.routes.ops behind a key when keys are configured.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.roles_by_digest = roles_by_digest(settings.api_keys)
    app.state.update_job = update_job
    app.state.stores = Stores(settings)
    app.state.metrics = Metrics()
    app.state.metrics.watch_stores(app.state.stores)
    app.state.labelstudio = LabelStudioClient(settings)
    app.state.annotation_index = AnnotationIndex(settings.home / "labelstudio")
    app.add_exception_handler(WarmtuneError, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    if not settings.api_keys:
        app.add_middleware(RefuseBrowserRequests)
    for module in (predict, updates, models, ops, labelstudio):
        app.include_router(module.router)
    return app
