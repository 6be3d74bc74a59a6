import shutil

import pytest
import torch

from app.errors import LineageMoved, UnknownVersion, VersionPruned
from app.snapshots import AttemptRecord, SnapshotMeta, SnapshotStore


def meta(parent, classes=("a", "b"), update_ids=("u1",)) -> SnapshotMeta:
    return SnapshotMeta(
        version=0,
        parent=parent,
        classes=list(classes),
        arch="resnet18",
        image_size=32,
        base_weights="none",
        update_ids=list(update_ids),
    )


def state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 3), value), "b": torch.zeros(2)}


def test_publishing_numbers_versions_and_moves_the_pointer(tmp_path):
    store = SnapshotStore(tmp_path)
    assert store.current() is None and store.versions() == []
    assert store.publish(state(1.0), meta(None)) == 1
    assert store.publish(state(2.0), meta(1, classes=("a", "b", "c"))) == 2
    assert store.current() == 2 and store.versions() == [1, 2]
    assert store.meta(2).classes == ["a", "b", "c"] and store.meta(2).parent == 1
    assert torch.equal(store.weights(1)["w"], torch.full((2, 3), 1.0))


def test_promote_rolls_back_and_forward_without_touching_versions(tmp_path):
    store = SnapshotStore(tmp_path)
    store.publish(state(1.0), meta(None))
    store.publish(state(2.0), meta(1))
    store.promote(1)
    assert store.current() == 1 and store.latest() == 2
    assert torch.equal(store.weights(2)["w"], torch.full((2, 3), 2.0))
    store.promote(2)
    assert store.current() == 2
    # the next version after a rollback continues the numbering, with the rolled-back-to parent
    store.promote(1)
    assert store.publish(state(3.0), meta(1)) == 3
    assert [m.version for m in store.lineage(3)] == [3, 1]


def test_promoting_an_unknown_version_is_refused(tmp_path):
    store = SnapshotStore(tmp_path)
    store.publish(state(1.0), meta(None))
    for version in (0, 2, -1):
        with pytest.raises(UnknownVersion, match=f"no model version {version}"):
            store.promote(version)
    assert store.current() == 1


def test_a_candidate_trained_on_a_stale_parent_is_not_published(tmp_path):
    store = SnapshotStore(tmp_path)
    store.publish(state(1.0), meta(None))
    store.publish(state(2.0), meta(1))
    with pytest.raises(LineageMoved):
        store.publish(state(3.0), meta(1))
    assert store.versions() == [1, 2] and store.current() == 2


def test_a_crash_between_writing_and_the_pointer_leaves_nothing_served(tmp_path):
    store = SnapshotStore(tmp_path)
    store.publish(state(1.0), meta(None))
    # what a crash after the rename but before the pointer moved leaves behind
    shutil.copytree(tmp_path / "1", tmp_path / "2")
    (tmp_path / ".tmp-abandoned").mkdir()
    assert store.versions() == [1] and store.current() == 1
    with pytest.raises(UnknownVersion):
        store.meta(2)
    # the next publish reclaims the number: versions stay contiguous, nothing is overwritten that was served
    assert store.publish(state(5.0), meta(1)) == 2
    assert torch.equal(store.weights(2)["w"], torch.full((2, 3), 5.0))
    assert not (tmp_path / ".tmp-abandoned").exists()


def test_attempt_records_are_written_and_read_back(tmp_path):
    store = SnapshotStore(tmp_path)
    store.record_attempt(AttemptRecord(outcome_id="o1", status="rejected", parent=None, update_ids=["u1"], reason="bad"))
    again = SnapshotStore(tmp_path).attempt_records()
    assert [(o.status, o.update_ids, o.reason) for o in again] == [("rejected", ["u1"], "bad")]


def test_retention_prunes_weights_but_keeps_current_newest_pinned_recent_and_every_meta(tmp_path):
    store = SnapshotStore(tmp_path)
    for v in range(1, 7):
        store.publish(state(float(v)), meta(v - 1 or None))
    store.pin(2)
    store.promote(1)  # the current version is kept whatever its age or number
    assert store.prune(keep_last=2, keep_seconds=0) == [3, 4]
    assert [v for v in store.versions() if store.has_weights(v)] == [1, 2, 5, 6]
    assert store.versions() == [1, 2, 3, 4, 5, 6] and store.meta(3).parent == 2  # the lineage is forever
    with pytest.raises(VersionPruned, match="version 3 has no weights any more"):
        store.promote(3)
    with pytest.raises(VersionPruned):
        store.weights(4)
    with pytest.raises(VersionPruned):
        store.pin(4)
    assert store.current() == 1

    store.pin(2, pinned=False)
    store.promote(6)
    assert store.prune(keep_last=2, keep_seconds=3600) == []  # a rollback window keeps the young ones
    assert store.prune(keep_last=1, keep_seconds=0) == [1, 2, 5]
    assert [v for v in store.versions() if store.has_weights(v)] == [6]


def test_a_store_sees_what_another_pruned_and_a_version_published_after_it_asked(tmp_path):
    worker, api = SnapshotStore(tmp_path), SnapshotStore(tmp_path)
    for v in range(1, 4):
        worker.publish(state(float(v)), meta(v - 1 or None))
    assert [api.has_weights(v) for v in (1, 2, 3, 4)] == [True, True, True, False]  # 4: not published yet
    assert worker.prune(keep_last=1, keep_seconds=0) == [1, 2]
    assert [api.has_weights(v) for v in (1, 2, 3)] == [False, False, True]
    worker.publish(state(4.0), meta(3))
    assert api.has_weights(4) and not api.has_weights(1)
    assert worker.prune(keep_last=1, keep_seconds=0) == [3]  # the pruned ones are not pruned again
