"""/labelstudio/*: the routes Label Studio calls on an ML backend (health, setup, predict, webhook).

Connect warmtune in Label Studio (Settings, Model) with the URL http://<warmtune>/labelstudio; the
README says how. What the calls mean is in app.labelstudio.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from app.auth import require
from app.errors import IdempotencyConflict, InvalidImage, InvalidLabel, InvalidUpdate, TooLarge
from app.labelstudio import (
    Annotation,
    AnnotationIndex,
    Change,
    LabelConfig,
    LabelStudioClient,
    PredictRequest,
    SetupRequest,
    Task,
    WebhookEvent,
    annotation_label,
    commit_annotation,
    image_reference,
    is_current,
    parse_label_config,
    pre_annotation,
    withdraw_annotations,
)
from app.ledger import Ledger
from app.routes.deps import AnnotationIndexDep, LabelStudioDep, LedgerDep, QueueDep, ServerDep, SettingsDep
from app.routes.uploads import read_json

router = APIRouter(prefix="/labelstudio", tags=["label studio"])

ANNOTATED = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED")
# What one bad annotation can raise; a catch-up reports it and goes on.
REFUSALS = (InvalidUpdate, InvalidImage, InvalidLabel, TooLarge, IdempotencyConflict)


def model_version(version: int | None) -> str:
    return "" if version is None else str(version)


@router.get("/health")
async def health() -> dict[str, str]:
    """Label Studio checks this before setup; it answers like /healthz, without a key."""
    return {"status": "UP", "model_class": "warmtune"}


@router.post("/setup", dependencies=[Depends(require("predict"))])
async def setup(request: Request, settings: SettingsDep, server: ServerDep, client: LabelStudioDep) -> dict[str, str]:
    """Check the project's labelling config and say which version serves (Label Studio calls it on connect)."""
    body = await read_json(request, settings, SetupRequest)
    client.require_configured()
    parse_label_config(body.label_config)
    return {"model_version": model_version(server.served_version)}


@router.post("/predict", dependencies=[Depends(require("predict"))])
async def predict(request: Request, settings: SettingsDep, server: ServerDep, client: LabelStudioDep) -> dict[str, Any]:
    """Pre-annotations for tasks, from the served version; no results before the first version."""
    body = await read_json(request, settings, PredictRequest)
    config = parse_label_config(body.label_config)
    if len(body.tasks) > settings.max_images_per_request:
        raise TooLarge(f"{len(body.tasks)} tasks in one request; the limit is {settings.max_images_per_request}")
    if server.current is None or not body.tasks:
        return {"results": []}
    refs = [image_reference(task, config) for task in body.tasks]
    async with client.session() as session:
        images = await asyncio.gather(*(client.image(session, ref) for ref in refs))
    pixels = await server.prepare_all([(f"task {task.id}", data) for task, data in zip(body.tasks, images, strict=True)])
    version, predictions = await server.predict(pixels, top_k=len(server.require_model().classes))
    return {"results": [pre_annotation(p.top_k, config, version) for p in predictions]}


@router.post("/webhook", dependencies=[Depends(require("annotate"))])
async def webhook(
    request: Request, settings: SettingsDep, ledger: LedgerDep, queue: QueueDep, client: LabelStudioDep, index: AnnotationIndexDep
) -> dict[str, Any]:
    """Label Studio's events: annotations created or updated become update sets (an edit supersedes
    the old label), deleted or skipped ones are withdrawn, START_TRAINING stores every annotation a
    missed event left out. Other events are acknowledged and ignored."""
    event = await read_json(request, settings, WebhookEvent)
    if event.action not in (*ANNOTATED, "ANNOTATIONS_DELETED", "TASKS_DELETED", "START_TRAINING"):
        return {"action": event.action, "ignored": True}
    if event.project is None:
        raise InvalidUpdate(f"a {event.action} event needs its project (with label_config)")
    project = event.project.id
    changes: Counter[str] = Counter()
    refused: list[str] = []
    if event.action in ANNOTATED:
        config = parse_label_config(event.project.label_config)
        for annotation, task in annotations_with_tasks(event):
            changes[await apply_annotation(ledger, index, client, project, task, annotation, config)] += 1
    elif event.action == "START_TRAINING":
        changes, refused = await catch_up(ledger, index, client, project, parse_label_config(event.project.label_config))
    else:
        paths = [
            path
            for item in (event.annotations or event.tasks)
            for path in (index.of_annotation(project, item.id) if event.annotations else index.of_task(project, item.id))
        ]
        why = "deleted in Label Studio"
        changes["withdrawn"] = await run_in_threadpool(withdraw_annotations, ledger, index, project, paths, why)
    if changes["stored"] or changes["restored"]:
        await run_in_threadpool(queue.submit)
    return {"action": event.action, "changes": dict(+changes), "refused": refused}


def annotations_with_tasks(event: WebhookEvent) -> list[tuple[Annotation, Task]]:
    annotations = event.annotation if isinstance(event.annotation, list) else [event.annotation] if event.annotation else []
    tasks = event.task if isinstance(event.task, list) else [event.task] if event.task else []
    by_id = {task.id: task for task in tasks}
    pairs = []
    for annotation in annotations:
        task = by_id.get(annotation.task) if annotation.task is not None else tasks[0] if len(tasks) == 1 else None
        if task is None:
            raise InvalidUpdate(f"annotation {annotation.id} comes without its task")
        pairs.append((annotation, task))
    return pairs


async def apply_annotation(
    ledger: Ledger, index: AnnotationIndex, client: LabelStudioClient, project: int, task: Task, annotation: Annotation, config: LabelConfig
) -> Change:
    """Make the update set standing for an annotation the one its latest revision says."""
    label = annotation_label(annotation, config)
    path = index.path(project, task.id, annotation.id)
    if label is None:
        withdrawn = await run_in_threadpool(withdraw_annotations, ledger, index, project, [path], "skipped or left without a choice")
        return "withdrawn" if withdrawn else "unchanged"
    if await run_in_threadpool(is_current, index, path, label, annotation.updated_at, ledger):
        return "unchanged"
    async with client.session() as session:
        image = await client.image(session, image_reference(task, config))
    return await run_in_threadpool(commit_annotation, ledger, index, project, task.id, annotation, label, image)


async def catch_up(
    ledger: Ledger, index: AnnotationIndex, client: LabelStudioClient, project: int, config: LabelConfig
) -> tuple[Counter[str], list[str]]:
    """Bring every annotation of the project up to date (events missed while warmtune or Label
    Studio was down); withdraw what Label Studio no longer has. One bad annotation does not stop it."""
    async with client.session() as session:
        tasks = await client.annotated_tasks(session, project)
    changes: Counter[str] = Counter()
    refused = []
    seen = set()
    for task in tasks:
        for annotation in task.annotations:
            seen.add(index.path(project, task.id, annotation.id))
            try:
                changes[await apply_annotation(ledger, index, client, project, task, annotation, config)] += 1
            except REFUSALS as exc:
                refused.append(str(exc))
    gone = [path for path in index.of_project(project) if path not in seen]
    changes["withdrawn"] += await run_in_threadpool(withdraw_annotations, ledger, index, project, gone, "no longer in Label Studio")
    return changes, refused
