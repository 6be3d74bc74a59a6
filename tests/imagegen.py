"""Small generated images for tests: each class is a colour, with noise and a random patch."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (200, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 60, 200),
    "yellow": (220, 210, 40),
    "purple": (140, 40, 160),
}


def make_image(label: str, rng: random.Random, size: int = 32, fmt: str = "PNG") -> bytes:
    """An image of a class: its colour under noise, with a patch of another colour."""
    base = np.array(COLOURS[label], dtype=np.float32)
    noise = np.array([[rng.gauss(0, 25) for _ in range(3)] for _ in range(size * size)], dtype=np.float32)
    pixels = np.clip(base + noise.reshape(size, size, 3), 0, 255).astype(np.uint8)
    x, y, w = rng.randrange(size // 2), rng.randrange(size // 2), rng.randrange(3, size // 3)
    pixels[y : y + w, x : x + w] = [rng.randrange(256) for _ in range(3)]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def make_set(counts: dict[str, int], seed: int = 0, size: int = 32) -> tuple[list[bytes], list[str]]:
    """Images and labels, shuffled: counts maps a class to how many images of it."""
    rng = random.Random(seed)
    pairs = [(make_image(label, rng, size), label) for label, n in counts.items() for _ in range(n)]
    rng.shuffle(pairs)
    return [p[0] for p in pairs], [p[1] for p in pairs]


def poisoned_set(image_class: str, label: str, count: int, seed: int = 0, size: int = 32) -> tuple[list[bytes], list[str]]:
    """Images of one class all labelled as another."""
    rng = random.Random(seed)
    return [make_image(image_class, rng, size) for _ in range(count)], [label] * count


def image_tree(root: Path, classes: int = 4, per_class: int = 20, size: int = 16) -> Path:
    """A folder of class sub-folders of generated PNGs (torchvision's ImageFolder layout)."""
    rng = random.Random(0)
    for colour in list(COLOURS)[:classes]:
        (root / colour).mkdir(parents=True)
        for i in range(per_class):
            (root / colour / f"{i}.png").write_bytes(make_image(colour, rng, size=size))
    return root
