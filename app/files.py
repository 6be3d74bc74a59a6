"""Durable, atomic file writes: a reader sees the old content or the new, never a torn file."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

# What a file gets: bytes, or a function that writes them into it (a large file is never whole in memory).
Content = bytes | Callable[[BinaryIO], object]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in this directory survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(directory: Path, data: Content, prefix: str = ".tmp-") -> Path:
    """Write data to a new fsynced temporary file in directory and return its path."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=prefix)
    try:
        with os.fdopen(fd, "w+b") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace path with data atomically and durably."""
    tmp = write_temp(path.parent, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def create_exclusive(path: Path, data: Content) -> bool:
    """Create path with data atomically; False, and nothing written, if it already exists."""
    tmp = write_temp(path.parent, data)
    try:
        os.link(tmp, path)  # unlike rename, link never replaces an existing file
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# Directory mtimes move in steps of a filesystem's timestamp resolution (1 ns on ext4 and tmpfs,
# up to seconds elsewhere): a directory changed more recently than this may change again
# without its mtime moving, so a cache must not trust it yet (git's "racy index" rule).
RACY_NS = 2_000_000_000


def directory_version(path: Path) -> int | None:
    """A directory's mtime in ns, to key a cache of its listing; None while it is too fresh to trust."""
    changed = path.stat().st_mtime_ns
    return None if time.time_ns() - changed < RACY_NS else changed


def file_key(path: Path) -> tuple[int, int] | None:
    """A file's size and mtime, or None if it is not there."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns
