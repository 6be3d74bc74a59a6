"""Real update steps on generated images: warm start, head growth, replay, gate, publish."""

import time
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from imagegen import make_set, poisoned_set

from app.errors import NotRetryable
from app.model import build_model
from app.snapshots import SnapshotMeta
from app.stores import Attempt, Stores
from worker.gate import Answers
from worker.jobs import (
    NEAREST,
    RECORD,
    answers_before,
    apply_pending_updates,
    holdout_draw,
    holdout_memo,
    known_answers,
    nearest_share,
    relabel_factor,
    start_step,
    weak_classes,
)
from worker.trainer import TrainStats, predict_logits


def add(stores: Stores, images, labels) -> str:
    current = stores.snapshots.current()
    known = stores.snapshots.meta(current).classes if current else []
    update, _ = stores.samples.add(images, labels, known_classes=known)
    return update.update_id


def similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_three_steps_then_a_poisoned_set_is_rejected(settings):
    stores = Stores(settings)

    # step 1: two initial classes
    first = add(stores, *make_set({"red": 30, "green": 30}, seed=1))
    assert stores.status(first).status == "queued"
    [r1] = apply_pending_updates(settings)
    assert (r1.status, r1.model_version) == ("applied", 1)
    assert sorted(stores.snapshots.meta(1).classes) == ["green", "red"]
    assert r1.metrics["holdout_after"]["new"] >= 0.8

    # step 2: a new class grows the head, warm-started from version 1
    second = add(stores, *make_set({"blue": 30}, seed=2))
    [r2] = apply_pending_updates(settings)
    meta2 = stores.snapshots.meta(2)
    assert meta2.classes == stores.snapshots.meta(1).classes + ["blue"]
    assert (meta2.parent, r2.metrics["warm_start_from"], r2.metrics["new_classes"]) == (1, 1, ["blue"])
    v1, v2 = stores.snapshots.weights(1), stores.snapshots.weights(2)
    fresh = build_model("resnet18", 3).state_dict()
    assert similarity(v2["layer1.0.conv1.weight"], v1["layer1.0.conv1.weight"]) > 0.99
    assert abs(similarity(fresh["layer1.0.conv1.weight"], v1["layer1.0.conv1.weight"])) < 0.1
    assert r2.metrics["samples_old"] > 0 and r2.metrics["holdout_after"]["new"] >= 0.8

    # step 3: more samples of a known class; two sets coalesce into one step
    third = [add(stores, *make_set({"red": 10}, seed=s)) for s in (3, 4)]
    [r3] = apply_pending_updates(settings)
    assert r3.model_version == 3 and stores.snapshots.meta(3).update_ids == third
    assert stores.snapshots.meta(3).classes == meta2.classes

    # poisoned sets (green and blue images labelled red) contradict what version 3 knows: each is
    # refused on its own, before any training
    poison = [add(stores, *poisoned_set("green", "red", 60, seed=5)), add(stores, *poisoned_set("blue", "red", 60, seed=6))]
    r4 = apply_pending_updates(settings)
    assert [r.status for r in r4] == ["rejected", "rejected"] and {r.update_ids[0] for r in r4} == set(poison)
    assert stores.snapshots.current() == 3 and stores.snapshots.versions() == [1, 2, 3]
    status = stores.status(poison[0])
    # (green is known from 3 holdout answers, too few to compete in the relabel test: the
    # agreement test refuses the set)
    assert status.status == "rejected" and "labels contradict the current version" in status.error
    assert "0 of 60 images labelled 'red' agree with it" in status.error
    # version 3 recorded what version 2 answered for the red images before training on them
    assert sum(stores.snapshots.meta(3).metrics["answers_before_training"]["red"].values()) == 20

    assert [stores.status(u).status for u in [first, second, *third]] == ["applied"] * 4
    assert stores.status(second).model_version == 2
    assert stores.pending() == []
    assert apply_pending_updates(settings) == []


def test_images_that_lie_nearest_another_known_class_are_refused_by_where_they_lie(make_settings):
    # The agreement test off: only the nearest-mean test reads the labels of known classes.
    settings = make_settings(gate_label_alpha=0.0)
    stores = Stores(settings)
    add(stores, *make_set({"red": 30, "green": 30, "blue": 30}, seed=1))
    apply_pending_updates(settings)
    slip = add(stores, *poisoned_set("green", "red", 20, seed=2))  # green images labelled red
    clean = add(stores, *make_set({"red": 20}, seed=3))
    results = {r.update_ids[0]: r for r in apply_pending_updates(settings)}
    refused = results[slip]
    assert refused.status == "rejected" and refused.metrics["refused_by"] == "nearest"
    assert "images labelled 'red'" in refused.reason and "nearest those of 'green'" in refused.reason, refused.reason
    assert results[clean].status == "applied"
    # both checks keep the counts they read, the passing one in the version that applied the set
    slip_counts, clean_counts = refused.metrics[NEAREST][slip]["red"], results[clean].metrics[NEAREST][clean]["red"]
    assert slip_counts.get("green", 0) > slip_counts.get("red", 0) and sum(slip_counts.values()) == 20
    assert clean_counts.get("red", 0) > clean_counts.get("green", 0) and sum(clean_counts.values()) == 20
    assert stores.status(clean).attempts[-1].metrics[NEAREST][clean]["red"] == clean_counts  # as GET /updates/{id} shows it


def test_without_the_label_check_the_candidate_that_forgets_old_classes_is_refused(make_settings):
    # no replay of the true green images: the poison does its damage for certain. The paper's step
    # only: trained on the whole memory, 54 true green images outweigh the 54 poisoned ones enough
    # for the candidate to keep the old holdout (1.000 -> 0.944 seen), and that candidate passes.
    settings = make_settings(
        gate_label_alpha=0.0, gate_relabel_factor=0.0, gate_relabel_share=0.0, replay_lambda=0.0, iterations="50", consolidate_growth=0
    )
    stores = Stores(settings)
    add(stores, *make_set({"red": 60, "green": 60, "blue": 60}, seed=1))  # a holdout of 18
    apply_pending_updates(settings)
    poison = add(stores, *poisoned_set("green", "red", 60, seed=5))
    [result] = apply_pending_updates(settings)
    assert result.status == "rejected", (result.metrics["gate"], result.metrics["holdout_after_per_class"])
    status = stores.status(poison)
    assert "the candidate would forget old classes" in status.error and "green" in status.error
    before, after = status.metrics["old_classes_apart"]["before"], status.metrics["old_classes_apart"]["after"]
    assert after < before - settings.gate_max_old_drop


def test_a_rejected_set_is_kept_retried_on_request_and_reconsidered_a_bounded_number_of_times(make_settings):
    settings = make_settings(retry_auto_max=1)
    stores = Stores(settings)
    add(stores, *make_set({"red": 30, "green": 30}, seed=1))
    apply_pending_updates(settings)
    poison = add(stores, *poisoned_set("green", "red", 20, seed=5))
    apply_pending_updates(settings)
    assert stores.status(poison).status == "rejected"
    with pytest.raises(NotRetryable, match="applied"):
        stores.requeue(stores.snapshots.meta(1).update_ids[0], "by hand")

    # retried by hand: queued, tried again, rejected again; every attempt is in its history
    stores.requeue(poison, "retried by an annotator")
    assert stores.status(poison).status == "queued" and [u.update_id for u in stores.pending()] == [poison]
    apply_pending_updates(settings)
    attempts = stores.status(poison).attempts
    assert [a.status for a in attempts] == ["rejected", "requeued", "rejected"]
    assert attempts[1].reason == "retried by an annotator" and "labels contradict" in attempts[2].reason

    # more red applied: the red-labelled set is reconsidered once by itself, then left alone
    add(stores, *make_set({"red": 10}, seed=7))
    results = apply_pending_updates(settings)
    assert [r.status for r in results] == ["applied", "rejected"]
    add(stores, *make_set({"red": 10}, seed=8))
    assert [r.status for r in apply_pending_updates(settings)] == ["applied"]
    attempts = stores.status(poison).attempts
    assert [a.status for a in attempts].count("requeued") == 2
    assert attempts[-2].reason.startswith("reconsidered: version 2 applied more images of red")


