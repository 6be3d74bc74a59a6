"""`warmtune experiment` end to end at a tiny size on generated images: CSV, plots and table agree."""

from __future__ import annotations

import csv
import re
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
from imagegen import image_tree

from app.datasets import image_folder
from app.errors import InvalidParameter
from worker.experiment import (
    POISON,
    STUDIES,
    Protocol,
    Row,
    corrupt,
    largest_served_drop,
    make_stream,
    matching_run,
    paired_difference,
    reference_setting,
    run_experiment,
)

TINY = Protocol(
    arch="resnet18",
    image_size=16,
    repeats=2,
    initial_classes=2,
    new_classes=2,
    initial_per_class=6,
    initial_epochs=2,
    set_size=4,
    sets_per_class=2,
    eval_per_class=3,
    device="cpu",
)


def test_experiment_writes_consistent_csv_plots_and_table(tmp_path: Path):
    data = image_folder(image_tree(tmp_path / "images", per_class=40))  # enough unused images for the poisoned sets
    out = tmp_path / "out"
    run_experiment(data, data, TINY, ["head", "gate"], out)

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    steps = TINY.new_classes * TINY.sets_per_class
    # the gate study's stream holds the poisoned sets besides the clean ones
    assert len(rows) == TINY.repeats * (len(STUDIES["head"]) * (steps + 1) + len(STUDIES["gate"]) * (steps + len(POISON) + 1))
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    assert {r["known_classes"] for r in rows if r["study"] == "head" and r["step"] == str(steps)} == {"4"}
    gate = [r for r in rows if r["study"] == "gate" and r["step"] != "0"]
    for setting in STUDIES["gate"]:
        for k in range(TINY.repeats):
            run = [r for r in gate if r["setting"] == setting.name and r["repeat"] == str(k)]
            assert sorted(float(r["wrong"]) for r in run if r["wrong"] != "0.0") == sorted(POISON)
            if not setting.service_loop:  # one decision per set: its status at the end is the one it got
                assert all(r["final_status"] == r["status"] for r in run)
    # every refusal names the check that made it; nothing else does
    assert all(bool(r["refused_by"]) == (r["status"] == "rejected") for r in gate)
    assert all(r["final_status"] in ("applied", "rejected") for r in gate)

    table = (out / "results.md").read_text()
    for study in ("head", "gate"):
        png = (out / f"{study}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        for setting in STUDIES[study]:
            runs = [
                [r for r in rows if r["study"] == study and r["setting"] == setting.name and r["repeat"] == str(k)]
                for k in range(TINY.repeats)
            ]
            final = [float(run[-1]["accuracy"]) for run in runs]
            line = next(row for row in table.splitlines() if row.startswith(f"| {setting.name} |"))
            assert re.search(rf"\| {statistics.fmean(final):.3f} ± {statistics.stdev(final):.3f} \|", line), line

    # the clean sets that ended rejected, beside them the paired difference from the reference
    def clean_rejected(setting: str) -> list[int]:
        return [
            sum(r["final_status"] == "rejected" and r["wrong"] == "0.0" for r in gate if r["setting"] == setting and r["repeat"] == str(k))
            for k in range(TINY.repeats)
        ]

    reference, loop = STUDIES["gate"][0].name, STUDIES["gate"][-1].name
    assert reference_setting("gate").name == reference
    lines = table.splitlines()
    columns = [c.strip() for c in next(row for row in lines if row.startswith("| setting |")).split("|")]
    at = columns.index("clean sets rejected at the end")
    row = lines.index(next(row for row in lines if row.startswith(f"| {loop} |")))
    counts = clean_rejected(loop)
    assert lines[row].split("|")[at].strip() == f"{statistics.fmean(counts):.3f} ± {statistics.stdev(counts):.3f}"
    assert lines[row + 1].startswith("| paired difference |")
    assert lines[row + 1].split("|")[at].strip() == paired_difference(counts, clean_rejected(reference))

    # a later run of another study lands beside these, in one CSV and table; a setting run before
    # from the same initial version (the defaults: head's mean rows, the batchnorm study's
    # reference) is read back, not run again: marked here to tell
    assert len({r["initial_model"] for r in rows if r["repeat"] == "0"}) == 1 and rows[0]["initial_model"]
    marked = [{**r, "accuracy": "0.123" if r["setting"] == "new rows: mean of old" else r["accuracy"]} for r in rows]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(marked)
    before = (out / "results.csv").read_text().splitlines()
    run_experiment(data, data, replace(TINY, repeats=1), ["batchnorm"], out)
    after = (out / "results.csv").read_text().splitlines()
    assert after[: len(before)] == before
    assert {r.split(",")[0] for r in after[1:]} == {"head", "gate", "batchnorm"}
    with open(out / "results.csv") as f:
        batchnorm = [r for r in csv.DictReader(f) if r["study"] == "batchnorm"]
    assert {r["accuracy"] for r in batchnorm if r["setting"] == "λ = 0.75, BatchNorm trained (default)"} == {"0.123"}
    assert len({r["accuracy"] for r in batchnorm if r["setting"] == "λ = 0.75, BatchNorm frozen"}) > 1
    table = (out / "results.md").read_text()
    assert "## gate\n\n2 repetition(s)." in table and "## batchnorm\n\n1 repetition(s)." in table
    with pytest.raises(InvalidParameter, match="another protocol"):
        run_experiment(data, data, replace(TINY, image_size=20), ["head"], out)


def test_poisoned_sets_label_a_known_class_as_another_without_touching_the_clean_stream(tmp_path: Path):
    data = image_folder(image_tree(tmp_path / "images", per_class=200))
    protocol = replace(TINY, set_size=10, sets_per_class=3)
    stream = make_stream(data, data, protocol, repeat=0)
    class_of = {image: c for c, images in data.by_class.items() for image in images}
    assert [c for c, _ in stream.update_sets] == [stream.new[0]] * 3 + [stream.new[1]] * 3  # the clean stream, unchanged
    clean = {image for _, images in stream.update_sets for image in images} | {i for i, _ in stream.initial_images}
    poisoned = [(after, s) for after, sets in sorted(stream.poisoned_sets.items()) for s in sets]
    assert [after for after, _ in poisoned] == [1, 2, 3, 3, 4, 5]  # spread evenly over the six clean sets
    assert [wrong for _, (_, _, wrong) in poisoned] == list(POISON)
    drawn = [image for _, (_, images, _) in poisoned for image in images]
    assert len(drawn) == len(set(drawn)) and not set(drawn) & clean  # fresh images only
    for after, (label, images, wrong) in poisoned:
        known = stream.initial + [c for c, _ in stream.update_sets[:after]]
        truth = [class_of[image] for image in images]
        assert label in known and set(truth) <= set(known)
        others = {c for c in truth if c != label}
        assert len(others) == 1  # one known class labelled as another
        assert sum(c != label for c in truth) == round(wrong * len(images))
    # the same stream for every study: the poisoned sets have their own random draws
    assert make_stream(data, data, protocol, repeat=0).update_sets == stream.update_sets


def test_label_noise_takes_fresh_images_for_every_set_of_a_class():
    pool = [bytes([i]) for i in range(30)]  # 30 % of ten sets of ten
    clean = [b"clean"] * 10
    for noise, k in ((0.1, 1), (0.3, 3)):
        used = [image for nth in range(10) for image in corrupt(clean, noise, pool, nth)[0][:k]]
        assert len(set(used)) == 10 * k  # before: 3 and 9 distinct images
        assert corrupt(clean, noise, pool, 0)[1] == k / 10


def test_the_largest_drop_counts_every_step_on_the_initial_classes():
    def row(step: int, initial: float, version: int, status: str) -> Row:
        # accuracy on the classes known so far falls as classes are added; the initial classes stay fixed
        return Row("gate", "s", 0, step, "c", 2 + step, 0.9 - 0.1 * step, initial, None, version, status, 0, 0.0)

    run = [row(0, 0.9, 1, "initial"), row(1, 0.8, 2, "applied"), row(2, 0.8, 2, "rejected"), row(3, 0.5, 3, "applied")]
    assert abs(largest_served_drop(run) - 0.3) < 1e-9  # version 2 -> 3 on the initial classes


def test_settings_are_compared_with_the_service_defaults_paired_by_repetition():
    assert reference_setting("lambda").replay_lambda == 0.75
    assert reference_setting("iterations").iterations == "update-size"
    assert reference_setting("batchnorm-naive").name == "λ = 0, BatchNorm trained"  # no defaults there: the first
    # differences 0.02, 0.04, 0.06: mean 0.04, sample SD 0.02, t(2) = 4.303, half-width 4.303 * 0.02 / sqrt(3)
    assert paired_difference([0.52, 0.54, 0.56], [0.5, 0.5, 0.5]) == "+0.040 (-0.010 to +0.090)"
    assert paired_difference([0.4], [0.5]) == "-0.100"
    assert paired_difference([0.4, 0.3], [0.5, 0.4]) == "-0.100 (the same in every repetition)"


def test_a_run_is_read_back_only_from_the_same_initial_version():
    def run(digest: str, start: float) -> list[Row]:
        return [
            Row("lambda", "λ = 1", 0, step, "", 5, start if step == 0 else 0.5, start, None, 1, "applied", 9, 1.0, initial_model=digest)
            for step in range(3)
        ]

    other_machine, this_one, older = run("aaaa", 0.688), run("bbbb", 0.692), run("", 0.692)
    assert matching_run([other_machine, this_one], "bbbb", 0.692) is this_one
    assert matching_run([other_machine], "bbbb", 0.688) is None  # the digest decides where there is one
    # rows written before the digest was kept: by the accuracy at step 0
    assert matching_run([older], "bbbb", 0.692) is older
    assert matching_run([older], "bbbb", 0.688) is None
