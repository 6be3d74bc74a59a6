"""The replay reads of one short fine-tune: Sample.read against opening the set's zip for each read.

A short fine-tune of |U_t| = 10 draws 9 batches of 64 samples, most of them from the replay
memory, each one image read from its update set's zip. The baseline opens the zip for every
read, as Sample.read did before (zipfile parses the whole central directory on opening), on
the same stored sets and the same draws, interleaved in one process.

    warmtune bench sample-reads --sizes 10,240,1000 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

from app.samples import Sample, write_archive

READS = 9 * 64  # one short fine-tune at |U_t| = 10 (9 training images) and batches of 64


def open_per_read(path: Path, indices: list[int]) -> None:
    for i in indices:
        with zipfile.ZipFile(path) as archive:
            archive.read(f"{i:06d}")


def sample_reads(path: Path, indices: list[int]) -> None:
    for i in indices:
        Sample("bench", i, "label", archive=path).read()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,240,1000", help="images per update set, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-bytes", type=int, default=800, help="a 28x28 Fashion-MNIST PNG is about this size")
    args = parser.parse_args(argv)
    rng = random.Random(0)
    print(f"{READS} reads from one update set (median of {args.repeats}, interleaved)")
    print(f"{'images in the set':>18} {'open per read':>14} {'Sample.read':>12} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as scratch:
        for size in (int(s) for s in args.sizes.split(",")):
            path = Path(scratch) / f"set-{size}.zip"
            with open(path, "wb") as f:
                write_archive(f, {"images": size}, [os.urandom(args.image_bytes) for _ in range(size)])
            indices = [rng.randrange(size) for _ in range(READS)]
            times: dict[str, list[float]] = {"open per read": [], "Sample.read": []}
            for _ in range(args.repeats):
                for name, read in (("open per read", open_per_read), ("Sample.read", sample_reads)):
                    start = time.perf_counter()
                    read(path, indices)
                    times[name].append(time.perf_counter() - start)
            base, ours = (statistics.median(t) for t in times.values())
            print(f"{size:>18} {base * 1000:>11.1f} ms {ours * 1000:>9.1f} ms {base / ours:>6.0f}x")


if __name__ == "__main__":
    main()
