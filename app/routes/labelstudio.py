"""/labelstudio/*: the routes Label Studio calls on an ML backend (health, setup, predict, webhook).

Connect warmtune in Label Studio (Settings, Model) with the URL http://<warmtune>/labelstudio; the
README says how. What the events mean is in app.labelstudio.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from app.auth import require
from app.errors import InvalidUpdate, TooLarge
from app.labelstudio.annotations import apply_annotations, catch_up, delete_annotations
from app.labelstudio.payloads import PredictRequest, SetupRequest, WebhookEvent, image_reference, parse_label_config, pre_annotation
from app.routes.deps import AnnotationIndexDep, LabelStudioDep, QueueDep, ServerDep, SettingsDep, StoresDep
from app.routes.uploads import read_json

router = APIRouter(prefix="/labelstudio", tags=["label studio"])

ANNOTATED = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED")
DELETED = ("ANNOTATIONS_DELETED", "TASKS_DELETED")


@router.get("/health")
async def health() -> dict[str, str]:
    """Label Studio checks this before setup; it answers like /healthz, without a key."""
    return {"status": "UP", "model_class": "warmtune"}


@router.post("/setup", dependencies=[Depends(require("predict", basic=True))])
async def setup(request: Request, settings: SettingsDep, server: ServerDep, client: LabelStudioDep) -> dict[str, str]:
    """Check the project's labelling config and say which version serves (Label Studio calls it on connect)."""
    body = await read_json(request, settings, SetupRequest)
    client.require_configured()
    parse_label_config(body.label_config)
    version = server.served_version
    return {"model_version": "" if version is None else str(version)}


@router.post("/predict", dependencies=[Depends(require("predict", basic=True))])
async def predict(request: Request, settings: SettingsDep, server: ServerDep, client: LabelStudioDep) -> dict[str, Any]:
    """Pre-annotations for tasks, from the served version; no results before the first version."""
    body = await read_json(request, settings, PredictRequest)
    config = parse_label_config(body.label_config)
    if len(body.tasks) > settings.max_images_per_request:
        raise TooLarge(f"{len(body.tasks)} tasks in one request; the limit is {settings.max_images_per_request}")
    if server.current is None or not body.tasks:
        return {"results": []}
    images = await client.images([image_reference(task, config) for task in body.tasks])
    pixels = await server.prepare_all([(f"task {task.id}", data) for task, data in zip(body.tasks, images, strict=True)])
    version, predictions = await server.predict(pixels, top_k=len(server.require_model().classes))
    return {"results": [pre_annotation(p.top_k, config, version) for p in predictions]}


@router.post("/webhook", dependencies=[Depends(require("annotate", basic=True))])
async def webhook(
    request: Request, settings: SettingsDep, stores: StoresDep, queue: QueueDep, client: LabelStudioDep, index: AnnotationIndexDep
) -> dict[str, Any]:
    """Label Studio's events: annotations created or updated become update sets (an edit supersedes
    the old label), deleted or skipped ones are withdrawn, START_TRAINING brings every annotation up
    to date after missed events. Other events are acknowledged and ignored.

    One bad annotation of an event is answered with its 4xx after the others are stored; a
    training event lists its refusals and answers 200."""
    event = await read_json(request, settings, WebhookEvent)
    if event.action not in (*ANNOTATED, *DELETED, "START_TRAINING"):
        return {"action": event.action, "ignored": True}
    if event.project is None:
        raise InvalidUpdate(f"a {event.action} event needs its project (with label_config)")
    project = event.project.id
    if event.action in DELETED:
        annotations, tasks = [a.id for a in event.annotations], [t.id for t in event.tasks]
        deleted = (annotations, None) if event.action == "ANNOTATIONS_DELETED" else (None, tasks)
        withdrawn = await run_in_threadpool(delete_annotations, stores, index, project, *deleted)
        return {"action": event.action, "changes": {"withdrawn": withdrawn} if withdrawn else {}, "refused": []}
    try:
        if event.action == "START_TRAINING":
            changes, refused = await catch_up(stores, index, client, project, event.project.label_config)
        else:
            changes, refused = await apply_annotations(stores, index, client, project, event.annotated(), event.project.label_config)
            if refused:
                raise refused[0]
    finally:
        await run_in_threadpool(queue.submit)  # whatever was stored before an error is not left waiting
    return {"action": event.action, "changes": dict(+changes), "refused": [str(e) for e in refused]}
