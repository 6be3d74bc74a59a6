"""`warmtune demo` for real at a tiny size: an embedded server fed and queried over HTTP."""

from __future__ import annotations

from pathlib import Path

from conftest import FAST
from imagegen import image_tree

from app.demo import demo_settings, run_demo
from app.settings import Settings
from worker.jobs import apply_pending_updates


def test_demo_streams_sets_and_the_client_sees_every_version(tmp_path: Path, capsys):
    data = image_tree(tmp_path / "images", classes=3, per_class=16)
    settings = demo_settings(Settings(**{**FAST, "image_size": 16}), tmp_path / "home")
    tally = run_demo(settings, apply_pending_updates, str(data), initial_classes=2, new_classes=1, per_class=8, set_size=8)
    out = capsys.readouterr().out
    assert tally.failures == 0
    assert "version 1:  2 classes" in out and "client accuracy" in out and "label-to-serve" in out
    assert max(tally.total) >= 2 and all(tally.total[v] > 0 for v in tally.first_seen)
    assert (tmp_path / "home" / "snapshots" / "POINTER").exists()
