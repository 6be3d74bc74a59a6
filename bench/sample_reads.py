"""The replay reads of one short fine-tune: Sample.read against opening the set's zip for each read.

A short fine-tune of |U_t| = 10 draws 9 batches of 64 samples, most of them from the replay
memory, each one image read from its update set's zip. The baseline opens the zip for every
read (zipfile parses the whole central directory on opening); Sample.read reads the image at
the offset its set's directory gave when the set was loaded. Both read the same draws from
the same stored sets, interleaved in one process: one set of `--size` images, and a history
of `--sets` sets of 10 (draws across a thousand sets defeat keeping zips open).

    warmtune bench sample-reads --size 1000 --sets 1000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

from app.samples import Sample, image_members, write_archive

READS = 9 * 64  # one short fine-tune at |U_t| = 10 (9 training images) and batches of 64


def store_set(path: Path, size: int, image_bytes: int) -> list[Sample]:
    with open(path, "wb") as f:
        write_archive(f, {"images": size}, [os.urandom(image_bytes) for _ in range(size)])
    with zipfile.ZipFile(path) as archive:
        members = image_members(archive, size)
    return [Sample(path.stem, i, "label", archive=path, member=m) for i, m in enumerate(members)]


def open_per_read(draws: list[Sample]) -> None:
    for sample in draws:
        with zipfile.ZipFile(sample.archive) as archive:
            archive.read(f"{sample.index:06d}")


def sample_reads(draws: list[Sample]) -> None:
    for sample in draws:
        sample.read()


def median_seconds(draws: list[Sample], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"open per read": [], "Sample.read": []}
    for _ in range(repeats):
        for name, read in (("open per read", open_per_read), ("Sample.read", sample_reads)):
            start = time.perf_counter()
            read(draws)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1000, help="images in the one large set")
    parser.add_argument("--sets", type=int, default=1000, help="sets of 10 images in the history")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-bytes", type=int, default=800, help="a 28x28 Fashion-MNIST PNG is about this size")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rng = random.Random(0)
    rows = []
    print(f"{READS} reads (median of {args.repeats}, interleaved)")
    print(f"{'stored':>24} {'open per read':>14} {'Sample.read':>12} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as scratch:
        one = store_set(Path(scratch) / "one.zip", args.size, args.image_bytes)
        history = [s for k in range(args.sets) for s in store_set(Path(scratch) / f"set-{k}.zip", 10, args.image_bytes)]
        for name, memory in ((f"1 set of {args.size}", one), (f"{args.sets} sets of 10", history)):
            seconds = median_seconds([rng.choice(memory) for _ in range(READS)], args.repeats)
            base, ours = seconds["open per read"], seconds["Sample.read"]
            rows.append({"stored": name, "reads": READS, "seconds": seconds, "ratio": base / ours})
            print(f"{name:>24} {base * 1000:>11.1f} ms {ours * 1000:>9.1f} ms {base / ours:>6.1f}x")
    if args.out:
        args.out.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