def test_after_a_rollback_the_next_version_grows_from_the_promoted_one(settings):
    stores = Stores(settings)
    add(stores, *make_set({"red": 20, "green": 20}, seed=1))
    apply_pending_updates(settings)
    blue = add(stores, *make_set({"blue": 20}, seed=2))
    apply_pending_updates(settings)
    stores.snapshots.promote(1)

    # blue is new again on this branch
    add(stores, *make_set({"blue": 20}, seed=3))
    [result] = apply_pending_updates(settings)

    meta = stores.snapshots.meta(result.model_version)
    assert (result.model_version, meta.parent) == (3, 1)
    assert meta.classes == stores.snapshots.meta(1).classes + ["blue"]
    assert blue not in {u.update_id for u in stores.replay_sets(3)}  # blue belongs to the abandoned branch
    status = stores.status(blue)
    assert status.status == "orphaned" and "retry it" in status.error
    assert stores.counts()["orphaned"] == 1

    # promoting the abandoned branch again makes it applied again; retrying applies it on this branch
    stores.snapshots.promote(2)
    assert stores.status(blue).status == "applied"
    stores.snapshots.promote(3)
    stores.requeue(blue, "re-apply after rollback")
    [again] = apply_pending_updates(settings)
    assert (again.model_version, stores.snapshots.meta(4).parent) == (4, 3)
    assert stores.status(blue).status == "applied" and stores.status(blue).model_version == 4
    assert blue in {u.update_id for u in stores.replay_sets(4)}


def test_a_step_that_fails_is_recorded_and_the_job_goes_on(make_settings):
    broken = make_settings(arch="nonesuch")
    stores = Stores(broken)
    update = add(stores, *make_set({"red": 4}, seed=1))
    [result] = apply_pending_updates(broken)
    assert result.status == "failed"
    status = stores.status(update)
    assert status.status == "failed" and "unknown architecture 'nonesuch'" in status.error


def test_a_step_that_fails_after_refusing_a_set_leaves_that_set_rejected(settings, monkeypatch):
    stores = Stores(settings)
    add(stores, *make_set({"red": 30, "green": 30}, seed=1))
    apply_pending_updates(settings)
    poison = add(stores, *poisoned_set("green", "red", 20, seed=5))
    clean = add(stores, *make_set({"blue": 10}, seed=6))

    def broken(*args, **kwargs):
        raise RuntimeError("the GPU fell off")

    monkeypatch.setattr("worker.jobs.train_candidate", broken)
    results = apply_pending_updates(settings)
    assert [(r.status, r.update_ids) for r in results] == [("failed", [clean])]  # the poison was refused first
    assert stores.status(poison).status == "rejected" and stores.status(clean).status == "failed"


def test_running_is_reported_while_a_job_holds_the_update(settings):
    stores = Stores(settings)
    update = add(stores, *make_set({"red": 4}, seed=1))
    stores.mark_running([update], lease_s=30)
    assert stores.status(update).status == "running"
    assert stores.counts()["running"] == 1
    stores.mark_running([update], lease_s=-1)  # a dead job's marker expires by itself
    assert stores.status(update).status == "queued"


def test_the_batched_trigger_waits_for_enough_samples_or_time_then_takes_them_in_one_step(make_settings):
    settings = make_settings(trigger="batched", trigger_samples=30, trigger_wait_s=3600)
    stores = Stores(settings)
    small = add(stores, *make_set({"red": 10, "green": 10}, seed=1))
    assert apply_pending_updates(settings) == [] and stores.status(small).status == "queued"
    more = add(stores, *make_set({"red": 5, "green": 5}, seed=2))  # 30 samples pending now
    [step] = apply_pending_updates(settings)
    assert (step.status, step.model_version, sorted(step.update_ids)) == ("applied", 1, sorted([small, more]))

    late = add(stores, *make_set({"blue": 4}, seed=3))
    assert apply_pending_updates(settings) == []
    waited = make_settings(trigger="batched", trigger_samples=30, trigger_wait_s=0.5)
    deadline = time.monotonic() + 30
    while not (steps := apply_pending_updates(waited)):  # the oldest set's wait runs out
        assert time.monotonic() < deadline, "the batched trigger never fired"
        time.sleep(0.1)
    assert [(s.status, s.update_ids) for s in steps] == [("applied", [late])]


