"""The CLI on real data: Debian's Fashion-MNIST, ingested and learned by `warmtune update`."""

import os
import re
import subprocess
import sys

from app.settings import Settings


def warmtune(*args: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def holdout_all(line: str) -> float:
    return float(re.search(r"all (\d\.\d+)", line).group(1))


def test_help_lists_every_setting():
    out = warmtune("--help", env={})
    for name in Settings.model_fields:
        assert f"WARMTUNE_{name.upper()}" in out


def test_ingest_and_update_learn_fashion_mnist(tmp_path):
    env = {"WARMTUNE_HOME": str(tmp_path), "WARMTUNE_ARCH": "resnet18", "WARMTUNE_IMAGE_SIZE": "32", "WARMTUNE_SEED": "0",
           "WARMTUNE_BATCH_SIZE": "32"}
    warmtune("ingest", "--classes", "Trouser,Bag", "--per-class", "50", "--seed", "1", env=env)
    [first] = warmtune("update", env=env).splitlines()
    assert "version 1" in first and "2 classes" in first
    assert holdout_all(first) >= 0.8  # chance is 0.5

    out = warmtune("ingest", "--classes", "Sneaker", "--per-class", "40", "--set-size", "10", "--seed", "2", env=env)
    assert out.count("stored update set") == 4 and "new classes ['Sneaker']" in out
    [second] = warmtune("update", env=env).splitlines()
    assert "applied  4 set(s) -> version 2" in second and "3 classes" in second
    assert holdout_all(second) >= 0.6  # chance is 0.33
