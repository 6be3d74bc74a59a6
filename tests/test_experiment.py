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
from worker.experiment import STUDIES, Protocol, Row, corrupt, largest_served_drop, paired_difference, reference_setting, run_experiment

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
    data = image_folder(image_tree(tmp_path / "images"))
    out = tmp_path / "out"
    run_experiment(data, data, TINY, ["noise", "gate"], out)

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    steps = TINY.new_classes * TINY.sets_per_class
    settings = STUDIES["noise"] + STUDIES["gate"]
    assert len(rows) == len(settings) * TINY.repeats * (steps + 1)
    assert {r["step"] for r in rows} == {str(s) for s in range(steps + 1)}
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    assert {r["known_classes"] for r in rows if r["step"] == str(steps)} == {"4"}

    # settings that are the same run appear in both studies with the same numbers
    def series(study: str, setting: str) -> list[str]:
        return [r["accuracy"] for r in rows if r["study"] == study and r["setting"] == setting]

    assert series("noise", "30% noise") == series("gate", "30% noise, gate off")

    table = (out / "results.md").read_text()
    for study in ("noise", "gate"):
        png = (out / f"{study}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        for setting in STUDIES[study]:
            final = [float(r["accuracy"]) for r in rows if r["study"] == study and r["setting"] == setting.name and r["step"] == str(steps)]
            line = next(row for row in table.splitlines() if row.startswith(f"| {setting.name} |"))
            assert re.search(rf"\| {statistics.fmean(final):.3f} ± {statistics.stdev(final):.3f} \|", line), line
    lines = table.splitlines()
    gate_on = lines.index(next(row for row in lines if row.startswith("| 30% noise, gate on |")))
    rejected = [
        sum(r["status"] == "rejected" for r in rows if r["setting"] == "30% noise, gate on" and r["repeat"] == str(k)) for k in range(2)
    ]
    assert lines[gate_on].endswith(f" {statistics.fmean(rejected):.3f} ± {statistics.stdev(rejected):.3f} |")
    # beside it, paired with gate off (the study's reference: the noise setting without the gate)
    off = [
        sum(r["status"] == "rejected" for r in rows if r["setting"] == "30% noise, gate off" and r["repeat"] == str(k)) for k in range(2)
    ]
    assert lines[gate_on + 1].startswith("| paired difference |")
    assert lines[gate_on + 1].endswith(f" | {paired_difference(rejected, off)} |")

    # a later run of another study lands beside these, in one CSV and table; a setting run before
    # (no noise: the defaults, as head's mean rows) is read back, not run again: marked here to tell
    marked = [{**r, "accuracy": "0.123" if r["setting"] == "0% noise" else r["accuracy"]} for r in rows]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(marked)
    before = (out / "results.csv").read_text().splitlines()
    run_experiment(data, data, replace(TINY, repeats=1), ["head"], out)
    after = (out / "results.csv").read_text().splitlines()
    assert after[: len(before)] == before
    assert {r.split(",")[0] for r in after[1:]} == {"noise", "gate", "head"}
    with open(out / "results.csv") as f:
        head = [r for r in csv.DictReader(f) if r["study"] == "head"]
    assert {r["accuracy"] for r in head if r["setting"] == "new rows: mean of old"} == {"0.123"}
    assert len({r["accuracy"] for r in head if r["setting"] == "new rows: random init"}) > 1
    table = (out / "results.md").read_text()
    assert "## gate\n\n2 repetition(s)." in table and "## head\n\n1 repetition(s)." in table
    with pytest.raises(InvalidParameter, match="another protocol"):
        run_experiment(data, data, replace(TINY, image_size=20), ["head"], out)


def test_label_noise_takes_fresh_images_for_every_set_of_a_class():
    pool = [bytes([i]) for i in range(30)]  # 30 % of ten sets of ten
    clean = [b"clean"] * 10
    for noise, k in ((0.1, 1), (0.3, 3)):
        used = [image for nth in range(10) for image in corrupt(clean, noise, pool, nth)[:k]]
        assert len(set(used)) == 10 * k  # before: 3 and 9 distinct images


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
