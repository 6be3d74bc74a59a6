"""The update job: one plain function, run the same from a test, the CLI, the embedded worker
thread and an RQ worker. Only where it is queued and how its swap is announced differ.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
import traceback
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from app.errors import DamagedSample, LineageMoved, LockLost
from app.locks import LineageLock
from app.model import build_model, grow_head, model_from_state, select_device
from app.samples import Sample, UpdateSet
from app.settings import Settings, get_settings
from app.snapshots import AttemptRecord, SnapshotMeta
from app.stores import Attempt, Stores, attempt_of
from worker.gate import (
    NEAREST_MIN_REFERENCE,
    NEAREST_RECONSIDERED_SHARE,
    Answers,
    Verdict,
    check_labels,
    check_nearest,
    check_old_knowledge,
    check_training,
    class_means,
    judged_by_nearest,
    nearest_means,
)
from worker.trainer import (
    SampleTensors,
    TrainConfig,
    TrainStats,
    fine_tune,
    iterations_for,
    predict_features,
    predict_logits,
    train_first_version,
)

log = logging.getLogger(__name__)

# The metrics key of a version's answers on its sets' images before training on them.
RECORD = "answers_before_training"
# The metrics key of gate check 1's nearest-mean counts, by set and label: where each judged
# label's images lay among the stored images' class means (GET /updates/{id} shows it).
NEAREST = "nearest_means"

# A whole-memory training for a weak class waits until that class's samples have grown by this
# factor since the last one: a class that stays weak (a look-alike even joint training confuses)
# costs a bounded number of them, about log(N)/log(1.1) for its N samples.
WEAK_CLASS_GROWTH = 1.1


def apply_pending_updates(
    settings: Settings | None = None,
    on_step: Callable[[Attempt], None] | None = None,
    stores: Stores | None = None,
) -> list[Attempt]:
    """Apply every pending update set under the lineage lock, coalescing what is pending into each step.

    After each new version, rejected sets that share a class with it are queued again (a bounded
    number of times). on_step is called after each step (to announce a new version, in the service).
    A long-lived caller passes its stores: set manifests and version metas are then read once per
    process, not once per job (10,000 sets cost about a second of zip reads).
    """
    settings = settings or get_settings()
    stores = stores or Stores(settings)
    running: list[str] = []
    results: list[Attempt] = []

    def renew_marker() -> None:
        if running:
            stores.mark_running(running, settings.lock_lease_s)

    with LineageLock(settings, on_renew=renew_marker) as lock:
        stores.snapshots.remove_leftovers()
        while (pending := stores.pending()) and step_due(settings, pending, time.time()):
            running[:] = [u.update_id for u in pending]
            stores.mark_running(running, settings.lock_lease_s)
            try:
                step = apply_step(settings, stores, pending, lock)
            except LineageMoved as exc:
                log.info("%s; starting over from the new current version", exc)
                continue
            except LockLost:
                raise
            except DamagedSample as exc:
                # Only reading an image finds it damaged; its set goes aside (kept, in quarantine) and
                # the step runs again without it. Each time one set fewer: this ends.
                if stores.samples.path(exc.update_id).exists():  # else another process moved it aside first, with its reason
                    stores.samples.quarantine(exc.update_id, exc.reason)
                continue
            except Exception as exc:  # a failed step is recorded, and the lineage goes on
                log.exception("update step failed")
                undecided = {u.update_id for u in stores.pending()}  # not the sets refused before the failure
                step = [record_failure(stores, [u for u in pending if u.update_id in undecided], exc)]
            finally:
                running.clear()
                stores.clear_running()
            for result in step:
                results.append(result)
                if on_step is not None:
                    on_step(result)
                if result.status == "applied":
                    stores.reconsider_rejected(result.model_version, settings.retry_auto_max)
    return results


def step_due(settings: Settings, pending: list[UpdateSet], now: float) -> bool:
    """Whether the trigger policy runs a step on these pending sets now (oldest first).

    Sets that wait stay queued: the next job (woken by the service's poll) asks again.
    """
    if settings.trigger == "best-effort":
        return True
    samples, waited = sum(len(u) for u in pending), now - pending[0].received_at
    if samples >= settings.trigger_samples or waited >= settings.trigger_wait_s:
        return True
    log.debug(
        "batched trigger: %d of %d samples pending, oldest waited %.0f of %.0f s",
        samples,
        settings.trigger_samples,
        waited,
        settings.trigger_wait_s,
    )
    return False


def record_attempt(
    stores: Stores, sets: list[UpdateSet], status: Literal["rejected", "failed"], reason: str, metrics: dict[str, Any]
) -> Attempt:
    record = AttemptRecord(
        outcome_id=uuid.uuid4().hex,
        status=status,
        parent=stores.snapshots.current(),
        update_ids=[u.update_id for u in sets],
        reason=reason,
        metrics=metrics,
    )
    stores.snapshots.record_attempt(record)
    return attempt_of(record)


def record_failure(stores: Stores, pending: list[UpdateSet], exc: Exception) -> Attempt:
    reason = f"{type(exc).__name__}: {exc}"
    return record_attempt(stores, pending, "failed", reason, {"traceback": traceback.format_exc(limit=5)})


def warm_start(settings: Settings, stores: Stores, classes_needed: list[str]) -> tuple[nn.Module, SnapshotMeta | None]:
    """The current version's model, or a new model from the base weights when there is none yet."""
    current = stores.snapshots.current()
    if current is None:
        return build_model(settings.arch, len(classes_needed), settings.base_weights), None
    meta = stores.snapshots.meta(current)
    return model_from_state(meta.arch, stores.snapshots.weights(current)), meta


@dataclass
class SetTensors:
    """One update set as model input: its training and its holdout samples."""

    update: UpdateSet
    train: SampleTensors
    holdout: SampleTensors


def per_class_draw(samples: list[Sample], per_class: int, rng: random.Random) -> list[Sample]:
    """At most per_class samples of each label, drawn at random and kept in their order, so the
    stored images' means the gate reads do not cost more as the history grows."""
    by_label: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        by_label.setdefault(sample.label, []).append(i)
    chosen = sorted(i for members in by_label.values() for i in (members if len(members) <= per_class else rng.sample(members, per_class)))
    return [samples[i] for i in chosen]


def holdout_draw(sets: list[UpdateSet], per_class: int) -> list[Sample]:
    """The old holdout the gate reads: of each label, the per_class holdout samples whose digests
    rank first, in their order. A sample once drawn stays drawn until per_class later samples of
    its label rank before it, so the draw is bounded and consecutive steps read nearly the same
    samples: the last step's answers and pixels for them (HoldoutMemo) serve the next."""
    ranked: dict[str, list[tuple[bytes, int]]] = {}
    samples: list[Sample] = []
    for u in sets:
        for sample in u.samples(holdout=True):
            rank = hashlib.sha256(f"{u.fingerprint or u.update_id}:{sample.index}".encode()).digest()
            ranked.setdefault(sample.label, []).append((rank, len(samples)))
            samples.append(sample)
    chosen = sorted(position for members in ranked.values() for _, position in sorted(members)[:per_class])
    return [samples[i] for i in chosen]


@dataclass
class HoldoutMemo:
    """What a process's last step leaves its next about the old holdout: the answers of one version
    (the one it published, or the current one when it published none) and the pixels, by
    Sample.key. The next step's draw is nearly the same, and its current version is usually that
    one, so it decodes and answers only what is new to it (bench/history.py --at measures what
    that saves at 1000 applied sets)."""

    version: int | None = None
    image_size: int = 0
    answers: dict[tuple[str, int], str] = field(default_factory=dict)
    pixels: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)


