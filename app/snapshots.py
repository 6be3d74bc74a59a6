"""The snapshot store: immutable model versions and one pointer saying which is current.

    snapshots/<version>/model.safetensors, meta.json   a published version, never overwritten
    snapshots/<version>/PINNED                         an admin asked to keep its weights
    snapshots/POINTER                                  {"current": v, "latest": n}, replaced atomically
    snapshots/outcomes/<id>.json                       attempts that published no version: rejected, failed, requeued, withdrawn, restored

Publishing writes the version directory under a temporary name, renames it into place and only
then moves the pointer: the pointer is the commit. A directory numbered above "latest" is the
leftover of a crash between the two and is never served.

Retention deletes the weights of versions nobody needs any more (prune) and keeps their
meta.json: the lineage is forever, the weights are not.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load, save_file

from app.errors import LineageMoved, UnknownVersion, VersionPruned
from app.files import atomic_write_json, directory_version, fsync_dir, read_json

WEIGHTS = "model.safetensors"
META = "meta.json"
PINNED = "PINNED"


class SnapshotMeta(BaseModel):
    version: int
    parent: int | None
    classes: list[str]
    arch: str
    image_size: int
    base_weights: str
    update_ids: list[str] = Field(description="Update sets this version applied (on top of its parent's).")
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)


class AttemptRecord(BaseModel):
    """An attempt on update sets that published no version: rejected by the gate, failed, queued again, or
    withdrawn by their source and restored. (Stored under outcomes/ with these field names, as before.)"""

    outcome_id: str
    status: Literal["rejected", "failed", "requeued", "withdrawn", "restored"]
    parent: int | None
    update_ids: list[str]
    reason: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class SnapshotStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.outcomes_dir = root / "outcomes"
        self.outcomes_dir.mkdir(parents=True, exist_ok=True)
        self._metas: dict[int, SnapshotMeta] = {}
        self._published: list[int] = []
        self._checked_up_to = 0
        self._pruned: set[int] = set()  # versions seen without weights: pruning is never undone
        self._records: dict[str, AttemptRecord] = {}
        self._sorted_records: list[AttemptRecord] = []
        self._records_version: int | None = None

    # The pointer -----------------------------------------------------------------------------

    @contextmanager
    def _pointer_lock(self) -> Iterator[None]:
        """Serialise read-modify-write of the pointer (publish against promote); held for milliseconds."""
        with open(self.root / "POINTER.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def pointer(self) -> dict[str, int | None]:
        path = self.root / "POINTER"
        if not path.exists():
            return {"current": None, "latest": 0}
        return read_json(path)

    def current(self) -> int | None:
        return self.pointer()["current"]

    def latest(self) -> int:
        return self.pointer()["latest"]

    def versions(self) -> list[int]:
        """Published versions, oldest first."""
        latest = self.latest()
        # A published version's directory is never removed (retention deletes weights only): look at new numbers only.
        for v in range(self._checked_up_to + 1, latest + 1):
            if (self.root / str(v) / META).exists():
                self._published.append(v)
        self._checked_up_to = max(self._checked_up_to, latest)
        return [v for v in self._published if v <= latest]

    # Versions --------------------------------------------------------------------------------

    def meta(self, version: int) -> SnapshotMeta:
        if version not in self._metas:
            if not 1 <= version <= self.latest() or not (self.root / str(version) / META).exists():
                raise UnknownVersion(f"no model version {version}")
            self._metas[version] = SnapshotMeta.model_validate(read_json(self.root / str(version) / META))
        return self._metas[version]

    def weights(self, version: int) -> dict[str, torch.Tensor]:
        self.require_weights(version)
        # Read into memory rather than load_file's memory map: a served model must not depend on a
        # file that something outside may truncate (its next page fault would kill the process).
        return load((self.root / str(version) / WEIGHTS).read_bytes())

    def has_weights(self, version: int) -> bool:
        if version in self._pruned:
            return False
        published = (self.root / str(version) / META).exists()  # before the weights: a publish brings both at once
        if (self.root / str(version) / WEIGHTS).exists():
            return True
        if published:  # so its weights are gone for good
            self._pruned.add(version)
        return False

    def require_weights(self, version: int) -> None:
        self.meta(version)
        if not self.has_weights(version):
            raise VersionPruned(
                f"version {version} has no weights any more: retention pruned them (its metadata stays); pin a version to keep its weights"
            )

    def pinned(self, version: int) -> bool:
        return (self.root / str(version) / PINNED).exists()

    def pin(self, version: int, pinned: bool = True) -> None:
        """Keep a version's weights whatever retention says (pinned=False lets retention prune it again)."""
        with self._pointer_lock():  # against prune
            if pinned:
                self.require_weights(version)
            else:
                self.meta(version)  # an unknown version is a 404; a pruned one may still be released
            marker = self.root / str(version) / PINNED
            if pinned:
                marker.touch()
            else:
                marker.unlink(missing_ok=True)
            fsync_dir(marker.parent)

    def prune(self, keep_last: int, keep_seconds: float) -> list[int]:
        """Delete the weights of every version that is not current, not among the keep_last newest,
        not pinned and older than keep_seconds; returns the versions pruned."""
        pruned = []
        with self._pointer_lock():  # against promote: it checks for weights under the same lock
            current, versions = self.current(), self.versions()
            newest = set(versions[-keep_last:]) if keep_last > 0 else set()
            now = time.time()
            for version in versions:
                if version == current or version in newest or not self.has_weights(version) or self.pinned(version):
                    continue
                if now - self.meta(version).created_at < keep_seconds:
                    continue
                (self.root / str(version) / WEIGHTS).unlink()
                self._pruned.add(version)
                pruned.append(version)
            if pruned:
                fsync_dir(self.root)
        return pruned

    def lineage(self, version: int | None) -> list[SnapshotMeta]:
        """The version and its ancestors, newest first."""
        return list(self.ancestors(version))

    def ancestors(self, version: int | None) -> Iterator[SnapshotMeta]:
        """The version and its ancestors, newest first, each read when reached (a caller that
        needs only the recent ones does not read the whole history)."""
        while version is not None:
            meta = self.meta(version)
            yield meta
            version = meta.parent

    def publish(self, state: dict[str, torch.Tensor], meta: SnapshotMeta) -> int:
        """Write a new version and make it current; raises LineageMoved if meta.parent is no longer current.

        The caller holds the lineage lock; meta.version is assigned here.
        """
        if self.current() != meta.parent:
            raise LineageMoved(f"current version moved from {meta.parent} to {self.current()} during the update")
        self.remove_leftovers()
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / WEIGHTS)
        _fsync_file(tmp / WEIGHTS)
        with self._pointer_lock():
            pointer = self.pointer()
            if pointer["current"] != meta.parent:
                shutil.rmtree(tmp)
                raise LineageMoved(f"current version moved from {meta.parent} to {pointer['current']} during the update")
            meta = meta.model_copy(update={"version": pointer["latest"] + 1})
            (tmp / META).write_text(meta.model_dump_json(indent=2))
            _fsync_file(tmp / META)
            fsync_dir(tmp)
            os.rename(tmp, self.root / str(meta.version))  # fails rather than replace a non-empty directory
            fsync_dir(self.root)
            atomic_write_json(self.root / "POINTER", {"current": meta.version, "latest": meta.version})
        return meta.version

    def promote(self, version: int) -> None:
        """Make an existing version current (rollback or forward)."""
        with self._pointer_lock():
            self.require_weights(version)
            pointer = self.pointer()
            atomic_write_json(self.root / "POINTER", {"current": version, "latest": pointer["latest"]})

    def remove_leftovers(self) -> None:
        """Delete what a crash mid-publish left: temporary directories and versions above latest."""
        latest = self.latest()
        for name in os.listdir(self.root):  # names only: no stat of every version at every step
            if (name.startswith(".tmp-") or (name.isdigit() and int(name) > latest)) and (self.root / name).is_dir():
                shutil.rmtree(self.root / name, ignore_errors=True)

    # Attempt records -----------------------------------------------------------------------

    def record_attempt(self, record: AttemptRecord) -> None:
        atomic_write_json(self.outcomes_dir / f"{record.outcome_id}.json", record.model_dump(mode="json"))

    def attempt_records(self) -> list[AttemptRecord]:
        """Every attempt record, oldest first (records are never changed or removed: new ones are read once)."""
        version = directory_version(self.outcomes_dir)
        if version is None or version != self._records_version:
            for path in self.outcomes_dir.glob("*.json"):
                if path.stem not in self._records:
                    self._records[path.stem] = AttemptRecord.model_validate(read_json(path))
            self._sorted_records = sorted(self._records.values(), key=lambda o: o.created_at)
            self._records_version = version
        return list(self._sorted_records)
