"""Reading request bodies within the limits: multipart forms, raw image bodies and JSON."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.errors import InvalidLabel, MalformedRequest, RequestTimeout, TooLarge, UnsupportedMediaType
from app.settings import Settings

IMAGE_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}


def multipart_body(properties: dict, **other_content: dict) -> dict:
    """openapi_extra documenting a multipart request body (FastAPI cannot infer it: we parse it ourselves)."""
    form = {"schema": {"type": "object", "properties": properties, "required": list(properties)}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": form, **other_content}}}


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def limited_body(request: Request, limit: int, timeout_s: float) -> AsyncIterator[bytes]:
    """The request body, refused with 413 as soon as it is known to be over the limit, and with
    408 if it has not all arrived within timeout_s (a client trickling bytes holds a connection)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    total = 0
    deadline = asyncio.get_running_loop().time() + timeout_s
    chunks = aiter(request.stream())
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s ({total} bytes came)") from None
        total += len(chunk)
        if total > limit:
            raise TooLarge(f"request body is over the limit of {limit} bytes")
        yield chunk


async def read_form(request: Request, settings: Settings) -> FormData:
    """Parse a multipart form of at most max_images_per_request files and max_request_bytes."""
    if content_type(request) != "multipart/form-data":
        raise UnsupportedMediaType(f"expected a multipart/form-data body, got {content_type(request) or 'no content type'}")
    limit = settings.max_images_per_request
    field_limit = 4 * settings.max_label_length + 1024  # a label at the length limit in UTF-8, with room to spare
    parser = MultiPartParser(
        request.headers,
        limited_body(request, settings.max_request_bytes, settings.body_timeout_s),
        max_files=limit,
        max_fields=limit + 16,  # one label per image, and a few others
        max_part_size=field_limit,
    )
    try:
        return await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many"):
            raise TooLarge(f"more than {limit} images (or fields) in one request") from None
        if exc.message.startswith("Part exceeded"):  # plain fields are labels
            raise InvalidLabel(
                f"a label field of over {field_limit} bytes; labels are at most {settings.max_label_length} characters"
            ) from None
        raise MalformedRequest(f"malformed multipart body: {exc.message}") from None


async def read_files(form: FormData, field: str, limit: int) -> list[tuple[str, bytes]]:
    """The file parts named field, as (name for messages, bytes)."""
    parts = form.getlist(field)
    if len(parts) > limit:
        raise TooLarge(f"{len(parts)} images in one request; the limit is {limit}")
    files = []
    for i, part in enumerate(parts):
        if not isinstance(part, UploadFile):
            raise MalformedRequest(f"{field}[{i}] must be a file part, not a plain form field")
        name = f"{field}[{i}]" + (f" ({part.filename})" if part.filename else "")
        files.append((name, await part.read()))
    return files


M = TypeVar("M", bound=BaseModel)


async def read_json(request: Request, settings: Settings, model: type[M]) -> M:
    """A JSON body within the size and time limits, validated as model (422 in FastAPI's shape otherwise)."""
    body = b"".join([chunk async for chunk in limited_body(request, settings.max_request_bytes, settings.body_timeout_s)])
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError([e | {"loc": ("body", *e["loc"])} for e in errors]) from None


async def read_images(request: Request, settings: Settings) -> list[tuple[str, bytes]]:
    """Images of a predict request: file parts named 'images', or one raw image/* body."""
    kind = content_type(request)
    if kind.startswith("image/"):
        body = b"".join([chunk async for chunk in limited_body(request, settings.max_request_bytes, settings.body_timeout_s)])
        return [("image", body)]
    if kind != "multipart/form-data":
        raise UnsupportedMediaType(
            f"send multipart/form-data with 'images' file parts, or one image/* body; got {kind or 'no content type'}"
        )
    form = await read_form(request, settings)
    try:
        images = await read_files(form, "images", settings.max_images_per_request)
    finally:
        await form.close()
    if not images:
        raise MalformedRequest("no images: send one or more file parts named 'images'")
    return images
