"""What the routes need from the running app, as FastAPI dependencies: one place that says where
each comes from (the app's state, set up by app.api), so a route names what it uses."""

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


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_stores(request: Request) -> Stores:
    return request.app.state.stores


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_server(request: Request) -> ModelServer:
    return request.app.state.server


def get_queue(request: Request) -> UpdateQueue:
    return request.app.state.queue


def get_labelstudio(request: Request) -> LabelStudioClient:
    return request.app.state.labelstudio


def get_annotation_index(request: Request) -> AnnotationIndex:
    return request.app.state.annotation_index


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoresDep = Annotated[Stores, Depends(get_stores)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ServerDep = Annotated[ModelServer, Depends(get_server)]
QueueDep = Annotated[UpdateQueue, Depends(get_queue)]
LabelStudioDep = Annotated[LabelStudioClient, Depends(get_labelstudio)]
AnnotationIndexDep = Annotated[AnnotationIndex, Depends(get_annotation_index)]
