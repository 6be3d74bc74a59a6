"""warmtune as a Label Studio ML backend: annotations become update sets, pre-annotations come from
the served version (routes in app.routes.labelstudio).

Each annotation is one update set of one image, stored under an idempotency key made of its
project, task, annotation and label: a webhook sent twice stores nothing new. An edit that changes
the label stores the image under the new label and withdraws the set of the old one
(Ledger.withdraw); an edit back restores it; a deleted or skipped annotation withdraws its set. So
an annotation has at most one label in the replay memory. Which set stands for an annotation now
is one small JSON file per annotation under WARMTUNE_HOME/labelstudio, changed under a file lock.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit
from xml.etree import ElementTree

import httpx
from pydantic import BaseModel, ConfigDict, Field

from app.errors import InvalidLabelConfig, InvalidUpdate, LabelStudioUnavailable, TooLarge
from app.files import atomic_write_json, read_json
from app.ledger import Ledger
from app.settings import Settings

KEY_OWNER = "labelstudio"  # idempotency keys of annotations are scoped to this, whichever API key Label Studio sends


# What Label Studio sends (only the fields warmtune reads; the rest is ignored) --------------------


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Annotation(_Payload):
    id: int
    task: int | None = None
    result: list[dict[str, Any]] = []
    was_cancelled: bool = False
    updated_at: datetime | None = None


class Task(_Payload):
    id: int
    data: dict[str, Any]
    annotations: list[Annotation] = []


class Project(_Payload):
    id: int
    label_config: str


class ById(_Payload):
    id: int


class WebhookEvent(_Payload):
    action: str
    project: Project | None = None
    annotation: Annotation | list[Annotation] | None = None
    task: Task | list[Task] | None = None
    annotations: list[ById] = []
    tasks: list[ById] = []


class PredictRequest(_Payload):
    tasks: list[Task]
    label_config: str


class SetupRequest(_Payload):
    project: str = ""
    label_config: str = Field(alias="schema")


# The labelling config -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelConfig:
    """The part of a project's labelling config warmtune uses: one image, classified by one choice."""

    image_name: str  # the <Image> tag's name (the to_name of results)
    image_key: str  # the task data field holding the image's URL
    choices_name: str  # the <Choices> tag's name (the from_name of results)
    classes: tuple[str, ...]


def parse_label_config(xml: str) -> LabelConfig:
    """The image and single-choice class of a labelling config; InvalidLabelConfig for anything else."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as exc:
        raise InvalidLabelConfig(f"the label config is not XML: {exc}") from None
    images = {tag.get("name"): tag.get("value", "") for tag in root.iter("Image")}
    for choices in root.iter("Choices"):
        target = choices.get("toName", "")
        value = images.get(target, "")
        if not value.startswith("$") or not choices.get("name"):
            continue
        if choices.get("choice", "single") != "single":
            raise InvalidLabelConfig(f"<Choices name={choices.get('name')!r}> allows several choices; warmtune takes one class per image")
        classes = tuple(c.get("value", "") for c in choices.iter("Choice") if c.get("value"))
        return LabelConfig(target, value[1:], choices.get("name", ""), classes)
    raise InvalidLabelConfig(
        "warmtune classifies images: the label config needs a <Choices name=...> whose toName is an "
        '<Image name=... value="$field"/>'
    )


def annotation_label(annotation: Annotation, config: LabelConfig) -> str | None:
    """The class an annotation gives its image; None when it gives none (skipped, or no choice made)."""
    if annotation.was_cancelled:
        return None
    chosen = [
        choice
        for item in annotation.result
        if item.get("type") == "choices" and item.get("from_name") == config.choices_name
        for choice in (item.get("value") or {}).get("choices") or []
    ]
    if len(chosen) > 1:
        raise InvalidUpdate(f"annotation {annotation.id} makes {len(chosen)} choices; warmtune takes one class per image")
    if chosen and not isinstance(chosen[0], str):
        raise InvalidUpdate(f"annotation {annotation.id}: a choice must be a string, got {chosen[0]!r}")
    return chosen[0] if chosen else None


def image_reference(task: Task, config: LabelConfig) -> str:
    ref = task.data.get(config.image_key)
    if not isinstance(ref, str) or not ref:
        raise InvalidUpdate(f"task {task.id} has no image URL in data.{config.image_key}")
    return ref


def pre_annotation(ranked: list[tuple[str, float]], config: LabelConfig, version: int) -> dict[str, Any]:
    """A prediction in Label Studio's format: the best-ranked label that is one of the project's
    choices (none if the served version knows none of them), with warmtune's version."""
    label, score = next(((label, score) for label, score in ranked if label in config.classes), (None, 0.0))
    result = [{"from_name": config.choices_name, "to_name": config.image_name, "type": "choices", "value": {"choices": [label]}}]
    return {"result": result if label is not None else [], "score": score, "model_version": str(version)}


