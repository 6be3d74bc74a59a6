"""POST /updates stores a labelled update set durably and queues it; GET /updates/{id} reports on it."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from app.auth import require
from app.errors import MalformedRequest
from app.routes.deps import QueueDep, SettingsDep, StoresDep
from app.routes.uploads import IMAGE_FILES, multipart_body, read_files, read_form
from app.stores import Status, UpdateStatus

router = APIRouter(tags=["updates"])

UPDATE_BODY = multipart_body(
    {"images": IMAGE_FILES, "labels": {"type": "array", "items": {"type": "string"}, "description": "One per image, in order."}}
)


class UpdateAccepted(BaseModel):
    update_id: str
    status: Status
    samples: int
    new_classes: list[str]


class AttemptOut(BaseModel):
    status: Literal["applied", "rejected", "failed", "requeued", "withdrawn", "restored"]
    at: float
    model_version: int | None
    reason: str | None
    metrics: dict[str, Any]


class UpdateStatusOut(BaseModel):
    update_id: str
    status: Status
    samples: int
    model_version: int | None
    metrics: dict[str, Any]
    error: str | None
    attempts: list[AttemptOut]

    @classmethod
    def of(cls, status: UpdateStatus) -> UpdateStatusOut:
        attempts = [AttemptOut(**a.as_dict()) for a in status.attempts]
        return cls(**{**status.__dict__, "attempts": attempts})


@router.post("/updates", status_code=202, response_model=UpdateAccepted, openapi_extra=UPDATE_BODY)
async def post_update(
    request: Request,
    response: Response,
    settings: SettingsDep,
    stores: StoresDep,
    queue: QueueDep,
    caller: str = Depends(require("annotate")),
    idempotency_key: str | None = Header(None, max_length=200),
) -> UpdateAccepted:
    """Validate and store an update set (durably, before answering), then queue the update job.

    A repeated Idempotency-Key with the same payload answers with the stored set and its current
    status; with another payload, 409. Keys are scoped to the caller's API key.
    """
    form = await read_form(request, settings)
    try:
        images = await read_files(form, "images", settings.max_images_per_request)
        labels = form.getlist("labels")
    finally:
        await form.close()
    if not all(isinstance(label, str) for label in labels):
        raise MalformedRequest("labels must be plain form fields, not files")
    update, created = await run_in_threadpool(
        stores.samples.add,
        [data for _, data in images],
        labels,
        stores.classes(),
        idempotency_key,
        [name for name, _ in images],
        caller,
    )
    if created:
        await run_in_threadpool(queue.submit)
        status: Status = "queued"
    else:
        status = (await run_in_threadpool(stores.status, update.update_id)).status
    response.headers["Location"] = f"/updates/{update.update_id}"
    return UpdateAccepted(update_id=update.update_id, status=status, samples=len(update), new_classes=list(update.new_classes))


@router.get("/updates/{update_id}", response_model=UpdateStatusOut, dependencies=[Depends(require("annotate"))])
async def get_update(update_id: str, stores: StoresDep) -> UpdateStatusOut:
    """Status of an update set, with the step's metrics (holdout accuracies, iterations, seconds) and every attempt."""
    status = await run_in_threadpool(stores.status, update_id)
    return UpdateStatusOut.of(status)


@router.post(
    "/updates/{update_id}/retry",
    status_code=202,
    response_model=UpdateStatusOut,
    dependencies=[Depends(require("annotate"))],
)
async def retry_update(response: Response, update_id: str, stores: StoresDep, queue: QueueDep) -> UpdateStatusOut:
    """Queue a rejected, failed or orphaned update set again (409 for any other)."""
    await run_in_threadpool(stores.requeue, update_id, "retried on request")
    await run_in_threadpool(queue.submit)
    response.headers["Location"] = f"/updates/{update_id}"
    return UpdateStatusOut.of(await run_in_threadpool(stores.status, update_id))
