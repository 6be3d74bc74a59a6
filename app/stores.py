"""What became of every update set, derived from the two stores rather than kept beside them.

Each set's attempts are the versions that list it and the outcome records that name it (rejected,
failed, queued again). A set is applied when a version in the current version's lineage lists it,
orphaned when only versions a promote abandoned do, rejected or failed when its last attempt says
so, running while a live job says it is working on it, and queued otherwise. A set withdrawn by
its source (a label changed or deleted in Label Studio) is withdrawn until restored: out of the
replay memory and of every step, its file kept. A set whose file cannot be read is quarantined:
moved aside, with its reason, and left out of every step.
"""

from __future__ import annotations

import time
import uuid
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from app.errors import CorruptUpdate, NotRetryable
from app.files import atomic_write_json, directory_version, read_json
from app.samples import SampleStore, UpdateSet
from app.settings import Settings
from app.snapshots import AttemptRecord, SnapshotStore

Status = Literal["queued", "running", "applied", "rejected", "failed", "orphaned", "withdrawn", "quarantined"]
STATUSES: tuple[Status, ...] = ("queued", "running", "applied", "rejected", "failed", "orphaned", "withdrawn", "quarantined")
RETRYABLE: tuple[Status, ...] = ("rejected", "failed", "orphaned")


@dataclass(frozen=True)
class Attempt:
    """One thing that happened to update sets: applied in a version, rejected, failed, queued again, or
    withdrawn by their source and restored. What an update step returns, and what a set's history
    lists; its status is what the set's attempts add up to (UpdateStatus)."""

    status: Literal["applied", "rejected", "failed", "requeued", "withdrawn", "restored"]
    at: float
    model_version: int | None  # the version it was applied in, or judged against
    reason: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    update_ids: list[str] = field(default_factory=list)  # the sets it was about, together

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UpdateStatus:
    update_id: str
    status: Status
    samples: int
    model_version: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    attempts: list[Attempt] = field(default_factory=list)


def attempt_of(record: AttemptRecord) -> Attempt:
    return Attempt(record.status, record.created_at, record.parent, record.reason, record.metrics, record.update_ids)


def settle(attempts: list[Attempt], lineage: set[int]) -> tuple[Status, Attempt | None]:
    """The status that a set's attempts (oldest first) add up to, given the current version's lineage.

    Applied means applied in a version the current one descends from: the set is in its replay
    memory. A set applied only on a branch a promote abandoned is orphaned, until it is retried.
    A withdrawal holds until the set is restored, even over a version that applied it meanwhile
    (the step had read it before) or a retry; restored, the set is what its other attempts say.
    """
    say = next((a for a in reversed(attempts) if a.status in ("withdrawn", "restored")), None)
    if say is not None and say.status == "withdrawn":
        return "withdrawn", say
    attempts = [a for a in attempts if a.status not in ("withdrawn", "restored")]
    for attempt in attempts:
        if attempt.status == "applied" and attempt.model_version in lineage:
            return "applied", attempt
    last = attempts[-1] if attempts else None
    if last is None or last.status == "requeued":
        return "queued", None
    return ("orphaned" if last.status == "applied" else last.status), last


