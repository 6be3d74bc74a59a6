"""bench/predict.py's summary over runs (the runs themselves need wrk and LitServe: `make bench`)."""

import json
from pathlib import Path

import pytest

from bench.predict import summarise


def run_file(path: Path, x_bare: float, x_peer: float, ours_p99: float, peer_p99: float) -> Path:
    point = lambda p99: {"8": {"p99_ms": 1.0}, "32": {"p99_ms": p99}}  # noqa: E731
    run = {"ratio_to_bare_best": x_bare, "ratio_to_peer": x_peer, "peer": "LitServe, batch timeout 0 s"}
    run["service"] = {"warmtune": point(ours_p99), "LitServe, batch timeout 0 s": point(peer_p99)}
    path.write_text(json.dumps(run))
    return path


def test_runs_are_summarised_at_the_highest_concurrency_with_an_interval(tmp_path: Path):
    files = [run_file(tmp_path / "a.json", 0.7, 1.1, 80.0, 100.0), run_file(tmp_path / "b.json", 0.9, 1.3, 90.0, 80.0)]
    summary = summarise(files)
    assert summary["x_bare"]["mean"] == pytest.approx(0.8) and summary["x_peer"]["mean"] == pytest.approx(1.2)
    assert summary["p99_minus_peer_ms"]["mean"] == pytest.approx(-5.0)  # -20 and +10 at concurrency 32, not 8
    assert summary["x_bare"]["low"] < 0.7 and summary["x_bare"]["high"] > 0.9  # two runs: a wide interval
