"""The update job: one plain function, run the same from a test, the CLI, the embedded worker
thread and an RQ worker. Only where it is queued and how its swap is announced differ.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from app.errors import LineageMoved, LockLost
from app.ledger import Ledger
from app.locks import LineageLock
from app.model import build_model, grow_head, model_from_state, select_device
from app.samples import UpdateSet
from app.settings import Settings, get_settings
from app.snapshots import Outcome, SnapshotMeta
from worker.gate import HoldoutScores, holdout_scores, judge
from worker.trainer import SampleTensors, TrainConfig, fine_tune, iterations_for

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    status: Literal["applied", "rejected", "failed"]
    update_ids: list[str]
    version: int | None = None
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def apply_pending_updates(
    settings: Settings | None = None, on_step: Callable[[StepResult], None] | None = None
) -> list[StepResult]:
    """Apply every pending update set under the lineage lock, coalescing what is pending into each step.

    on_step is called after each step (to announce a new version, in the service).
    """
    settings = settings or get_settings()
    ledger = Ledger(settings)
    running: list[str] = []
    results: list[StepResult] = []

    def renew_marker() -> None:
        if running:
            ledger.mark_running(running, settings.lock_lease_s)

    with LineageLock(settings, on_renew=renew_marker) as lock:
        ledger.snapshots.remove_leftovers()
        while pending := ledger.pending():
            running[:] = [u.update_id for u in pending]
            ledger.mark_running(running, settings.lock_lease_s)
            try:
                result = apply_step(settings, ledger, pending, lock)
            except LineageMoved as exc:
                log.info("%s; starting over from the new current version", exc)
                continue
            except LockLost:
                raise
            except Exception as exc:  # a failed step is recorded, and the lineage goes on
                log.exception("update step failed")
                result = record_failure(ledger, pending, exc)
            finally:
                running.clear()
                ledger.clear_running()
            results.append(result)
            if on_step is not None:
                on_step(result)
    return results


def run_update_job() -> list[dict[str, Any]]:
    """The RQ job: apply everything pending, announcing each new version to the API replicas."""
    import redis

    from app.queue import announce_swap, queued_key

    settings = get_settings()
    connection = redis.Redis.from_url(settings.redis_url)
    connection.delete(queued_key(settings))  # sets stored from now on queue the next job

    def announce(result: StepResult) -> None:
        if result.version is not None:
            announce_swap(connection, settings, result.version)

    results = apply_pending_updates(settings, on_step=announce)
    return [{"status": r.status, "update_ids": r.update_ids, "version": r.version, "reason": r.reason} for r in results]


def record_failure(ledger: Ledger, pending: list[UpdateSet], exc: Exception) -> StepResult:
    ids = [u.update_id for u in pending]
    reason = f"{type(exc).__name__}: {exc}"
    outcome = Outcome(
        outcome_id=uuid.uuid4().hex,
        status="failed",
        parent=ledger.snapshots.current(),
        update_ids=ids,
        reason=reason,
        metrics={"traceback": traceback.format_exc(limit=5)},
    )
    ledger.snapshots.record_outcome(outcome)
    return StepResult("failed", ids, reason=reason)


def warm_start(settings: Settings, ledger: Ledger, classes_needed: list[str]) -> tuple[nn.Module, SnapshotMeta | None]:
    """The current version's model, or a new model from the base weights when there is none yet."""
    current = ledger.snapshots.current()
    if current is None:
        return build_model(settings.arch, len(classes_needed), settings.base_weights), None
    meta = ledger.snapshots.meta(current)
    return model_from_state(meta.arch, ledger.snapshots.weights(current)), meta


@dataclass
class StepData:
    """The samples of one step as model input: old data D_{t-1} and the update U_t, train and holdout."""

    old_train: SampleTensors
    old_holdout: SampleTensors
    new_train: SampleTensors
    new_holdout: SampleTensors


def step_data(old_sets: list[UpdateSet], new_sets: list[UpdateSet], classes: list[str], image_size: int) -> StepData:
    index = {c: i for i, c in enumerate(classes)}

    def tensors(sets: list[UpdateSet], holdout: bool) -> SampleTensors:
        return SampleTensors([s for u in sets for s in u.samples(holdout=holdout)], index, image_size)

    return StepData(tensors(old_sets, False), tensors(old_sets, True), tensors(new_sets, False), tensors(new_sets, True))


