"""Which update set stands for each Label Studio annotation, and Label Studio's events applied to it.

One small JSON file per annotation, WARMTUNE_HOME/labelstudio/project-P/annotation-A.json, says
which set stands for it now, from which revision, or that nothing does (skipped, emptied,
deleted). Changes happen under a file lock per project and in revision order: an event older than
what the file holds changes nothing, and a deletion is final (Label Studio never reuses an id),
so a late event cannot bring back a label that was taken away. An annotation whose image could not
be fetched (Label Studio down) is kept under failed/ and tried again by retry_failed.
"""

from __future__ import annotations

import fcntl
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from fastapi.concurrency import run_in_threadpool

from app.errors import IdempotencyConflict, InvalidImage, InvalidLabel, InvalidUpdate, LabelStudioUnavailable, TooLarge, WarmtuneError
from app.files import atomic_write_json, read_json
from app.labelstudio.client import LabelStudioClient
from app.labelstudio.payloads import Annotation, LabelConfig, Task, annotation_label, image_reference, parse_label_config
from app.stores import Stores

log = logging.getLogger(__name__)

KEY_OWNER = "labelstudio"  # idempotency keys of annotations are scoped to this, whichever API key Label Studio sends
# What one bad annotation can raise: it is refused, and the others of its event go on.
REFUSALS = (InvalidUpdate, InvalidImage, InvalidLabel, TooLarge, IdempotencyConflict)

Change = Literal["stored", "unchanged", "stale", "withdrawn", "restored"]


def revision_of(updated_at: datetime | None) -> datetime:
    """When an annotation was last changed, in UTC (a time without a zone is taken as UTC; none: now)."""
    if updated_at is None:
        return datetime.now(UTC)
    return updated_at if updated_at.tzinfo else updated_at.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Standing:
    """What stands for an annotation: a set and its label, or nothing (update_id None), as of a revision."""

    task: int | None
    update_id: str | None
    label: str | None
    updated_at: str
    deleted: bool = False  # deleted in Label Studio: final

    @property
    def revision(self) -> datetime:
        return revision_of(datetime.fromisoformat(self.updated_at))

    def supersedes(self, revision: datetime) -> bool:
        """Whether an event of this revision comes too late to change anything."""
        return self.deleted or self.revision > revision


