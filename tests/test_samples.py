import io
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from imagegen import make_set
from PIL import Image

from app.errors import CorruptUpdate, DamagedSample, InvalidImage, InvalidLabel, InvalidUpdate, UnknownUpdate
from app.samples import Sample, SampleStore, image_members, split_holdout, write_archive


def store(root: Path, holdout: float = 0.1) -> SampleStore:
    return SampleStore(root, 40_000_000, max_label_length=20, holdout_fraction=holdout, max_request_pixels=10**9, decode_slots=2)


def test_an_update_set_round_trips_with_its_bytes(tmp_path):
    images, labels = make_set({"red": 6, "green": 4})
    update, created = store(tmp_path).add(images, labels)
    assert created
    again = store(tmp_path).get(update.update_id)  # a fresh store reads it from disk
    assert again.labels == tuple(labels)
    samples = again.samples(holdout=False) + again.samples(holdout=True)
    assert sorted(s.read() for s in samples) == sorted(images)
    assert {s.label for s in samples} == {"red", "green"}


def test_holdout_is_a_stratified_fraction_with_one_per_new_class():
    labels = ["a"] * 30 + ["b"] * 10 + ["c"] * 3 + ["d"]
    chosen = split_holdout("x" * 32, labels, 0.1, new_classes={"c", "d"})
    per_label = {lab: sum(1 for i in chosen if labels[i] == lab) for lab in "abcd"}
    assert per_label == {"a": 3, "b": 1, "c": 1, "d": 0}  # d has a single sample: it is kept for training
    assert split_holdout("x" * 32, labels, 0.0, {"c"}) == set()


def test_the_same_payload_splits_the_same_way_in_every_store(tmp_path):
    images, labels = make_set({"red": 20, "green": 20}, seed=3)
    first, _ = store(tmp_path / "a").add(images, labels)
    second, _ = store(tmp_path / "b").add(images, labels)
    assert first.update_id != second.update_id and first.fingerprint == second.fingerprint
    assert first.holdout == second.holdout and len(first.holdout) == 4
    other, _ = store(tmp_path / "c").add(images, ["green" if x == "red" else "red" for x in labels])
    assert other.fingerprint != first.fingerprint


def test_new_classes_are_those_not_known(tmp_path):
    images, labels = make_set({"red": 2, "green": 2})
    update, _ = store(tmp_path).add(images, labels, known_classes=["red"])
    assert update.new_classes == ("green",)


def test_an_idempotency_key_stores_a_set_once(tmp_path):
    s = store(tmp_path)
    images, labels = make_set({"red": 3})
    first, created = s.add(images, labels, idempotency_key="k-1")
    second, created_again = s.add(images, labels, idempotency_key="k-1")
    assert created and not created_again
    assert first.update_id == second.update_id
    assert s.ids() == [first.update_id]


@pytest.mark.parametrize(
    "labels,error,message",
    [
        (["red", "red", "   "], InvalidLabel, "image 2: label is empty"),
        (["red", "red", "x" * 21], InvalidLabel, "image 2: label is 21 characters, over the limit of 20"),
        (["red", "red\x00", "red"], InvalidLabel, "image 1: label .* non-printable"),
        (["red", "red"], InvalidUpdate, "3 images but 2 labels"),
        (["red", "red", "red", "red"], InvalidUpdate, "3 images but 4 labels"),
    ],
)
def test_bad_labels_are_refused_and_nothing_is_stored(tmp_path, labels, error, message):
    images, _ = make_set({"red": 3})
    s = store(tmp_path)
    with pytest.raises(error, match=message):
        s.add(images, labels)
    assert s.ids() == []


def test_one_bad_image_refuses_the_whole_set_naming_it(tmp_path):
    images, labels = make_set({"red": 3})
    images[1] = b"GIF89a but not really"
    s = store(tmp_path)
    with pytest.raises(InvalidImage, match="shoe.png: not an image in a format we read"):
        s.add(images, labels, names=["a.png", "shoe.png", "c.png"])
    assert s.ids() == []
    assert list(tmp_path.iterdir()) == []


def test_an_empty_set_is_refused(tmp_path):
    with pytest.raises(InvalidUpdate, match="at least one image"):
        store(tmp_path).add([], [])


def test_unknown_or_malformed_ids_are_unknown(tmp_path):
    s = store(tmp_path)
    for update_id in ["0" * 32, "../../etc/passwd", ""]:
        with pytest.raises(UnknownUpdate):
            s.get(update_id)


def test_a_crash_mid_write_leaves_the_store_readable_and_the_set_absent(tmp_path):
    # A real process dies (SIGKILL) after writing the set's bytes, before they are linked into place.
    child = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from imagegen import make_set
        from app.samples import SampleStore
        from pathlib import Path
        store = SampleStore(Path({str(tmp_path)!r}), 40_000_000, 20, 0.1, 10**9, 2)
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        store.add(*make_set({{"red": 50}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert result.returncode == -9, result.stderr
    assert any(tmp_path.iterdir()), "the child should have died holding a partly written file"

    s = store(tmp_path)
    assert s.ids() == []
    update, _ = s.add(*make_set({"green": 2}))
    assert s.ids() == [update.update_id]


def test_storing_a_set_builds_no_copy_of_it_in_memory(tmp_path):
    """The archive is written straight into its file: storing 4 MB of images allocates far less
    than the images again (it was about twice: a zip in a buffer, then the buffer's bytes)."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(20):  # noise does not compress: about 200 KB per PNG
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    size = sum(map(len, images))
    s = store(tmp_path)
    tracemalloc.start()
    try:
        update, _ = s.add(images, ["noise"] * len(images))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(update) == 20 and s.path(update.update_id).stat().st_size > size
    assert peak < 0.25 * size, f"storing {size} bytes of images allocated {peak} bytes at the peak"


def stored_samples(path: Path, images: list[bytes]) -> list[Sample]:
    with open(path, "wb") as f:
        write_archive(f, {}, images)
    with zipfile.ZipFile(path) as archive:
        members = image_members(archive, len(images))
    return [Sample("u", i, "x", archive=path, member=m) for i, m in enumerate(members)]


def test_a_sample_is_read_at_its_offset_and_checked_against_its_crc(tmp_path):
    path = tmp_path / "set.zip"
    samples = stored_samples(path, [b"first-0", b"first-1"])
    assert [samples[i].read() for i in (1, 0)] == [b"first-1", b"first-0"]
    # one flipped byte in an image: a read says so rather than hand training wrong bytes
    raw = bytearray(path.read_bytes())
    at = samples[1].member.offset + 30 + 6
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert samples[0].read() == b"first-0"
    with pytest.raises(DamagedSample, match="update set u: image 1 could not be read .*does not match its zip directory"):
        samples[1].read()


def test_a_sample_is_not_read_from_another_file_at_its_path(tmp_path):
    # a file replaced at the path: the old set's offsets read nothing from it unchecked
    path = tmp_path / "set.zip"
    old = stored_samples(path, [b"first-0", b"first-1"])
    new = stored_samples(path, [b"second-0", b"second-1"])
    assert [s.read() for s in new] == [b"second-0", b"second-1"]
    with pytest.raises(DamagedSample):
        old[1].read()


def test_a_stored_set_with_compressed_images_is_quarantined_not_misread(tmp_path):
    s = store(tmp_path)
    update, _ = s.add(*make_set({"red": 2, "green": 2}))
    path = s.path(update.update_id)
    with zipfile.ZipFile(path) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    with pytest.raises(CorruptUpdate, match="compressed"):
        store(tmp_path).get(update.update_id)
