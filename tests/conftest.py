from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from app.settings import Settings  # noqa: E402

# A small, fast configuration: ResNet-18 at 32 pixels learns the generated colour classes
# in a handful of iterations on a CPU.
FAST = {
    "arch": "resnet18",
    "image_size": 32,
    "seed": 0,
    "device": "cpu",
    "batch_size": 32,
    "bootstrap_max_epochs": 20,
    "bootstrap_patience": 10,
}


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        values = {"home": tmp_path / "home", **FAST, **overrides}
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()
