"""A class-relative nearest-mean test, replayed on the counts the stream benchmark recorded.

The service's nearest-mean test (worker/gate.py: check_nearest) refuses a set when at most a
fixed share of its images of a known label lie nearest that label's stored images. A look-alike
class (Shirt beside T-shirt/top) may sit that low when its set is clean. The rule tried here also
asks whether the share is improbably low for that class: a beta-binomial test of the set's count
against the counts of the label's earlier applied sets of the same run (read before training on
them: unseen images then), refused only under alpha, and judged by the fixed share alone
while the record holds fewer than `least` images.

It reads the committed results (`set_log` of each run, whose attempts keep the counts each check
read) and counts, at each set's first check, the clean and poisoned sets each rule refuses. A
replay, not a rerun: a different decision would have changed the later models and counts.

    warmtune bench nearest-record bench/results/nearest/*/stream-*.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.stream import answers_of
from worker.gate import beta_binomial_cdf, check_nearest


@dataclass(frozen=True)
class LabelCheck:
    own: int  # images nearest the label's own mean
    images: int
    record_own: int  # the same, summed over the label's earlier applied sets in the run
    record_images: int


@dataclass(frozen=True)
class FirstCheck:
    """The first check that read a set (as bench.stream's sweep counts them), label by label."""

    poisoned: bool
    counts: dict[str, dict[str, int]]
    labels: dict[str, LabelCheck]


def first_checks(set_log: list[dict]) -> list[FirstCheck]:
    """Each set's first nearest-mean check, with each judged label's record so far: the counts of
    its applied sets' checks, which read images the version had not trained on."""
    checks: list[FirstCheck] = []
    own_record: Counter[str] = Counter()
    size_record: Counter[str] = Counter()
    for entry in set_log:
        read = [(a, c) for a, c in zip(entry["attempts"], entry.get("nearest_means") or [], strict=False) if c]
        if read:
            counts = read[0][1]
            labels = {
                label: LabelCheck(by_class.get(label, 0), sum(by_class.values()), own_record[label], size_record[label])
                for label, by_class in counts.items()
            }
            checks.append(FirstCheck(entry["kind"] == "poisoned", counts, labels))
        for attempt, counts in read:
            if attempt.startswith("applied"):
                for label, by_class in counts.items():
                    own_record[label] += by_class.get(label, 0)
                    size_record[label] += sum(by_class.values())
    return checks


def refused(check: FirstCheck, share: float, alpha: float | None, least: int) -> bool:
    """The service's rule at this share; with alpha, a label it refuses must also sit improbably
    low for its class (once its record holds `least` images)."""
    for label, seen in check.labels.items():
        if check_nearest(answers_of({label: check.counts[label]}), share).passed:
            continue
        if alpha is None or seen.record_images < least:
            return True
        if beta_binomial_cdf(seen.own, seen.images, seen.record_own, seen.record_images) < alpha:
            return True
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="warmtune bench nearest-record", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="stream benchmark JSON files")
    parser.add_argument("--least", type=int, default=10, help="record images before the class-relative test applies")
    args = parser.parse_args(argv)
    runs = [run for path in args.results for run in json.loads(path.read_text())["runs"].values()]
    per_run = [first_checks(run["set_log"]) for run in runs]
    checks = [c for run in per_run for c in run]
    clean, poisoned = sum(not c.poisoned for c in checks), sum(c.poisoned for c in checks)
    read = sum(bool(run) for run in per_run)
    print(f"{read} of {len(runs)} runs kept the counts: the first checks of {clean} clean and {poisoned} poisoned sets")
    print("| share | alpha | clean refused | poisoned refused |\n| --- | --- | --- | --- |")
    for share in (0.2, 0.3, 0.4, 0.5):
        for alpha in (None, 0.01, 0.05):
            hit = Counter(c.poisoned for c in checks if refused(c, share, alpha, args.least))
            print(f"| {share:g} | {'fixed share only' if alpha is None else alpha} | {hit[False]} of {clean} | {hit[True]} of {poisoned} |")


if __name__ == "__main__":
    main()