# Label Studio's HTTP API ------------------------------------------------------------------------


class LabelStudioClient:
    """Task images and annotated tasks, fetched from the configured Label Studio with its token."""

    def __init__(self, settings: Settings) -> None:
        self.base_url = (settings.labelstudio_url or "").rstrip("/") + "/"
        self.token = settings.labelstudio_token.get_secret_value() if settings.labelstudio_token else ""
        self.timeout_s = settings.labelstudio_timeout_s
        self.max_bytes = settings.max_request_bytes

    def require_configured(self) -> None:
        if self.base_url == "/" or not self.token:
            raise LabelStudioUnavailable(
                "the Label Studio backend is not configured: set WARMTUNE_LABELSTUDIO_URL and WARMTUNE_LABELSTUDIO_TOKEN"
            )

    def url_of(self, ref: str) -> str:
        """The absolute URL of a task's image; only Label Studio's own host is fetched from (the token goes there)."""
        url = urljoin(self.base_url, ref)
        if urlsplit(url)[:2] != urlsplit(self.base_url)[:2]:
            raise InvalidUpdate(f"image {ref[:200]!r} is not on Label Studio ({self.base_url}); warmtune fetches images from there only")
        return url

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except httpx.HTTPError as exc:
            raise LabelStudioUnavailable(f"Label Studio did not answer for {what}: {type(exc).__name__}: {exc}") from None

    def session(self) -> httpx.AsyncClient:
        self.require_configured()
        return httpx.AsyncClient(headers={"Authorization": f"Token {self.token}"}, timeout=self.timeout_s)

    async def image(self, session: httpx.AsyncClient, ref: str) -> bytes:
        """The bytes of a task's image, at most max_request_bytes."""
        url = self.url_of(ref)
        with self._errors(f"image {ref[:200]}"):
            async with session.stream("GET", url) as response:
                self._check(response, f"image {ref[:200]}")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise TooLarge(f"image {ref[:200]} is over the limit of {self.max_bytes} bytes")
                return bytes(data)

    async def annotated_tasks(self, session: httpx.AsyncClient, project: int) -> list[Task]:
        """Every task of a project that has annotations, with them (Label Studio's JSON export)."""
        url = urljoin(self.base_url, f"api/projects/{project}/export?exportType=JSON&download_all_tasks=false")
        with self._errors(f"the annotations of project {project}"):
            response = await session.get(url)
            self._check(response, f"the annotations of project {project}")
            return [Task.model_validate(task) for task in response.json()]

    @staticmethod
    def _check(response: httpx.Response, what: str) -> None:
        if response.status_code in (401, 403):
            raise LabelStudioUnavailable(f"Label Studio refused warmtune's token for {what} ({response.status_code})")
        if response.status_code == 404:
            raise InvalidUpdate(f"Label Studio has no {what} (404)")
        if response.status_code >= 400:
            raise LabelStudioUnavailable(f"Label Studio answered {response.status_code} for {what}")


# Which update set stands for each annotation ----------------------------------------------------

Change = Literal["stored", "unchanged", "stale", "withdrawn", "restored"]


