"""GET /models lists the versions; POST /models/{version}/promote makes one current (rollback or
forward); POST and DELETE /models/{version}/pin keep a version's weights from retention or release them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from app.auth import require
from app.routes.deps import QueueDep, ServerDep, StoresDep
from app.snapshots import SnapshotStore

router = APIRouter(tags=["models"])


class ModelVersionOut(BaseModel):
    version: int
    parent: int | None
    classes: list[str]
    created_at: float
    update_ids: list[str]
    metrics: dict[str, Any]
    has_weights: bool  # False once retention pruned them: it can no longer be served or promoted
    pinned: bool


class ModelsOut(BaseModel):
    current: int | None
    versions: list[ModelVersionOut]


def list_models(snapshots: SnapshotStore) -> ModelsOut:
    versions = [
        ModelVersionOut(**snapshots.meta(v).model_dump(), has_weights=snapshots.has_weights(v), pinned=snapshots.pinned(v))
        for v in snapshots.versions()
    ]
    return ModelsOut(current=snapshots.current(), versions=versions)


@router.get("/models", response_model=ModelsOut, dependencies=[Depends(require("predict"))])
async def get_models(stores: StoresDep) -> ModelsOut:
    return await run_in_threadpool(list_models, stores.snapshots)


@router.post("/models/{version}/promote", response_model=ModelsOut, dependencies=[Depends(require("admin"))])
async def promote(version: int, stores: StoresDep, server: ServerDep, queue: QueueDep) -> ModelsOut:
    """Make an existing version current; this replica loads and serves it before answering, the others follow."""
    await server.promote(version)  # 409, and nothing moves, if it does not load here
    await run_in_threadpool(queue.announce, version)
    return await run_in_threadpool(list_models, stores.snapshots)


async def set_pin(snapshots: SnapshotStore, version: int, pinned: bool) -> ModelsOut:
    await run_in_threadpool(snapshots.pin, version, pinned)
    return await run_in_threadpool(list_models, snapshots)


@router.post("/models/{version}/pin", response_model=ModelsOut, dependencies=[Depends(require("admin"))])
async def pin(version: int, stores: StoresDep) -> ModelsOut:
    """Keep this version's weights whatever retention says (409 if they are already pruned)."""
    return await set_pin(stores.snapshots, version, True)


@router.delete("/models/{version}/pin", response_model=ModelsOut, dependencies=[Depends(require("admin"))])
async def unpin(version: int, stores: StoresDep) -> ModelsOut:
    """Let retention prune this version's weights again once it is old enough."""
    return await set_pin(stores.snapshots, version, False)
