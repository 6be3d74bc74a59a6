"""What became of every update set, derived from the two stores rather than kept beside them.

An update set is applied when a published version lists it, rejected or failed when an outcome
record lists it, running while a live job says it is working on it, and queued otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from app.files import atomic_write_json, read_json
from app.samples import SampleStore, UpdateSet
from app.settings import Settings
from app.snapshots import SnapshotStore

Status = Literal["queued", "running", "applied", "rejected", "failed"]


@dataclass(frozen=True)
class UpdateStatus:
    update_id: str
    status: Status
    samples: int
    model_version: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Consumed:
    status: Status
    model_version: int | None
    metrics: dict[str, Any]
    error: str | None


@dataclass(frozen=True)
class LastStep:
    status: Status
    created_at: float


class Ledger:
    """The sample store and the snapshot store of one WARMTUNE_HOME, and what follows from them."""

    def __init__(self, settings: Settings) -> None:
        home = settings.home
        self.samples = SampleStore(
            home / "samples", settings.max_image_pixels, settings.max_label_length, settings.holdout_fraction
        )
        self.snapshots = SnapshotStore(home / "snapshots")
        self.running_path = home / "running.json"

    def consumed(self) -> dict[str, Consumed]:
        done: dict[str, Consumed] = {}
        for outcome in self.snapshots.outcomes():
            for update_id in outcome.update_ids:
                done[update_id] = Consumed(outcome.status, None, outcome.metrics, outcome.reason)
        for version in self.snapshots.versions():
            meta = self.snapshots.meta(version)
            for update_id in meta.update_ids:
                done[update_id] = Consumed("applied", version, meta.metrics, None)
        return done

    def pending(self) -> list[UpdateSet]:
        """Stored update sets no version or outcome has consumed, oldest first."""
        done = self.consumed()
        sets = [self.samples.get(i) for i in self.samples.ids() if i not in done]
        return sorted(sets, key=lambda s: (s.received_at, s.update_id))

    def replay_sets(self, version: int | None) -> list[UpdateSet]:
        """The update sets a version was trained on: its own and its ancestors' (the replay memory)."""
        return [
            self.samples.get(update_id)
            for meta in reversed(self.snapshots.lineage(version))
            for update_id in meta.update_ids
        ]

    def status(self, update_id: str) -> UpdateStatus:
        update = self.samples.get(update_id)
        done = self.consumed().get(update_id)
        if done is not None:
            return UpdateStatus(update_id, done.status, len(update), done.model_version, done.metrics, done.error)
        status: Status = "running" if update_id in self.running() else "queued"
        return UpdateStatus(update_id, status, len(update))

    def counts(self) -> dict[Status, int]:
        """How many stored update sets are in each status."""
        done = self.consumed()
        running = self.running()
        counts: dict[Status, int] = dict.fromkeys(("queued", "running", "applied", "rejected", "failed"), 0)
        for update_id in self.samples.ids():
            if update_id in done:
                counts[done[update_id].status] += 1
            else:
                counts["running" if update_id in running else "queued"] += 1
        return counts

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


    def last_step(self) -> LastStep | None:
        """The most recent update step's outcome: a published version, or a rejected or failed step."""
        steps = [LastStep("applied", self.snapshots.meta(v).created_at) for v in self.snapshots.versions()[-1:]]
        steps += [LastStep(o.status, o.created_at) for o in self.snapshots.outcomes()[-1:]]
        return max(steps, key=lambda s: s.created_at, default=None)