# One memo per Stores object: a long-lived caller (the RQ worker, the embedded worker thread)
# keeps its stores from job to job, so its memo lives as long; a new Stores starts empty.
_memos: weakref.WeakKeyDictionary[Stores, HoldoutMemo] = weakref.WeakKeyDictionary()


def holdout_memo(stores: Stores) -> HoldoutMemo:
    return _memos.setdefault(stores, HoldoutMemo())


def remember_holdout(memo: HoldoutMemo, version: int, image_size: int, holdouts: list[SampleTensors], answers: Answers) -> None:
    """Keep a version's answers on these holdout samples (answers in their order) and their pixels."""
    samples = [s for h in holdouts for s in h.samples]
    memo.version, memo.image_size = version, image_size
    memo.answers = {s.key: p for s, p in zip(samples, answers.predicted, strict=True)}
    memo.pixels = {key: pixels for h in holdouts for key, pixels in h.decoded_by_key().items()}


def answers_before(step: Step, memo: HoldoutMemo) -> Answers:
    """The current version's answers on the old holdout: those the memo holds, and a forward pass for the rest."""
    held = memo.answers if step.parent is not None and memo.version == step.parent.version else {}
    missing = [i for i, s in enumerate(step.old_holdout.samples) if s.key not in held]
    computed = Answers.of(predict_logits(step.model, step.old_holdout.subset(missing), step.device), [""] * len(missing), step.old_classes)
    predicted = dict(zip(missing, computed.predicted, strict=True))
    return Answers(
        tuple(step.old_holdout.labels),
        tuple(predicted[i] if i in predicted else held[s.key] for i, s in enumerate(step.old_holdout.samples)),
    )


def set_tensors(sets: list[UpdateSet], classes: list[str], image_size: int) -> list[SetTensors]:
    index = {c: i for i, c in enumerate(classes)}
    return [
        SetTensors(u, SampleTensors(u.samples(holdout=False), index, image_size), SampleTensors(u.samples(holdout=True), index, image_size))
        for u in sets
    ]


def holdout_summary(old: Answers, new: Answers) -> dict[str, Any]:
    """Accuracy on the old holdout, the new holdout and both, with their sizes (the metrics' shape)."""
    both = Answers(old.true + new.true, old.predicted + new.predicted)
    return {"old": old.accuracy(), "new": new.accuracy(), "all": both.accuracy(), "n_old": len(old), "n_new": len(new)}


def per_class(outcomes: Answers) -> dict[str, float]:
    """Recall of every label among the outcomes."""
    recall = {}
    for label in dict.fromkeys(outcomes.true):
        hits, n = outcomes.recall(label)
        recall[label] = hits / n
    return recall


def reconsidered_after(attempts: list[Attempt], check: str) -> bool:
    """Whether a set is now reconsidered by itself (not retried by an annotator) after this label
    test refused it at some attempt."""
    reconsidered = bool(attempts) and attempts[-1].status == "requeued" and bool(attempts[-1].metrics.get("automatic"))
    return reconsidered and any(a.status == "rejected" and a.metrics.get("refused_by") == check for a in attempts)


def relabel_factor(settings: Settings, attempts: list[Attempt]) -> float:
    """The relabel test's threshold for a set. A set the relabel test ever refused and that is now
    reconsidered by itself must be explained by its label at least as well as by any other class
    (a factor below 1), not merely fall under the threshold once more: without this hysteresis a
    refused set gets up to WARMTUNE_RETRY_AUTO_MAX more draws, and in the stream benchmark two
    poisoned sets (shirts labelled T-shirt/top, pullovers labelled Coat) passed on one of them.
    An annotator's retry is judged like a new set."""
    if reconsidered_after(attempts, "relabel"):
        return min(settings.gate_relabel_factor, 1.0)
    return settings.gate_relabel_factor


def nearest_share(settings: Settings, attempts: list[Attempt]) -> float:
    """The nearest-mean test's share for a set: NEAREST_RECONSIDERED_SHARE for a set it refused that
    is now reconsidered by itself (the same hysteresis as relabel_factor's), else the setting."""
    if settings.gate_relabel_share > 0 and reconsidered_after(attempts, "nearest"):
        return max(settings.gate_relabel_share, NEAREST_RECONSIDERED_SHARE)
    return settings.gate_relabel_share


def screen_labels(
    model: nn.Module,
    known: Answers,
    sets: list[SetTensors],
    classes: list[str],
    thresholds: dict[str, tuple[float, float]],
    settings: Settings,
    device: torch.device,
    means: dict[str, torch.Tensor],
) -> tuple[list[tuple[SetTensors, Verdict]], list[tuple[SetTensors, Verdict]], dict[str, dict[str, int]]]:
    """Split the sets into those whose labels the current version can accept and those it refuses
    (gate check 1, each verdict with the nearest-mean counts it read), each set with its relabel
    factor and nearest-mean share from thresholds and the mean features of the stored images of
    each known class; with the version's answers on the accepted sets' images of known classes,
    by label (the record later label checks read)."""
    accepted, refused = [], []
    record: dict[str, Counter[str]] = {}
    for s in sets:
        images = SampleTensors.join([s.train, s.holdout])
        logits, features = predict_features(model, images, device)
        answers = Answers.of(logits, images.labels, classes)
        factor, share = thresholds[s.update.update_id]
        verdict = check_labels(known, answers, settings.gate_label_alpha, factor)
        if verdict.passed and share > 0:
            verdict = check_nearest(nearest_means(features, images.labels, means), share)
        if not verdict.passed:
            refused.append((s, verdict))
            continue
        accepted.append((s, verdict))
        for t, p in zip(answers.true, answers.predicted, strict=True):
            if t in classes:
                record.setdefault(t, Counter())[p] += 1
    return accepted, refused, {label: dict(counts) for label, counts in record.items()}


def known_answers(holdout: Answers, lineage: Iterable[SnapshotMeta], classes: list[str], per_class: int) -> Answers:
    """What the lineage answers for each known class: the current version's answers on the old
    holdout, and each version's record of its parent's answers on the images it accepted, before
    training on them, newest first, up to about per_class images of each class from the record
    (so a long history is not read)."""
    true, predicted = list(holdout.true), list(holdout.predicted)
    taken: Counter[str] = Counter()
    for meta in lineage:
        for label, answers in meta.metrics.get(RECORD, {}).items():
            if taken[label] < per_class:
                for answer, count in answers.items():
                    true += [label] * count
                    predicted += [answer] * count
                    taken[label] += count
        if all(taken[c] >= per_class for c in classes):
            break
    return Answers(tuple(true), tuple(predicted))