def revision_of(updated_at: datetime | None) -> datetime:
    """When an annotation was last changed, in UTC (a time without a zone is taken as UTC; none: the epoch)."""
    if updated_at is None:
        return datetime.fromtimestamp(0, timezone.utc)
    return updated_at if updated_at.tzinfo else updated_at.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Standing:
    """The update set that stands for an annotation now: its label, and the revision it came from."""

    update_id: str
    label: str
    updated_at: str

    @property
    def revision(self) -> datetime:
        return revision_of(datetime.fromisoformat(self.updated_at))


class AnnotationIndex:
    """One JSON file per annotation: WARMTUNE_HOME/labelstudio/project-P/task-T/annotation-A.json."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, project: int, task: int, annotation: int) -> Path:
        return self.root / f"project-{project}" / f"task-{task}" / f"annotation-{annotation}.json"

    def get(self, path: Path) -> Standing | None:
        try:
            return Standing(**read_json(path))
        except FileNotFoundError:
            return None

    def put(self, path: Path, standing: Standing) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, standing.__dict__)

    def of_annotation(self, project: int, annotation: int) -> list[Path]:
        return sorted((self.root / f"project-{project}").glob(f"task-*/annotation-{annotation}.json"))

    def of_project(self, project: int) -> list[Path]:
        return sorted((self.root / f"project-{project}").glob("task-*/annotation-*.json"))

    def of_task(self, project: int, task: int) -> list[Path]:
        return sorted((self.root / f"project-{project}" / f"task-{task}").glob("annotation-*.json"))

    @contextmanager
    def locked(self, project: int) -> Iterator[None]:
        """One change at a time per project, across API replicas sharing WARMTUNE_HOME."""
        directory = self.root / f"project-{project}"
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def is_current(index: AnnotationIndex, path: Path, label: str, updated_at: datetime | None, ledger: Ledger) -> bool:
    """Whether an annotation's revision is already what stands for it (nothing to fetch or store)."""
    standing = index.get(path)
    return (
        standing is not None
        and standing.label == label
        and standing.revision >= revision_of(updated_at)
        and ledger.status(standing.update_id).status != "withdrawn"
    )


def commit_annotation(
    ledger: Ledger, index: AnnotationIndex, project: int, task: int, annotation: Annotation, label: str, image: bytes
) -> Change:
    """Store an annotation's image under its label and make that set the one standing for it.

    Ordered so that a crash anywhere leaves what a repeat of the same call completes: the new set
    first, then the old one withdrawn, then the index.
    """
    path = index.path(project, task, annotation.id)
    revision = revision_of(annotation.updated_at)
    with index.locked(project):
        standing = index.get(path)
        if standing is not None and standing.revision > revision:
            return "stale"  # a newer revision arrived first
        key = f"project {project} task {task} annotation {annotation.id} label {label}"
        update, created = ledger.samples.add([image], [label], ledger.classes(), key, [f"task {task}"], KEY_OWNER)
        restored = not created and ledger.restore(update.update_id, f"annotation {annotation.id} of task {task} says {label!r} again")
        if standing is not None and standing.update_id != update.update_id:
            ledger.withdraw(standing.update_id, f"annotation {annotation.id} of task {task} now says {label!r}")
        index.put(path, Standing(update.update_id, label, revision.isoformat()))
    return "stored" if created else "restored" if restored else "unchanged"


def withdraw_annotations(ledger: Ledger, index: AnnotationIndex, project: int, paths: list[Path], why: str) -> int:
    """Withdraw the sets standing for these annotations (deleted, skipped, emptied); returns how many."""
    with index.locked(project):
        standings = [(path, index.get(path)) for path in paths]
        for path, standing in standings:
            if standing is not None:
                ledger.withdraw(standing.update_id, f"{path.stem.replace('-', ' ')} of {path.parent.name.replace('-', ' ')}: {why}")
                path.unlink(missing_ok=True)
    return sum(standing is not None for _, standing in standings)
