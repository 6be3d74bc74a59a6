"""The sample store: every accepted update set, durable and whole, with its holdout split.

One update set is one zip file (manifest.json + the original image bytes), written to a
temporary file, fsynced and linked into place: a crash leaves the whole set or none of it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
import uuid
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.errors import CorruptUpdate, DamagedSample, IdempotencyConflict, InvalidLabel, InvalidUpdate, UnknownUpdate
from app.files import create_exclusive, directory_version, file_key
from app.images import check_pixel_budget, decode_image

UPDATE_ID = re.compile(r"^[0-9a-f]{32}$")
QUARANTINE = "quarantine"  # unreadable sets are moved here, with a .reason file beside each

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """Where an image lies in its update set's file: its zip member's local header, its size and CRC-32."""

    offset: int
    size: int
    crc: int


@dataclass(frozen=True)
class Sample:
    """One labelled image: its bytes in memory, or where to read them when first needed."""

    update_id: str
    index: int
    label: str
    data: bytes | None = None
    archive: Path | None = None  # the update set's zip, when data is None
    member: Member | None = None  # where the image lies in it

    @property
    def key(self) -> tuple[str, int]:
        """What names this sample across steps and processes: its set and its place in it."""
        return self.update_id, self.index

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.archive is not None and self.member is not None
        try:
            return read_member(self.archive, self.member)
        except (FileNotFoundError, zipfile.BadZipFile) as exc:  # not a passing error (EMFILE, EIO): the step fails, the set stays
            raise DamagedSample(self.update_id, f"image {self.index} could not be read ({type(exc).__name__}: {exc})") from None


def image_members(archive: zipfile.ZipFile, count: int) -> tuple[Member, ...]:
    """Where each of an open set file's `count` images lies: read once with its manifest, so that
    a replay draw reads one image without parsing the zip's directory again."""
    infos = [archive.getinfo(f"{i:06d}") for i in range(count)]
    if any(info.compress_type != zipfile.ZIP_STORED for info in infos):
        raise zipfile.BadZipFile("its images are compressed; warmtune stores them as they came")
    return tuple(Member(info.header_offset, info.compress_size, info.CRC) for info in infos)


LOCAL_HEADER = 30  # bytes of a zip member's local header before its name and extra field