@dataclass
class Step:
    """What one update step works on: the warm-started model, its lineage's replay memory (D_{t-1})
    and the new sets (U_t) as tensors, and what the current version answered before training."""

    device: torch.device
    generator: torch.Generator
    seed: int
    model: nn.Module
    parent: SnapshotMeta | None
    base_weights: str
    image_size: int
    old_classes: list[str]
    old_train: SampleTensors
    old_holdout: SampleTensors
    sets: list[SetTensors]
    incoming: list[str]  # the labels of the pending sets that the current version lacks
    load_seconds: float
    before: Answers = field(default_factory=lambda: Answers((), ()))  # the current version on the old holdout
    new_classes: list[str] = field(default_factory=list)
    new_train: SampleTensors | None = None
    new_holdout: SampleTensors | None = None
    nearest: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # gate check 1's counts, by set
    corroborated: dict[str, list[str]] = field(default_factory=dict)  # label: the sets applied on it without the label checks

    @property
    def classes(self) -> list[str]:
        return self.old_classes + self.new_classes


@dataclass
class Candidate:
    """A trained model's figures and the gate's verdict on it."""

    stats: TrainStats
    verdict: Verdict
    holdout_after: dict[str, Any]
    after: Answers  # the candidate on the old and new holdout
    evaluate_seconds: float
    consolidated: bool
    consolidated_because: str | None = None
    short_fine_tune: dict[str, Any] | None = None  # why a short fine-tune was set aside for a consolidation


def apply_step(settings: Settings, stores: Stores, pending: list[UpdateSet], lock: LineageLock) -> list[Attempt]:
    """One update step of the method: warm start, check the labels, grow the head, train, gate, publish or reject."""
    step = start_step(settings, stores, pending)
    refused, record = check_labels_of_sets(settings, stores, step)
    if not step.sets:
        return refused
    holdout_before = grow_for_new_classes(settings, step)
    candidate = train_and_judge(settings, stores, step)
    metrics = step_metrics(settings, step, candidate, holdout_before)
    if lock.lost:
        raise LockLost("the lineage lease expired during training; leaving the update to the new holder")
    accepted = [s.update for s in step.sets]
    if not candidate.verdict.passed:
        log.warning("rejected update set(s) %s: %s", [u.update_id for u in accepted], candidate.verdict.reason)
        metrics["refused_by"] = candidate.verdict.check
        return refused + [record_attempt(stores, accepted, "rejected", candidate.verdict.reason, metrics)]
    # The record goes with the published version only: the label checks read it from the lineage.
    metrics[RECORD] = record
    published = publish(settings, stores, step.model, step.parent, step.classes, step.image_size, step.base_weights, accepted, metrics)
    assert step.new_holdout is not None and published.model_version is not None
    remember_holdout(holdout_memo(stores), published.model_version, step.image_size, [step.old_holdout, step.new_holdout], candidate.after)
    return refused + [published]


def start_step(settings: Settings, stores: Stores, pending: list[UpdateSet]) -> Step:
    """Warm start from the current version, and read its replay memory and the pending sets."""
    clock = time.perf_counter()
    device = select_device(settings.device)
    seed = settings.seed + stores.snapshots.latest() if settings.seed is not None else random.getrandbits(62)
    torch.manual_seed(seed)
    model, parent = warm_start(settings, stores, list(dict.fromkeys(label for u in pending for label in u.labels)))
    old_classes = parent.classes if parent else []
    image_size = parent.image_size if parent else settings.image_size
    old_index = {c: i for i, c in enumerate(old_classes)}
    old_train, old_holdout = replay_memory(stores, parent, old_index, image_size, settings.gate_holdout_per_class)
    memo = holdout_memo(stores)
    if memo.image_size == image_size:
        old_holdout.reuse(memo.pixels)
    incoming = list(dict.fromkeys(label for u in pending for label in u.labels if label not in old_index))
    return Step(
        device=device,
        generator=torch.Generator().manual_seed(seed),
        seed=seed,
        model=model,
        parent=parent,
        base_weights=parent.base_weights if parent else settings.base_weights,
        image_size=image_size,
        old_classes=old_classes,
        old_train=old_train,
        old_holdout=old_holdout,
        sets=set_tensors(pending, old_classes + incoming, image_size),
        incoming=incoming,
        load_seconds=time.perf_counter() - clock,
    )