def apply_step(settings: Settings, ledger: Ledger, pending: list[UpdateSet], lock: LineageLock) -> StepResult:
    """One update step of the method: warm start, grow the head, λ-replay SGD, gate, publish or reject."""
    clock = time.perf_counter()
    update_ids = [u.update_id for u in pending]
    device = select_device(settings.device)
    seed = settings.seed + ledger.snapshots.latest() if settings.seed is not None else random.getrandbits(62)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    incoming = list(dict.fromkeys(label for u in pending for label in u.labels))
    model, parent = warm_start(settings, ledger, incoming)
    old_classes = parent.classes if parent else []
    new_classes = [c for c in incoming if c not in old_classes]
    image_size = parent.image_size if parent else settings.image_size
    old_sets = ledger.replay_sets(parent.version if parent else None)
    data = step_data(old_sets, pending, old_classes + new_classes, image_size)
    log.info(
        "applying %d update set(s) on top of version %s: %d new samples, %d old, new classes %s",
        len(pending), parent.version if parent else None, len(data.new_train), len(data.old_train), new_classes,
    )
    load_seconds = time.perf_counter() - clock

    before: HoldoutScores | None = None
    if parent is not None:
        before = holdout_scores(model, data.old_holdout, data.new_holdout, device)
        grow_head(model, len(new_classes), settings.head_init, generator)

    n_old, n_new = len(data.old_train), len(data.new_train)
    iterations = iterations_for(settings.iterations, n_new, n_old + n_new, settings.batch_size)
    stats = fine_tune(model, data.old_train, data.new_train, TrainConfig.from_settings(settings, iterations), device, generator)

    clock = time.perf_counter()
    after = holdout_scores(model, data.old_holdout, data.new_holdout, device)
    verdict = judge(before, after, stats.loss, settings.gate_max_old_drop, settings.gate_significance_z)
    metrics: dict[str, Any] = {
        "iterations": stats.iterations,
        "loss": stats.loss,
        "replay_lambda": settings.replay_lambda,
        "samples_old": n_old,
        "samples_new": n_new,
        "new_classes": new_classes,
        "warm_start_from": parent.version if parent else None,
        "seed": seed,
        "holdout_before": before.as_dict() if before else None,
        "holdout_after": after.as_dict(),
        "gate": verdict.reason,
        "load_seconds": load_seconds,
        "train_seconds": stats.seconds,
        "evaluate_seconds": time.perf_counter() - clock,
    }
    if lock.lost:
        raise LockLost("the lineage lease expired during training; leaving the update to the new holder")
    parent_version = parent.version if parent else None
    if not verdict.passed:
        outcome = Outcome(
            outcome_id=uuid.uuid4().hex,
            status="rejected",
            parent=parent_version,
            update_ids=update_ids,
            reason=verdict.reason,
            metrics=metrics,
        )
        ledger.snapshots.record_outcome(outcome)
        log.warning("rejected update set(s) %s: %s", update_ids, verdict.reason)
        return StepResult("rejected", update_ids, reason=verdict.reason, metrics=metrics)

    clock = time.perf_counter()
    meta = SnapshotMeta(
        version=0,  # assigned by publish
        parent=parent_version,
        classes=old_classes + new_classes,
        arch=parent.arch if parent else settings.arch,
        image_size=image_size,
        base_weights=parent.base_weights if parent else settings.base_weights,
        update_ids=update_ids,
        metrics=metrics,
    )
    version = ledger.snapshots.publish(model.state_dict(), meta)
    metrics["publish_seconds"] = time.perf_counter() - clock
    log.info(
        "published version %d (%d classes): holdout old %s new %s; %d iterations in %.1fs; written in %.2fs",
        version, len(meta.classes), after.old, after.new, stats.iterations, stats.seconds, metrics["publish_seconds"],
    )
    return StepResult("applied", update_ids, version=version, metrics=metrics)
