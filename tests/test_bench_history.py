import json

import pytest

from bench.history import main, step_ratio


def write_run(path, seconds_at):
    rows = [{"history": n, "step": i, "seconds": s} for n, steps in seconds_at.items() for i, s in enumerate(steps)]
    path.write_text(json.dumps({"rows": rows}))
    return path


def test_a_runs_ratio_is_its_largest_historys_median_step_over_its_smallests(tmp_path):
    run = write_run(tmp_path / "a.json", {10: [1.0, 9.0, 2.0], 100: [5.0], 1000: [2.4, 3.0, 0.1]})
    assert step_ratio(run) == 2.4 / 2.0


def test_a_run_cut_short_is_named_not_averaged_in(tmp_path):
    run = write_run(tmp_path / "cut.json", {10: [1.0], 100: [1.1]})
    with pytest.raises(SystemExit, match=r"cut.json has no steps at \[1000\] applied sets"):
        step_ratio(run)


def test_ratios_report_the_mean_and_the_paired_differences(tmp_path, capsys):
    new = [write_run(tmp_path / f"new{i}.json", {10: [1.0], 1000: [r]}) for i, r in enumerate((1.1, 1.2, 1.3))]
    old = [write_run(tmp_path / f"old{i}.json", {10: [1.0], 1000: [r]}) for i, r in enumerate((1.3, 1.5, 1.4))]
    assert [round(r, 6) for r in main(["--ratios", *map(str, new), "--paired-with", *map(str, old)])] == [1.1, 1.2, 1.3]
    out = capsys.readouterr().out
    assert "3 runs: mean 1.200x" in out
    assert "paired with 3 other runs: difference -0.200" in out