def check_labels_of_sets(settings: Settings, stores: Stores, step: Step) -> tuple[list[Attempt], dict[str, dict[str, int]]]:
    """Gate check 1 against the current version (none for a first version): the refused sets leave
    the step; returns their attempts and the version's answers on the accepted sets (the record)."""
    if step.parent is None:
        return [], {}
    step.old_holdout.decoded()  # once, for the answers before training and after it
    step.before = answers_before(step, holdout_memo(stores))
    remember_holdout(holdout_memo(stores), step.parent.version, step.image_size, [step.old_holdout], step.before)
    accepted, refused, record, step.nearest = refuse_contradicting_sets(
        settings, stores, step.model, step.parent, step.before, step.sets, step.device, step.old_train
    )
    joined, refused = corroborate(settings, stores, step, refused)
    step.sets = accepted + joined
    return [record_refusal(stores, s.update, verdict, step.parent.version) for s, verdict in refused], record


def corroborate(
    settings: Settings, stores: Stores, step: Step, refused: list[tuple[SetTensors, Verdict]]
) -> tuple[list[SetTensors], list[tuple[SetTensors, Verdict]]]:
    """Join the step with the sets of every label that at least WARMTUNE_GATE_CORROBORATE sets now
    stand refused on by a label check: this step's refusals of it and the stored sets still
    rejected on it, trained on together (gate check 2 still judges them). Returns the joined sets
    and the refusals that stand.

    A slip is one set; a new class the model cannot yet tell from an older one is refused set
    after set (in the paper-protocol gate study, up to 8 sets of Shirt, Pullover or Sandal one
    after the other), and none of them is learned until some are applied together.
    """
    if settings.gate_corroborate <= 0 or not refused:
        return [], refused
    standing = standing_refusals(stores, set(step.old_classes))
    here = Counter(verdict.label for _, verdict in refused if verdict.label)
    labels = {label for label, n in here.items() if n + len(standing.get(label, [])) >= settings.gate_corroborate}
    if not labels:
        return [], refused
    stored = [u for label in labels for u in standing.get(label, [])]
    joined = [s for s, verdict in refused if verdict.label in labels] + set_tensors(
        stored, step.old_classes + step.incoming, step.image_size
    )
    step.corroborated = {label: [s.update.update_id for s in joined if label in s.update.labels] for label in sorted(labels)}
    log.info("labels corroborated by the sets that stand refused on them, applied together: %s", step.corroborated)
    return joined, [(s, verdict) for s, verdict in refused if verdict.label not in labels]


def standing_refusals(stores: Stores, known: set[str]) -> dict[str, list[UpdateSet]]:
    """The stored sets that stand rejected by a label check, by the label it refused; only sets
    whose labels are all known (they need no new rows of the head)."""
    refused_on = {
        update_id: attempt.metrics["refused_label"]
        for update_id, (status, attempt) in stores.settled().items()
        if status == "rejected" and attempt is not None and attempt.metrics.get("refused_label")
    }
    by_label: dict[str, list[UpdateSet]] = {}
    for update in stores.readable(list(refused_on)):
        if set(update.labels) <= known:
            by_label.setdefault(refused_on[update.update_id], []).append(update)
    return by_label


def record_refusal(stores: Stores, update: UpdateSet, verdict: Verdict, parent: int) -> Attempt:
    log.warning("rejected update set %s before training: %s", update.update_id, verdict.reason)
    metrics: dict[str, Any] = {
        "gate": verdict.reason,
        "refused_by": verdict.check,
        "refused_label": verdict.label,
        "warm_start_from": parent,
    }
    if verdict.nearest is not None:
        metrics[NEAREST] = {update.update_id: verdict.nearest}
    return record_attempt(stores, [update], "rejected", verdict.reason, metrics)


def grow_for_new_classes(settings: Settings, step: Step) -> dict[str, Any] | None:
    """Join the accepted sets under the grown class list and grow the head by their new classes;
    returns the current version's holdout figures before training (None for a first version)."""
    # Classes in the order they first appear; a refused set's new classes are not added.
    step.new_classes = [c for c in step.incoming if any(c in s.update.labels for s in step.sets)]
    index = {c: i for i, c in enumerate(step.classes)}
    step.new_train = SampleTensors.join([s.train for s in step.sets], index)
    step.new_holdout = SampleTensors.join([s.holdout for s in step.sets], index)
    log.info(
        "applying %d update set(s) on top of version %s: %d new samples, %d old, new classes %s",
        len(step.sets),
        step.parent.version if step.parent else None,
        len(step.new_train),
        len(step.old_train),
        step.new_classes,
    )
    if step.parent is None:
        return None
    new_before = Answers.of(predict_logits(step.model, step.new_holdout, step.device), step.new_holdout.labels, step.old_classes)
    grow_head(step.model, len(step.new_classes), settings.head_init, step.generator)
    return holdout_summary(step.before, new_before)


