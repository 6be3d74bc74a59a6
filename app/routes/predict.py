"""POST /predict: classify images with the served model, micro-batched with other requests."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel

from app.auth import require
from app.errors import InvalidParameter
from app.routes.deps import MetricsDep, ServerDep, SettingsDep
from app.routes.errors import status_of
from app.routes.uploads import IMAGE_FILES, multipart_body, read_images
from app.serving import Prediction

router = APIRouter(tags=["predict"])

IMAGES_BODY = multipart_body({"images": IMAGE_FILES}, **{"image/*": {"schema": {"type": "string", "format": "binary"}}})


class LabelScore(BaseModel):
    label: str
    score: float


class PredictionOut(BaseModel):
    label: str
    score: float
    top_k: list[LabelScore]


class PredictResponse(BaseModel):
    model_version: int
    predictions: list[PredictionOut]


def prediction_out(p: Prediction) -> PredictionOut:
    return PredictionOut(label=p.label, score=p.score, top_k=[LabelScore(label=label, score=score) for label, score in p.top_k])


@router.post(
    "/predict",
    response_model=PredictResponse,
    dependencies=[Depends(require("predict"))],
    openapi_extra=IMAGES_BODY,
    responses={503: {"description": "No model has any class yet"}},
)
async def predict(request: Request, settings: SettingsDep, server: ServerDep, metrics: MetricsDep, top_k: int = 5) -> Response:
    """Top-k labels for each image, in input order, and the model version that produced them."""
    started = time.perf_counter()
    status, version = 500, None
    try:
        if not 1 <= top_k <= settings.max_top_k:
            raise InvalidParameter(f"top_k must be between 1 and {settings.max_top_k}, got {top_k}")
        images = await read_images(request, settings)
        pixels = await server.prepare_all(images)
        version, predictions = await server.predict(pixels, top_k)
        status = 200
    except Exception as exc:
        status = status_of(exc)
        raise
    finally:
        metrics.predicted(status, version, started)
    body = PredictResponse(model_version=version, predictions=[prediction_out(p) for p in predictions])
    # pydantic's serializer (in Rust) rather than JSONResponse's model_dump + json.dumps
    return Response(body.model_dump_json(), media_type="application/json", headers={"X-Model-Version": str(version)})