class Stores:
    """The sample store and the snapshot store of one WARMTUNE_HOME, and what follows from them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        home = settings.home
        self.samples = SampleStore(
            home / "samples",
            settings.max_image_pixels,
            settings.max_label_length,
            settings.holdout_fraction,
            settings.max_request_pixels,
            settings.decode_threads,
        )
        self.snapshots = SnapshotStore(home / "snapshots")
        self.running_path = home / "running.json"
        self._derived: tuple[dict[str, list[Attempt]], dict[str, tuple[Status, Attempt | None]]] = ({}, {})
        self._derived_version: tuple[int | None, int, int] | None = None

    def stores_version(self) -> tuple[int | None, int, int] | None:
        """What history() reads, in a few bytes: the pointer and the outcome records' directory.

        None while that directory changed too recently to key a cache (see files.directory_version).
        """
        pointer = self.snapshots.pointer()
        outcomes = directory_version(self.snapshots.outcomes_dir)
        return None if outcomes is None else (pointer["current"], pointer["latest"], outcomes)

    def history(self) -> dict[str, list[Attempt]]:
        """Every set's attempts, oldest first: from the versions that list it and the outcome records.

        Derived from the stores on every change of stores_version(), and kept until the next:
        a lookup then costs the same at 10 versions and at 10,000.
        """
        return self.derived()[0]

    def derived(self) -> tuple[dict[str, list[Attempt]], dict[str, tuple[Status, Attempt | None]]]:
        """history() and settled() from one reading of the stores: a caller that needs both gets
        a matching pair (read one after the other, a step could land between them)."""
        version = self.stores_version()
        if version is not None and version == self._derived_version:
            return self._derived
        attempts = self._read_history()
        self._derived = attempts, self._settle_all(attempts)
        self._derived_version = version
        return self._derived

    def _read_history(self) -> dict[str, list[Attempt]]:
        attempts: dict[str, list[Attempt]] = {}
        for record in self.snapshots.attempt_records():
            attempt = attempt_of(record)
            for update_id in record.update_ids:
                attempts.setdefault(update_id, []).append(attempt)
        for version in self.snapshots.versions():
            meta = self.snapshots.meta(version)
            attempt = Attempt("applied", meta.created_at, version, None, meta.metrics, meta.update_ids)
            for update_id in meta.update_ids:
                attempts.setdefault(update_id, []).append(attempt)
        for entries in attempts.values():
            entries.sort(key=lambda a: a.at)
        return attempts

    def current_lineage(self) -> set[int]:
        """The current version and its ancestors: whose sets are in the replay memory."""
        return {meta.version for meta in self.snapshots.lineage(self.snapshots.current())}

    def settled(self) -> dict[str, tuple[Status, Attempt | None]]:
        """The status of every set that has attempts (a set without any is queued or running)."""
        return self.derived()[1]

    def _settle_all(self, history: dict[str, list[Attempt]]) -> dict[str, tuple[Status, Attempt | None]]:
        lineage = self.current_lineage()
        return {update_id: settle(attempts, lineage) for update_id, attempts in history.items()}

    def pending(self) -> list[UpdateSet]:
        """Stored update sets waiting for a step (never tried, or queued again), oldest first."""
        settled = self.settled()
        sets = self.readable([i for i in self.samples.ids() if settled.get(i, ("queued", None))[0] == "queued"])
        return sorted(sets, key=lambda s: (s.received_at, s.update_id))

    def readable(self, update_ids: list[str]) -> list[UpdateSet]:
        """The sets of these ids that can be read; the others are quarantined (and logged) on the way."""
        sets = []
        for update_id in update_ids:
            with suppress(CorruptUpdate):
                sets.append(self.samples.get(update_id))
        return sets

    def replay_sets(self, version: int | None) -> list[UpdateSet]:
        """The update sets a version was trained on, its own and its ancestors' (the replay memory),
        less those their source has withdrawn since."""
        settled = self.settled()
        lineage_ids = [update_id for meta in reversed(self.snapshots.lineage(version)) for update_id in meta.update_ids]
        return self.readable([u for u in lineage_ids if settled.get(u, ("queued", None))[0] != "withdrawn"])

    def classes(self) -> list[str]:
        """The classes of the current version (none before the first)."""
        current = self.snapshots.current()
        return self.snapshots.meta(current).classes if current else []

    def status(self, update_id: str) -> UpdateStatus:
        try:
            update = self.samples.get(update_id)
        except CorruptUpdate as exc:
            return UpdateStatus(update_id, "quarantined", 0, error=str(exc))
        history, settled = self.derived()
        attempts = history.get(update_id, [])
        status, attempt = settled.get(update_id, ("queued", None))
        if status == "queued":
            return UpdateStatus(update_id, "running" if update_id in self.running() else "queued", len(update), attempts=attempts)
        assert attempt is not None
        error = attempt.reason
        if status == "orphaned":
            error = (
                f"applied in version {attempt.model_version}, which a promote left out of the current version's "
                "lineage: its samples are not in the replay memory; retry it to apply it on the current version"
            )
        return UpdateStatus(update_id, status, len(update), attempt.model_version, attempt.metrics, error, attempts)

    def counts(self) -> dict[Status, int]:
        """How many stored update sets are in each status."""
        settled = self.settled()
        running = self.running()
        counts: dict[Status, int] = dict.fromkeys(STATUSES, 0)
        for update_id in self.samples.ids():
            status = settled.get(update_id, ("queued", None))[0]
            counts["running" if status == "queued" and update_id in running else status] += 1
        counts["quarantined"] = len(self.samples.quarantined())
        return counts

    # Trying again

    def requeue(self, update_id: str, reason: str, automatic: bool = False) -> None:
        """Queue a rejected, failed or orphaned set for another step; NotRetryable for any other."""
        status = self.status(update_id).status
        if status not in RETRYABLE:
            raise NotRetryable(f"update set {update_id} is {status}; only {', '.join(RETRYABLE)} sets can be retried")
        self._record(update_id, "requeued", reason, automatic)

    def reconsider_rejected(self, version: int, max_automatic: int) -> list[str]:
        """Queue again the rejected sets that share a class with what this new version applied.

        Each set is reconsidered at most max_automatic times by itself, so a bad set costs a
        bounded number of checks and never loops.
        """
        applied = {label for update in self.readable(self.snapshots.meta(version).update_ids) for label in update.labels}
        requeued = []
        history, settled = self.derived()
        for update in self.readable([u for u in history if settled[u][0] == "rejected"]):
            automatic = sum(a.status == "requeued" and bool(a.metrics.get("automatic")) for a in history[update.update_id])
            shared = sorted(applied & set(update.labels))
            if automatic < max_automatic and shared:
                try:
                    self.requeue(update.update_id, f"reconsidered: version {version} applied more images of {', '.join(shared)}", True)
                except NotRetryable:  # retried on request meanwhile
                    continue
                requeued.append(update.update_id)
        return requeued

    # Withdrawing: the source of a set took its label back (edited or deleted it)

    def withdraw(self, reasons: dict[str, str]) -> None:
        """Take sets (update id: why) out of the replay memory and of every later step; their files
        and histories stay. The stores are read once, however many sets."""
        settled = self.settled()
        for update_id, reason in reasons.items():
            if settled.get(update_id, ("queued", None))[0] != "withdrawn":
                self._record(update_id, "withdrawn", reason)

    def restore(self, update_id: str, reason: str) -> bool:
        """Undo a withdrawal: the set is applied again if its version is in the lineage, else what its
        other attempts say (queued if none). Returns whether it was withdrawn."""
        if self.status(update_id).status != "withdrawn":
            return False
        self._record(update_id, "restored", reason)
        return True

    def _record(self, update_id: str, status: Literal["requeued", "withdrawn", "restored"], reason: str, automatic: bool = False) -> None:
        self.snapshots.record_attempt(
            AttemptRecord(
                outcome_id=uuid.uuid4().hex,
                status=status,
                parent=self.snapshots.current(),
                update_ids=[update_id],
                reason=reason,
                metrics={"automatic": automatic} if status == "requeued" else {},
            )
        )

    # The running marker: transient, and it expires by itself if its job dies.

    def mark_running(self, update_ids: list[str], lease_s: float) -> None:
        atomic_write_json(self.running_path, {"update_ids": update_ids, "expires_at": time.time() + lease_s})

    def clear_running(self) -> None:
        self.running_path.unlink(missing_ok=True)

    def running(self) -> set[str]:
        try:
            marker = read_json(self.running_path)
        except (FileNotFoundError, ValueError):
            return set()
        return set(marker["update_ids"]) if marker["expires_at"] > time.time() else set()

    def last_step(self) -> Attempt | None:
        """The most recent update step's attempt: a published version, or a rejected or failed step."""
        steps = []
        for version in self.snapshots.versions()[-1:]:
            meta = self.snapshots.meta(version)
            steps.append(Attempt("applied", meta.created_at, version, None, meta.metrics, meta.update_ids))
        steps += [attempt_of(r) for r in self.snapshots.attempt_records() if r.status in ("rejected", "failed")][-1:]
        return max(steps, key=lambda a: a.at, default=None)