def train_and_judge(settings: Settings, stores: Stores, step: Step) -> Candidate:
    """Train the candidate: the paper's short fine-tune, or a consolidation on the whole memory when
    one is due or when the short fine-tune falls short; then gate check 2."""
    if step.parent is None:
        return train_and_check(settings, step, consolidate=True, why="the first version")
    if settings.consolidate_growth == 0:
        return train_and_check(settings, step, consolidate=False)
    last = last_whole_memory_training(stores.snapshots.ancestors(step.parent.version))
    counts = samples_per_class(step)
    weak = grown_weak_classes(settings, step.before, last, counts)
    if consolidation_due(settings.consolidate_growth, last, len(step.old_train) + len(step.new_train)):
        return train_and_check(settings, step, consolidate=True, why="the memory grew")
    if weak:
        # A class the current version has lost (or never generalised to) on its holdout: the short
        # fine-tune only trains on it in proportion to its share of the memory; the whole memory does.
        why = "weak classes: " + weak
        log.info("the current version is weak on old classes (%s); training on the whole memory", why)
        return train_and_check(settings, step, consolidate=True, why=why)
    # The grown model before training: where a whole-memory training starts if the short one falls short.
    start = {k: v.detach().clone() for k, v in step.model.state_dict().items()}
    short = train_and_check(settings, step, consolidate=False)
    learned = new_classes_learned(step.model, step.new_train, step.new_classes, step.classes, step.device)
    # A short fine-tune can also knock out a class the version knew: on AlexNet the last step of a
    # stream did so to its newest class, and no later step came to see it weak and retrain.
    weak_after = grown_weak_classes(settings, short.after, last, counts)
    if short.verdict.check != "old knowledge" and learned >= 0.5 and not weak_after:
        return short
    # The short fine-tune cannot teach a weak network a look-alike class: it forgets old classes,
    # or does not fit the new class's own images. Training on the whole memory can; gate 2 judges
    # that candidate like any other.
    if short.verdict.check == "old knowledge":
        why = short.verdict.reason
    elif learned < 0.5:
        why = f"it calls {learned:.0%} of the new classes' images by their label"
    else:
        why = f"it leaves weak classes: {weak_after}"
    log.info("the short fine-tune falls short (%s); training on the whole memory instead", why)
    step.model.load_state_dict(start)
    candidate = train_and_check(settings, step, consolidate=True, why="the short fine-tune fell short")
    candidate.short_fine_tune = {"why": why, "iterations": short.stats.iterations, "train_seconds": short.stats.seconds}
    return candidate


def train_and_check(settings: Settings, step: Step, consolidate: bool, why: str | None = None) -> Candidate:
    stats = train_candidate(settings, step, consolidate)
    clock = time.perf_counter()
    verdict, after, holdout_after = judge_candidate(settings, step, stats)
    return Candidate(stats, verdict, holdout_after, after, time.perf_counter() - clock, consolidate, why)


def grown_weak_classes(settings: Settings, answers: Answers, last: SnapshotMeta | None, samples: Counter[str]) -> str:
    """The weak classes among these holdout answers, with their recall ("Sneaker 0.00, ..."), when one
    of them has grown enough since the last training on the whole memory to retrain for; else ""."""
    weak = weak_classes(answers, settings.consolidate_weak_recall)
    if not weak or not weak_class_grew(weak, last, samples):
        return ""
    return ", ".join(f"{c} {r:.2f}" for c, r in weak.items())


def weak_classes(before: Answers, below: float, least: int = 3) -> dict[str, float]:
    """Old classes the current version calls by their label on fewer than `below` of their holdout
    samples (at least `least` of them), with that share."""
    weak = {}
    for label in dict.fromkeys(before.true):
        hits, n = before.recall(label)
        if n >= least and hits / n < below:
            weak[label] = hits / n
    return weak


def step_metrics(settings: Settings, step: Step, candidate: Candidate, holdout_before: dict[str, Any] | None) -> dict[str, Any]:
    """What a step reports, published or rejected: GET /updates/{id} shows it."""
    stats = candidate.stats
    return {
        "first_version": step.parent is None,
        "consolidated": candidate.consolidated,
        "consolidated_because": candidate.consolidated_because,
        "short_fine_tune": candidate.short_fine_tune,
        "iterations": stats.iterations,
        "epochs": stats.epochs,
        "lr": settings.learning_rate(step.base_weights, short_fine_tune=not candidate.consolidated),
        "loss": stats.loss,
        "replay_lambda": settings.replay_lambda,
        "samples_old": len(step.old_train),
        "samples_new": len(step.new_train),
        "samples_per_class": dict(samples_per_class(step)),
        "new_classes": step.new_classes,
        "warm_start_from": step.parent.version if step.parent else None,
        "seed": step.seed,
        "holdout_before": holdout_before,
        **candidate.holdout_after,
        "gate": candidate.verdict.reason,
        NEAREST: step.nearest,
        "corroborated": step.corroborated,
        "load_seconds": step.load_seconds,
        "train_seconds": stats.seconds,
        "evaluate_seconds": candidate.evaluate_seconds,
    }