def test_the_label_check_reads_the_newest_answers_of_the_lineage_up_to_the_cap():
    def meta(version: int, record: dict) -> SnapshotMeta:
        return SnapshotMeta(
            version=version,
            parent=version - 1 or None,
            classes=["a", "b"],
            arch="resnet18",
            image_size=32,
            base_weights="none",
            update_ids=[],
            metrics={RECORD: record},
        )

    newest_first = [meta(3, {"a": {"a": 4, "b": 1}}), meta(2, {"a": {"b": 5}, "b": {"b": 5}}), meta(1, {"b": {"a": 9}})]
    read = []

    def lineage():
        for m in newest_first:
            read.append(m.version)
            yield m

    holdout = Answers(("a",), ("a",))
    known = known_answers(holdout, lineage(), ["a", "b"], per_class=5)
    # a: the holdout, then version 3's five answers (full); b: version 2's five; version 1 is never read
    assert Counter(zip(known.true, known.predicted, strict=True)) == {("a", "a"): 5, ("a", "b"): 1, ("b", "b"): 5}
    assert read == [3, 2]


def test_a_set_the_relabel_test_refused_must_be_explained_by_its_label_when_reconsidered(settings):
    refused = Attempt("rejected", 1.0, 3, "labels contradict", {"refused_by": "relabel"})
    disagreed = Attempt("rejected", 1.0, 3, "labels contradict", {"refused_by": "agreement"})
    forgot = Attempt("rejected", 1.0, 3, "the candidate would forget", {})
    by_itself = Attempt("requeued", 2.0, 4, "reconsidered", {"automatic": True})
    by_request = Attempt("requeued", 2.0, 4, "retried on request", {"automatic": False})
    settings = settings.model_copy(update={"gate_relabel_factor": 10.0})  # off by default since the nearest-mean test
    assert relabel_factor(settings, []) == settings.gate_relabel_factor
    assert relabel_factor(settings, [refused, by_itself]) == 1.0  # hysteresis
    assert relabel_factor(settings, [refused, by_request]) == settings.gate_relabel_factor  # an annotator's call
    assert relabel_factor(settings, [forgot, by_itself]) == settings.gate_relabel_factor
    assert relabel_factor(settings, [disagreed, by_itself]) == settings.gate_relabel_factor
    # refused by the relabel test once, later by the check after training: still judged at 1
    assert relabel_factor(settings, [refused, by_itself, forgot, by_itself]) == 1.0
    assert relabel_factor(settings.model_copy(update={"gate_relabel_factor": 0.0}), [refused, by_itself]) == 0.0


def test_a_set_the_nearest_mean_test_refused_needs_half_its_images_nearest_its_label_when_reconsidered(settings):
    refused = Attempt("rejected", 1.0, 3, "labels contradict", {"refused_by": "nearest"})
    by_relabel = Attempt("rejected", 1.0, 3, "labels contradict", {"refused_by": "relabel"})
    by_itself = Attempt("requeued", 2.0, 4, "reconsidered", {"automatic": True})
    by_request = Attempt("requeued", 2.0, 4, "retried on request", {"automatic": False})
    assert nearest_share(settings, []) == settings.gate_relabel_share == 0.4
    assert nearest_share(settings, [refused, by_itself]) == 0.5  # hysteresis
    assert nearest_share(settings, [refused, by_request]) == settings.gate_relabel_share  # an annotator's call is judged like a new set
    assert nearest_share(settings, [by_relabel, by_itself]) == settings.gate_relabel_share
    assert nearest_share(settings.model_copy(update={"gate_relabel_share": 0.0}), [refused, by_itself]) == 0.0


