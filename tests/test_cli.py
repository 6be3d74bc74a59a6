"""The CLI on real data: Debian's Fashion-MNIST, ingested and learned by `warmtune update`."""

import importlib
import inspect
import os
import random
import re
import subprocess
import sys
from pathlib import Path

from app.cli import BENCHMARKS
from app.datasets import fashion_mnist
from app.settings import Settings
from app.stores import Stores


def warmtune(*args: str, env: dict[str, str], code: int = 0) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=600
    )
    assert result.returncode == code, result.stdout + result.stderr
    return result.stdout + (result.stderr if code == 2 else "")  # 2: a refusal, said on stderr


def holdout_all(line: str) -> float:
    return float(re.search(r"all (\d\.\d+)", line).group(1))


def test_the_readme_documents_every_setting_with_its_default():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        assert f"| `WARMTUNE_{name.upper()}` | `{default}` |" in readme, name


def test_ingest_and_update_learn_fashion_mnist(tmp_path):
    env = {
        "WARMTUNE_HOME": str(tmp_path),
        "WARMTUNE_ARCH": "resnet18",
        "WARMTUNE_IMAGE_SIZE": "32",
        "WARMTUNE_SEED": "0",
        "WARMTUNE_BATCH_SIZE": "32",
    }
    warmtune("ingest", "--classes", "Trouser,Bag", "--per-class", "50", "--seed", "1", env=env)
    [first] = warmtune("update", env=env).splitlines()
    assert "version 1" in first and "2 classes" in first
    assert holdout_all(first) >= 0.8  # chance is 0.5

    out = warmtune("ingest", "--classes", "Sneaker", "--per-class", "40", "--set-size", "10", "--seed", "2", env=env)
    assert out.count("stored update set") == 4 and "new classes ['Sneaker']" in out
    [second] = warmtune("update", env=env).splitlines()
    assert "applied  4 set(s) -> version 2" in second and "3 classes" in second
    assert holdout_all(second) >= 0.6  # chance is 0.33

    # trousers labelled Bag: refused, retried from the command line, refused again
    stores = Stores(Settings(home=tmp_path))
    trousers = fashion_mnist("test").take("Trouser", 20, random.Random(3))
    slip, _ = stores.samples.add(trousers, ["Bag"] * 20, known_classes=["Trouser", "Bag", "Sneaker"])
    [refused] = warmtune("update", env=env, code=1).splitlines()
    assert refused.startswith("rejected 1 set(s)") and "labels contradict the current version" in refused and "'Bag'" in refused
    assert "queued " + slip.update_id in warmtune("retry", slip.update_id, env=env)
    assert stores.status(slip.update_id).status == "queued"
    warmtune("update", env=env, code=1)
    assert [a.status for a in stores.status(slip.update_id).attempts] == ["rejected", "requeued", "rejected"]
    applied = stores.snapshots.meta(1).update_ids[0]
    assert "is applied; only rejected, failed, orphaned sets can be retried" in warmtune("retry", applied, env=env, code=2)


def test_serve_sets_the_gil_switch_interval_before_the_server_starts(tmp_path, monkeypatch):
    import uvicorn
    from PIL import Image

    from app.cli import main
    from app.settings import get_settings

    seen = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: seen.append(sys.getswitchinterval()))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # serve sets it too; restored after
    monkeypatch.setenv("WARMTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WARMTUNE_GIL_SWITCH_INTERVAL_MS", "0.5")
    default = sys.getswitchinterval()
    get_settings.cache_clear()  # read the environment above, not an earlier test's
    try:
        assert main(["serve", "--port", "1"]) == 0
    finally:
        sys.setswitchinterval(default)
        get_settings.cache_clear()
    assert seen == [0.0005]


def test_every_benchmark_takes_its_flags_from_the_command_line():
    # `warmtune bench NAME ...` hands the flags after the name to the module's main.
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "sample-reads", "--size", "10", "--sets", "2", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "576 reads (median of 1" in out.stdout and "2 sets of 10" in out.stdout
    for name, module in BENCHMARKS.items():
        assert "argv" in inspect.signature(importlib.import_module(module).main).parameters, name
