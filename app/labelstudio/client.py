"""Task images and a project's annotations, fetched from the configured Label Studio with its token."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urljoin, urlsplit

import httpx
from pydantic import TypeAdapter, ValidationError

from app.errors import InvalidUpdate, LabelStudioUnavailable, TooLarge
from app.labelstudio.payloads import Task
from app.settings import Settings

TASKS = TypeAdapter(list[Task])


class _Budget:
    """Bytes that the images of one request may take together (as /predict's body limit does)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.left = limit, limit

    def take(self, n: int, what: str) -> None:
        self.left -= n
        if self.left < 0:
            raise TooLarge(f"the task images are over the limit of {self.limit} bytes together (at {what})")


class LabelStudioClient:
    def __init__(self, settings: Settings) -> None:
        self.base_url = (settings.labelstudio_url or "").rstrip("/") + "/"
        self.token = settings.labelstudio_token.get_secret_value() if settings.labelstudio_token else ""
        self.timeout_s = settings.labelstudio_timeout_s
        self.max_bytes = settings.max_request_bytes
        self.concurrency = settings.decode_threads

    def require_configured(self) -> None:
        if self.base_url == "/" or not self.token:
            raise LabelStudioUnavailable(
                "the Label Studio backend is not configured: set WARMTUNE_LABELSTUDIO_URL and WARMTUNE_LABELSTUDIO_TOKEN"
            )

    def url_of(self, ref: str) -> str:
        """The absolute URL of a task's image; only Label Studio's own host is fetched from (the token goes there)."""
        try:
            url = urljoin(self.base_url, ref)
            httpx.URL(url)
            same_host = urlsplit(url)[:2] == urlsplit(self.base_url)[:2]
        except (ValueError, httpx.InvalidURL):
            raise InvalidUpdate(f"image {ref[:200]!r} is not a URL") from None
        if not same_host:
            raise InvalidUpdate(f"image {ref[:200]!r} is not on Label Studio ({self.base_url}); warmtune fetches images from there only")
        return url

    def session(self) -> httpx.AsyncClient:
        self.require_configured()
        return httpx.AsyncClient(headers={"Authorization": f"Token {self.token}"}, timeout=self.timeout_s)

    async def images(self, refs: list[str]) -> list[bytes]:
        """Task images in order: a few fetched at once, max_request_bytes in all; the first error stops the rest."""
        urls = [self.url_of(ref) for ref in refs]
        budget, slots = _Budget(self.max_bytes), asyncio.Semaphore(self.concurrency)
        async with self.session() as session:

            async def fetch(url: str, ref: str) -> bytes:
                async with slots:
                    return await self._image(session, url, ref, budget)

            try:
                async with asyncio.TaskGroup() as group:
                    fetches = [group.create_task(fetch(url, ref)) for url, ref in zip(urls, refs, strict=True)]
            except ExceptionGroup as failed:
                raise failed.exceptions[0] from None
        return [f.result() for f in fetches]

    async def _image(self, session: httpx.AsyncClient, url: str, ref: str, budget: _Budget) -> bytes:
        what = f"image {ref[:200]}"
        with self._errors(what):
            async with session.stream("GET", url) as response:
                self._check(response, what)
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    budget.take(len(chunk), what)
                    data += chunk
                return bytes(data)

    async def annotated_tasks(self, project: int) -> list[Task]:
        """Every task of a project that has annotations, with them (Label Studio's JSON export)."""
        what = f"the annotations of project {project}"
        async with self.session() as session:
            with self._errors(what):
                response = await session.get(
                    urljoin(self.base_url, f"api/projects/{project}/export"), params={"exportType": "JSON", "download_all_tasks": "false"}
                )
                self._check(response, what)
        try:
            return TASKS.validate_json(response.content)
        except ValidationError as exc:
            raise LabelStudioUnavailable(
                f"Label Studio's export of project {project} is not a list of tasks: {exc.errors()[0]['msg']}"
            ) from None

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except httpx.HTTPError as exc:
            raise LabelStudioUnavailable(f"Label Studio did not answer for {what}: {type(exc).__name__}: {exc}") from None

    @staticmethod
    def _check(response: httpx.Response, what: str) -> None:
        if response.status_code in (401, 403):
            raise LabelStudioUnavailable(f"Label Studio refused warmtune's token for {what} ({response.status_code})")
        if response.status_code == 404:
            raise InvalidUpdate(f"Label Studio has no {what} (404)")
        if 300 <= response.status_code < 400:
            raise InvalidUpdate(
                f"Label Studio redirects {what} to {response.headers.get('location', '?')[:200]} (cloud storage?); "
                "warmtune fetches images from Label Studio only"
            )
        if response.status_code >= 400:
            raise LabelStudioUnavailable(f"Label Studio answered {response.status_code} for {what}")
