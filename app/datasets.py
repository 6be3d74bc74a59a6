"""Labelled image sources for ingest, the demo and the experiments: Debian's Fashion-MNIST
package, or a folder of class sub-folders (torchvision's ImageFolder layout)."""

from __future__ import annotations

import gzip
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class LabelledImages:
    """Encoded images grouped by class label."""

    by_class: dict[str, Sequence[bytes]]

    @property
    def classes(self) -> list[str]:
        return list(self.by_class)

    def take(self, label: str, count: int, rng: random.Random) -> list[bytes]:
        """count distinct images of one class, chosen at random (all of them if there are fewer)."""
        if label not in self.by_class:
            raise KeyError(f"no class {label!r}; classes are {', '.join(self.classes)}")
        pool = self.by_class[label]
        return rng.sample(pool, min(count, len(pool)))


def read_idx(path: Path) -> np.ndarray:
    """Read an (optionally gzipped) idx file of unsigned bytes, as MNIST ships them."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class PngView(Sequence[bytes]):
    """Arrays of pixels seen as PNG files, encoded only when read."""

    def __init__(self, arrays: np.ndarray) -> None:
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i):  # type: ignore[override]
        return encode_png(self.arrays[i])


def fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR) -> LabelledImages:
    """Fashion-MNIST from Debian's dataset-fashion-mnist package, each image as PNG bytes."""
    prefix = "train" if split == "train" else "t10k"
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise FileNotFoundError(f"{images_path} is missing: install Debian's dataset-fashion-mnist (make install does)")
    images = read_idx(images_path)
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return LabelledImages({name: PngView(images[labels == i]) for i, name in enumerate(FASHION_MNIST_CLASSES)})


def image_folder(root: Path) -> LabelledImages:
    """Images under root/<class>/..., the class being the sub-folder's name."""
    by_class = {
        d.name: [p.read_bytes() for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        for d in sorted(root.iterdir())
        if d.is_dir()
    }
    by_class = {label: images for label, images in by_class.items() if images}
    if not by_class:
        raise FileNotFoundError(f"{root} has no class sub-folders with images in them")
    return LabelledImages(by_class)


def load_source(source: str, split: str = "train") -> LabelledImages:
    """'fashion-mnist' or the path of an image folder."""
    return fashion_mnist(split) if source == "fashion-mnist" else image_folder(Path(source))