def test_a_step_retrains_on_the_whole_memory_once_it_has_grown_by_the_factor(settings):
    settings = settings.model_copy(update={"consolidate_growth": 1.5, "bootstrap_max_epochs": 8, "bootstrap_patience": 3})
    stores = Stores(settings)
    add(stores, *make_set({"red": 20, "green": 20}, seed=1))  # 36 training samples after the holdout
    [first] = apply_pending_updates(settings)
    assert first.metrics["consolidated"] and first.metrics["epochs"] >= 1
    add(stores, *make_set({"red": 10}, seed=2))  # 36 + 9 = 45 < 1.5 * 36: the paper's short fine-tune
    [short] = apply_pending_updates(settings)
    assert not short.metrics["consolidated"] and short.metrics["iterations"] == 9
    add(stores, *make_set({"blue": 10}, seed=3))  # 45 + 9 = 54 >= 54: every sample, epochs until the holdout stops improving
    [whole] = apply_pending_updates(settings)
    assert whole.status == "applied" and whole.metrics["consolidated"]
    assert whole.metrics["iterations"] >= whole.metrics["epochs"] * (54 // settings.batch_size)
    assert [m.metrics["consolidated"] for m in stores.snapshots.ancestors(whole.model_version)] == [True, False, True]

    off = settings.model_copy(update={"consolidate_growth": 0})
    add(stores, *make_set({"blue": 30}, seed=4))
    [never] = apply_pending_updates(off)
    assert not never.metrics["consolidated"]


def test_a_short_fine_tune_that_would_forget_old_classes_is_tried_again_on_the_whole_memory(settings, monkeypatch):
    # no consolidation by growth here; few epochs: the colours are learned in a handful
    settings = settings.model_copy(update={"consolidate_growth": 10.0, "bootstrap_max_epochs": 8, "bootstrap_patience": 3})
    stores = Stores(settings)
    add(stores, *make_set({"red": 40, "green": 40, "blue": 40}, seed=1))
    apply_pending_updates(settings)

    def forgetful_fine_tune(model, *args, **kwargs):  # what a short fine-tune can do to a weak network
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.01)
        return TrainStats(iterations=9, loss=1.0, seconds=0.0)

    monkeypatch.setattr("worker.jobs.fine_tune", forgetful_fine_tune)
    add(stores, *make_set({"yellow": 10}, seed=2))
    [step] = apply_pending_updates(settings)
    assert step.status == "applied" and step.metrics["consolidated"], step
    assert "would forget old classes" in step.metrics["short_fine_tune"]["why"]
    assert step.metrics["holdout_after"]["old"] >= 0.9

    add(stores, *make_set({"yellow": 10}, seed=3))
    [refused] = apply_pending_updates(settings.model_copy(update={"consolidate_growth": 0}))  # the paper's step only
    assert refused.status == "rejected" and "would forget old classes" in refused.reason


def test_a_short_fine_tune_that_does_not_fit_its_new_class_is_tried_again_on_the_whole_memory(settings, monkeypatch):
    settings = settings.model_copy(update={"consolidate_growth": 10.0, "bootstrap_max_epochs": 8, "bootstrap_patience": 3})
    stores = Stores(settings)
    add(stores, *make_set({"red": 20, "green": 20, "blue": 20}, seed=1))
    apply_pending_updates(settings)
    monkeypatch.setattr("worker.jobs.fine_tune", lambda *args, **kwargs: TrainStats(iterations=9, loss=1.0, seconds=0.0))
    add(stores, *make_set({"yellow": 10}, seed=2))  # untrained, the new row (the mean of the old ones) wins no image
    [step] = apply_pending_updates(settings)
    assert step.status == "applied" and step.metrics["consolidated"], step
    assert "0% of the new classes' images" in step.metrics["short_fine_tune"]["why"]


def test_weak_classes_are_those_the_version_calls_right_too_rarely_on_enough_samples():
    before = Answers(("a",) * 4 + ("b",) * 2 + ("c",) * 3, ("a", "c", "c", "c", "a", "a", "c", "c", "a"))
    # a: 1 of 4 right; b: 0 of 2, too few to say; c: 2 of 3
    assert weak_classes(before, 0.3) == {"a": 0.25}
    assert weak_classes(before, 0.0) == {}  # off


def test_a_weak_old_class_makes_a_step_train_on_the_whole_memory_at_most_once_per_tenth_of_its_own_growth(settings, monkeypatch):
    settings = settings.model_copy(update={"consolidate_growth": 10.0, "bootstrap_max_epochs": 8, "bootstrap_patience": 3})
    stores = Stores(settings)
    add(stores, *make_set({"red": 20, "green": 60}, seed=1))  # 18 red and 54 green training samples
    apply_pending_updates(settings)
    seen = []

    def red_is_weak(before, below):
        seen.append(before.recall("red"))
        return {"red": 0.0}

    monkeypatch.setattr("worker.jobs.weak_classes", red_is_weak)
    add(stores, *make_set({"red": 10}, seed=2))  # red 18 + 9 = 27 >= 1.1 * 18 (the memory: 81 < 1.1 * 72 + 2)
    [whole] = apply_pending_updates(settings)
    assert whole.metrics["consolidated"] and whole.metrics["consolidated_because"] == "weak classes: red 0.00"
    assert whole.metrics["samples_per_class"] == {"red": 27, "green": 54}
    assert seen and seen[0][1] > 0  # it was asked about the version's holdout answers
    add(stores, *make_set({"green": 10}, seed=3))  # red has not grown: the paper's step, weak or not
    [short] = apply_pending_updates(settings)
    assert short.status == "applied" and not short.metrics["consolidated"]
    add(stores, *make_set({"red": 3}, seed=4))  # red 27 + 3 = 30 >= 1.1 * 27
    [again] = apply_pending_updates(settings)
    assert again.metrics["consolidated"] and again.metrics["samples_per_class"]["red"] == 30


