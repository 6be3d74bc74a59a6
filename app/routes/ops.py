"""For operators: Prometheus metrics, liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["ops"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    body = await run_in_threadpool(generate_latest, request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready while a model serves, or while there is none yet and the first update can be taken."""
    server = request.app.state.server
    if server.current is not None:
        return JSONResponse({"status": "ready", "model_version": server.current.version})
    current = await run_in_threadpool(request.app.state.ledger.snapshots.current)
    if current is None:
        return JSONResponse({"status": "ready", "model_version": None, "detail": "no model yet: waiting for a first update"})
    reason = server.broken.get(current, "still loading")
    return JSONResponse(
        {"status": "not ready", "model_version": None, "detail": f"version {current} is not loaded: {reason}"},
        status_code=503,
    )
