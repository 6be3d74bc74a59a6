"""What the routes need from the running app, as FastAPI dependencies: one place that says where
each comes from (the app's state, set up by app.api), so a route names what it uses.

They are coroutines because FastAPI runs a plain function dependency in a worker thread: a
thread hand-off per dependency and request, to read an attribute."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.labelstudio.annotations import AnnotationIndex
from app.labelstudio.client import LabelStudioClient
from app.metrics import Metrics
from app.queue import UpdateQueue
from app.serving import ModelServer
from app.settings import Settings
from app.stores import Stores


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_stores(request: Request) -> Stores:
    return request.app.state.stores


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_server(request: Request) -> ModelServer:
    return request.app.state.server


async def get_queue(request: Request) -> UpdateQueue:
    return request.app.state.queue


async def get_labelstudio(request: Request) -> LabelStudioClient:
    return request.app.state.labelstudio


async def get_annotation_index(request: Request) -> AnnotationIndex:
    return request.app.state.annotation_index


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoresDep = Annotated[Stores, Depends(get_stores)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ServerDep = Annotated[ModelServer, Depends(get_server)]
QueueDep = Annotated[UpdateQueue, Depends(get_queue)]
LabelStudioDep = Annotated[LabelStudioClient, Depends(get_labelstudio)]
AnnotationIndexDep = Annotated[AnnotationIndex, Depends(get_annotation_index)]