def test_a_short_fine_tune_that_leaves_a_grown_class_weak_is_set_aside_for_the_whole_memory(settings, monkeypatch):
    settings = settings.model_copy(update={"consolidate_growth": 10.0, "bootstrap_max_epochs": 8, "bootstrap_patience": 3})
    stores = Stores(settings)
    add(stores, *make_set({"red": 20, "green": 60}, seed=1))
    apply_pending_updates(settings)
    calls = []

    def red_weak_after_training(answers, below):  # called on the current version, then on the candidate
        calls.append(len(answers))
        return {"red": 0.0} if len(calls) % 2 == 0 else {}

    monkeypatch.setattr("worker.jobs.weak_classes", red_weak_after_training)
    add(stores, *make_set({"green": 10}, seed=2))  # red has not grown since the first version: kept
    [kept] = apply_pending_updates(settings)
    assert kept.status == "applied" and not kept.metrics["consolidated"]
    add(stores, *make_set({"red": 10}, seed=3))  # red grew: the weak candidate is set aside
    [whole] = apply_pending_updates(settings)
    assert whole.status == "applied" and whole.metrics["consolidated"], whole
    assert whole.metrics["short_fine_tune"]["why"] == "it leaves weak classes: red 0.00"
    assert len(calls) == 4  # the current version and the short fine-tune's candidate, in each step


def test_the_short_fine_tune_trains_at_its_own_rate_and_the_whole_memory_at_the_lineage_rate(make_settings, monkeypatch):
    settings = make_settings(finetune_lr=0.002, consolidate_growth=10.0, bootstrap_max_epochs=8, bootstrap_patience=3)
    stores = Stores(settings)
    add(stores, *make_set({"red": 20, "green": 20}, seed=1))
    [first] = apply_pending_updates(settings)
    rates = []

    def spy(model, old, new, cfg, *args):
        rates.append(cfg.lr)
        return TrainStats(iterations=cfg.iterations, loss=0.1, seconds=0.0)

    monkeypatch.setattr("worker.jobs.fine_tune", spy)
    add(stores, *make_set({"red": 10}, seed=2))
    [step] = apply_pending_updates(settings)
    assert first.metrics["lr"] == 0.01  # random weights: the lineage's rate
    assert rates == [0.002]
    assert step.status == "applied" and not step.metrics["consolidated"] and step.metrics["lr"] == 0.002


def test_sets_that_stand_refused_on_the_same_label_are_applied_together_once_there_are_enough(make_settings):
    # The check after training off: what corroboration lets through is applied.
    settings = make_settings(gate_corroborate=3, gate_max_old_drop=1.0)
    stores = Stores(settings)
    add(stores, *make_set({"red": 30, "green": 30, "blue": 30}, seed=1))
    apply_pending_updates(settings)
    insisted = []
    for seed in (10, 11):  # one set at a time: each refused by itself
        insisted.append(add(stores, *poisoned_set("green", "red", 10, seed=seed)))
        [refused] = apply_pending_updates(settings)
        assert refused.status == "rejected" and refused.metrics["refused_label"] == "red", refused.reason
    other = add(stores, *poisoned_set("red", "blue", 10, seed=20))  # refused on another label: not counted for red
    assert [r.status for r in apply_pending_updates(settings)] == ["rejected"]

    third = add(stores, *poisoned_set("green", "red", 10, seed=12))
    [applied] = apply_pending_updates(settings)
    assert applied.status == "applied" and sorted(applied.update_ids) == sorted([*insisted, third])
    assert sorted(applied.metrics["corroborated"]["red"]) == sorted([*insisted, third])
    assert [stores.status(u).status for u in [*insisted, third]] == ["applied"] * 3
    assert stores.status(other).status == "rejected"