class AnnotationIndex:
    def __init__(self, root: Path) -> None:
        self.root = root

    def project_dir(self, project: int) -> Path:
        return self.root / f"project-{project}"

    def path(self, project: int, annotation: int) -> Path:
        return self.project_dir(project) / f"annotation-{annotation}.json"

    def get(self, project: int, annotation: int) -> Standing | None:
        try:
            return Standing(**read_json(self.path(project, annotation)))
        except FileNotFoundError:
            return None

    def put(self, project: int, annotation: int, standing: Standing) -> None:
        atomic_write_json(self.path(project, annotation), asdict(standing))

    def all(self, project: int) -> dict[int, Standing]:
        """Every annotation of a project warmtune has heard of (read for task deletions and catch-ups only)."""
        paths = self.project_dir(project).glob("annotation-*.json")
        return {int(p.stem.removeprefix("annotation-")): Standing(**read_json(p)) for p in paths}

    @contextmanager
    def locked(self, project: int) -> Iterator[None]:
        """One change at a time per project, across API replicas sharing WARMTUNE_HOME."""
        self.project_dir(project).mkdir(parents=True, exist_ok=True)
        with open(self.project_dir(project) / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # Annotations whose image could not be fetched, to be tried again

    def failed_path(self, project: int, annotation: int) -> Path:
        return self.project_dir(project) / "failed" / f"annotation-{annotation}.json"

    def keep_failed(self, project: int, task: Task, annotation: Annotation, label_config: str) -> None:
        path = self.failed_path(project, annotation.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            path, {"task": task.model_dump(mode="json"), "annotation": annotation.model_dump(mode="json"), "label_config": label_config}
        )

    def failed(self) -> Iterator[tuple[int, Path]]:
        for path in sorted(self.root.glob("project-*/failed/annotation-*.json")):
            yield int(path.parent.parent.name.removeprefix("project-")), path


def confirm_label(stores: Stores, index: AnnotationIndex, project: int, annotation: Annotation, label: str) -> Change | None:
    """What an event changes without its image: "stale" when a later revision (or a deletion) is
    already in, "unchanged" when its label already stands (its revision noted); None when the
    image has to be fetched and stored."""
    revision = revision_of(annotation.updated_at)
    with index.locked(project):
        standing = index.get(project, annotation.id)
        if standing is None:
            return None
        if standing.supersedes(revision):
            return "stale"
        if standing.label != label or standing.update_id is None or stores.status(standing.update_id).status == "withdrawn":
            return None
        index.put(project, annotation.id, replace(standing, updated_at=revision.isoformat()))
    return "unchanged"


def commit_label(
    stores: Stores, index: AnnotationIndex, project: int, task: int, annotation: Annotation, label: str, image: bytes
) -> Change:
    """Store an annotation's image under its label and make that set the one standing for it.

    Ordered so that a crash anywhere leaves what a repeat of the same event completes: the new set
    first, then the old one withdrawn, then the index.
    """
    revision = revision_of(annotation.updated_at)
    where = f"annotation {annotation.id} of task {task}"
    with index.locked(project):
        standing = index.get(project, annotation.id)
        if standing is not None and standing.supersedes(revision):
            return "stale"
        key = f"project {project} task {task} annotation {annotation.id} label {label}"
        update, created = stores.samples.add([image], [label], stores.classes(), key, [f"task {task}"], KEY_OWNER)
        restored = not created and stores.restore(update.update_id, f"{where} says {label!r} again")
        if standing is not None and standing.update_id not in (None, update.update_id):
            stores.withdraw({standing.update_id: f"{where} now says {label!r}"})
        index.put(project, annotation.id, Standing(task, update.update_id, label, revision.isoformat()))
        index.failed_path(project, annotation.id).unlink(missing_ok=True)
    return "stored" if created else "restored" if restored else "unchanged"


def clear_label(stores: Stores, index: AnnotationIndex, project: int, task: int, annotation: Annotation) -> Change:
    """An annotation now gives no class (skipped, or its choice removed): withdraw what stood for it."""
    revision = revision_of(annotation.updated_at)
    with index.locked(project):
        standing = index.get(project, annotation.id)
        if standing is not None and standing.supersedes(revision):
            return "stale"
        if standing is not None and standing.update_id is not None:
            stores.withdraw({standing.update_id: f"annotation {annotation.id} of task {task}: skipped or left without a choice"})
        index.put(project, annotation.id, Standing(task, None, None, revision.isoformat()))
        index.failed_path(project, annotation.id).unlink(missing_ok=True)
    return "withdrawn" if standing is not None and standing.update_id is not None else "unchanged"


def delete_annotations(
    stores: Stores, index: AnnotationIndex, project: int, annotations: list[int] | None = None, tasks: list[int] | None = None
) -> int:
    """Mark annotations deleted (these ids, or every one of these tasks) and withdraw their sets; returns how many."""
    with index.locked(project):
        if tasks is not None:
            standings = {a: s for a, s in index.all(project).items() if s.task in set(tasks)}
        else:
            standings = {a: index.get(project, a) for a in annotations or []}
        reasons = {
            s.update_id: f"annotation {a} of task {s.task}: deleted in Label Studio"
            for a, s in standings.items()
            if s is not None and s.update_id is not None
        }
        stores.withdraw(reasons)
        now = datetime.now(UTC).isoformat()
        for a, s in standings.items():
            index.put(project, a, Standing(s.task if s else None, None, None, now, deleted=True))
            index.failed_path(project, a).unlink(missing_ok=True)
    return len(reasons)


async def apply_annotation(
    stores: Stores,
    index: AnnotationIndex,
    client: LabelStudioClient,
    project: int,
    task: Task,
    annotation: Annotation,
    config: LabelConfig,
    label_config: str,
) -> Change:
    """Make what stands for an annotation what its revision says. If Label Studio cannot give its
    image, the annotation is kept to be tried again (retry_failed) and the error raised."""
    label = annotation_label(annotation, config)
    if label is None:
        return await run_in_threadpool(clear_label, stores, index, project, task.id, annotation)
    if known := await run_in_threadpool(confirm_label, stores, index, project, annotation, label):
        return known
    try:
        [image] = await client.images([image_reference(task, config)])
    except LabelStudioUnavailable:
        await run_in_threadpool(index.keep_failed, project, task, annotation, label_config)
        raise
    return await run_in_threadpool(commit_label, stores, index, project, task.id, annotation, label, image)


async def apply_annotations(
    stores: Stores,
    index: AnnotationIndex,
    client: LabelStudioClient,
    project: int,
    pairs: list[tuple[Annotation, Task]],
    label_config: str,
) -> tuple[Counter[str], list[WarmtuneError]]:
    """Each annotation of an event: what changed, and the annotations refused (the others go on)."""
    config = parse_label_config(label_config)
    changes: Counter[str] = Counter()
    refused: list[WarmtuneError] = []
    for annotation, task in pairs:
        try:
            changes[await apply_annotation(stores, index, client, project, task, annotation, config, label_config)] += 1
        except REFUSALS as exc:
            refused.append(exc)
    return changes, refused


async def catch_up(
    stores: Stores, index: AnnotationIndex, client: LabelStudioClient, project: int, label_config: str
) -> tuple[Counter[str], list[WarmtuneError]]:
    """Bring every annotation of the project up to date (events missed while warmtune or Label
    Studio was down), and mark deleted what Label Studio no longer has.

    What warmtune knew is listed before the export is asked for: an annotation an event stores
    meanwhile is not in it, so it is not taken for deleted.
    """
    known = await run_in_threadpool(index.all, project)
    tasks = await client.annotated_tasks(project)
    pairs = [(annotation, task) for task in tasks for annotation in task.annotations]
    changes, refused = await apply_annotations(stores, index, client, project, pairs, label_config)
    in_studio = {annotation.id for annotation, _ in pairs}
    gone = [a for a, s in known.items() if not s.deleted and a not in in_studio]
    changes["withdrawn"] += await run_in_threadpool(delete_annotations, stores, index, project, gone)
    return changes, refused


async def retry_failed(stores: Stores, index: AnnotationIndex, client: LabelStudioClient) -> int:
    """Try again the annotations whose image Label Studio could not give; returns how many were applied."""
    applied = 0
    for project, path in await run_in_threadpool(lambda: list(index.failed())):
        try:
            kept = read_json(path)
            task, annotation = Task.model_validate(kept["task"]), Annotation.model_validate(kept["annotation"])
            config = parse_label_config(kept["label_config"])
            await apply_annotation(stores, index, client, project, task, annotation, config, kept["label_config"])
            path.unlink(missing_ok=True)  # also when a later event had already settled it ("stale", "unchanged")
            applied += 1
        except LabelStudioUnavailable:
            return applied  # still down: the rest waits for the next round
        except (WarmtuneError, ValueError, KeyError) as exc:
            log.warning("dropping the retry of %s: %s", path, exc)
            path.unlink(missing_ok=True)
    return applied