def read_member(path: Path, member: Member) -> bytes:
    """An image's bytes straight from its set's file, checked against the member's header and CRC.

    Opening the zip for each read parses its directory; keeping zips open stops helping once a
    long history's draws span more sets than stay open. Reading at a known offset is one pread
    (bench/sample_reads.py).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        # Names are six digits and extra fields empty as write_archive writes them: one read.
        chunk = os.pread(fd, LOCAL_HEADER + 6 + member.size, member.offset)
        extent = LOCAL_HEADER + int.from_bytes(chunk[26:28], "little") + int.from_bytes(chunk[28:30], "little")
        if extent != LOCAL_HEADER + 6:
            chunk = chunk[:LOCAL_HEADER] + os.pread(fd, member.size, member.offset + extent)
            extent = LOCAL_HEADER
    finally:
        os.close(fd)
    data = chunk[extent : extent + member.size]
    if chunk[:4] != b"PK\x03\x04" or len(data) != member.size or zlib.crc32(data) != member.crc:
        raise zipfile.BadZipFile(f"{path.name}: the image at byte {member.offset} does not match its zip directory")
    return data


@dataclass(frozen=True)
class UpdateSet:
    update_id: str
    received_at: float
    labels: tuple[str, ...]
    holdout: frozenset[int]
    new_classes: tuple[str, ...]
    path: Path
    fingerprint: str = ""  # sets stored before fingerprints were kept have none
    members: tuple[Member, ...] = ()  # where each image lies in the file

    def __len__(self) -> int:
        return len(self.labels)

    def samples(self, holdout: bool) -> tuple[Sample, ...]:
        """The training samples (holdout=False) or the holdout samples (holdout=True).

        Their bytes are read when first used: a replay step reads the samples it draws, not the
        whole memory.
        """
        return self.holdout_samples if holdout else self.train_samples

    # Listed once per set: a worker keeps its sets (SampleStore.get) from step to step, and listing
    # a history of 1000 sets' samples anew took 0.04 s of every step (bench/history.py --at).
    @functools.cached_property
    def train_samples(self) -> tuple[Sample, ...]:
        return self._samples(holdout=False)

    @functools.cached_property
    def holdout_samples(self) -> tuple[Sample, ...]:
        return self._samples(holdout=True)

    def _samples(self, holdout: bool) -> tuple[Sample, ...]:
        wanted = [i for i in range(len(self.labels)) if (i in self.holdout) == holdout]
        return tuple(Sample(self.update_id, i, self.labels[i], archive=self.path, member=self.members[i]) for i in wanted)


def clean_label(label: str, max_length: int, name: str) -> str:
    """A label stripped of surrounding whitespace, or InvalidLabel saying what is wrong with it."""
    text = label.strip()
    if not text:
        raise InvalidLabel(f"{name}: label is empty")
    if len(text) > max_length:
        raise InvalidLabel(f"{name}: label is {len(text)} characters, over the limit of {max_length}")
    if not text.isprintable():
        raise InvalidLabel(f"{name}: label {text[:40]!r} has non-printable characters")
    return text


def fingerprint(images: Sequence[bytes], labels: Sequence[str]) -> str:
    """A digest of the payload: every image and label, in order."""
    digest = hashlib.sha256()
    for data, label in zip(images, labels, strict=True):
        digest.update(hashlib.sha256(data).digest())
        digest.update(hashlib.sha256(label.encode()).digest())
    return digest.hexdigest()


def split_holdout(seed: str, labels: Sequence[str], fraction: float, new_classes: Iterable[str]) -> set[int]:
    """Pick a stratified holdout: about `fraction` of each label, at least one of a new class with two or more.

    Seeded by the payload's fingerprint, so the same images and labels split the same way in every run.
    """
    if fraction <= 0:
        return set()
    rng = random.Random(seed)
    new = set(new_classes)
    chosen: set[int] = set()
    for label in dict.fromkeys(labels):
        members = [i for i, lab in enumerate(labels) if lab == label]
        count = math.floor(fraction * len(members) + 0.5)
        if label in new and len(members) >= 2:
            count = max(count, 1)
        count = min(count, len(members) - 1)  # keep one sample of every label to train on
        chosen.update(rng.sample(members, count))
    return chosen


def write_archive(file: BinaryIO, manifest: dict, images: Sequence[bytes]) -> None:
    """An update set's file: its images as stored members, then its manifest. Written straight
    into the file: no copy of the set is built in memory beside the images."""
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED) as archive:
        for i, data in enumerate(images):
            archive.writestr(f"{i:06d}", data)
        archive.writestr("manifest.json", json.dumps(manifest))


class SampleStore:
    """Update sets on disk under root, one zip file each."""

    def __init__(
        self,
        root: Path,
        max_image_pixels: int,
        max_label_length: int,
        holdout_fraction: float,
        max_request_pixels: int,
        decode_slots: int,
    ) -> None:
        self.root = root
        self.max_image_pixels = max_image_pixels
        self.max_request_pixels = max_request_pixels
        # Shared by every request validating a set: at most this many images decode at once.
        self._decode_slots = threading.BoundedSemaphore(decode_slots)
        self.max_label_length = max_label_length
        self.holdout_fraction = holdout_fraction
        self._cache: dict[str, tuple[UpdateSet, tuple[int, int] | None]] = {}
        self._ids: list[str] = []
        self._ids_version: int | None = None
        root.mkdir(parents=True, exist_ok=True)

    def path(self, update_id: str) -> Path:
        return self.root / f"{update_id}.zip"

    def validate(self, images: Sequence[bytes], labels: Sequence[str], names: Sequence[str]) -> list[str]:
        """Check every image and label; return the cleaned labels or raise naming the first bad item."""
        if not images:
            raise InvalidUpdate("an update set needs at least one image")
        if len(labels) != len(images):
            raise InvalidUpdate(f"got {len(images)} images but {len(labels)} labels; give one label per image, in order")
        check_pixel_budget(list(zip(names, images, strict=True)), self.max_image_pixels, self.max_request_pixels)
        for data, name in zip(images, names, strict=True):
            with self._decode_slots:
                decode_image(data, self.max_image_pixels, name)
        return [clean_label(label, self.max_label_length, name) for label, name in zip(labels, names, strict=True)]

    def add(
        self,
        images: Sequence[bytes],
        labels: Sequence[str],
        known_classes: Iterable[str] = (),
        idempotency_key: str | None = None,
        names: Sequence[str] | None = None,
        caller: str = "",
    ) -> tuple[UpdateSet, bool]:
        """Validate and store an update set; returns it and whether it is new.

        An idempotency key names the set within the caller's keys (caller: a digest of its API key,
        "" without keys). A second call with the same key and payload stores nothing and returns the
        set stored by the first; with another payload it raises IdempotencyConflict.
        """
        names = list(names) if names else [f"image {i}" for i in range(len(images))]
        labels = self.validate(images, labels, names)
        digest = fingerprint(images, labels)
        if idempotency_key is not None:
            scoped = f"{caller}\n{idempotency_key}" if caller else idempotency_key
            update_id = hashlib.sha256(scoped.encode()).hexdigest()[:32]
            if self.path(update_id).exists():
                return self.replayed(update_id, idempotency_key, digest), False
        else:
            update_id = uuid.uuid4().hex
        known = set(known_classes)
        new_classes = list(dict.fromkeys(label for label in labels if label not in known))
        manifest = {
            "update_id": update_id,
            "received_at": time.time(),
            "labels": labels,
            "names": names,
            "new_classes": new_classes,
            "fingerprint": digest,
            "holdout": sorted(split_holdout(digest, labels, self.holdout_fraction, new_classes)),
        }
        created = create_exclusive(self.path(update_id), lambda file: write_archive(file, manifest, images))
        if not created:  # a concurrent request with the same key stored it first
            return self.replayed(update_id, idempotency_key or "", digest), False
        return self.get(update_id), True

    def replayed(self, update_id: str, idempotency_key: str, digest: str) -> UpdateSet:
        """The set stored under an idempotency key, if this payload is the one it holds."""
        stored = self.get(update_id)
        if stored.fingerprint and stored.fingerprint != digest:
            raise IdempotencyConflict(
                f"Idempotency-Key {idempotency_key[:100]!r} was used for update set {update_id} with other images or "
                "labels; send new data under a new key"
            )
        return stored

    def get(self, update_id: str) -> UpdateSet:
        path = self.path(update_id)
        file = file_key(path)  # a file quarantined, or damaged, by another process is read again
        if update_id in self._cache and self._cache[update_id][1] == file:
            return self._cache[update_id][0]
        if not UPDATE_ID.match(update_id) or file is None:
            if UPDATE_ID.match(update_id) and self.quarantine_reason(update_id) is not None:
                raise CorruptUpdate(f"update set {update_id} is quarantined: {self.quarantine_reason(update_id)}")
            raise UnknownUpdate(f"no update set with id {update_id!r}")
        try:
            with zipfile.ZipFile(path) as archive:
                manifest = json.loads(archive.read("manifest.json"))
                members = image_members(archive, len(manifest["labels"]))
            update = UpdateSet(
                update_id=update_id,
                received_at=manifest["received_at"],
                labels=tuple(manifest["labels"]),
                holdout=frozenset(manifest["holdout"]),
                new_classes=tuple(manifest["new_classes"]),
                path=path,
                fingerprint=manifest.get("fingerprint", ""),
                members=members,
            )
        except (zipfile.BadZipFile, KeyError, TypeError, ValueError, OSError) as exc:
            raise self.quarantine(update_id, f"its file could not be read ({type(exc).__name__}: {exc})") from None
        self._cache[update_id] = update, file
        return update

    def quarantine(self, update_id: str, reason: str) -> CorruptUpdate:
        """Move an unreadable set's file aside (never delete it: it is accepted data) and say why."""
        folder = self.root / QUARANTINE
        folder.mkdir(exist_ok=True)
        (folder / f"{update_id}.reason").write_text(reason)
        with suppress(FileNotFoundError):  # another process moved it first
            os.replace(self.path(update_id), folder / f"{update_id}.zip")
        log.error("update set %s quarantined to %s: %s", update_id, folder, reason)
        return CorruptUpdate(f"update set {update_id} is quarantined: {reason}")

    def quarantine_reason(self, update_id: str) -> str | None:
        path = self.root / QUARANTINE / f"{update_id}.reason"
        return path.read_text() if path.exists() else None

    def quarantined(self) -> list[str]:
        return [p.stem for p in (self.root / QUARANTINE).glob("*.zip")]

    def ids(self) -> list[str]:
        """Ids of every stored update set (temporary files of unfinished writes are not sets)."""
        version = directory_version(self.root)
        if version is None or version != self._ids_version:  # listing 10,000 sets costs milliseconds: once per change
            self._ids = [n[:-4] for n in os.listdir(self.root) if n.endswith(".zip") and UPDATE_ID.match(n[:-4])]
            self._ids_version = version
        return list(self._ids)