def test_corroborated_sets_still_face_the_check_after_training_and_are_not_tried_together_again(make_settings):
    settings = make_settings(gate_corroborate=2, replay_lambda=0.0, iterations="50", consolidate_growth=0)
    stores = Stores(settings)
    add(stores, *make_set({"red": 60, "green": 60, "blue": 60}, seed=1))
    apply_pending_updates(settings)
    first = add(stores, *poisoned_set("green", "red", 20, seed=10))
    apply_pending_updates(settings)
    second = add(stores, *poisoned_set("green", "red", 20, seed=11))
    [result] = apply_pending_updates(settings)
    # trained together on 40 green images labelled red, the candidate forgets green: refused, both sets with it
    assert result.status == "rejected" and sorted(result.update_ids) == sorted([first, second]), result.reason
    assert result.metrics["refused_by"] == "old knowledge" and sorted(result.metrics["corroborated"]["red"]) == sorted([first, second])
    assert stores.status(first).status == "rejected" and "forget old classes" in stores.status(first).error
    # rejected after training, they no longer stand refused on red: a third slip is refused by itself
    third = add(stores, *poisoned_set("green", "red", 20, seed=12))
    [alone] = apply_pending_updates(settings)
    assert alone.status == "rejected" and alone.update_ids == [third] and alone.metrics["refused_label"] == "red"


def test_the_gate_draws_a_bounded_holdout_that_a_new_set_changes_only_by_its_own_samples(settings):
    stores = Stores(settings)
    older = [stores.samples.add(*make_set({"red": 20, "green": 20}, seed=s))[0] for s in range(4)]
    draw = holdout_draw(older, per_class=5)
    assert Counter(s.label for s in draw) == {"red": 5, "green": 5}
    assert holdout_draw(older, per_class=5) == draw  # the same sets, the same draw: no seed, no clock
    newer = stores.samples.add(*make_set({"red": 20, "green": 20}, seed=9))[0]
    after = holdout_draw([*older, newer], per_class=5)
    assert Counter(s.label for s in after) == {"red": 5, "green": 5}
    # what was drawn stays drawn, except where the new set's own samples rank before it
    assert {s.key for s in after} <= {s.key for s in draw} | {s.key for s in newer.samples(holdout=True)}


def test_a_long_lived_caller_answers_the_old_holdout_from_the_last_step_as_the_version_would(settings):
    stores = Stores(settings)
    add(stores, *make_set({"red": 30, "green": 30}, seed=1))
    apply_pending_updates(settings, stores=stores)
    add(stores, *make_set({"blue": 20}, seed=2))
    [r2] = apply_pending_updates(settings, stores=stores)
    memo = holdout_memo(stores)
    assert memo.version == r2.model_version == 2
    # the memo holds what version 2 itself answers for every sample its next step draws
    meta = stores.snapshots.meta(2)
    step = start_step(settings, stores, [])
    assert len(step.old_holdout) > 0 and {s.key for s in step.old_holdout.samples} <= set(memo.answers)
    fresh = Answers.of(predict_logits(step.model, step.old_holdout, step.device), step.old_holdout.labels, meta.classes)
    assert answers_before(step, memo) == fresh
    # answers from another version are not taken: a memo of version 1 is answered afresh
    memo.version, memo.answers = 1, {key: "green" for key in memo.answers}
    assert answers_before(step, memo) == fresh
    memo.version = 2  # ... while those of version 2 are, without a forward pass
    assert set(answers_before(step, memo).predicted) == {"green"}


def test_an_applied_set_whose_images_are_damaged_on_disk_goes_aside_and_the_lineage_goes_on(settings):
    stores = Stores(settings)
    add(stores, *make_set({"red": 30, "green": 30}, seed=1))
    apply_pending_updates(settings)
    damaged = add(stores, *make_set({"red": 20, "green": 20}, seed=2))
    apply_pending_updates(settings)
    assert stores.status(damaged).status == "applied"
    # every image of the set changes on disk (its manifest still reads): only reading one finds it
    path = stores.samples.path(damaged)
    raw = bytearray(path.read_bytes())
    for member in stores.samples.get(damaged).members:
        raw[member.offset + 30 + 6] ^= 0xFF
    path.write_bytes(bytes(raw))

    later = add(stores, *make_set({"red": 10}, seed=3))
    results = apply_pending_updates(settings)
    assert [(r.status, r.update_ids) for r in results] == [("applied", [later])]
    assert damaged not in stores.snapshots.meta(results[0].model_version).update_ids
    status = stores.status(damaged)
    assert status.status == "quarantined" and "could not be read" in status.error, status
    assert (stores.samples.root / "quarantine" / f"{damaged}.zip").exists()  # moved aside, never deleted