def refuse_contradicting_sets(
    settings: Settings,
    stores: Stores,
    model: nn.Module,
    parent: SnapshotMeta,
    before: Answers,
    sets: list[SetTensors],
    device: torch.device,
    memory: SampleTensors,
) -> tuple[list[SetTensors], list[tuple[SetTensors, Verdict]], dict[str, dict[str, int]], dict[str, dict[str, dict[str, int]]]]:
    """Gate check 1 against what the current version answers for each known class: the sets it
    accepts, those it refuses with their verdicts, its answers on the accepted sets (the record),
    and the nearest-mean counts of the accepted sets that test read, by set."""
    known = known_answers(before, stores.snapshots.ancestors(parent.version), parent.classes, settings.gate_holdout_per_class)
    history = stores.history()
    thresholds = {
        s.update.update_id: (relabel_factor(settings, attempts), nearest_share(settings, attempts))
        for s in sets
        for attempts in [history.get(s.update.update_id, [])]
    }
    judged = any(judged_by_nearest(s.update.labels, parent.classes) for s in sets)
    means = stored_means(settings, model, memory, device) if judged else {}
    accepted, refused, record = screen_labels(model, known, sets, parent.classes, thresholds, settings, device, means)
    nearest = {s.update.update_id: v.nearest for s, v in accepted if v.nearest}
    return [s for s, _ in accepted], refused, record, nearest


def stored_means(settings: Settings, model: nn.Module, memory: SampleTensors, device: torch.device) -> dict[str, torch.Tensor]:
    """The current model's mean features of the stored training images of each known class, from a
    bounded draw of the memory (WARMTUNE_GATE_HOLDOUT_PER_CLASS images of each class), so the cost
    does not grow with the history; none when the nearest-mean test is off."""
    if settings.gate_relabel_share <= 0 or not len(memory):
        return {}
    draw = per_class_draw(memory.samples, settings.gate_holdout_per_class, random.Random(len(memory)))
    _, features = predict_features(model, SampleTensors(draw, memory.class_index, memory.image_size), device)
    return class_means(features, [s.label for s in draw], NEAREST_MIN_REFERENCE)


def judge_candidate(settings: Settings, step: Step, stats: TrainStats) -> tuple[Verdict, Answers, dict[str, Any]]:
    """Gate check 2: did training converge, and does the candidate still tell the old classes
    apart? With the candidate's answers on the whole holdout, and its figures for the metrics."""
    old_logits = predict_logits(step.model, step.old_holdout, step.device)
    old_after = Answers.of(old_logits, step.old_holdout.labels, step.classes)
    new_after = Answers.of(predict_logits(step.model, step.new_holdout, step.device), step.new_holdout.labels, step.classes)
    kept = Answers.of(old_logits, step.old_holdout.labels, step.old_classes)  # read among the old classes only
    both = Answers(old_after.true + new_after.true, old_after.predicted + new_after.predicted)
    verdict = check_training(stats.loss)
    if verdict.passed:
        verdict = check_old_knowledge(step.before, kept, settings.gate_max_old_drop, settings.gate_drop_alpha)
    return (
        verdict,
        both,
        {
            "holdout_after": holdout_summary(old_after, new_after),
            "holdout_after_per_class": per_class(both),
            "old_classes_apart": {"before": step.before.accuracy(), "after": kept.accuracy()},
        },
    )


def replay_memory(
    stores: Stores, parent: SnapshotMeta | None, index: dict[str, int], image_size: int, holdout_per_class: int
) -> tuple[SampleTensors, SampleTensors]:
    """D_{t-1}: the training samples of the parent's lineage, and the bounded draw of its holdout the gate reads."""
    old_sets = stores.replay_sets(parent.version if parent else None)
    train = [s for u in old_sets for s in u.samples(holdout=False)]
    holdout = holdout_draw(old_sets, holdout_per_class)
    return SampleTensors(train, index, image_size), SampleTensors(holdout, index, image_size)


