"""For operators: Prometheus metrics, liveness and readiness, and the API's own documentation.

With keys configured every route here but the two probes needs a valid key (any role).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.auth import require
from app.routes.deps import MetricsDep, ServerDep, StoresDep

router = APIRouter(tags=["ops"])
any_key = [Depends(require(None))]


@router.get("/openapi.json", include_in_schema=False, dependencies=any_key)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False, dependencies=any_key)
async def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="warmtune")


@router.get("/redoc", include_in_schema=False, dependencies=any_key)
async def redoc() -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title="warmtune")


@router.get("/metrics", response_class=Response, dependencies=any_key)
async def metrics(metrics: MetricsDep) -> Response:
    body = await run_in_threadpool(generate_latest, metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(server: ServerDep, stores: StoresDep) -> JSONResponse:
    """Ready while a model serves, or while there is none yet and the first update can be taken."""
    if server.current is not None:
        return JSONResponse({"status": "ready", "model_version": server.current.version})
    current = await run_in_threadpool(stores.snapshots.current)
    if current is None:
        return JSONResponse({"status": "ready", "model_version": None, "detail": "no model yet: waiting for a first update"})
    # The reason is in the server log (app.serving logs it); probes answer anyone, so it stays there.
    state = "failed to load; the server log says why" if current in server.broken else "still loading"
    return JSONResponse(
        {"status": "not ready", "model_version": None, "detail": f"version {current} {state}"},
        status_code=503,
    )
