"""Where domain errors become HTTP answers: one table of statuses, and FastAPI's own errors in the same shape."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.errors import (
    Forbidden,
    IdempotencyConflict,
    InvalidImage,
    InvalidLabel,
    InvalidLabelConfig,
    InvalidParameter,
    InvalidUpdate,
    LabelStudioUnavailable,
    MalformedRequest,
    NoModel,
    NotRetryable,
    RequestTimeout,
    TooLarge,
    Unauthorized,
    UnknownUpdate,
    UnknownVersion,
    UnsupportedMediaType,
    VersionPruned,
    VersionUnloadable,
    WarmtuneError,
)

# The one place where domain errors become HTTP statuses; an error not listed is a 500.
HTTP_STATUS: dict[type[WarmtuneError], int] = {
    MalformedRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    UnknownUpdate: 404,
    UnknownVersion: 404,
    IdempotencyConflict: 409,
    RequestTimeout: 408,
    NotRetryable: 409,
    VersionPruned: 409,
    VersionUnloadable: 409,
    TooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidParameter: 422,
    InvalidImage: 422,
    InvalidLabel: 422,
    InvalidUpdate: 422,
    InvalidLabelConfig: 422,
    LabelStudioUnavailable: 503,
    NoModel: 503,
}


def status_of(exc: BaseException) -> int:
    """The HTTP status an exception is answered with."""
    return next((code for kind, code in HTTP_STATUS.items() if isinstance(exc, kind)), 500)


def error_response(exc: WarmtuneError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status_of(exc), headers=exc.headers)


async def domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, WarmtuneError)
    return error_response(exc)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's parameter errors as one readable sentence, like every other error."""
    assert isinstance(exc, RequestValidationError)
    problems = ["{} {}: {}".format(e["loc"][0], ".".join(map(str, e["loc"][1:])), e["msg"]) for e in exc.errors()]
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)