def publish(
    settings: Settings,
    stores: Stores,
    model: nn.Module,
    parent: SnapshotMeta | None,
    classes: list[str],
    image_size: int,
    base_weights: str,
    accepted: list[UpdateSet],
    metrics: dict[str, Any],
) -> Attempt:
    """Write the candidate as the new current version, then let retention prune what is no longer kept."""
    clock = time.perf_counter()
    meta = SnapshotMeta(
        version=0,  # assigned by publish
        parent=parent.version if parent else None,
        classes=classes,
        arch=parent.arch if parent else settings.arch,
        image_size=image_size,
        base_weights=base_weights,
        update_ids=[u.update_id for u in accepted],
        metrics=metrics,
    )
    version = stores.snapshots.publish(model.state_dict(), meta)
    metrics["publish_seconds"] = time.perf_counter() - clock
    if pruned := stores.snapshots.prune(settings.retain_versions, settings.retain_seconds):
        log.info("retention pruned the weights of version(s) %s (their metadata stays)", pruned)
    log.info(
        "published version %d (%d classes): holdout %s; %d iterations in %.1fs; written in %.2fs",
        version,
        len(classes),
        metrics["holdout_after"],
        metrics["iterations"],
        metrics["train_seconds"],
        metrics["publish_seconds"],
    )
    return Attempt("applied", meta.created_at, version, None, metrics, meta.update_ids)


def new_classes_learned(
    model: nn.Module, new_train: SampleTensors, new_classes: list[str], classes: list[str], device: torch.device
) -> float:
    """Share of the new classes' training samples the candidate calls by their label (1.0 without new classes)."""
    mine = [s for s in new_train.samples if s.label in new_classes]
    if not mine:
        return 1.0
    subset = SampleTensors(mine, new_train.class_index, new_train.image_size)
    return Answers.of(predict_logits(model, subset, device), subset.labels, classes).accuracy() or 0.0


def last_whole_memory_training(lineage: Iterable[SnapshotMeta]) -> SnapshotMeta | None:
    """The newest version of the lineage that trained on the whole memory: a consolidation or the first version."""
    for meta in lineage:  # newest first: only the versions since the last consolidation are read
        if meta.metrics.get("consolidated") or meta.metrics.get("first_version"):
            return meta
    return None


def consolidation_due(growth: float, last: SnapshotMeta | None, samples: int) -> bool:
    """Whether a step with this many training samples in all should retrain on the whole memory:
    they have grown by the factor since the last version that did.

    Growth by a factor keeps the cost of all consolidations within a constant multiple of one
    training on all the data: each trains on at most 1/growth of the next one's samples.
    """
    if growth == 0:
        return False
    if last is None:
        return True
    return samples >= growth * (last.metrics.get("samples_old", 0) + last.metrics.get("samples_new", 0))


def weak_class_grew(weak: Iterable[str], last: SnapshotMeta | None, samples: Counter[str]) -> bool:
    """Whether some weak class has gained samples, by WEAK_CLASS_GROWTH at least, since the last
    training on the whole memory.

    Counted per class, not over the whole memory: the class the annotators are teaching now (the
    last new class of a stream) grows by a third with each of its sets while the memory grows by
    a few percent, so its weakness is answered while its sets arrive. A class that stays weak
    costs about log(its samples)/log(WEAK_CLASS_GROWTH) such trainings.
    """
    then = (last.metrics.get("samples_per_class") or {}) if last else {}
    return any(samples[c] > then.get(c, 0) and samples[c] >= WEAK_CLASS_GROWTH * then.get(c, 0) for c in weak)


def samples_per_class(step: Step) -> Counter[str]:
    """The step's training samples (old and new) by label."""
    return Counter(s.label for part in (step.old_train, step.new_train) for s in part.samples)


def train_candidate(settings: Settings, step: Step, consolidate: bool) -> TrainStats:
    """The first version, and a consolidation, train on all the samples until the holdout stops
    improving; every other step is the paper's short fine-tune with replay."""
    if consolidate:
        cfg = TrainConfig.from_settings(settings, step.base_weights, iterations=0)  # epochs decide, not iterations
        index = step.new_train.class_index
        train = SampleTensors.join([step.new_train, step.old_train], index)
        holdout = SampleTensors.join([step.new_holdout, step.old_holdout], index)
        return train_first_version(
            step.model, train, holdout, cfg, settings.bootstrap_max_epochs, settings.bootstrap_patience, step.device, step.generator
        )
    n_old, n_new = len(step.old_train), len(step.new_train)
    iterations = iterations_for(settings.iterations, n_new, n_old + n_new, settings.batch_size)
    cfg = TrainConfig.from_settings(settings, step.base_weights, iterations)
    return fine_tune(step.model, step.old_train, step.new_train, cfg, step.device, step.generator)
