"""Derived status stays derived: cached between changes of the stores, never stale after one."""

import os
import time

import pytest
import torch
from imagegen import make_set

from app.errors import NotRetryable
from app.snapshots import AttemptRecord, SnapshotMeta
from app.stores import Stores


def age(*directories) -> None:
    """Date the directories back, as if nothing had changed for a while: their listing may be cached."""
    past = time.time() - 60
    for d in directories:
        os.utime(d, (past, past))


def test_status_follows_each_change_made_by_another_process_while_lookups_are_cached(settings):
    api, worker = Stores(settings), Stores(settings)  # two processes' views of one home
    [first, second] = [api.samples.add(*make_set({"red": 2}, seed=s))[0].update_id for s in (1, 2)]
    age(api.samples.root, api.snapshots.outcomes_dir)
    assert [api.status(u).status for u in (first, second)] == ["queued", "queued"]
    assert api.stores_version() is not None and api.counts()["queued"] == 2  # from the cache now

    worker.snapshots.record_attempt(AttemptRecord(outcome_id="o1", status="rejected", parent=None, update_ids=[first], reason="bad"))
    assert api.status(first).status == "rejected"
    age(api.snapshots.outcomes_dir)
    assert api.status(first).status == "rejected" and api.counts()["rejected"] == 1

    meta = SnapshotMeta(version=0, parent=None, classes=["red"], arch="resnet18", image_size=32, base_weights="none", update_ids=[second])
    worker.snapshots.publish({"w": torch.zeros(1)}, meta)  # the pointer moves: the outcome directory does not
    assert api.status(second).status == "applied" and api.counts()["applied"] == 1

    third = worker.samples.add(*make_set({"red": 2}, seed=3))[0].update_id
    age(api.samples.root)
    assert third in api.samples.ids() and api.counts()["queued"] == 1


def test_a_withdrawn_set_stays_out_of_the_replay_memory_until_restored_even_if_a_step_applied_it(settings):
    stores = Stores(settings)
    keep, take_back = [stores.samples.add(*make_set({"red": 2}, seed=s))[0].update_id for s in (1, 2)]
    stores.withdraw({take_back: "annotation 3 of task 1 now says 'blue'"})
    assert stores.status(take_back).status == "withdrawn"
    assert [u.update_id for u in stores.pending()] == [keep]

    # a step that read both sets before the withdrawal publishes them: the withdrawal holds
    meta = SnapshotMeta(
        version=0, parent=None, classes=["red"], arch="resnet18", image_size=32, base_weights="none", update_ids=[keep, take_back]
    )
    version = stores.snapshots.publish({"w": torch.zeros(1)}, meta)
    status = stores.status(take_back)
    assert status.status == "withdrawn" and "now says 'blue'" in status.error
    assert [a.status for a in status.attempts] == ["withdrawn", "applied"]
    assert [u.update_id for u in stores.replay_sets(version)] == [keep]
    assert stores.counts()["withdrawn"] == 1 and stores.counts()["applied"] == 1
    with pytest.raises(NotRetryable, match="is withdrawn"):
        stores.requeue(take_back, "retried on request")
    # a retry that checked the status just before the withdrawal does not undo it
    stores.snapshots.record_attempt(
        AttemptRecord(outcome_id="r1", status="requeued", parent=version, update_ids=[take_back], reason="retry")
    )
    assert stores.status(take_back).status == "withdrawn"

    assert stores.restore(take_back, "the label is 'red' again")
    assert stores.status(take_back).status == "applied"  # its version is in the lineage
    assert [u.update_id for u in stores.replay_sets(version)] == [keep, take_back]
    assert not stores.restore(take_back, "twice")
